/*
 * The C boundary audit: EVERY exported function of include/qdirty.h is called with NULL for
 * each pointer argument and with out-of-range integers (UINT64_MAX offsets and lengths,
 * UINT32_MAX granularities and flags, unknown flag bits, zero where invalid) on valid handles.
 * Each call must return what the header documents (NULL / -EINVAL / false / -1 / 0) and, where
 * the function has errp, leave an error with that errno and a non-empty message; the same calls
 * with errp NULL return the same; a non-NULL *errp on entry makes the call do nothing.
 *
 * tests/boundary_coverage.rs parses the header and this file and fails when an exported
 * function, or one of its pointer arguments, gets no NULL here, or an integer argument gets no
 * *_MAX value: a new export needs its boundary test.
 */
#define _POSIX_C_SOURCE 200809L

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qdirty_test.h"

#define MIB (1024u * 1024u)
#define SIZE (64u * MIB)
#define GRAN 65536u
/* Flag bits no version knows. */
#define UNKNOWN_FLAG 0x80000000u

/* A call that must fail with some errno (the header leaves it open): rc < 0, an error whose
 * errno is -rc and whose message is not empty. */
static bool fails_rc(const char *file, int line, const char *expr, int64_t rc, qdirty_error **errp)
{
    qdirty_error *err = *errp;
    const char *msg = err ? qdirty_error_message(err) : NULL;
    int e = err ? qdirty_error_errno(err) : 0;
    bool ok = qt_record(rc < 0 && err != NULL && e > 0 && (rc == INT64_MIN || e == -rc) &&
                            msg != NULL && msg[0] != '\0',
                        file, line, "%s: expected a failure with an error, got %lld (%s)", expr,
                        (long long)rc, msg ? msg : "(no error)");
    qdirty_error_free(err);
    *errp = NULL;
    return ok;
}
#define CHECK_FAILS(call, err) fails_rc(__FILE__, __LINE__, #call, (int64_t)(call), &(err))
/* CHECK_FAILS_PTR(call, err): NULL and an error with some errno and a message. */
#define CHECK_FAILS_PTR(call, err) \
    fails_rc(__FILE__, __LINE__, #call, (call) == NULL ? INT64_MIN : 0, &(err))

/* CHECK_I64_RC(call, ERRNO, err): for int64_t results (a failure is -ERRNO). */
#define CHECK_I64_RC(call, expected, err)                                                     \
    do {                                                                                      \
        int64_t r_ = (call);                                                                  \
        EXPECT_I64(r_, -(int64_t)(expected));                                               \
        qt_check_err(__FILE__, __LINE__, #call, r_ < 0, (expected), &(err));                  \
    } while (0)

/* EXPECT_I64 / EXPECT_U64: like CHECK_EQ_*, but evaluate the call once (the calls here have
 * side effects). */
static bool expect_i64(const char *file, int line, const char *expr, int64_t got, int64_t want)
{
    return qt_record(got == want, file, line, "%s: %lld, expected %lld", expr, (long long)got,
                     (long long)want);
}
#define EXPECT_I64(call, want) \
    expect_i64(__FILE__, __LINE__, #call, (int64_t)(call), (int64_t)(want))
static bool expect_u64(const char *file, int line, const char *expr, uint64_t got, uint64_t want)
{
    return qt_record(got == want, file, line, "%s: %llu, expected %llu", expr,
                     (unsigned long long)got, (unsigned long long)want);
}
#define EXPECT_U64(call, want) \
    expect_u64(__FILE__, __LINE__, #call, (uint64_t)(call), (uint64_t)(want))

/* A real error, to pass as a stale *errp. */
static qdirty_error *some_error(void)
{
    qdirty_error *e = NULL;
    CHECK(qdirty_image_open(NULL, 0, &e) == NULL && e != NULL);
    return e;
}

static int warnings;
static void *warning_opaque = (void *)1;
static void count_warning(const char *message, void *opaque)
{
    warnings += message != NULL && message[0] != '\0';
    warning_opaque = opaque;
}

/* ---------------------------------------------------------------------------------------- */

static void boundary_misc(void)
{
    qdirty_error *err = some_error();

    CHECK(qdirty_version() != NULL);
    CHECK(qdirty_version_number() == QDIRTY_VERSION_NUMBER);
    qdirty_string_free(NULL);
    CHECK(qdirty_error_message(NULL) == NULL);
    CHECK(qdirty_error_hint(NULL) == NULL);
    EXPECT_I64(qdirty_error_errno(NULL), 0);
    CHECK(qdirty_error_message(err) != NULL);
    EXPECT_I64(qdirty_error_errno(err), EINVAL);
    qdirty_error_free(err);
    qdirty_error_free(NULL);

    /* A handler with a NULL opaque gets NULL back; NULL restores the default. */
    qdirty_set_warning_handler(count_warning, NULL);
    {
        qdirty_image *m = qdirty_image_new_memory(MIB, NULL);
        CHECK(m != NULL);
        CHECK(qdirty_image_add_bitmap(m, "w", 0, QDIRTY_BITMAP_AUTOLOAD, NULL) != NULL);
        EXPECT_I64(warnings, 1);
        CHECK(warning_opaque == NULL);
        EXPECT_I64(qdirty_image_close(m, NULL), 0);
    }
    qdirty_set_warning_handler(NULL, NULL);
}

static void boundary_create_open(const char *dir)
{
    qdirty_error *err = NULL;
    char *p = qt_path(dir, "bnd-create.qcow2");
    char *p2 = qt_path(dir, "bnd-create2.qcow2");
    struct stat st;

    CHECK_RC(qdirty_image_create(NULL, MIB, 0, &err), EINVAL, err);
    EXPECT_I64(qdirty_image_create(NULL, MIB, 0, NULL), -EINVAL);
    CHECK_RC(qdirty_image_create("", MIB, 0, &err), EINVAL, err);
    CHECK_RC(qdirty_image_create(p, MIB, UINT32_MAX, &err), EINVAL, err);
    CHECK_RC(qdirty_image_create(p, MIB, 256, &err), EINVAL, err);
    CHECK_RC(qdirty_image_create(p, MIB, 4 * MIB, &err), EINVAL, err);
    CHECK_RC(qdirty_image_create(p, MIB, 3 * 4096, &err), EINVAL, err);
    /* A size that cannot be rounded up to 512, or that no qcow2 can address. */
    CHECK_FAILS(qdirty_image_create(p, UINT64_MAX, 0, &err), err);
    CHECK_FAILS(qdirty_image_create(p2, UINT64_MAX - 511, 0, &err), err);
    CHECK(stat(p, &st) != 0 || st.st_size > 0); /* nothing half-created */
    unlink(p);
    unlink(p2);

    CHECK_PTR(qdirty_image_open(NULL, 0, &err), EINVAL, err);
    CHECK(qdirty_image_open(NULL, QDIRTY_OPEN_RDWR, NULL) == NULL);
    EXPECT_I64(qdirty_image_create(p, MIB, 0, NULL), 0);
    CHECK_PTR(qdirty_image_open(p, UINT32_MAX, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_open(p, UNKNOWN_FLAG, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_open(p, QDIRTY_OPEN_RDWR | QDIRTY_OPEN_FORCE_SHARE, &err), EINVAL, err);
    CHECK_FAILS_PTR(qdirty_image_open("", 0, &err), err);

    {
        int dropped = 7;
        qdirty_image *held;
        CHECK_RC(qdirty_image_drop_bitmaps_extension(NULL, &dropped, &err), EINVAL, err);
        EXPECT_I64(qdirty_image_drop_bitmaps_extension(NULL, NULL, NULL), -EINVAL);
        CHECK_RC(qdirty_image_drop_bitmaps_extension("", &dropped, &err), EINVAL, err);
        CHECK(dropped == 7 || dropped == 0);
        /* Nothing to drop: no extension, nothing written. */
        CHECK_RC(qdirty_image_drop_bitmaps_extension(p, NULL, &err), 0, err);
        CHECK_RC(qdirty_image_drop_bitmaps_extension(p, &dropped, &err), 0, err);
        CHECK(dropped == 0);
        /* An image in use (its locks) is refused. */
        held = CHECK_PTR(qdirty_image_open(p, QDIRTY_OPEN_RDWR, &err), 0, err);
        CHECK_RC(qdirty_image_drop_bitmaps_extension(p, &dropped, &err), EAGAIN, err);
        if (held) {
            CHECK_RC(qdirty_image_close(held, &err), 0, err);
        }
    }
    unlink(p);
    free(p);
    free(p2);
}

/* Image-level functions on a valid read-write image `img` (bitmaps "a" enabled, "d"
 * disabled, both persistent) and a standalone image `small` of another size. */
static void boundary_image(qdirty_image *img, qdirty_image *small)
{
    qdirty_error *err = NULL;
    qdirty_bitmap *a = qdirty_image_find_bitmap(img, "a");
    uint64_t before;

    CHECK_RC(qdirty_image_close(NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_image_close(NULL, NULL), -EINVAL);
    CHECK_RC(qdirty_image_store_bitmaps(NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_image_store_bitmaps(NULL, NULL), -EINVAL);
    EXPECT_U64(qdirty_image_size(NULL), 0);
    CHECK(!qdirty_image_read_only(NULL));
    CHECK(qdirty_image_first_bitmap(NULL) == NULL);
    CHECK(qdirty_image_find_bitmap(NULL, "a") == NULL);
    CHECK(qdirty_image_find_bitmap(img, NULL) == NULL);
    CHECK(qdirty_image_find_bitmap(img, "") == NULL);

    CHECK_PTR(qdirty_image_add_bitmap(NULL, "x", 0, 0, &err), EINVAL, err);
    CHECK(qdirty_image_add_bitmap(NULL, "x", 0, 0, NULL) == NULL);
    CHECK_PTR(qdirty_image_add_bitmap(img, NULL, 0, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "", 0, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "x", UINT32_MAX, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "x", 256, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "x", 3 * 512, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "x", 0, UINT32_MAX, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "x", 0, UNKNOWN_FLAG, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "x", 0, 8, &err), EINVAL, err);
    {
        char longname[1100];
        memset(longname, 'n', sizeof longname - 1);
        longname[sizeof longname - 1] = '\0';
        CHECK_PTR(qdirty_image_add_bitmap(img, longname, 0, 0, &err), EINVAL, err);
    }
    CHECK(qdirty_image_find_bitmap(img, "x") == NULL);

    CHECK_RC(qdirty_image_remove_bitmap(NULL, "a", &err), EINVAL, err);
    CHECK_RC(qdirty_image_remove_bitmap(img, NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_image_remove_bitmap(img, NULL, NULL), -EINVAL);
    CHECK_RC(qdirty_image_remove_bitmap(img, "", &err), ENOENT, err);

    CHECK_RC(qdirty_image_merge_bitmap(NULL, "a", NULL, "d", &err), EINVAL, err);
    CHECK_RC(qdirty_image_merge_bitmap(img, NULL, NULL, "d", &err), EINVAL, err);
    CHECK_RC(qdirty_image_merge_bitmap(img, "a", NULL, NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_image_merge_bitmap(img, "a", img, NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_image_merge_bitmap(img, "a", NULL, NULL, NULL), -EINVAL);
    /* src_img NULL means img. */
    CHECK_RC(qdirty_image_merge_bitmap(img, "a", NULL, "d", &err), 0, err);
    /* Different sizes. */
    CHECK_RC(qdirty_image_merge_bitmap(img, "a", small, "s", &err), EINVAL, err);
    CHECK_RC(qdirty_image_merge_bitmap(small, "s", img, "a", &err), EINVAL, err);

    /* The write hook: NULL is a no-op; out-of-range ranges are clamped, never wrap. */
    qdirty_image_set_dirty(NULL, 0, 4096);
    qdirty_image_set_dirty(NULL, UINT64_MAX, UINT64_MAX);
    before = qdirty_bitmap_count(a);
    qdirty_image_set_dirty(img, UINT64_MAX, UINT64_MAX);
    qdirty_image_set_dirty(img, UINT64_MAX, 1);
    qdirty_image_set_dirty(img, SIZE, UINT64_MAX);
    qdirty_image_set_dirty(img, 0, 0);
    EXPECT_U64(qdirty_bitmap_count(a), before);
    CHECK(!qdirty_bitmap_get(a, 0));
    qdirty_image_set_dirty(img, SIZE - 1, UINT64_MAX);
    CHECK(qdirty_bitmap_get(a, SIZE - 1));
    EXPECT_U64(qdirty_bitmap_count(a), before + GRAN);
    CHECK(!qdirty_bitmap_get(a, 0));

    /* Query, space. */
    {
        qdirty_bitmap_info *info = (qdirty_bitmap_info *)&err; /* garbage: must be reset */
        size_t n = 99;
        uint64_t c = 1, b = 1, m = 1;
        CHECK_RC(qdirty_image_query_bitmaps(NULL, &info, &n, &err), EINVAL, err);
        CHECK(info == NULL && n == 0);
        CHECK_RC(qdirty_image_query_bitmaps(img, NULL, &n, &err), EINVAL, err);
        CHECK_RC(qdirty_image_query_bitmaps(img, &info, NULL, &err), EINVAL, err);
        EXPECT_I64(qdirty_image_query_bitmaps(img, NULL, NULL, NULL), -EINVAL);
        qdirty_bitmap_info_free(NULL, 0);
        qdirty_bitmap_info_free(NULL, SIZE_MAX);

        CHECK_RC(qdirty_image_store_space(NULL, &c, &b, &m, &err), EINVAL, err);
        EXPECT_I64(qdirty_image_store_space(NULL, NULL, NULL, NULL, NULL), -EINVAL);
        CHECK_RC(qdirty_image_store_space(img, NULL, NULL, NULL, &err), 0, err);
        CHECK_RC(qdirty_image_store_space(img, &c, &b, &m, &err), 0, err);
        CHECK(m > 0);
    }

    CHECK_RC(qdirty_image_truncate(NULL, SIZE, &err), EINVAL, err);
    EXPECT_I64(qdirty_image_truncate(NULL, 0, NULL), -EINVAL);
    /* A qcow2 image: only the size its header says. */
    CHECK_RC(qdirty_image_truncate(img, UINT64_MAX, &err), EINVAL, err);
    CHECK_RC(qdirty_image_truncate(img, 0, &err), EINVAL, err);
    EXPECT_U64(qdirty_image_size(img), SIZE);

    CHECK_RC(qdirty_image_reopen(NULL, QDIRTY_OPEN_RDWR, &err), EINVAL, err);
    EXPECT_I64(qdirty_image_reopen(NULL, 0, NULL), -EINVAL);
    CHECK_RC(qdirty_image_reopen(img, UINT32_MAX, &err), EINVAL, err);
    CHECK_RC(qdirty_image_reopen(img, UNKNOWN_FLAG | QDIRTY_OPEN_RDWR, &err), EINVAL, err);
    CHECK(!qdirty_image_read_only(img));

    EXPECT_U64(qdirty_image_default_granularity(NULL), 0);
    CHECK(!qdirty_image_has_readonly_bitmaps(NULL));

    CHECK_RC(qdirty_image_remove_stored_bitmap(NULL, "a", &err), EINVAL, err);
    CHECK_RC(qdirty_image_remove_stored_bitmap(img, NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_image_remove_stored_bitmap(img, NULL, NULL), -EINVAL);

    /* Salvage functions on an image without broken bitmaps. */
    {
        uint32_t index = 7;
        char *name = NULL, *reason = NULL;
        CHECK_RC(qdirty_image_broken_bitmap_count(NULL, &err), EINVAL, err);
        EXPECT_I64(qdirty_image_broken_bitmap_count(NULL, NULL), -EINVAL);
        EXPECT_I64(qdirty_image_broken_bitmap_count(img, NULL), 0);
        CHECK_RC(qdirty_image_broken_bitmap(NULL, 0, &index, &name, &reason, &err), EINVAL, err);
        EXPECT_I64(qdirty_image_broken_bitmap(NULL, 0, NULL, NULL, NULL, NULL), -EINVAL);
        CHECK_RC(qdirty_image_broken_bitmap(img, UINT32_MAX, &index, &name, &reason, &err),
                 ENOENT, err);
        CHECK_RC(qdirty_image_broken_bitmap(img, 0, NULL, NULL, NULL, &err), ENOENT, err);
        CHECK(index == 7 && name == NULL && reason == NULL);
        CHECK_RC(qdirty_image_remove_broken_bitmap(NULL, 0, &err), EINVAL, err);
        EXPECT_I64(qdirty_image_remove_broken_bitmap(NULL, 0, NULL), -EINVAL);
        CHECK_FAILS(qdirty_image_remove_broken_bitmap(img, UINT32_MAX, &err), err);
    }
}

/* Standalone images at the extremes. */
static void boundary_memory(void)
{
    qdirty_error *err = NULL;
    qdirty_image *m;

    m = CHECK_PTR(qdirty_image_new_memory(0, &err), 0, err);
    if (m) {
        qdirty_bitmap *b = CHECK_PTR(qdirty_image_add_bitmap(m, "z", 0, 0, &err), 0, err);
        qdirty_image_set_dirty(m, 0, UINT64_MAX);
        EXPECT_U64(qdirty_bitmap_count(b), 0);
        EXPECT_I64(qdirty_bitmap_next_dirty(b, 0, UINT64_MAX), -1);
        CHECK_RC(qdirty_bitmap_set_dirty(b, 0, 1, &err), EINVAL, err);
        CHECK_RC(qdirty_image_close(m, &err), 0, err);
    }
    /* The largest size: the image may exist (bitmaps are sparse) but a fine bitmap over it is
     * refused rather than allocated; truncating to it likewise. */
    m = qdirty_image_new_memory(UINT64_MAX, &err);
    if (m) {
        CHECK(err == NULL);
        CHECK_FAILS_PTR(qdirty_image_add_bitmap(m, "big", 512, 0, &err), err);
        qdirty_image_set_dirty(m, UINT64_MAX - 1, UINT64_MAX);
        CHECK_RC(qdirty_image_close(m, &err), 0, err);
    } else {
        CHECK_FAILS_PTR((void *)NULL, err);
    }
    m = CHECK_PTR(qdirty_image_new_memory(MIB, &err), 0, err);
    if (m) {
        CHECK(qdirty_image_add_bitmap(m, "t", 512, 0, NULL) != NULL);
        CHECK_FAILS(qdirty_image_truncate(m, UINT64_MAX, &err), err);
        EXPECT_U64(qdirty_image_size(m), MIB);
        CHECK_RC(qdirty_image_truncate(m, 0, &err), 0, err);
        CHECK_RC(qdirty_image_close(m, &err), 0, err);
    }
}

/* Bitmap-level functions on `a` (enabled, persistent, 64 KiB) of `img`. */
static void boundary_bitmap(qdirty_image *img, qdirty_image *small)
{
    qdirty_error *err = NULL;
    qdirty_bitmap *a = qdirty_image_find_bitmap(img, "a");
    qdirty_bitmap *s = qdirty_image_find_bitmap(small, "s");
    uint64_t count;

    CHECK(a != NULL && s != NULL);
    CHECK_RC(qdirty_bitmap_set_dirty(a, 0, GRAN, &err), 0, err);
    count = qdirty_bitmap_count(a);

    CHECK(qdirty_bitmap_next(NULL) == NULL);
    CHECK(qdirty_bitmap_name(NULL) == NULL);
    EXPECT_U64(qdirty_bitmap_granularity(NULL), 0);
    EXPECT_U64(qdirty_bitmap_size(NULL), 0);
    CHECK(!qdirty_bitmap_enabled(NULL));
    CHECK(!qdirty_bitmap_persistent(NULL));
    CHECK(!qdirty_bitmap_inconsistent(NULL));
    CHECK(!qdirty_bitmap_readonly(NULL));
    CHECK(!qdirty_bitmap_busy(NULL));
    CHECK(!qdirty_bitmap_skip_store(NULL));
    CHECK(!qdirty_bitmap_recording(NULL));
    CHECK(!qdirty_bitmap_has_successor(NULL));
    EXPECT_U64(qdirty_bitmap_count(NULL), 0);
    EXPECT_U64(qdirty_bitmap_serialization_align(NULL), 0);

    CHECK_RC(qdirty_bitmap_enable(NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_bitmap_enable(NULL, NULL), -EINVAL);
    CHECK_RC(qdirty_bitmap_disable(NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_bitmap_disable(NULL, NULL), -EINVAL);
    CHECK_RC(qdirty_bitmap_clear(NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_bitmap_clear(NULL, NULL), -EINVAL);

    /* set_dirty / reset_dirty: ranges beyond the end, overflowing, unaligned. */
    CHECK_RC(qdirty_bitmap_set_dirty(NULL, 0, 512, &err), EINVAL, err);
    EXPECT_I64(qdirty_bitmap_set_dirty(NULL, 0, 512, NULL), -EINVAL);
    CHECK_RC(qdirty_bitmap_set_dirty(a, UINT64_MAX, 1, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_set_dirty(a, 1, UINT64_MAX, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_set_dirty(a, UINT64_MAX, UINT64_MAX, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_set_dirty(a, SIZE, 1, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_set_dirty(a, SIZE - 1, 2, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_reset_dirty(NULL, 0, GRAN, &err), EINVAL, err);
    EXPECT_I64(qdirty_bitmap_reset_dirty(NULL, 0, GRAN, NULL), -EINVAL);
    CHECK_RC(qdirty_bitmap_reset_dirty(a, UINT64_MAX, UINT64_MAX, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_reset_dirty(a, 0, UINT64_MAX, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_reset_dirty(a, UINT64_MAX - GRAN + 1, GRAN, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_reset_dirty(a, 1, GRAN, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_reset_dirty(a, 0, 1, &err), EINVAL, err);
    EXPECT_U64(qdirty_bitmap_count(a), count);
    CHECK(qdirty_bitmap_get(a, 0));

    /* Getters and searches. */
    CHECK(!qdirty_bitmap_get(NULL, 0));
    CHECK(!qdirty_bitmap_get(a, UINT64_MAX));
    CHECK(!qdirty_bitmap_get(a, SIZE));
    EXPECT_I64(qdirty_bitmap_next_dirty(NULL, 0, 1), -1);
    EXPECT_I64(qdirty_bitmap_next_dirty(a, UINT64_MAX, UINT64_MAX), -1);
    EXPECT_I64(qdirty_bitmap_next_dirty(a, SIZE, 1), -1);
    EXPECT_I64(qdirty_bitmap_next_dirty(a, 0, UINT64_MAX), 0);
    EXPECT_I64(qdirty_bitmap_next_dirty(a, 0, 0), -1);
    EXPECT_I64(qdirty_bitmap_next_zero(NULL, 0, 1), -1);
    EXPECT_I64(qdirty_bitmap_next_zero(a, UINT64_MAX, UINT64_MAX), -1);
    EXPECT_I64(qdirty_bitmap_next_zero(a, SIZE, UINT64_MAX), -1);
    EXPECT_I64(qdirty_bitmap_next_zero(a, 0, UINT64_MAX), GRAN);
    {
        uint64_t ds = 7, dc = 7;
        CHECK(!qdirty_bitmap_next_dirty_area(NULL, 0, SIZE, SIZE, &ds, &dc));
        CHECK(ds == 0 && dc == 0);
        CHECK(!qdirty_bitmap_next_dirty_area(a, 0, SIZE, SIZE, NULL, &dc));
        CHECK(!qdirty_bitmap_next_dirty_area(a, 0, SIZE, SIZE, &ds, NULL));
        CHECK(!qdirty_bitmap_next_dirty_area(a, 0, SIZE, 0, &ds, &dc));
        CHECK(!qdirty_bitmap_next_dirty_area(a, UINT64_MAX, UINT64_MAX, UINT64_MAX, &ds, &dc));
        CHECK(!qdirty_bitmap_next_dirty_area(a, SIZE, UINT64_MAX, UINT64_MAX, &ds, &dc));
        CHECK(!qdirty_bitmap_next_dirty_area(a, GRAN, 0, UINT64_MAX, &ds, &dc));
        CHECK(qdirty_bitmap_next_dirty_area(a, 0, UINT64_MAX, UINT64_MAX, &ds, &dc));
        EXPECT_U64(ds, 0);
        EXPECT_U64(dc, GRAN);
    }
    CHECK_PTR(qdirty_bitmap_sha256(NULL, &err), EINVAL, err);
    CHECK(qdirty_bitmap_sha256(NULL, NULL) == NULL);
    {
        qdirty_extent ext[2] = {{7, 7}, {7, 7}};
        size_t n = 7;
        CHECK_RC(qdirty_bitmap_dirty_extents(NULL, 0, SIZE, ext, 2, &n, &err), EINVAL, err);
        CHECK(n == 0);
        CHECK_RC(qdirty_bitmap_dirty_extents(a, 0, SIZE, NULL, 2, &n, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_dirty_extents(a, 0, SIZE, ext, 2, NULL, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_dirty_extents(a, 0, SIZE, ext, 0, &n, &err), EINVAL, err);
        EXPECT_I64(qdirty_bitmap_dirty_extents(a, 0, SIZE, ext, 2, &n, NULL), 0);
        CHECK_RC(qdirty_bitmap_dirty_extents(a, UINT64_MAX, UINT64_MAX, ext, SIZE_MAX, &n, &err),
                 0, err);
        EXPECT_U64(n, 0);
        CHECK_RC(qdirty_bitmap_dirty_extents(a, GRAN, 0, ext, 2, &n, &err), 0, err);
        EXPECT_U64(n, 0);
        CHECK_RC(qdirty_bitmap_dirty_extents(a, 0, UINT64_MAX, ext, 1, &n, &err), 0, err);
        EXPECT_U64(n, 1);
        EXPECT_U64(ext[0].offset, 0);
        EXPECT_U64(ext[0].length, GRAN);
    }

    /* State setters and the gatekeeper. */
    CHECK_RC(qdirty_bitmap_check(NULL, 0, &err), EINVAL, err);
    EXPECT_I64(qdirty_bitmap_check(NULL, QDIRTY_CHECK_DEFAULT, NULL), -EINVAL);
    CHECK_RC(qdirty_bitmap_check(a, UINT32_MAX, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_check(a, 8, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_check(a, QDIRTY_CHECK_DEFAULT, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_busy(NULL, true, &err), EINVAL, err);
    EXPECT_I64(qdirty_bitmap_set_busy(NULL, false, NULL), -EINVAL);
    CHECK_RC(qdirty_bitmap_set_readonly(NULL, true, &err), EINVAL, err);
    EXPECT_I64(qdirty_bitmap_set_readonly(NULL, false, NULL), -EINVAL);
    CHECK_RC(qdirty_bitmap_set_persistence(NULL, true, &err), EINVAL, err);
    EXPECT_I64(qdirty_bitmap_set_persistence(NULL, false, NULL), -EINVAL);
    CHECK_RC(qdirty_bitmap_set_skip_store(NULL, true, &err), EINVAL, err);
    EXPECT_I64(qdirty_bitmap_set_skip_store(NULL, false, NULL), -EINVAL);
    CHECK_RC(qdirty_bitmap_set_inconsistent(NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_bitmap_set_inconsistent(NULL, NULL), -EINVAL);
    /* Not persistent: refused, nothing changed. */
    CHECK_RC(qdirty_bitmap_set_inconsistent(s, &err), EINVAL, err);
    CHECK(!qdirty_bitmap_inconsistent(s) && qdirty_bitmap_enabled(s));
    CHECK(!qdirty_bitmap_busy(a) && !qdirty_bitmap_readonly(a) && !qdirty_bitmap_skip_store(a));

    /* Creation and release. */
    CHECK_PTR(qdirty_image_create_bitmap(NULL, "c", 0, &err), EINVAL, err);
    CHECK(qdirty_image_create_bitmap(NULL, NULL, 0, NULL) == NULL);
    CHECK_PTR(qdirty_image_create_bitmap(img, "c", UINT32_MAX, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_create_bitmap(img, "c", 1, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_create_bitmap(img, "", 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_create_bitmap(img, "a", 0, &err), EEXIST, err);
    {
        /* NULL name: an anonymous bitmap. */
        qdirty_bitmap *anon = CHECK_PTR(qdirty_image_create_bitmap(img, NULL, 0, &err), 0, err);
        CHECK(anon != NULL && qdirty_bitmap_name(anon) == NULL);
        CHECK_RC(qdirty_bitmap_release(anon, &err), 0, err);
    }
    CHECK_RC(qdirty_bitmap_release(NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_bitmap_release(NULL, NULL), -EINVAL);

    /* Successors. */
    CHECK_PTR(qdirty_bitmap_create_successor(NULL, &err), EINVAL, err);
    CHECK(qdirty_bitmap_create_successor(NULL, NULL) == NULL);
    CHECK_PTR(qdirty_bitmap_abdicate(NULL, &err), EINVAL, err);
    CHECK(qdirty_bitmap_abdicate(NULL, NULL) == NULL);
    CHECK_PTR(qdirty_bitmap_abdicate(a, &err), EINVAL, err);
    CHECK_PTR(qdirty_bitmap_reclaim(NULL, &err), EINVAL, err);
    CHECK(qdirty_bitmap_reclaim(NULL, NULL) == NULL);
    CHECK_PTR(qdirty_bitmap_reclaim(a, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_enable_successor(NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_bitmap_enable_successor(NULL, NULL), -EINVAL);
    CHECK_RC(qdirty_bitmap_enable_successor(a, &err), EINVAL, err);
    CHECK(!qdirty_bitmap_has_successor(a) && qdirty_bitmap_enabled(a));

    /* Backups and merges. */
    {
        qdirty_backup *bk = (qdirty_backup *)&err; /* garbage: reset on entry */
        CHECK_RC(qdirty_bitmap_clear_with_backup(NULL, &bk, &err), EINVAL, err);
        CHECK(bk == NULL);
        CHECK_RC(qdirty_bitmap_clear_with_backup(a, NULL, &err), EINVAL, err);
        EXPECT_I64(qdirty_bitmap_clear_with_backup(a, NULL, NULL), -EINVAL);
        EXPECT_U64(qdirty_bitmap_count(a), count);
        CHECK_RC(qdirty_bitmap_clear_with_backup(a, &bk, &err), 0, err);
        CHECK_RC(qdirty_bitmap_restore(NULL, bk, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_restore(a, NULL, &err), EINVAL, err);
        EXPECT_I64(qdirty_bitmap_restore(NULL, NULL, NULL), -EINVAL);
        /* Another size: refused. */
        CHECK_RC(qdirty_bitmap_restore(s, bk, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_restore(a, bk, &err), 0, err);
        EXPECT_U64(qdirty_bitmap_count(a), count);
        /* Already restored: empty. */
        CHECK_RC(qdirty_bitmap_restore(a, bk, &err), EINVAL, err);
        qdirty_backup_free(bk);
        qdirty_backup_free(NULL);

        bk = (qdirty_backup *)&err;
        CHECK_RC(qdirty_bitmap_merge(NULL, a, &bk, &err), EINVAL, err);
        CHECK(bk == NULL);
        CHECK_RC(qdirty_bitmap_merge(a, NULL, NULL, &err), EINVAL, err);
        EXPECT_I64(qdirty_bitmap_merge(NULL, NULL, NULL, NULL), -EINVAL);
        CHECK_RC(qdirty_bitmap_merge(a, s, NULL, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_merge(s, a, NULL, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_merge(a, a, NULL, &err), 0, err);
        EXPECT_U64(qdirty_bitmap_count(a), count);
    }

    /* Iterators. */
    {
        qdirty_iter *it;
        CHECK_PTR(qdirty_bitmap_iter_new(NULL, &err), EINVAL, err);
        CHECK(qdirty_bitmap_iter_new(NULL, NULL) == NULL);
        EXPECT_I64(qdirty_iter_next(NULL), -EINVAL);
        CHECK_RC(qdirty_iter_seek(NULL, 0, &err), EINVAL, err);
        EXPECT_I64(qdirty_iter_seek(NULL, 0, NULL), -EINVAL);
        qdirty_iter_free(NULL);
        it = CHECK_PTR(qdirty_bitmap_iter_new(a, &err), 0, err);
        CHECK_RC(qdirty_iter_seek(it, UINT64_MAX, &err), EINVAL, err);
        CHECK_RC(qdirty_iter_seek(it, SIZE, &err), EINVAL, err);
        EXPECT_I64(qdirty_iter_next(it), 0); /* did not move */
        EXPECT_I64(qdirty_iter_next(it), SIZE - GRAN); /* the hook's clamped write */
        EXPECT_I64(qdirty_iter_next(it), -1);
        /* A live iterator blocks release. */
        {
            qdirty_bitmap *t = qdirty_image_create_bitmap(img, "it", 0, NULL);
            qdirty_iter *it2 = qdirty_bitmap_iter_new(t, NULL);
            CHECK(t != NULL && it2 != NULL);
            CHECK_RC(qdirty_bitmap_release(t, &err), EBUSY, err);
            qdirty_iter_free(it2);
            CHECK_RC(qdirty_bitmap_release(t, &err), 0, err);
        }
        qdirty_iter_free(it);
    }

    /* Status. */
    {
        uint64_t c = 7;
        CHECK_RC(qdirty_bitmap_status(NULL, 0, GRAN, &c, &err), EINVAL, err);
        EXPECT_U64(c, 0);
        CHECK_RC(qdirty_bitmap_status(a, 0, GRAN, NULL, &err), EINVAL, err);
        EXPECT_I64(qdirty_bitmap_status(a, 0, GRAN, NULL, NULL), -EINVAL);
        CHECK_RC(qdirty_bitmap_status(a, 0, 0, &c, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_status(a, UINT64_MAX, 1, &c, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_status(a, 0, UINT64_MAX, &c, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_status(a, 1, UINT64_MAX, &c, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_status(a, SIZE - 1, 2, &c, &err), EINVAL, err);
        EXPECT_I64(qdirty_bitmap_status(a, 0, SIZE, &c, &err), 1);
        CHECK(err == NULL);
        EXPECT_U64(c, GRAN);
    }

    /* Serialization. */
    {
        uint64_t align = qdirty_bitmap_serialization_align(a);
        uint8_t buf[64];
        int64_t need;
        EXPECT_U64(align, 64 * GRAN);
        CHECK_I64_RC(qdirty_bitmap_serialization_size(NULL, 0, align, &err), EINVAL, err);
        EXPECT_I64(qdirty_bitmap_serialization_size(NULL, 0, align, NULL), -EINVAL);
        CHECK_I64_RC(qdirty_bitmap_serialization_size(a, UINT64_MAX, UINT64_MAX, &err), EINVAL, err);
        CHECK_I64_RC(qdirty_bitmap_serialization_size(a, 0, UINT64_MAX, &err), EINVAL, err);
        CHECK_I64_RC(qdirty_bitmap_serialization_size(a, align, UINT64_MAX - align + 1, &err),
                     EINVAL, err);
        CHECK_I64_RC(qdirty_bitmap_serialization_size(a, GRAN, align, &err), EINVAL, err);
        need = qdirty_bitmap_serialization_size(a, 0, align, &err);
        CHECK(err == NULL && need == 8);

        CHECK_RC(qdirty_bitmap_serialize_part(NULL, buf, sizeof buf, 0, align, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_serialize_part(a, NULL, 8, 0, align, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_serialize_part(a, NULL, 0, 0, align, &err), EINVAL, err);
        EXPECT_I64(qdirty_bitmap_serialize_part(NULL, NULL, 0, 0, 0, NULL), -EINVAL);
        CHECK_RC(qdirty_bitmap_serialize_part(a, buf, 7, 0, align, &err), EINVAL, err);
        /* (len is the caller's promise about buf: a huge len with a real buffer would break
         * the Safety contract, so only NULL gets one.) */
        CHECK_RC(qdirty_bitmap_serialize_part(a, NULL, SIZE_MAX, 0, align, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_serialize_part(a, buf, sizeof buf, UINT64_MAX, UINT64_MAX, &err),
                 EINVAL, err);
        CHECK_RC(qdirty_bitmap_serialize_part(a, buf, sizeof buf, 0, UINT64_MAX, &err), EINVAL,
                 err);
        memset(buf, 0, sizeof buf);
        CHECK_RC(qdirty_bitmap_serialize_part(a, buf, sizeof buf, 0, align, &err), 0, err);
        CHECK(buf[0] == 1);

        CHECK_RC(qdirty_bitmap_deserialize_part(NULL, buf, 8, 0, align, true, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_deserialize_part(a, NULL, 8, 0, align, true, &err), EINVAL, err);
        EXPECT_I64(qdirty_bitmap_deserialize_part(NULL, NULL, 0, 0, 0, true, NULL), -EINVAL);
        CHECK_RC(qdirty_bitmap_deserialize_part(a, buf, 7, 0, align, true, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_deserialize_part(a, NULL, SIZE_MAX, 0, align, true, &err), EINVAL,
                 err);
        CHECK_RC(qdirty_bitmap_deserialize_part(a, buf, sizeof buf, UINT64_MAX, UINT64_MAX, true,
                                                &err),
                 EINVAL, err);
        CHECK_RC(qdirty_bitmap_deserialize_part(a, buf, sizeof buf, 0, UINT64_MAX, true, &err),
                 EINVAL, err);
        CHECK_RC(qdirty_bitmap_deserialize_zeroes(NULL, 0, align, true, &err), EINVAL, err);
        EXPECT_I64(qdirty_bitmap_deserialize_zeroes(NULL, 0, align, true, NULL), -EINVAL);
        CHECK_RC(qdirty_bitmap_deserialize_zeroes(a, UINT64_MAX, UINT64_MAX, true, &err), EINVAL,
                 err);
        CHECK_RC(qdirty_bitmap_deserialize_zeroes(a, 0, UINT64_MAX, true, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_deserialize_zeroes(a, GRAN, align, true, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_deserialize_ones(NULL, 0, align, true, &err), EINVAL, err);
        EXPECT_I64(qdirty_bitmap_deserialize_ones(NULL, 0, align, true, NULL), -EINVAL);
        CHECK_RC(qdirty_bitmap_deserialize_ones(a, UINT64_MAX, UINT64_MAX, false, &err), EINVAL,
                 err);
        CHECK_RC(qdirty_bitmap_deserialize_ones(a, 0, UINT64_MAX, false, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_deserialize_ones(a, SIZE, align, false, &err), EINVAL, err);
        CHECK_RC(qdirty_bitmap_deserialize_finish(NULL, &err), EINVAL, err);
        EXPECT_I64(qdirty_bitmap_deserialize_finish(NULL, NULL), -EINVAL);
        CHECK_RC(qdirty_bitmap_deserialize_finish(a, &err), 0, err);
        EXPECT_U64(qdirty_bitmap_count(a), count);
        CHECK(qdirty_bitmap_get(a, 0));
    }
}

/* A stale *errp: the call returns its failure value, does nothing, and leaves *errp alone. */
static void boundary_stale_errp(qdirty_image *img, const char *dir)
{
    qdirty_error *stale = some_error();
    qdirty_error *err = stale;
    qdirty_bitmap *a = qdirty_image_find_bitmap(img, "a");
    uint64_t count = qdirty_bitmap_count(a);
    char *p = qt_path(dir, "bnd-stale.qcow2");
    qdirty_backup *bk = NULL;
    qdirty_txn *txn = qdirty_txn_new();
    uint64_t c = 0;

    EXPECT_I64(qdirty_image_create(p, MIB, 0, &err), -EINVAL);
    CHECK(access(p, F_OK) != 0);
    CHECK(qdirty_image_new_memory(MIB, &err) == NULL);
    CHECK(qdirty_image_add_bitmap(img, "stale", 0, 0, &err) == NULL);
    CHECK(qdirty_image_create_bitmap(img, "stale", 0, &err) == NULL);
    CHECK(qdirty_image_find_bitmap(img, "stale") == NULL);
    EXPECT_I64(qdirty_bitmap_clear(a, &err), -EINVAL);
    EXPECT_I64(qdirty_bitmap_disable(a, &err), -EINVAL);
    EXPECT_I64(qdirty_bitmap_reset_dirty(a, 0, GRAN, &err), -EINVAL);
    EXPECT_I64(qdirty_bitmap_clear_with_backup(a, &bk, &err), -EINVAL);
    CHECK(bk == NULL);
    CHECK(qdirty_bitmap_sha256(a, &err) == NULL);
    CHECK(qdirty_bitmap_iter_new(a, &err) == NULL);
    CHECK(qdirty_bitmap_create_successor(a, &err) == NULL);
    EXPECT_I64(qdirty_bitmap_status(a, 0, GRAN, &c, &err), -EINVAL);
    EXPECT_I64(qdirty_bitmap_serialization_size(a, 0, 0, &err), -EINVAL);
    EXPECT_I64(qdirty_image_store_bitmaps(img, &err), -EINVAL);
    EXPECT_I64(qdirty_image_remove_bitmap(img, "d", &err), -EINVAL);
    /* Not qdirty_image_close: it closes all the same with a stale *errp (only the details of a
     * failure are dropped), and img is used below. */
    CHECK(txn != NULL);
    CHECK(qdirty_txn_add_bitmap(txn, img, "stale", 0, 0, &err) == NULL);
    EXPECT_I64(qdirty_txn_clear_bitmap(txn, img, "a", &err), -EINVAL);
    EXPECT_I64(qdirty_txn_commit(txn, &err), -EINVAL);
    CHECK(qdirty_image_open_with_io(NULL, NULL, NULL, 0, &err) == NULL);
    qdirty_txn_free(txn);

    CHECK(err == stale);
    CHECK(qdirty_bitmap_enabled(a));
    EXPECT_U64(qdirty_bitmap_count(a), count);
    CHECK(qdirty_image_find_bitmap(img, "d") != NULL);
    CHECK(!qdirty_bitmap_busy(a) && !qdirty_bitmap_has_successor(a));
    qdirty_error_free(stale);
    free(p);
}

static void boundary_txn(qdirty_image *img)
{
    qdirty_error *err = NULL;
    qdirty_txn *txn = qdirty_txn_new();
    qdirty_bitmap *a = qdirty_image_find_bitmap(img, "a");
    qdirty_bitmap *d = qdirty_image_find_bitmap(img, "d");
    uint64_t count = qdirty_bitmap_count(a);

    CHECK(txn != NULL);
    CHECK_PTR(qdirty_txn_add_bitmap(NULL, img, "t", 0, 0, &err), EINVAL, err);
    CHECK(qdirty_txn_add_bitmap(NULL, img, "t", 0, 0, NULL) == NULL);
    CHECK_PTR(qdirty_txn_add_bitmap(txn, NULL, "t", 0, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_txn_add_bitmap(txn, img, NULL, 0, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_txn_add_bitmap(txn, img, "t", UINT32_MAX, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_txn_add_bitmap(txn, img, "t", 0, UINT32_MAX, &err), EINVAL, err);
    CHECK_PTR(qdirty_txn_add_bitmap(txn, img, "t", 0, UNKNOWN_FLAG, &err), EINVAL, err);

    CHECK_RC(qdirty_txn_clear_bitmap(NULL, img, "a", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_clear_bitmap(txn, NULL, "a", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_clear_bitmap(txn, img, NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_txn_clear_bitmap(NULL, NULL, NULL, NULL), -EINVAL);
    CHECK_RC(qdirty_txn_enable_bitmap(NULL, img, "d", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_enable_bitmap(txn, NULL, "d", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_enable_bitmap(txn, img, NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_txn_enable_bitmap(NULL, NULL, NULL, NULL), -EINVAL);
    CHECK_RC(qdirty_txn_disable_bitmap(NULL, img, "a", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_disable_bitmap(txn, NULL, "a", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_disable_bitmap(txn, img, NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_txn_disable_bitmap(NULL, NULL, NULL, NULL), -EINVAL);
    CHECK_RC(qdirty_txn_remove_bitmap(NULL, img, "d", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_remove_bitmap(txn, NULL, "d", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_remove_bitmap(txn, img, NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_txn_remove_bitmap(NULL, NULL, NULL, NULL), -EINVAL);
    CHECK_RC(qdirty_txn_merge_bitmap(NULL, img, "d", NULL, "a", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_merge_bitmap(txn, NULL, "d", NULL, "a", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_merge_bitmap(txn, img, NULL, NULL, "a", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_merge_bitmap(txn, img, "d", img, NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_txn_merge_bitmap(NULL, NULL, NULL, NULL, NULL, NULL), -EINVAL);
    /* Nothing was prepared: abort changes nothing. */
    CHECK_RC(qdirty_txn_abort(txn, &err), 0, err);
    CHECK(qdirty_bitmap_enabled(a) && !qdirty_bitmap_enabled(d));
    CHECK(qdirty_image_find_bitmap(img, "t") == NULL);

    /* src_img NULL means img; abort restores the target. */
    CHECK_RC(qdirty_txn_clear_bitmap(txn, img, "d", &err), 0, err);
    CHECK_RC(qdirty_txn_merge_bitmap(txn, img, "d", NULL, "a", &err), 0, err);
    EXPECT_U64(qdirty_bitmap_count(d), count);
    CHECK_RC(qdirty_txn_abort(txn, &err), 0, err);
    EXPECT_U64(qdirty_bitmap_count(d), 0);

    CHECK_RC(qdirty_txn_commit(NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_txn_commit(NULL, NULL), -EINVAL);
    CHECK_RC(qdirty_txn_abort(NULL, &err), EINVAL, err);
    EXPECT_I64(qdirty_txn_abort(NULL, NULL), -EINVAL);
    CHECK_RC(qdirty_txn_commit(txn, &err), 0, err); /* empty */
    qdirty_txn_free(NULL);
    qdirty_txn_free(txn);
}

/* ---------------------------------------------------------------------------------------- */
/* qdirty_image_open_with_io: the ops table at its boundaries. The callbacks ignore opaque
 * (a NULL opaque is legal) and use io_fd. */

static int io_fd = -1;

static int io_pread(void *opaque, void *buf, uint64_t len, uint64_t offset)
{
    (void)opaque;
    ssize_t n = pread(io_fd, buf, (size_t)len, (off_t)offset);
    return n == (ssize_t)len ? 0 : -EIO;
}

static int io_pwrite(void *opaque, const void *buf, uint64_t len, uint64_t offset)
{
    (void)opaque;
    ssize_t n = pwrite(io_fd, buf, (size_t)len, (off_t)offset);
    return n == (ssize_t)len ? 0 : -EIO;
}

static int io_flush(void *opaque)
{
    (void)opaque;
    return fsync(io_fd) == 0 ? 0 : -EIO;
}

static int64_t io_length(void *opaque)
{
    struct stat st;
    (void)opaque;
    return fstat(io_fd, &st) == 0 ? (int64_t)st.st_size : -EIO;
}

static int io_alloc(void *opaque, uint64_t n, uint64_t cs, uint64_t *off)
{
    (void)opaque, (void)n, (void)cs, (void)off;
    return -ENOSPC;
}

static int io_free(void *opaque, uint64_t off, uint64_t n, uint64_t cs)
{
    (void)opaque, (void)off, (void)n, (void)cs;
    return 0;
}

static void boundary_open_with_io(const char *dir)
{
    qdirty_error *err = NULL;
    char *p = qt_path(dir, "bnd-io.qcow2");
    qdirty_io_ops ops;
    /* The structure followed by bytes a later version might define. */
    struct {
        qdirty_io_ops ops;
        uint64_t extra[2];
    } big;
    qdirty_image *img;

    CHECK_RC(qdirty_image_create(p, SIZE, 0, &err), 0, err);
    io_fd = open(p, O_RDWR);
    CHECK(io_fd >= 0);

    memset(&ops, 0, sizeof ops);
    ops.size = sizeof ops;
    ops.pread = io_pread;
    ops.pwrite = io_pwrite;
    ops.flush = io_flush;
    ops.get_length = io_length;

    CHECK_PTR(qdirty_image_open_with_io(NULL, NULL, "io", 0, &err), EINVAL, err);
    CHECK(qdirty_image_open_with_io(NULL, NULL, NULL, 0, NULL) == NULL);
    CHECK_PTR(qdirty_image_open_with_io(&ops, NULL, NULL, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_open_with_io(&ops, NULL, "io", UINT32_MAX, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_open_with_io(&ops, NULL, "io", UNKNOWN_FLAG, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_open_with_io(&ops, NULL, "io", QDIRTY_OPEN_FORCE_SHARE, &err), EINVAL,
              err);
    {
        qdirty_io_ops o = ops;
        o.size = 0;
        CHECK_PTR(qdirty_image_open_with_io(&o, NULL, "io", 0, &err), EINVAL, err);
        o.size = sizeof o - 1;
        CHECK_PTR(qdirty_image_open_with_io(&o, NULL, "io", 0, &err), EINVAL, err);
        o = ops;
        o.pread = NULL;
        CHECK_PTR(qdirty_image_open_with_io(&o, NULL, "io", 0, &err), EINVAL, err);
        o = ops;
        o.get_length = NULL;
        CHECK_PTR(qdirty_image_open_with_io(&o, NULL, "io", 0, &err), EINVAL, err);
        o = ops;
        o.pwrite = NULL;
        CHECK_PTR(qdirty_image_open_with_io(&o, NULL, "io", QDIRTY_OPEN_RDWR, &err), EINVAL, err);
        o = ops;
        o.flush = NULL;
        CHECK_PTR(qdirty_image_open_with_io(&o, NULL, "io", QDIRTY_OPEN_RDWR, &err), EINVAL, err);
        o = ops;
        o.alloc_clusters = io_alloc;
        CHECK_PTR(qdirty_image_open_with_io(&o, NULL, "io", 0, &err), EINVAL, err);
        o = ops;
        o.free_clusters = io_free;
        CHECK_PTR(qdirty_image_open_with_io(&o, NULL, "io", 0, &err), EINVAL, err);
    }
    memset(&big, 0, sizeof big);
    big.ops = ops;
    big.ops.size = sizeof big;
    big.extra[1] = 1;
    CHECK_PTR(qdirty_image_open_with_io(&big.ops, NULL, "io", 0, &err), ENOTSUP, err);

    /* Read-only without pwrite/flush, NULL opaque, larger zero-padded structure: fine. */
    big.extra[1] = 0;
    big.ops.pwrite = NULL;
    big.ops.flush = NULL;
    img = CHECK_PTR(qdirty_image_open_with_io(&big.ops, NULL, "io", 0, &err), 0, err);
    if (img) {
        CHECK(qdirty_image_read_only(img));
        EXPECT_U64(qdirty_image_size(img), SIZE);
        CHECK(qdirty_image_first_bitmap(img) == NULL);
        CHECK_RC(qdirty_image_store_bitmaps(img, &err), EROFS, err);
        CHECK_RC(qdirty_image_close(img, &err), 0, err);
    }
    close(io_fd);
    io_fd = -1;
    unlink(p);
    free(p);
}

/* Durable mode: its open, the prepare call, the zone size; a completion without a prepare is
 * reported through the warning handler. */
static void boundary_durable(const char *dir)
{
    qdirty_error *err = NULL;
    char *p = qt_path(dir, "bnd-durable.qcow2");
    qdirty_image *img;

    CHECK_PTR(qdirty_image_open_durable(NULL, MIB, &err), EINVAL, err);
    CHECK(qdirty_image_open_durable(NULL, MIB, NULL) == NULL);
    EXPECT_I64(qdirty_image_create(p, SIZE, 0, NULL), 0);
    CHECK_PTR(qdirty_image_open_durable(p, UINT64_MAX, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_open_durable(p, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_open_durable(p, 3 * MIB, &err), EINVAL, err);
    /* Durable mode needs a read-write open. */
    CHECK_PTR(qdirty_image_open(p, QDIRTY_OPEN_DURABLE, &err), EINVAL, err);
    EXPECT_U64(qdirty_image_zone_bytes(NULL), 0);
    CHECK_RC(qdirty_image_prepare_write(NULL, 0, 4096, &err), EINVAL, err);
    EXPECT_I64(qdirty_image_prepare_write(NULL, UINT64_MAX, UINT64_MAX, NULL), -EINVAL);

    img = CHECK_PTR(qdirty_image_open_durable(p, MIB, &err), 0, err);
    if (img) {
        qdirty_bitmap *a =
            CHECK_PTR(qdirty_image_add_bitmap(img, "a", GRAN, QDIRTY_BITMAP_PERSISTENT, &err), 0,
                      err);
        EXPECT_U64(qdirty_image_zone_bytes(img), MIB);
        /* Empty ranges: nothing to cover, nothing in flight. */
        CHECK_RC(qdirty_image_prepare_write(img, 0, 0, &err), 0, err);
        CHECK_RC(qdirty_image_prepare_write(img, UINT64_MAX, 0, &err), 0, err);
        /* A range that does not end inside the disk: no bitmap could cover it. */
        CHECK_RC(qdirty_image_prepare_write(img, UINT64_MAX, UINT64_MAX, &err), EINVAL, err);
        CHECK_RC(qdirty_image_prepare_write(img, SIZE - 1, UINT64_MAX, &err), EINVAL, err);
        CHECK_RC(qdirty_image_prepare_write(img, SIZE - 1, 2, &err), EINVAL, err);
        /* The last byte: its completion matches it. */
        CHECK_RC(qdirty_image_prepare_write(img, SIZE - 1, 1, &err), 0, err);
        qdirty_set_warning_handler(count_warning, NULL);
        warnings = 0;
        qdirty_image_set_dirty(img, SIZE - 1, 1);
        EXPECT_I64(warnings, 0);
        CHECK(qdirty_bitmap_get(a, SIZE - 1));
        /* A write recorded without its prepare breaks the protocol: reported. */
        qdirty_image_set_dirty(img, 0, 4096);
        EXPECT_I64(warnings, 1);
        CHECK(qdirty_bitmap_get(a, 0));
        /* A write past the end is in no bitmap: reported at the next call. */
        qdirty_image_set_dirty(img, SIZE, 4096);
        CHECK(!qdirty_bitmap_get(a, SIZE));
        EXPECT_I64(warnings, 2);
        qdirty_set_warning_handler(NULL, NULL);
        CHECK_RC(qdirty_image_close(img, &err), 0, err);
    }
    /* The ordinary mode: no zones, nothing to prepare. */
    img = CHECK_PTR(qdirty_image_open(p, QDIRTY_OPEN_RDWR, &err), 0, err);
    if (img) {
        EXPECT_U64(qdirty_image_zone_bytes(img), 0);
        CHECK_RC(qdirty_image_prepare_write(img, 0, 4096, &err), 0, err);
        CHECK_RC(qdirty_image_close(img, &err), 0, err);
    }
    unlink(p);
    free(p);
}

void test_boundary(const char *dir)
{
    qdirty_error *err = NULL;
    char *p = qt_path(dir, "bnd.qcow2");
    qdirty_image *img = NULL, *small = NULL;

    boundary_misc();
    boundary_create_open(dir);
    boundary_memory();
    boundary_open_with_io(dir);
    boundary_durable(dir);

    CHECK_RC(qdirty_image_create(p, SIZE, 0, &err), 0, err);
    img = CHECK_PTR(qdirty_image_open(p, QDIRTY_OPEN_RDWR, &err), 0, err);
    small = CHECK_PTR(qdirty_image_new_memory(SIZE / 2, &err), 0, err);
    if (!img || !small) {
        goto out;
    }
    CHECK_PTR(qdirty_image_add_bitmap(img, "a", GRAN, QDIRTY_BITMAP_PERSISTENT, &err), 0, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "d", GRAN,
                                      QDIRTY_BITMAP_PERSISTENT | QDIRTY_BITMAP_DISABLED, &err),
              0, err);
    CHECK_PTR(qdirty_image_add_bitmap(small, "s", GRAN, 0, &err), 0, err);

    boundary_image(img, small);
    boundary_bitmap(img, small);
    boundary_stale_errp(img, dir);
    boundary_txn(img);

    /* Everything above left the image storable and sane. */
    CHECK_RC(qdirty_image_store_bitmaps(img, &err), 0, err);
out:
    if (small) CHECK_RC(qdirty_image_close(small, &err), 0, err);
    if (img) CHECK_RC(qdirty_image_close(img, &err), 0, err);
    if (img) {
        /* Reopened: both bitmaps, consistent, with the bits set above. */
        qdirty_image *again = CHECK_PTR(qdirty_image_open(p, 0, &err), 0, err);
        if (again) {
            qdirty_bitmap *a = qdirty_image_find_bitmap(again, "a");
            CHECK(a != NULL && !qdirty_bitmap_inconsistent(a));
            CHECK(a != NULL && qdirty_bitmap_get(a, 0) && qdirty_bitmap_get(a, SIZE - 1));
            CHECK(qdirty_image_find_bitmap(again, "d") != NULL);
            CHECK_RC(qdirty_image_close(again, &err), 0, err);
        }
    }
    unlink(p);
    free(p);
}
