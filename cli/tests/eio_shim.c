/* LD_PRELOAD shim for tests: reads of one file that touch one byte range fail with EIO.
 *
 *   QDIRTY_EIO_FILE   the file (its real path; every descriptor open on it is affected)
 *   QDIRTY_EIO_START  first byte of the failing range (decimal)
 *   QDIRTY_EIO_END    end of the failing range, exclusive (decimal)
 *   QDIRTY_EIO_LOG    optional: a file to which each failed read appends one line
 *
 * pread, pread64, preadv, preadv64, preadv2, preadv64v2 and the fortified __pread_chk /
 * __pread64_chk are covered: QEMU reads through a thread pool with preadv or pread, Rust's
 * std with pread64. Everything else passes through. Build: cc -shared -fPIC -o eio.so
 * eio_shim.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int hits(int fd, off_t offset, size_t len) {
    const char *file = getenv("QDIRTY_EIO_FILE");
    const char *s = getenv("QDIRTY_EIO_START");
    const char *e = getenv("QDIRTY_EIO_END");
    if (!file || !s || !e || len == 0 || offset < 0) {
        return 0;
    }
    unsigned long long start = strtoull(s, NULL, 10), end = strtoull(e, NULL, 10);
    unsigned long long first = (unsigned long long)offset, stop = first + len;
    if (stop <= start || first >= end) {
        return 0;
    }
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) {
        return 0;
    }
    path[n] = 0;
    if (strcmp(path, file) != 0) {
        return 0;
    }
    const char *log = getenv("QDIRTY_EIO_LOG");
    if (log) {
        int saved = errno;
        FILE *f = fopen(log, "a");
        if (f) {
            fprintf(f, "EIO %s %llu +%zu\n", path, first, len);
            fclose(f);
        }
        errno = saved;
    }
    return 1;
}

static size_t iov_len(const struct iovec *iov, int cnt) {
    size_t n = 0;
    for (int i = 0; i < cnt; i++) {
        n += iov[i].iov_len;
    }
    return n;
}

#define REAL(name, ret, ...)                                                                 \
    static ret (*real)(__VA_ARGS__);                                                         \
    if (!real) {                                                                             \
        real = (ret(*)(__VA_ARGS__))dlsym(RTLD_NEXT, name);                                  \
    }

ssize_t pread(int fd, void *buf, size_t count, off_t offset) {
    REAL("pread", ssize_t, int, void *, size_t, off_t);
    if (hits(fd, offset, count)) {
        errno = EIO;
        return -1;
    }
    return real(fd, buf, count, offset);
}

ssize_t pread64(int fd, void *buf, size_t count, off_t offset) {
    REAL("pread64", ssize_t, int, void *, size_t, off_t);
    if (hits(fd, offset, count)) {
        errno = EIO;
        return -1;
    }
    return real(fd, buf, count, offset);
}

ssize_t __pread_chk(int fd, void *buf, size_t count, off_t offset, size_t buflen) {
    REAL("__pread_chk", ssize_t, int, void *, size_t, off_t, size_t);
    if (hits(fd, offset, count)) {
        errno = EIO;
        return -1;
    }
    return real(fd, buf, count, offset, buflen);
}

ssize_t __pread64_chk(int fd, void *buf, size_t count, off_t offset, size_t buflen) {
    REAL("__pread64_chk", ssize_t, int, void *, size_t, off_t, size_t);
    if (hits(fd, offset, count)) {
        errno = EIO;
        return -1;
    }
    return real(fd, buf, count, offset, buflen);
}

ssize_t preadv(int fd, const struct iovec *iov, int cnt, off_t offset) {
    REAL("preadv", ssize_t, int, const struct iovec *, int, off_t);
    if (hits(fd, offset, iov_len(iov, cnt))) {
        errno = EIO;
        return -1;
    }
    return real(fd, iov, cnt, offset);
}

ssize_t preadv64(int fd, const struct iovec *iov, int cnt, off_t offset) {
    REAL("preadv64", ssize_t, int, const struct iovec *, int, off_t);
    if (hits(fd, offset, iov_len(iov, cnt))) {
        errno = EIO;
        return -1;
    }
    return real(fd, iov, cnt, offset);
}

ssize_t preadv2(int fd, const struct iovec *iov, int cnt, off_t offset, int flags) {
    REAL("preadv2", ssize_t, int, const struct iovec *, int, off_t, int);
    if (hits(fd, offset, iov_len(iov, cnt))) {
        errno = EIO;
        return -1;
    }
    return real(fd, iov, cnt, offset, flags);
}

ssize_t preadv64v2(int fd, const struct iovec *iov, int cnt, off_t offset, int flags) {
    REAL("preadv64v2", ssize_t, int, const struct iovec *, int, off_t, int);
    if (hits(fd, offset, iov_len(iov, cnt))) {
        errno = EIO;
        return -1;
    }
    return real(fd, iov, cnt, offset, flags);
}
