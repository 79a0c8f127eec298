/* The rest of QEMU's dirty-bitmap API: state, check, create/release, successors, backups,
 * merge, iterators, status, serialization, query, standalone images, reopen, truncate; and
 * bad arguments to every one of those functions. */
#define _POSIX_C_SOURCE 200809L

#include "qdirty_test.h"

#define MIB (1024u * 1024u)

static qdirty_bitmap *find_named(qdirty_image *img, const char *name)
{
    return qdirty_image_find_bitmap(img, name);
}

static void test_state_and_check(void)
{
    qdirty_error *err = NULL;
    qdirty_image *img = CHECK_PTR(qdirty_image_new_memory(4 * MIB, &err), 0, err);
    qdirty_bitmap *bm;
    if (!img) {
        return;
    }
    CHECK(!qdirty_image_read_only(img));
    CHECK_EQ_U64(qdirty_image_size(img), 4 * MIB);
    CHECK_EQ_U64(qdirty_image_default_granularity(img), 65536);
    bm = CHECK_PTR(qdirty_image_add_bitmap(img, "b", 4096, 0, &err), 0, err);

    CHECK_RC(qdirty_bitmap_check(bm, QDIRTY_CHECK_DEFAULT, &err), 0, err);
    CHECK(!qdirty_bitmap_busy(bm));
    CHECK(qdirty_bitmap_recording(bm));
    CHECK(!qdirty_bitmap_has_successor(bm));
    CHECK(!qdirty_bitmap_skip_store(bm));

    /* busy: BUSY check fails with QEMU's message; RO/INCONSISTENT alone pass. */
    CHECK_RC(qdirty_bitmap_set_busy(bm, true, &err), 0, err);
    CHECK(qdirty_bitmap_busy(bm));
    CHECK(qdirty_bitmap_check(bm, QDIRTY_CHECK_ALLOW_RO, &err) == -EBUSY);
    CHECK(err && strcmp(qdirty_error_message(err),
                        "Bitmap 'b' is currently in use by another operation and cannot be used") == 0);
    qdirty_error_free(err);
    err = NULL;
    CHECK_RC(qdirty_bitmap_check(bm, QDIRTY_CHECK_RO | QDIRTY_CHECK_INCONSISTENT, &err), 0, err);
    CHECK_RC(qdirty_bitmap_clear(bm, &err), EBUSY, err);
    CHECK_RC(qdirty_bitmap_set_busy(bm, false, &err), 0, err);

    /* readonly: RO fails (EPERM), ALLOW_RO passes; the image then has readonly bitmaps. */
    CHECK(!qdirty_image_has_readonly_bitmaps(img));
    CHECK_RC(qdirty_bitmap_set_readonly(bm, true, &err), 0, err);
    CHECK(qdirty_bitmap_readonly(bm));
    CHECK(qdirty_image_has_readonly_bitmaps(img));
    CHECK(qdirty_bitmap_check(bm, QDIRTY_CHECK_DEFAULT, &err) == -EPERM);
    CHECK(err && strcmp(qdirty_error_message(err), "Bitmap 'b' is readonly and cannot be modified") == 0);
    qdirty_error_free(err);
    err = NULL;
    CHECK_RC(qdirty_bitmap_check(bm, QDIRTY_CHECK_ALLOW_RO, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(bm, 0, 512, &err), EPERM, err);
    CHECK_RC(qdirty_bitmap_set_readonly(bm, false, &err), 0, err);
    CHECK(!qdirty_image_has_readonly_bitmaps(img));

    /* skip_store and persistence flags. */
    CHECK_RC(qdirty_bitmap_set_skip_store(bm, true, &err), 0, err);
    CHECK(qdirty_bitmap_skip_store(bm));
    CHECK_RC(qdirty_bitmap_set_skip_store(bm, false, &err), 0, err);
    CHECK(!qdirty_bitmap_skip_store(bm));

    /* inconsistent needs persistent; then it disables and fails INCONSISTENT with the hint. */
    CHECK_RC(qdirty_bitmap_set_inconsistent(bm, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_set_persistence(bm, true, &err), 0, err);
    CHECK(qdirty_bitmap_persistent(bm));
    CHECK_RC(qdirty_bitmap_set_inconsistent(bm, &err), 0, err);
    CHECK(qdirty_bitmap_inconsistent(bm));
    CHECK(!qdirty_bitmap_enabled(bm));
    CHECK(!qdirty_bitmap_recording(bm));
    CHECK(qdirty_bitmap_check(bm, QDIRTY_CHECK_INCONSISTENT, &err) == -EINVAL);
    CHECK(err && qdirty_error_hint(err) != NULL &&
          strstr(qdirty_error_message(err), "is inconsistent and cannot be used") != NULL);
    qdirty_error_free(err);
    err = NULL;
    CHECK_RC(qdirty_bitmap_check(bm, 0, &err), 0, err);
    CHECK_RC(qdirty_bitmap_check(bm, 8, &err), EINVAL, err);

    CHECK_RC(qdirty_image_close(img, &err), 0, err);
}

static void test_create_release_successors(void)
{
    qdirty_error *err = NULL;
    qdirty_image *img = CHECK_PTR(qdirty_image_new_memory(1 * MIB, &err), 0, err);
    qdirty_bitmap *anon, *named, *succ, *again;
    uint64_t dirty_start, dirty_count;
    if (!img) {
        return;
    }
    /* Anonymous and named transient bitmaps. */
    anon = CHECK_PTR(qdirty_image_create_bitmap(img, NULL, 0, &err), 0, err);
    CHECK(qdirty_bitmap_name(anon) == NULL);
    CHECK_EQ_U64(qdirty_bitmap_granularity(anon), 65536);
    CHECK(qdirty_bitmap_enabled(anon));
    CHECK(!qdirty_bitmap_persistent(anon));
    named = CHECK_PTR(qdirty_image_create_bitmap(img, "n", 4096, &err), 0, err);
    CHECK_STR(qdirty_bitmap_name(named), "n");
    CHECK(qdirty_image_first_bitmap(img) == named); /* newest first */
    CHECK_PTR(qdirty_image_create_bitmap(img, "n", 4096, &err), EEXIST, err);
    CHECK_PTR(qdirty_image_create_bitmap(img, "x", 1000, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_create_bitmap(img, "", 4096, &err), EINVAL, err);

    /* The write hook reaches anonymous bitmaps too. */
    qdirty_image_set_dirty(img, 0, 1);
    CHECK(qdirty_bitmap_get(anon, 0));
    CHECK_RC(qdirty_bitmap_release(anon, &err), 0, err);
    CHECK(qdirty_image_first_bitmap(img) == named && qdirty_bitmap_next(named) == NULL);

    /* Successor of an enabled bitmap: parent frozen (disabled, busy), still recording. */
    CHECK_RC(qdirty_bitmap_set_dirty(named, 0, 4096, &err), 0, err);
    succ = CHECK_PTR(qdirty_bitmap_create_successor(named, &err), 0, err);
    CHECK(succ != NULL && qdirty_bitmap_name(succ) == NULL);
    CHECK(qdirty_bitmap_has_successor(named));
    CHECK(qdirty_bitmap_busy(named));
    CHECK(!qdirty_bitmap_enabled(named));
    CHECK(qdirty_bitmap_recording(named));
    CHECK(qdirty_bitmap_enabled(succ));
    CHECK_PTR(qdirty_bitmap_create_successor(named, &err), EBUSY, err);
    CHECK_RC(qdirty_bitmap_release(named, &err), EBUSY, err); /* busy, frozen */
    qdirty_image_set_dirty(img, 8192, 1);
    CHECK(!qdirty_bitmap_get(named, 8192));
    CHECK(qdirty_bitmap_get(succ, 8192));

    /* Reclaim: parent = parent | successor, enabled again, successor freed. */
    again = CHECK_PTR(qdirty_bitmap_reclaim(named, &err), 0, err);
    CHECK(again == named);
    CHECK(qdirty_bitmap_get(named, 0) && qdirty_bitmap_get(named, 8192));
    CHECK(!qdirty_bitmap_busy(named) && !qdirty_bitmap_has_successor(named));
    CHECK(qdirty_bitmap_enabled(named));
    CHECK(qdirty_bitmap_next(named) == NULL); /* the successor is gone */
    CHECK_PTR(qdirty_bitmap_reclaim(named, &err), EINVAL, err);
    CHECK_PTR(qdirty_bitmap_abdicate(named, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_enable_successor(named, &err), EINVAL, err);

    /* A disabled bitmap's successor starts disabled; enable_successor turns it on. */
    CHECK_RC(qdirty_bitmap_disable(named, &err), 0, err);
    succ = CHECK_PTR(qdirty_bitmap_create_successor(named, &err), 0, err);
    CHECK(!qdirty_bitmap_recording(named));
    CHECK(!qdirty_bitmap_enabled(succ));
    CHECK_RC(qdirty_bitmap_enable_successor(named, &err), 0, err);
    CHECK(qdirty_bitmap_enabled(succ));
    CHECK(qdirty_bitmap_recording(named));
    qdirty_image_set_dirty(img, 65536, 1);

    /* Abdicate: the successor takes the name (same pointer), the parent is freed. */
    again = CHECK_PTR(qdirty_bitmap_abdicate(named, &err), 0, err);
    CHECK(again == succ);
    CHECK_STR(qdirty_bitmap_name(succ), "n");
    CHECK(find_named(img, "n") == succ);
    CHECK(!qdirty_bitmap_get(succ, 0) && qdirty_bitmap_get(succ, 65536));
    CHECK(!qdirty_bitmap_busy(succ));
    CHECK(qdirty_image_first_bitmap(img) == succ && qdirty_bitmap_next(succ) == NULL);
    CHECK(qdirty_bitmap_next_dirty_area(succ, 0, UINT64_MAX, UINT64_MAX, &dirty_start, &dirty_count));
    CHECK_EQ_U64(dirty_start, 65536);
    CHECK_EQ_U64(dirty_count, 4096);
    CHECK_RC(qdirty_bitmap_release(succ, &err), 0, err);
    CHECK(qdirty_image_first_bitmap(img) == NULL);

    CHECK_RC(qdirty_image_close(img, &err), 0, err);
}

static void test_backup_and_merge(void)
{
    qdirty_error *err = NULL;
    qdirty_image *a = CHECK_PTR(qdirty_image_new_memory(1 * MIB, &err), 0, err);
    qdirty_image *b = CHECK_PTR(qdirty_image_new_memory(1 * MIB, &err), 0, err);
    qdirty_image *c = CHECK_PTR(qdirty_image_new_memory(2 * MIB, &err), 0, err);
    qdirty_bitmap *x, *y, *z, *w;
    qdirty_backup *bk = (qdirty_backup *)1;
    if (!a || !b || !c) {
        goto out;
    }
    x = CHECK_PTR(qdirty_image_add_bitmap(a, "x", 4096, 0, &err), 0, err);
    y = CHECK_PTR(qdirty_image_add_bitmap(b, "y", 65536, 0, &err), 0, err);
    z = CHECK_PTR(qdirty_image_add_bitmap(c, "z", 4096, 0, &err), 0, err);
    w = CHECK_PTR(qdirty_image_create_bitmap(a, NULL, 512, &err), 0, err);

    /* clear with a backup, restore: bits back; the backup is emptied, not freed. */
    CHECK_RC(qdirty_bitmap_set_dirty(x, 4096, 8192, &err), 0, err);
    CHECK_RC(qdirty_bitmap_clear_with_backup(x, &bk, &err), 0, err);
    CHECK(bk != NULL);
    CHECK_EQ_U64(qdirty_bitmap_count(x), 0);
    CHECK_RC(qdirty_bitmap_restore(x, bk, &err), 0, err);
    CHECK_EQ_U64(qdirty_bitmap_count(x), 8192);
    CHECK_RC(qdirty_bitmap_restore(x, bk, &err), EINVAL, err); /* empty now */
    qdirty_backup_free(bk);
    bk = NULL;
    /* A backup of another shape is refused and kept. */
    CHECK_RC(qdirty_bitmap_clear_with_backup(w, &bk, &err), 0, err);
    CHECK_RC(qdirty_bitmap_restore(x, bk, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_restore(w, bk, &err), 0, err);
    qdirty_backup_free(bk);
    bk = NULL;

    /* merge across images (different granularity), with a backup, and restore. */
    CHECK_RC(qdirty_bitmap_set_dirty(y, 0, 1, &err), 0, err);
    CHECK_RC(qdirty_bitmap_merge(x, y, &bk, &err), 0, err);
    CHECK(bk != NULL);
    CHECK(qdirty_bitmap_get(x, 0) && qdirty_bitmap_get(x, 61440));
    CHECK_EQ_U64(qdirty_bitmap_count(x), 65536);
    CHECK_RC(qdirty_bitmap_restore(x, bk, &err), 0, err);
    CHECK(!qdirty_bitmap_get(x, 0));
    CHECK_EQ_U64(qdirty_bitmap_count(x), 8192);
    qdirty_backup_free(bk);
    bk = (qdirty_backup *)1;
    /* merge without backup (the other direction, rounded outward), same image, itself. */
    CHECK_RC(qdirty_bitmap_merge(y, x, NULL, &err), 0, err);
    CHECK_EQ_U64(qdirty_bitmap_count(y), 65536);
    CHECK_RC(qdirty_bitmap_merge(w, x, NULL, &err), 0, err);
    CHECK_EQ_U64(qdirty_bitmap_count(w), 8192);
    CHECK_RC(qdirty_bitmap_merge(x, x, NULL, &err), 0, err);
    /* sizes differ: QEMU's message, nothing changes, *backup reset. */
    CHECK(qdirty_bitmap_merge(x, z, &bk, &err) == -EINVAL);
    CHECK(bk == NULL);
    CHECK(err && strstr(qdirty_error_message(err), "Bitmaps are of different sizes") != NULL);
    qdirty_error_free(err);
    err = NULL;
    /* readonly source ok, readonly target refused, busy source refused. */
    CHECK_RC(qdirty_bitmap_set_readonly(y, true, &err), 0, err);
    CHECK_RC(qdirty_bitmap_merge(x, y, NULL, &err), 0, err);
    CHECK_RC(qdirty_bitmap_merge(y, x, NULL, &err), EPERM, err);
    CHECK_RC(qdirty_bitmap_clear_with_backup(y, &bk, &err), EPERM, err);
    CHECK(bk == NULL);
    CHECK_RC(qdirty_bitmap_set_readonly(y, false, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_busy(y, true, &err), 0, err);
    CHECK_RC(qdirty_bitmap_merge(x, y, NULL, &err), EBUSY, err);
    CHECK_RC(qdirty_bitmap_set_busy(y, false, &err), 0, err);

out:
    if (a) CHECK_RC(qdirty_image_close(a, &err), 0, err);
    if (b) CHECK_RC(qdirty_image_close(b, &err), 0, err);
    if (c) CHECK_RC(qdirty_image_close(c, &err), 0, err);
}

static void test_iter_and_status(void)
{
    qdirty_error *err = NULL;
    qdirty_image *img = CHECK_PTR(qdirty_image_new_memory(1 * MIB, &err), 0, err);
    qdirty_bitmap *bm;
    qdirty_iter *it;
    uint64_t count = 7;
    if (!img) {
        return;
    }
    bm = CHECK_PTR(qdirty_image_add_bitmap(img, "b", 4096, 0, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(bm, 4096, 8192, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(bm, 65536, 1, &err), 0, err);

    it = CHECK_PTR(qdirty_bitmap_iter_new(bm, &err), 0, err);
    {
        int64_t got[5];
        for (int i = 0; i < 5; i++) {
            got[i] = qdirty_iter_next(it);
        }
        CHECK_EQ_I64(got[0], 4096);
        CHECK_EQ_I64(got[1], 8192);
        CHECK_EQ_I64(got[2], 65536);
        CHECK_EQ_I64(got[3], -1);
        CHECK_EQ_I64(got[4], -1);
        CHECK_RC(qdirty_iter_seek(it, 5000, &err), 0, err);
        got[0] = qdirty_iter_next(it); /* the granule containing 5000 */
        CHECK_EQ_I64(got[0], 4096);
    }
    CHECK_RC(qdirty_iter_seek(it, 1 * MIB, &err), EINVAL, err);
    /* An iterated bitmap cannot be released, nor the image truncated. */
    CHECK_RC(qdirty_bitmap_release(bm, &err), EBUSY, err);
    CHECK_RC(qdirty_image_truncate(img, 2 * MIB, &err), EINVAL, err);
    qdirty_iter_free(it);
    qdirty_iter_free(NULL);

    /* status: 1 dirty / 0 clean, run lengths capped at bytes. */
    CHECK(qdirty_bitmap_status(bm, 4096, 65536, &count, &err) == 1);
    CHECK_EQ_U64(count, 8192);
    CHECK(qdirty_bitmap_status(bm, 0, 65536, &count, &err) == 0);
    CHECK_EQ_U64(count, 4096);
    CHECK(qdirty_bitmap_status(bm, 12288, 4096, &count, &err) == 0);
    CHECK_EQ_U64(count, 4096);
    CHECK(err == NULL);
    CHECK_RC(qdirty_bitmap_status(bm, 0, 0, &count, &err), EINVAL, err);
    CHECK_EQ_U64(count, 0);
    CHECK_RC(qdirty_bitmap_status(bm, 1 * MIB, 1, &count, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_status(bm, 0, 1, NULL, &err), EINVAL, err);

    /* truncate: grow clean, shrink drops granules beyond the end. */
    CHECK_RC(qdirty_image_truncate(img, 2 * MIB, &err), 0, err);
    CHECK_EQ_U64(qdirty_bitmap_size(bm), 2 * MIB);
    CHECK_EQ_U64(qdirty_image_size(img), 2 * MIB);
    CHECK_EQ_U64(qdirty_bitmap_count(bm), 3 * 4096);
    CHECK_RC(qdirty_image_truncate(img, 8192, &err), 0, err);
    CHECK_EQ_U64(qdirty_bitmap_count(bm), 4096);
    CHECK_RC(qdirty_bitmap_set_busy(bm, true, &err), 0, err);
    CHECK_RC(qdirty_image_truncate(img, 4096, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_set_busy(bm, false, &err), 0, err);

    CHECK_RC(qdirty_image_close(img, &err), 0, err);
}

static void test_serialization(void)
{
    qdirty_error *err = NULL;
    qdirty_image *img = CHECK_PTR(qdirty_image_new_memory(1 * MIB + 512, &err), 0, err);
    qdirty_bitmap *src, *dst;
    uint8_t buf[64];
    int64_t n;
    uint64_t align;
    if (!img) {
        return;
    }
    src = CHECK_PTR(qdirty_image_add_bitmap(img, "s", 4096, 0, &err), 0, err);
    dst = CHECK_PTR(qdirty_image_add_bitmap(img, "d", 4096, QDIRTY_BITMAP_DISABLED, &err), 0, err);
    align = qdirty_bitmap_serialization_align(src);
    CHECK_EQ_U64(align, 64 * 4096);
    n = qdirty_bitmap_serialization_size(src, 0, align, &err);
    CHECK_EQ_I64(n, 8);
    /* The last chunk may be partial: 1 MiB + 512 is 257 granules -> 5 words. */
    n = qdirty_bitmap_serialization_size(src, 0, 1 * MIB + 512, &err);
    CHECK_EQ_I64(n, 40);
    n = qdirty_bitmap_serialization_size(src, 4096, align, &err);
    CHECK_EQ_I64(n, -EINVAL);
    CHECK(err != NULL);
    qdirty_error_free(err);
    err = NULL;
    n = qdirty_bitmap_serialization_size(src, 0, 0, &err);
    CHECK_EQ_I64(n, 0);
    CHECK(err == NULL);

    /* granule 0 and 9 -> byte 0 bit 0, byte 1 bit 1 (LSB first). */
    CHECK_RC(qdirty_bitmap_set_dirty(src, 0, 1, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(src, 9 * 4096, 1, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(src, 1 * MIB, 512, &err), 0, err); /* last granule */
    memset(buf, 0xee, sizeof buf);
    CHECK_RC(qdirty_bitmap_serialize_part(src, buf, sizeof buf, 0, align, &err), 0, err);
    CHECK(buf[0] == 0x01 && buf[1] == 0x02 && buf[2] == 0 && buf[7] == 0 && buf[8] == 0xee);
    CHECK_RC(qdirty_bitmap_serialize_part(src, buf, 4, 0, align, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_serialize_part(src, NULL, 8, 0, align, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_serialize_part(src, NULL, 0, 0, 0, &err), 0, err);

    /* deserialize into dst without finish: invisible until finish. */
    CHECK_RC(qdirty_bitmap_deserialize_part(dst, buf, 8, 0, align, false, &err), 0, err);
    CHECK_EQ_U64(qdirty_bitmap_count(dst), 0);
    CHECK_RC(qdirty_bitmap_deserialize_finish(dst, &err), 0, err);
    CHECK_EQ_U64(qdirty_bitmap_count(dst), 2 * 4096);
    CHECK(qdirty_bitmap_get(dst, 9 * 4096));
    CHECK_RC(qdirty_bitmap_deserialize_part(dst, buf, 7, 0, align, true, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_deserialize_part(dst, NULL, 8, 0, align, true, &err), EINVAL, err);

    /* ones / zeroes over the tail chunk (ends at the end: unaligned length allowed). */
    CHECK_RC(qdirty_bitmap_deserialize_ones(dst, 4 * align, 1 * MIB + 512 - 4 * align, true, &err), 0, err);
    CHECK(qdirty_bitmap_get(dst, 1 * MIB));
    CHECK_EQ_U64(qdirty_bitmap_count(dst), 3 * 4096);
    CHECK_RC(qdirty_bitmap_deserialize_zeroes(dst, 0, align, true, &err), 0, err);
    CHECK_EQ_U64(qdirty_bitmap_count(dst), 4096);
    CHECK_RC(qdirty_bitmap_deserialize_zeroes(dst, 512, align, true, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_deserialize_ones(dst, 0, 2 * MIB, true, &err), EINVAL, err);
    /* readonly bitmaps cannot be deserialized into */
    CHECK_RC(qdirty_bitmap_set_readonly(dst, true, &err), 0, err);
    CHECK_RC(qdirty_bitmap_deserialize_zeroes(dst, 0, align, true, &err), EPERM, err);
    CHECK_RC(qdirty_bitmap_set_readonly(dst, false, &err), 0, err);

    CHECK_RC(qdirty_image_close(img, &err), 0, err);
}

static void test_query(void)
{
    qdirty_error *err = NULL;
    qdirty_image *img = CHECK_PTR(qdirty_image_new_memory(1 * MIB, &err), 0, err);
    qdirty_bitmap_info *info = (qdirty_bitmap_info *)1;
    size_t n = 99;
    qdirty_bitmap *a, *s;
    if (!img) {
        return;
    }
    CHECK_RC(qdirty_image_query_bitmaps(img, &info, &n, &err), 0, err);
    CHECK(info == NULL && n == 0);
    qdirty_bitmap_info_free(info, n);

    a = CHECK_PTR(qdirty_image_add_bitmap(img, "a", 4096, 0, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(a, 0, 4096, &err), 0, err);
    s = CHECK_PTR(qdirty_bitmap_create_successor(a, &err), 0, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "d", 65536, QDIRTY_BITMAP_DISABLED, &err), 0, err);
    CHECK_RC(qdirty_image_query_bitmaps(img, &info, &n, &err), 0, err);
    CHECK_EQ_U64(n, 3);
    if (n == 3) {
        /* newest first: d, the successor, a */
        CHECK_STR(info[0].name, "d");
        CHECK(!info[0].recording && !info[0].busy && !info[0].persistent && !info[0].inconsistent);
        CHECK_EQ_U64(info[0].granularity, 65536);
        CHECK(info[1].name == NULL);
        CHECK(info[1].recording && !info[1].busy);
        CHECK_STR(info[2].name, "a");
        CHECK(info[2].recording && info[2].busy);
        CHECK_EQ_U64(info[2].count, 4096);
        CHECK_EQ_U64(info[2].granularity, 4096);
    }
    qdirty_bitmap_info_free(info, n);
    CHECK_PTR(qdirty_bitmap_reclaim(a, &err), 0, err);
    (void)s;
    qdirty_bitmap_info_free(NULL, 0);
    CHECK_RC(qdirty_image_close(img, &err), 0, err);
}

static void test_reopen_and_stored(const char *dir)
{
    qdirty_error *err = NULL;
    char *path = qt_path(dir, "mirror-reopen.qcow2");
    qdirty_image *img;
    qdirty_bitmap *p, *t;
    if (!path) {
        return;
    }
    CHECK_RC(qdirty_image_create(path, 16 * MIB, 0, &err), 0, err);
    img = CHECK_PTR(qdirty_image_open(path, QDIRTY_OPEN_RDWR, &err), 0, err);
    if (!img) {
        free(path);
        return;
    }
    CHECK_EQ_U64(qdirty_image_default_granularity(img), 65536);
    p = CHECK_PTR(qdirty_image_add_bitmap(img, "p", 0, QDIRTY_BITMAP_PERSISTENT, &err), 0, err);
    t = CHECK_PTR(qdirty_image_create_bitmap(img, "t", 0, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(p, 0, 65536, &err), 0, err);

    /* rw -> ro: persistent bitmaps stored and readonly; the transient one is not. */
    CHECK_RC(qdirty_image_reopen(img, 0, &err), 0, err);
    CHECK(qdirty_image_read_only(img));
    CHECK(qdirty_bitmap_readonly(p));
    CHECK(!qdirty_bitmap_readonly(t));
    CHECK(qdirty_image_has_readonly_bitmaps(img));
    CHECK_RC(qdirty_bitmap_set_dirty(p, 0, 1, &err), EPERM, err);
    CHECK_RC(qdirty_image_remove_stored_bitmap(img, "p", &err), EROFS, err);
    CHECK_RC(qdirty_image_reopen(img, 0, &err), 0, err); /* no-op */
    CHECK_RC(qdirty_image_reopen(img, 2, &err), EINVAL, err);
    /* ro -> rw */
    CHECK_RC(qdirty_image_reopen(img, QDIRTY_OPEN_RDWR, &err), 0, err);
    CHECK(!qdirty_image_read_only(img));
    CHECK(!qdirty_bitmap_readonly(p));
    CHECK(!qdirty_image_has_readonly_bitmaps(img));
    CHECK_EQ_U64(qdirty_bitmap_count(p), 65536);

    /* remove_stored_bitmap: the stored copy goes; unknown names are fine. */
    CHECK_RC(qdirty_image_remove_stored_bitmap(img, "nope", &err), 0, err);
    CHECK_RC(qdirty_image_store_bitmaps(img, &err), 0, err);
    CHECK_RC(qdirty_image_remove_stored_bitmap(img, "p", &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_persistence(p, false, &err), 0, err);
    CHECK_RC(qdirty_image_close(img, &err), 0, err);

    img = CHECK_PTR(qdirty_image_open(path, 0, &err), 0, err);
    if (img) {
        CHECK(qdirty_image_first_bitmap(img) == NULL);
        CHECK_RC(qdirty_image_close(img, &err), 0, err);
    }
    remove(path);
    free(path);
}

/* Bad arguments to every function of the mirror: an error with a message, never a crash. */
static void test_bad_arguments(void)
{
    qdirty_error *err = NULL;
    qdirty_backup *bk = NULL;
    qdirty_bitmap_info *info = (qdirty_bitmap_info *)1;
    size_t n = 5;
    uint64_t count = 5;
    uint8_t buf[8] = {0};
    int64_t junk[8] = {0};
    qdirty_image *img;
    qdirty_bitmap *bm;
    qdirty_iter *it;

    CHECK_RC(qdirty_bitmap_check(NULL, 0, &err), EINVAL, err);
    CHECK(!qdirty_bitmap_busy(NULL));
    CHECK_RC(qdirty_bitmap_set_busy(NULL, true, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_set_readonly(NULL, true, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_set_persistence(NULL, true, &err), EINVAL, err);
    CHECK(!qdirty_bitmap_skip_store(NULL));
    CHECK_RC(qdirty_bitmap_set_skip_store(NULL, true, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_set_inconsistent(NULL, &err), EINVAL, err);
    CHECK(!qdirty_bitmap_recording(NULL));
    CHECK(!qdirty_bitmap_has_successor(NULL));
    CHECK_PTR(qdirty_image_create_bitmap(NULL, "a", 0, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_release(NULL, &err), EINVAL, err);
    CHECK_PTR(qdirty_bitmap_create_successor(NULL, &err), EINVAL, err);
    CHECK_PTR(qdirty_bitmap_abdicate(NULL, &err), EINVAL, err);
    CHECK_PTR(qdirty_bitmap_reclaim(NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_enable_successor(NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_clear_with_backup(NULL, &bk, &err), EINVAL, err);
    CHECK(bk == NULL);
    CHECK_RC(qdirty_bitmap_restore(NULL, NULL, &err), EINVAL, err);
    qdirty_backup_free(NULL);
    CHECK_RC(qdirty_bitmap_merge(NULL, NULL, NULL, &err), EINVAL, err);
    CHECK_PTR(qdirty_bitmap_iter_new(NULL, &err), EINVAL, err);
    CHECK(qdirty_iter_next(NULL) == -EINVAL);
    CHECK_RC(qdirty_iter_seek(NULL, 0, &err), EINVAL, err);
    qdirty_iter_free(NULL);
    CHECK_RC(qdirty_bitmap_status(NULL, 0, 1, &count, &err), EINVAL, err);
    CHECK_EQ_U64(count, 0);
    CHECK_EQ_U64(qdirty_bitmap_serialization_align(NULL), 0);
    CHECK(qdirty_bitmap_serialization_size(NULL, 0, 0, &err) == -EINVAL);
    CHECK(err && qdirty_error_message(err) && strstr(qdirty_error_message(err), "bitmap"));
    qdirty_error_free(err);
    err = NULL;
    CHECK_RC(qdirty_bitmap_serialize_part(NULL, buf, sizeof buf, 0, 0, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_deserialize_part(NULL, buf, sizeof buf, 0, 0, true, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_deserialize_zeroes(NULL, 0, 0, true, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_deserialize_ones(NULL, 0, 0, true, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_deserialize_finish(NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_image_query_bitmaps(NULL, &info, &n, &err), EINVAL, err);
    CHECK(info == NULL && n == 0);
    qdirty_bitmap_info_free(NULL, 3);
    CHECK_RC(qdirty_image_truncate(NULL, 0, &err), EINVAL, err);
    CHECK_RC(qdirty_image_reopen(NULL, 0, &err), EINVAL, err);
    CHECK_EQ_U64(qdirty_image_default_granularity(NULL), 0);
    CHECK(!qdirty_image_has_readonly_bitmaps(NULL));
    CHECK_RC(qdirty_image_remove_stored_bitmap(NULL, "a", &err), EINVAL, err);

    /* Not-a-handle pointers (right size, wrong magic) are recognized. */
    CHECK_RC(qdirty_bitmap_check((qdirty_bitmap *)junk, 0, &err), EINVAL, err);
    CHECK(qdirty_iter_next((qdirty_iter *)junk) == -EINVAL);
    CHECK_RC(qdirty_bitmap_restore(NULL, (qdirty_backup *)junk, &err), EINVAL, err);
    qdirty_backup_free((qdirty_backup *)junk);
    qdirty_iter_free((qdirty_iter *)junk);

    /* With a valid image and bitmap: NULL out-parameters and names. */
    img = CHECK_PTR(qdirty_image_new_memory(1 * MIB, &err), 0, err);
    if (!img) {
        return;
    }
    bm = CHECK_PTR(qdirty_image_add_bitmap(img, "b", 0, 0, &err), 0, err);
    CHECK_RC(qdirty_bitmap_clear_with_backup(bm, NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_restore(bm, NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_merge(bm, NULL, NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_merge(NULL, bm, NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_image_query_bitmaps(img, NULL, &n, &err), EINVAL, err);
    CHECK_RC(qdirty_image_query_bitmaps(img, &info, NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_image_remove_stored_bitmap(img, NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_image_reopen(img, 0x80, &err), EINVAL, err);
    it = CHECK_PTR(qdirty_bitmap_iter_new(bm, &err), 0, err);
    qdirty_iter_free(it);
    /* errp rule: a set *errp makes every call fail with -EINVAL/NULL without touching it. */
    err = (qdirty_error *)junk;
    CHECK_EQ_I64(qdirty_bitmap_check(bm, 0, &err), -EINVAL);
    CHECK(qdirty_image_create_bitmap(img, "z", 0, &err) == NULL);
    CHECK_EQ_I64(qdirty_bitmap_status(bm, 0, 1, &count, &err), -EINVAL);
    CHECK_EQ_I64(qdirty_bitmap_serialization_size(bm, 0, 0, &err), -EINVAL);
    CHECK(qdirty_image_new_memory(1, &err) == NULL);
    CHECK(err == (qdirty_error *)junk);
    err = NULL;
    /* errp NULL: same failures. */
    CHECK_EQ_I64(qdirty_bitmap_release(NULL, NULL), -EINVAL);
    CHECK(qdirty_bitmap_create_successor(NULL, NULL) == NULL);
    CHECK_EQ_I64(qdirty_bitmap_status(bm, 0, 0, &count, NULL), -EINVAL);
    CHECK_EQ_I64(qdirty_bitmap_serialization_size(bm, 1, 1, NULL), -EINVAL);
    CHECK(qdirty_image_new_memory(UINT64_MAX, NULL) == NULL);
    CHECK_PTR(qdirty_image_new_memory(UINT64_MAX, &err), EINVAL, err);
    CHECK_RC(qdirty_image_close(img, &err), 0, err);
}

void test_mirror(const char *dir)
{
    test_state_and_check();
    test_create_release_successors();
    test_backup_and_merge();
    test_iter_and_status();
    test_serialization();
    test_query();
    test_reopen_and_stored(dir);
    test_bad_arguments();
}
