/* Runs every C test group against the built libqdirty and prints "N passed, N failed". */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qdirty_test.h"

int qt_passed;
int qt_failed;

char *qt_path(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) {
        snprintf(p, n, "%s/%s", dir, name);
    }
    return p;
}

unsigned char *qt_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL;
    size_t cap = 0, n = 0;
    if (!f) {
        return NULL;
    }
    for (;;) {
        if (n == cap) {
            unsigned char *nb = realloc(buf, cap ? cap * 2 : 65536);
            if (!nb) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = nb;
            cap = cap ? cap * 2 : 65536;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) {
            break;
        }
    }
    fclose(f);
    *len = n;
    return buf;
}

bool qt_copy_file(const char *src, const char *dst)
{
    size_t len = 0;
    unsigned char *buf = qt_read_file(src, &len);
    FILE *f;
    bool ok;
    if (!buf) {
        return false;
    }
    f = fopen(dst, "wb");
    ok = f && fwrite(buf, 1, len, f) == len;
    if (f && fclose(f) != 0) {
        ok = false;
    }
    free(buf);
    return ok;
}

static void remove_tree(const char *dir)
{
    /* The tests remove their own files; anything left over (after failures) is listed. */
    char *cmd;
    size_t n = strlen(dir) + 16;
    cmd = malloc(n);
    if (!cmd) {
        return;
    }
    snprintf(cmd, n, "rm -rf '%s'", dir);
    if (system(cmd) != 0) {
        fprintf(stderr, "warning: could not remove %s\n", dir);
    }
    free(cmd);
}

int main(void)
{
    const char *base = getenv("QDIRTY_TEST_TMP");
    char *tmpl;
    char *dir;

    if (!base || !*base) {
        base = "/tmp";
    }
    tmpl = qt_path(base, "qdirty-c-tests-XXXXXX");
    if (!tmpl || !(dir = mkdtemp(tmpl))) {
        fprintf(stderr, "cannot create a temporary directory under %s\n", base);
        free(tmpl);
        return 2;
    }

    printf("qdirty %s, C tests in %s\n", qdirty_version(), dir);
    fflush(stdout);

    test_errors(dir);
    test_image(dir);
    test_bitmap(dir);
    test_mirror(dir);
    test_txn(dir);
    test_threads();
    test_boundary(dir);
    test_stress(dir);

    qdirty_set_warning_handler(NULL, NULL);
    remove_tree(dir);
    free(tmpl);

    printf("%d passed, %d failed\n", qt_passed, qt_failed);
    return qt_failed == 0 ? 0 : 1;
}
