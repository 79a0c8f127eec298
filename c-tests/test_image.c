/* Images the way an emulator uses them: create, open read-write, add bitmaps, track writes,
 * merge, remove, close, reopen; read-only opens; images left in use by a crash. */
#define _POSIX_C_SOURCE 200809L

#include "qdirty_test.h"

#define MiB (1024u * 1024u)
#define KiB 1024u

static const char AUTOLOAD_WARNING[] = "Autoload option is deprecated and its value is ignored";

/* The warning handler: records the last message and the number of calls. */
struct warnings {
    int count;
    char last[256];
};

static void capture_warning(const char *message, void *opaque)
{
    struct warnings *w = opaque;
    w->count++;
    snprintf(w->last, sizeof(w->last), "%s", message ? message : "(null)");
}

static int count_bitmaps(qdirty_image *img)
{
    int n = 0;
    for (qdirty_bitmap *bm = qdirty_image_first_bitmap(img); bm; bm = qdirty_bitmap_next(bm)) {
        n++;
        if (n > 100) {
            break;
        }
    }
    return n;
}

static void check_sha(qdirty_bitmap *bm, const char *expected)
{
    qdirty_error *err = NULL;
    char *hex = CHECK_PTR(qdirty_bitmap_sha256(bm, &err), 0, err);
    CHECK_STR(hex, expected);
    qdirty_string_free(hex);
}

/* sha256 of 8 zero bytes: an empty bitmap of 16 granules (one 64-bit word, as QEMU hashes). */
static const char SHA_EMPTY_WORD[] = "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc";
/* sha256 of 01 00 00 00 00 00 00 00: granule 0 dirty. */
static const char SHA_FIRST_GRANULE[] = "7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8";

