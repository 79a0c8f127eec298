/* Errors, NULL arguments and the errp rules, for every exported function. */
#define _POSIX_C_SOURCE 200809L

#include <ctype.h>

#include "qdirty_test.h"

static void test_version_and_frees(void)
{
    const char *v = qdirty_version();
    CHECK(v != NULL);
    CHECK(v != NULL && isdigit((unsigned char)v[0]));
    CHECK(v != NULL && strchr(v, '.') != NULL);
    CHECK(qdirty_version() == v); /* static */

    /* The header's version macros, the library's string and its number agree. */
    unsigned x = 99, y = 99, z = 99;
    char rest = 0;
    CHECK(v != NULL && sscanf(v, "%u.%u.%u%c", &x, &y, &z, &rest) == 3);
    CHECK_EQ_U64(x, QDIRTY_VERSION_MAJOR);
    CHECK_EQ_U64(y, QDIRTY_VERSION_MINOR);
    CHECK_EQ_U64(z, QDIRTY_VERSION_PATCH);
    CHECK_EQ_U64(qdirty_version_number(), x * 10000u + y * 100u + z);
    CHECK_EQ_U64(qdirty_version_number(), QDIRTY_VERSION_NUMBER);
#if QDIRTY_VERSION_NUMBER != QDIRTY_VERSION_MAJOR * 10000 + QDIRTY_VERSION_MINOR * 100 + QDIRTY_VERSION_PATCH
#error "QDIRTY_VERSION_NUMBER is not usable in #if"
#endif

    /* NULL is a no-op for the free functions. */
    qdirty_error_free(NULL);
    qdirty_string_free(NULL);
    CHECK(qdirty_error_message(NULL) == NULL);
    CHECK(qdirty_error_hint(NULL) == NULL);
    CHECK_EQ_I64(qdirty_error_errno(NULL), 0);

    /* Restoring the default handler is always allowed. */
    qdirty_set_warning_handler(NULL, NULL);
}

