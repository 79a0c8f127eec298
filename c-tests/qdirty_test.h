/*
 * A tiny test harness for the qdirty C tests: checks record file:line and keep going; main.c
 * prints "N passed, N failed" and exits non-zero on any failure.
 */
#ifndef QDIRTY_TEST_H
#define QDIRTY_TEST_H

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qdirty.h"

extern int qt_passed;
extern int qt_failed;

/* Records one check. */
static inline bool qt_record(bool ok, const char *file, int line, const char *fmt, ...)
{
    if (ok) {
        qt_passed++;
    } else {
        va_list ap;
        qt_failed++;
        fprintf(stderr, "%s:%d: FAILED: ", file, line);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
    }
    return ok;
}

/* Checks the error left in *errp by a call that should have succeeded (expected == 0) or failed
 * with -expected; frees it and resets *errp to NULL. */
static inline bool qt_check_err(const char *file, int line, const char *expr, bool failed,
                                int expected, qdirty_error **errp)
{
    qdirty_error *err = *errp;
    bool ok;
    if (expected == 0) {
        ok = qt_record(!failed && err == NULL, file, line, "%s: expected success, got %s%s", expr,
                       err ? "error: " : "a failure without error",
                       err ? qdirty_error_message(err) : "");
    } else {
        const char *msg = err ? qdirty_error_message(err) : NULL;
        ok = qt_record(failed && err != NULL && qdirty_error_errno(err) == expected && msg != NULL &&
                           msg[0] != '\0',
                       file, line, "%s: expected failure with errno %d (%s), got %s (errno %d: %s)",
                       expr, expected, strerror(expected), failed ? "a failure" : "success",
                       err ? qdirty_error_errno(err) : 0, msg ? msg : "(no error)");
    }
    qdirty_error_free(err);
    *errp = NULL;
    return ok;
}

static inline bool qt_check_rc(const char *file, int line, const char *expr, int rc, int expected,
                               qdirty_error **errp)
{
    bool ok = qt_record(rc == -expected, file, line, "%s returned %d, expected %d", expr, rc,
                        -expected);
    return qt_check_err(file, line, expr, rc != 0, expected, errp) && ok;
}

static inline void *qt_check_ptr(const char *file, int line, const char *expr, void *p,
                                 int expected, qdirty_error **errp)
{
    qt_record(expected == 0 ? p != NULL : p == NULL, file, line, "%s returned %p, expected %s",
              expr, p, expected == 0 ? "an object" : "NULL");
    qt_check_err(file, line, expr, p == NULL, expected, errp);
    return p;
}

/* CHECK(cond): a plain condition. */
#define CHECK(cond) qt_record((cond), __FILE__, __LINE__, "%s", #cond)
/* CHECK_EQ_U64(a, b): two unsigned integers, printed on failure. */
#define CHECK_EQ_U64(a, b)                                                                   \
    qt_record((uint64_t)(a) == (uint64_t)(b), __FILE__, __LINE__, "%s == %s (%llu != %llu)", \
              #a, #b, (unsigned long long)(a), (unsigned long long)(b))
/* CHECK_EQ_I64(a, b): two signed integers, printed on failure. */
#define CHECK_EQ_I64(a, b)                                                                   \
    qt_record((int64_t)(a) == (int64_t)(b), __FILE__, __LINE__, "%s == %s (%lld != %lld)",   \
              #a, #b, (long long)(a), (long long)(b))
/* CHECK_STR(a, b): two C strings (NULL-safe). */
#define CHECK_STR(a, b)                                                                      \
    qt_record((a) != NULL && (b) != NULL && strcmp((a), (b)) == 0, __FILE__, __LINE__,       \
              "%s == %s (\"%s\" != \"%s\")", #a, #b, (a) ? (a) : "(null)", (b) ? (b) : "(null)")
/* CHECK_RC(call, ERRNO, err): call returns -ERRNO (0: success) and leaves the matching error in
 * err, which is freed and reset. */
#define CHECK_RC(call, expected, err) \
    qt_check_rc(__FILE__, __LINE__, #call, (call), (expected), &(err))
/* CHECK_PTR(call, ERRNO, err): call returns an object (ERRNO 0) or NULL with the error; the
 * value is the pointer. */
#define CHECK_PTR(call, expected, err) \
    qt_check_ptr(__FILE__, __LINE__, #call, (void *)(call), (expected), &(err))

/* Test groups (each file has one entry point). */
void test_errors(const char *dir);
void test_image(const char *dir);
void test_bitmap(const char *dir);
void test_mirror(const char *dir);
void test_txn(const char *dir);
void test_threads(void);
void test_boundary(const char *dir);
void test_stress(const char *dir);

/* Helpers from main.c. */
char *qt_path(const char *dir, const char *name); /* malloc'd "dir/name" */
unsigned char *qt_read_file(const char *path, size_t *len); /* malloc'd content or NULL */
bool qt_copy_file(const char *src, const char *dst);

#endif /* QDIRTY_TEST_H */