static void test_lifecycle(const char *dir)
{
    qdirty_error *err = NULL;
    struct warnings w = {0, ""};
    char *path = qt_path(dir, "lifecycle.qcow2");
    qdirty_image *img;
    qdirty_bitmap *persist, *disabled, *autoload, *transient, *bm;
    char *autoload_sha;

    CHECK_RC(qdirty_image_create(path, 1 * MiB, 64 * KiB, &err), 0, err);
    CHECK_RC(qdirty_image_create(path, 1 * MiB, 64 * KiB, &err), EEXIST, err);

    img = CHECK_PTR(qdirty_image_open(path, QDIRTY_OPEN_RDWR, &err), 0, err);
    CHECK_EQ_U64(qdirty_image_size(img), 1 * MiB);
    CHECK(!qdirty_image_read_only(img));
    CHECK(qdirty_image_first_bitmap(img) == NULL);

    qdirty_set_warning_handler(capture_warning, &w);

    /* Granularity 0: QEMU's default for 64 KiB clusters is 64 KiB. */
    persist = CHECK_PTR(qdirty_image_add_bitmap(img, "persist", 0, QDIRTY_BITMAP_PERSISTENT, &err),
                        0, err);
    CHECK_STR(qdirty_bitmap_name(persist), "persist");
    CHECK_EQ_U64(qdirty_bitmap_granularity(persist), 64 * KiB);
    CHECK_EQ_U64(qdirty_bitmap_size(persist), 1 * MiB);
    CHECK(qdirty_bitmap_enabled(persist));
    CHECK(qdirty_bitmap_persistent(persist));
    CHECK(!qdirty_bitmap_inconsistent(persist));
    CHECK(!qdirty_bitmap_readonly(persist));
    CHECK_EQ_U64(qdirty_bitmap_count(persist), 0);
    check_sha(persist, SHA_EMPTY_WORD);

    disabled = CHECK_PTR(qdirty_image_add_bitmap(img, "disabled", 4096,
                                                 QDIRTY_BITMAP_PERSISTENT | QDIRTY_BITMAP_DISABLED,
                                                 &err),
                         0, err);
    CHECK_EQ_U64(qdirty_bitmap_granularity(disabled), 4096);
    CHECK(!qdirty_bitmap_enabled(disabled));
    CHECK(qdirty_bitmap_persistent(disabled));
    CHECK_EQ_I64(w.count, 0);

    /* The deprecated autoload flag: accepted, ignored, warned about. */
    autoload = CHECK_PTR(qdirty_image_add_bitmap(img, "autoload", 0,
                                                 QDIRTY_BITMAP_PERSISTENT | QDIRTY_BITMAP_AUTOLOAD,
                                                 &err),
                         0, err);
    CHECK_EQ_I64(w.count, 1);
    CHECK(strstr(w.last, AUTOLOAD_WARNING) != NULL);
    CHECK(qdirty_bitmap_enabled(autoload));

    transient = CHECK_PTR(qdirty_image_add_bitmap(img, "transient", 0, 0, &err), 0, err);
    CHECK(!qdirty_bitmap_persistent(transient));

    /* Rejected adds. */
    CHECK_PTR(qdirty_image_add_bitmap(img, "persist", 0, 0, &err), EEXIST, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "g", 1000, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "g", 256, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "g", 1u << 31, 0, &err), 0, err); /* 2 GiB: the max */
    CHECK_RC(qdirty_image_remove_bitmap(img, "g", &err), 0, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "", 0, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "f", 0, 8, &err), EINVAL, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "f", 0, 0xffffffffu, &err), EINVAL, err);
    CHECK(qdirty_image_find_bitmap(img, "f") == NULL);
    CHECK_PTR(qdirty_image_add_bitmap(img, NULL, 0, 0, &err), EINVAL, err);
    {
        char long_name[1025];
        memset(long_name, 'n', 1024);
        long_name[1024] = '\0';
        CHECK_PTR(qdirty_image_add_bitmap(img, long_name, 0, 0, &err), EINVAL, err);
        long_name[1023] = '\0'; /* 1023 bytes: the maximum */
        bm = CHECK_PTR(qdirty_image_add_bitmap(img, long_name, 0, 0, &err), 0, err);
        CHECK(bm != NULL && strlen(qdirty_bitmap_name(bm)) == 1023);
        CHECK_RC(qdirty_image_remove_bitmap(img, long_name, &err), 0, err);
    }

    /* Lookup and iteration (newest first); the same bitmap is the same pointer. */
    CHECK(qdirty_image_find_bitmap(img, "disabled") == disabled);
    CHECK(qdirty_image_find_bitmap(img, "nope") == NULL);
    CHECK(qdirty_image_find_bitmap(img, NULL) == NULL);
    CHECK(qdirty_image_first_bitmap(img) == transient);
    CHECK(qdirty_bitmap_next(transient) == autoload);
    CHECK(qdirty_bitmap_next(autoload) == disabled);
    CHECK(qdirty_bitmap_next(disabled) == persist);
    CHECK(qdirty_bitmap_next(persist) == NULL);
    CHECK_EQ_I64(count_bitmaps(img), 4);

    /* The write hook marks enabled bitmaps only. */
    qdirty_image_set_dirty(img, 0, 512);
    CHECK(qdirty_bitmap_get(persist, 0));
    CHECK(qdirty_bitmap_get(autoload, 0));
    CHECK(qdirty_bitmap_get(transient, 0));
    CHECK(!qdirty_bitmap_get(disabled, 0));
    CHECK_EQ_U64(qdirty_bitmap_count(persist), 64 * KiB);
    check_sha(persist, SHA_FIRST_GRANULE);
    check_sha(autoload, SHA_FIRST_GRANULE);
    qdirty_image_set_dirty(img, 2 * MiB, 512); /* beyond the end: clamped, no crash */

    /* Disabled bitmaps take explicit sets. */
    CHECK_RC(qdirty_bitmap_set_dirty(disabled, 128 * KiB, 1, &err), 0, err);
    CHECK(qdirty_bitmap_get(disabled, 128 * KiB));
    CHECK_EQ_U64(qdirty_bitmap_count(disabled), 4096);

    /* Enable / disable. */
    CHECK_RC(qdirty_bitmap_enable(disabled, &err), 0, err);
    CHECK(qdirty_bitmap_enabled(disabled));
    CHECK_RC(qdirty_bitmap_disable(persist, &err), 0, err);
    CHECK(!qdirty_bitmap_enabled(persist));
    qdirty_image_set_dirty(img, 512 * KiB, 512);
    CHECK(!qdirty_bitmap_get(persist, 512 * KiB));
    CHECK(qdirty_bitmap_get(disabled, 512 * KiB));

    /* Merge within the image (src_img NULL or img), across granularities. */
    CHECK_RC(qdirty_image_merge_bitmap(img, "persist", NULL, "disabled", &err), 0, err);
    CHECK(qdirty_bitmap_get(persist, 128 * KiB));
    CHECK(qdirty_bitmap_get(persist, 512 * KiB));
    CHECK_RC(qdirty_image_merge_bitmap(img, "transient", img, "persist", &err), 0, err);
    CHECK(qdirty_bitmap_get(transient, 128 * KiB));
    CHECK_RC(qdirty_image_merge_bitmap(img, "nope", NULL, "persist", &err), ENOENT, err);
    CHECK_RC(qdirty_image_merge_bitmap(img, "persist", NULL, "nope", &err), ENOENT, err);
    CHECK_RC(qdirty_image_merge_bitmap(img, NULL, NULL, "persist", &err), EINVAL, err);
    CHECK_RC(qdirty_image_merge_bitmap(img, "persist", NULL, NULL, &err), EINVAL, err);

    /* Remove. */
    CHECK_RC(qdirty_image_remove_bitmap(img, "transient", &err), 0, err);
    CHECK_RC(qdirty_image_remove_bitmap(img, "transient", &err), ENOENT, err);
    CHECK_RC(qdirty_image_remove_bitmap(img, NULL, &err), EINVAL, err);
    CHECK(qdirty_image_find_bitmap(img, "transient") == NULL);
    CHECK(qdirty_image_first_bitmap(img) == autoload);
    CHECK_EQ_I64(count_bitmaps(img), 3);

    /* A checkpoint store keeps everything loaded. */
    CHECK_RC(qdirty_image_store_bitmaps(img, &err), 0, err);
    CHECK_EQ_I64(count_bitmaps(img), 3);

    autoload_sha = qdirty_bitmap_sha256(autoload, NULL);
    CHECK(autoload_sha != NULL && strlen(autoload_sha) == 64);
    CHECK(autoload_sha != NULL && strcmp(autoload_sha, SHA_FIRST_GRANULE) != 0);
    CHECK_RC(qdirty_image_close(img, &err), 0, err);

    /* Reopen: persistent bitmaps are back; enabled <-> auto flag; contents survive. */
    img = CHECK_PTR(qdirty_image_open(path, QDIRTY_OPEN_RDWR, &err), 0, err);
    CHECK_EQ_I64(count_bitmaps(img), 3);
    persist = qdirty_image_find_bitmap(img, "persist");
    disabled = qdirty_image_find_bitmap(img, "disabled");
    autoload = qdirty_image_find_bitmap(img, "autoload");
    CHECK(persist != NULL && disabled != NULL && autoload != NULL);
    CHECK(qdirty_image_find_bitmap(img, "transient") == NULL);
    CHECK(!qdirty_bitmap_enabled(persist)); /* disabled when stored */
    CHECK(qdirty_bitmap_enabled(disabled)); /* enabled when stored */
    CHECK(qdirty_bitmap_enabled(autoload));
    CHECK(qdirty_bitmap_persistent(persist) && qdirty_bitmap_persistent(disabled));
    CHECK_EQ_U64(qdirty_bitmap_granularity(disabled), 4096);
    CHECK(qdirty_bitmap_get(persist, 0));
    CHECK(qdirty_bitmap_get(persist, 128 * KiB));
    CHECK(qdirty_bitmap_get(persist, 512 * KiB));
    CHECK(!qdirty_bitmap_get(persist, 256 * KiB));
    CHECK(qdirty_bitmap_get(disabled, 128 * KiB));
    CHECK_EQ_U64(qdirty_bitmap_count(disabled), 2 * 4096);
    check_sha(autoload, autoload_sha ? autoload_sha : "(none)");
    qdirty_string_free(autoload_sha);

    /* Removing a persistent bitmap removes it from the file. */
    CHECK_RC(qdirty_image_remove_bitmap(img, "autoload", &err), 0, err);
    CHECK_RC(qdirty_image_close(img, &err), 0, err);
    img = CHECK_PTR(qdirty_image_open(path, 0, &err), 0, err);
    CHECK_EQ_I64(count_bitmaps(img), 2);
    CHECK(qdirty_image_find_bitmap(img, "autoload") == NULL);
    CHECK_RC(qdirty_image_close(img, &err), 0, err);

    qdirty_set_warning_handler(NULL, NULL);
    remove(path);
    free(path);
}