/* Every function with errp: NULL arguments give -EINVAL (or NULL) and an error with a message. */
static void test_null_arguments_with_errp(void)
{
    qdirty_error *err = NULL;
    uint64_t s = 7, c = 7;

    CHECK_RC(qdirty_image_create(NULL, 1 << 20, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_open(NULL, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_open(NULL, QDIRTY_OPEN_RDWR, &err), EINVAL, err);
    CHECK_RC(qdirty_image_close(NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_image_store_bitmaps(NULL, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_add_bitmap(NULL, "b", 0, 0, &err), EINVAL, err);
    CHECK_RC(qdirty_image_remove_bitmap(NULL, "b", &err), EINVAL, err);
    CHECK_RC(qdirty_image_merge_bitmap(NULL, "a", NULL, "b", &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_enable(NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_disable(NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_set_dirty(NULL, 0, 512, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_reset_dirty(NULL, 0, 512, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_clear(NULL, &err), EINVAL, err);
    CHECK_PTR(qdirty_bitmap_sha256(NULL, &err), EINVAL, err);

    /* The message names the argument. */
    CHECK(qdirty_image_open(NULL, 0, &err) == NULL);
    CHECK(err != NULL && strstr(qdirty_error_message(err), "path") != NULL);
    CHECK(err != NULL && qdirty_error_hint(err) == NULL);
    qdirty_error_free(err);
    err = NULL;

    /* errp may be NULL: the same failures, no details. */
    CHECK_EQ_I64(qdirty_image_create(NULL, 1 << 20, 0, NULL), -EINVAL);
    CHECK(qdirty_image_open(NULL, 0, NULL) == NULL);
    CHECK_EQ_I64(qdirty_image_close(NULL, NULL), -EINVAL);
    CHECK_EQ_I64(qdirty_image_store_bitmaps(NULL, NULL), -EINVAL);
    CHECK(qdirty_image_add_bitmap(NULL, "b", 0, 0, NULL) == NULL);
    CHECK_EQ_I64(qdirty_image_remove_bitmap(NULL, "b", NULL), -EINVAL);
    CHECK_EQ_I64(qdirty_image_merge_bitmap(NULL, "a", NULL, "b", NULL), -EINVAL);
    CHECK_EQ_I64(qdirty_bitmap_enable(NULL, NULL), -EINVAL);
    CHECK_EQ_I64(qdirty_bitmap_disable(NULL, NULL), -EINVAL);
    CHECK_EQ_I64(qdirty_bitmap_set_dirty(NULL, 0, 1, NULL), -EINVAL);
    CHECK_EQ_I64(qdirty_bitmap_reset_dirty(NULL, 0, 1, NULL), -EINVAL);
    CHECK_EQ_I64(qdirty_bitmap_clear(NULL, NULL), -EINVAL);
    CHECK(qdirty_bitmap_sha256(NULL, NULL) == NULL);

    /* Functions without errp return their documented defaults. */
    CHECK_EQ_U64(qdirty_image_size(NULL), 0);
    CHECK(!qdirty_image_read_only(NULL));
    CHECK(qdirty_image_first_bitmap(NULL) == NULL);
    CHECK(qdirty_image_find_bitmap(NULL, "b") == NULL);
    CHECK(qdirty_image_find_bitmap(NULL, NULL) == NULL);
    qdirty_image_set_dirty(NULL, 0, 4096); /* no crash */
    CHECK(qdirty_bitmap_next(NULL) == NULL);
    CHECK(qdirty_bitmap_name(NULL) == NULL);
    CHECK_EQ_U64(qdirty_bitmap_granularity(NULL), 0);
    CHECK_EQ_U64(qdirty_bitmap_size(NULL), 0);
    CHECK(!qdirty_bitmap_enabled(NULL));
    CHECK(!qdirty_bitmap_persistent(NULL));
    CHECK(!qdirty_bitmap_inconsistent(NULL));
    CHECK(!qdirty_bitmap_readonly(NULL));
    CHECK(!qdirty_bitmap_get(NULL, 0));
    CHECK_EQ_U64(qdirty_bitmap_count(NULL), 0);
    CHECK_EQ_I64(qdirty_bitmap_next_dirty(NULL, 0, UINT64_MAX), -1);
    CHECK_EQ_I64(qdirty_bitmap_next_zero(NULL, 0, UINT64_MAX), -1);
    CHECK(!qdirty_bitmap_next_dirty_area(NULL, 0, UINT64_MAX, UINT64_MAX, &s, &c));
    CHECK_EQ_U64(s, 0); /* out-parameters are reset on entry */
    CHECK_EQ_U64(c, 0);
    CHECK(!qdirty_bitmap_next_dirty_area(NULL, 0, UINT64_MAX, UINT64_MAX, NULL, NULL));
}

/* A non-NULL *errp on entry is a caller bug: -EINVAL (or NULL), no side effect, *errp kept. */
static void test_errp_in_use(const char *dir)
{
    qdirty_error *err = NULL;
    qdirty_error *first;
    const char *msg;
    char *path = qt_path(dir, "errp-in-use.qcow2");
    size_t len = 0;
    unsigned char *content;

    CHECK(qdirty_image_open(NULL, 0, &err) == NULL);
    first = err;
    CHECK(first != NULL);
    msg = first ? qdirty_error_message(first) : NULL;

    /* No file is created, *errp is untouched. */
    CHECK_EQ_I64(qdirty_image_create(path, 1 << 20, 0, &err), -EINVAL);
    CHECK(err == first);
    content = qt_read_file(path, &len);
    CHECK(content == NULL);
    free(content);

    CHECK(qdirty_image_open(path, 0, &err) == NULL);
    CHECK(err == first);
    CHECK_EQ_I64(qdirty_image_close(NULL, &err), -EINVAL);
    CHECK(qdirty_image_add_bitmap(NULL, "b", 0, 0, &err) == NULL);
    CHECK_EQ_I64(qdirty_bitmap_clear(NULL, &err), -EINVAL);
    CHECK(qdirty_bitmap_sha256(NULL, &err) == NULL);
    CHECK(err == first);
    CHECK(msg != NULL && qdirty_error_message(err) == msg);

    qdirty_error_free(err);
    free(path);
}

static void test_bad_arguments(const char *dir)
{
    qdirty_error *err = NULL;
    char *path = qt_path(dir, "bad-args.qcow2");
    char *junk = qt_path(dir, "not-qcow2.img");
    char *missing = qt_path(dir, "no-such-dir/x.qcow2");
    FILE *f;

    /* Unknown flag bits. */
    CHECK_PTR(qdirty_image_open(path, 0x80, &err), EINVAL, err);
    CHECK(qdirty_image_open(path, QDIRTY_OPEN_RDWR | 0x40u, &err) == NULL);
    CHECK(err != NULL && strstr(qdirty_error_message(err), "flag") != NULL);
    qdirty_error_free(err);
    err = NULL;
    /* Force-share is for read-only opens only. */
    CHECK_PTR(qdirty_image_open(path, QDIRTY_OPEN_RDWR | QDIRTY_OPEN_FORCE_SHARE, &err), EINVAL,
              err);

    /* Empty path, bad cluster size, missing directory. */
    CHECK_RC(qdirty_image_create("", 1 << 20, 0, &err), EINVAL, err);
    CHECK_RC(qdirty_image_create(path, 1 << 20, 1000, &err), EINVAL, err);
    CHECK_RC(qdirty_image_create(path, 1 << 20, 256, &err), EINVAL, err);
    CHECK_RC(qdirty_image_create(path, 1 << 20, 4u << 20, &err), EINVAL, err);
    CHECK_RC(qdirty_image_create(missing, 1 << 20, 0, &err), ENOENT, err);
    CHECK_PTR(qdirty_image_open(missing, 0, &err), ENOENT, err);

    /* A file that is not qcow2. */
    f = fopen(junk, "wb");
    if (f) {
        for (int i = 0; i < 4096; i++) {
            fputc(i & 0xff, f);
        }
        fclose(f);
    }
    CHECK_PTR(qdirty_image_open(junk, 0, &err), EINVAL, err);
    remove(junk);

    free(path);
    free(junk);
    free(missing);
}

void test_errors(const char *dir)
{
    test_version_and_frees();
    test_null_arguments_with_errp();
    test_errp_in_use(dir);
    test_bad_arguments(dir);
}