static void test_read_only(const char *dir)
{
    qdirty_error *err = NULL;
    char *path = qt_path(dir, "readonly.qcow2");
    qdirty_image *img;
    qdirty_bitmap *bm;
    unsigned char *before, *after;
    size_t before_len = 0, after_len = 0;
    int rc;

    CHECK_RC(qdirty_image_create(path, 4 * MiB, 0, &err), 0, err);
    img = CHECK_PTR(qdirty_image_open(path, QDIRTY_OPEN_RDWR, &err), 0, err);
    bm = CHECK_PTR(qdirty_image_add_bitmap(img, "b", 0, QDIRTY_BITMAP_PERSISTENT, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(bm, 0, 1, &err), 0, err);
    CHECK_RC(qdirty_image_close(img, &err), 0, err);

    before = qt_read_file(path, &before_len);
    img = CHECK_PTR(qdirty_image_open(path, 0, &err), 0, err);
    CHECK(qdirty_image_read_only(img));
    CHECK_EQ_U64(qdirty_image_size(img), 4 * MiB);
    bm = qdirty_image_find_bitmap(img, "b");
    CHECK(bm != NULL);
    CHECK(qdirty_bitmap_readonly(bm));
    CHECK(qdirty_bitmap_get(bm, 0));

    /* Bits of a read-only bitmap cannot change. */
    CHECK_RC(qdirty_bitmap_set_dirty(bm, 65536, 1, &err), EPERM, err);
    CHECK_RC(qdirty_bitmap_reset_dirty(bm, 0, 65536, &err), EPERM, err);
    CHECK_RC(qdirty_bitmap_clear(bm, &err), EPERM, err);
    CHECK(qdirty_bitmap_get(bm, 0));

    /* Nothing can be stored. */
    CHECK(qdirty_image_add_bitmap(img, "p", 0, QDIRTY_BITMAP_PERSISTENT, &err) == NULL);
    CHECK(err != NULL && (qdirty_error_errno(err) == EROFS || qdirty_error_errno(err) == EPERM));
    qdirty_error_free(err);
    err = NULL;
    rc = qdirty_image_remove_bitmap(img, "b", &err);
    CHECK(rc == -EROFS || rc == -EPERM);
    CHECK(err != NULL && -qdirty_error_errno(err) == rc);
    qdirty_error_free(err);
    err = NULL;
    CHECK_RC(qdirty_image_store_bitmaps(img, &err), EROFS, err);
    CHECK_RC(qdirty_image_close(img, &err), 0, err);

    /* A read-only open writes nothing at all. */
    after = qt_read_file(path, &after_len);
    CHECK(before != NULL && after != NULL);
    CHECK_EQ_U64(before_len, after_len);
    CHECK(before && after && before_len == after_len && memcmp(before, after, before_len) == 0);
    free(before);
    free(after);

    remove(path);
    free(path);
}

/* A copy of an image taken while it is open read-write looks like one left by a crash: its
 * bitmaps are in_use, so they load as inconsistent. */
static void test_inconsistent(const char *dir)
{
    qdirty_error *err = NULL;
    char *path = qt_path(dir, "crash.qcow2");
    char *copy = qt_path(dir, "crash-copy.qcow2");
    qdirty_image *img;
    qdirty_bitmap *bm;

    CHECK_RC(qdirty_image_create(path, 1 * MiB, 0, &err), 0, err);
    img = CHECK_PTR(qdirty_image_open(path, QDIRTY_OPEN_RDWR, &err), 0, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "b", 0, QDIRTY_BITMAP_PERSISTENT, &err), 0, err);
    CHECK_RC(qdirty_image_close(img, &err), 0, err);
    img = CHECK_PTR(qdirty_image_open(path, QDIRTY_OPEN_RDWR, &err), 0, err); /* marks in_use */
    CHECK(qt_copy_file(path, copy));
    CHECK_RC(qdirty_image_close(img, &err), 0, err);

    img = CHECK_PTR(qdirty_image_open(copy, QDIRTY_OPEN_RDWR, &err), 0, err);
    bm = qdirty_image_find_bitmap(img, "b");
    CHECK(bm != NULL);
    CHECK(qdirty_bitmap_inconsistent(bm));
    CHECK(qdirty_bitmap_persistent(bm));
    CHECK(!qdirty_bitmap_enabled(bm));
    CHECK(qdirty_bitmap_set_dirty(bm, 0, 1, &err) == -EINVAL);
    CHECK(err != NULL && strstr(qdirty_error_message(err), "inconsistent") != NULL);
    CHECK(err != NULL && qdirty_error_hint(err) != NULL &&
          strstr(qdirty_error_hint(err), "block-dirty-bitmap-remove") != NULL);
    qdirty_error_free(err);
    err = NULL;
    CHECK_RC(qdirty_bitmap_enable(bm, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_clear(bm, &err), EINVAL, err);
    CHECK_RC(qdirty_image_merge_bitmap(img, "b", NULL, "b", &err), EINVAL, err);
    CHECK_PTR(qdirty_image_add_bitmap(img, "b", 0, 0, &err), EEXIST, err);
    CHECK_RC(qdirty_image_remove_bitmap(img, "b", &err), 0, err);
    CHECK(qdirty_image_first_bitmap(img) == NULL);
    CHECK_RC(qdirty_image_close(img, &err), 0, err);

    img = CHECK_PTR(qdirty_image_open(copy, 0, &err), 0, err);
    CHECK(qdirty_image_first_bitmap(img) == NULL);
    CHECK_RC(qdirty_image_close(img, &err), 0, err);

    remove(path);
    remove(copy);
    free(path);
    free(copy);
}

static void test_merge_across_images(const char *dir)
{
    qdirty_error *err = NULL;
    char *pa = qt_path(dir, "merge-a.qcow2");
    char *pb = qt_path(dir, "merge-b.qcow2");
    char *pc = qt_path(dir, "merge-c.qcow2");
    qdirty_image *a, *b, *c;
    qdirty_bitmap *dst, *src;

    CHECK_RC(qdirty_image_create(pa, 2 * MiB, 0, &err), 0, err);
    CHECK_RC(qdirty_image_create(pb, 2 * MiB, 4096, &err), 0, err);
    CHECK_RC(qdirty_image_create(pc, 3 * MiB, 0, &err), 0, err);
    a = CHECK_PTR(qdirty_image_open(pa, QDIRTY_OPEN_RDWR, &err), 0, err);
    b = CHECK_PTR(qdirty_image_open(pb, 0, &err), 0, err);
    c = CHECK_PTR(qdirty_image_open(pc, QDIRTY_OPEN_RDWR, &err), 0, err);

    dst = CHECK_PTR(qdirty_image_add_bitmap(a, "dst", 65536, 0, &err), 0, err);
    /* A transient bitmap can be added to a read-only image (QEMU allows it). */
    src = CHECK_PTR(qdirty_image_add_bitmap(b, "src", 4096, 0, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(src, 1 * MiB + 4096, 4096, &err), 0, err);
    CHECK_PTR(qdirty_image_add_bitmap(c, "other", 0, 0, &err), 0, err);

    CHECK_RC(qdirty_image_merge_bitmap(a, "dst", b, "src", &err), 0, err);
    CHECK(qdirty_bitmap_get(dst, 1 * MiB));
    CHECK_EQ_U64(qdirty_bitmap_count(dst), 65536);
    /* Different disk sizes. */
    CHECK_RC(qdirty_image_merge_bitmap(a, "dst", c, "other", &err), EINVAL, err);
    CHECK_RC(qdirty_image_merge_bitmap(a, "dst", c, "nope", &err), ENOENT, err);

    CHECK_RC(qdirty_image_close(c, &err), 0, err);
    CHECK_RC(qdirty_image_close(b, &err), 0, err);
    CHECK_RC(qdirty_image_close(a, &err), 0, err);
    remove(pa);
    remove(pb);
    remove(pc);
    free(pa);
    free(pb);
    free(pc);
}

/* Image locks as QEMU takes them: a second opener (another open file description) is refused
 * with -EAGAIN while the image is open for writing; force-share reads without locks. */
static void test_locking(const char *dir)
{
    qdirty_error *err = NULL;
    char *path = qt_path(dir, "locked.qcow2");
    qdirty_image *rw, *peek;
    qdirty_bitmap *bm;

    CHECK_RC(qdirty_image_create(path, 4 * MiB, 0, &err), 0, err);
    rw = CHECK_PTR(qdirty_image_open(path, QDIRTY_OPEN_RDWR, &err), 0, err);
    bm = CHECK_PTR(qdirty_image_add_bitmap(rw, "b", 0, QDIRTY_BITMAP_PERSISTENT, &err), 0, err);
    CHECK_RC(qdirty_image_store_bitmaps(rw, &err), 0, err);
    CHECK_PTR(qdirty_image_open(path, QDIRTY_OPEN_RDWR, &err), EAGAIN, err);
    CHECK_PTR(qdirty_image_open(path, 0, &err), EAGAIN, err);
    peek = CHECK_PTR(qdirty_image_open(path, QDIRTY_OPEN_FORCE_SHARE, &err), 0, err);
    if (peek) {
        qdirty_bitmap *seen = qdirty_image_find_bitmap(peek, "b");
        CHECK(seen != NULL && qdirty_bitmap_inconsistent(seen));
        CHECK_RC(qdirty_image_close(peek, &err), 0, err);
    }
    (void)bm;
    CHECK_RC(qdirty_image_close(rw, &err), 0, err);
    peek = CHECK_PTR(qdirty_image_open(path, 0, &err), 0, err);
    if (peek) {
        CHECK_RC(qdirty_image_close(peek, &err), 0, err);
    }
    free(path);
}

/* Handles of gone bitmaps stay safe (under valgrind too): calls fail with ENOENT and never
 * reach the bitmap that took the freed slot; an iterator whose bitmap went away says so. */
static void test_gone_handles(void)
{
    qdirty_error *err = NULL;
    qdirty_image *img = qdirty_image_new_memory(1 << 20, &err);
    CHECK(img != NULL);
    qdirty_bitmap *b = qdirty_image_add_bitmap(img, "b", 4096, 0, &err);
    CHECK(b != NULL);
    CHECK_RC(qdirty_image_remove_bitmap(img, "b", &err), 0, err);
    qdirty_bitmap *c = qdirty_image_add_bitmap(img, "c", 4096, 0, &err);
    CHECK(c != NULL && c != b);
    CHECK_RC(qdirty_bitmap_set_dirty(b, 0, 4096, &err), ENOENT, err);
    CHECK_EQ_I64((int64_t)qdirty_bitmap_count(c), 0);
    CHECK(qdirty_bitmap_name(b) == NULL);
    CHECK(!qdirty_bitmap_enabled(b));

    /* A bitmap added in a transaction, iterated, then taken away by the abort. */
    qdirty_txn *txn = qdirty_txn_new();
    qdirty_bitmap *t = qdirty_txn_add_bitmap(txn, img, "t", 4096, 0, &err);
    CHECK(t != NULL);
    CHECK_RC(qdirty_bitmap_set_dirty(t, 8192, 1, &err), 0, err);
    qdirty_iter *it = qdirty_bitmap_iter_new(t, &err);
    CHECK(it != NULL);
    CHECK_RC(qdirty_txn_abort(txn, &err), 0, err);
    CHECK_EQ_I64(qdirty_iter_next(it), -ENOENT);
    qdirty_iter_free(it);
    qdirty_txn_free(txn);
    CHECK_RC(qdirty_image_close(img, &err), 0, err);
}

void test_image(const char *dir)
{
    test_gone_handles();
    test_lifecycle(dir);
    test_locking(dir);
    test_read_only(dir);
    test_inconsistent(dir);
    test_merge_across_images(dir);
}
