/* Transactions: each action prepared at once; abort undoes them in reverse order exactly;
 * commit makes them final (remove's stored-copy deletion is not undone). */
#define _POSIX_C_SOURCE 200809L

#include "qdirty_test.h"

#define MIB (1024u * 1024u)

static char *sha(qdirty_bitmap *bm)
{
    return qdirty_bitmap_sha256(bm, NULL);
}

static bool same_sha(qdirty_bitmap *bm, const char *want)
{
    char *h = sha(bm);
    bool ok = h && want && strcmp(h, want) == 0;
    qdirty_string_free(h);
    return ok;
}

static void test_abort_restores_everything(void)
{
    qdirty_error *err = NULL;
    qdirty_image *a = CHECK_PTR(qdirty_image_new_memory(1 * MIB, &err), 0, err);
    qdirty_image *b = CHECK_PTR(qdirty_image_new_memory(1 * MIB, &err), 0, err);
    qdirty_bitmap *c, *m, *e, *d, *r, *src, *added;
    char *c_sha = NULL, *m_sha = NULL;
    qdirty_txn *txn;
    if (!a || !b) {
        goto out;
    }
    c = CHECK_PTR(qdirty_image_add_bitmap(a, "c", 4096, 0, &err), 0, err);
    m = CHECK_PTR(qdirty_image_add_bitmap(a, "m", 4096, 0, &err), 0, err);
    e = CHECK_PTR(qdirty_image_add_bitmap(a, "e", 4096, QDIRTY_BITMAP_DISABLED, &err), 0, err);
    d = CHECK_PTR(qdirty_image_add_bitmap(a, "d", 4096, 0, &err), 0, err);
    r = CHECK_PTR(qdirty_image_add_bitmap(a, "r", 4096, 0, &err), 0, err);
    src = CHECK_PTR(qdirty_image_add_bitmap(b, "src", 65536, 0, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(c, 0, 8192, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(m, 4096, 4096, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(src, 500000, 1, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(r, 0, 512, &err), 0, err);
    c_sha = sha(c);
    m_sha = sha(m);

    txn = qdirty_txn_new();
    CHECK(txn != NULL);
    added = CHECK_PTR(qdirty_txn_add_bitmap(txn, a, "new", 4096, 0, &err), 0, err);
    CHECK(added != NULL && qdirty_image_find_bitmap(a, "new") == added);
    CHECK_RC(qdirty_txn_clear_bitmap(txn, a, "c", &err), 0, err);
    CHECK_EQ_U64(qdirty_bitmap_count(c), 0); /* prepared at once */
    CHECK_RC(qdirty_txn_merge_bitmap(txn, a, "m", b, "src", &err), 0, err);
    CHECK(qdirty_bitmap_get(m, 500000));
    CHECK_RC(qdirty_txn_clear_bitmap(txn, a, "m", &err), 0, err); /* clear after merge */
    CHECK_RC(qdirty_txn_enable_bitmap(txn, a, "e", &err), 0, err);
    CHECK(qdirty_bitmap_enabled(e));
    CHECK_RC(qdirty_txn_disable_bitmap(txn, a, "d", &err), 0, err);
    CHECK(!qdirty_bitmap_enabled(d));
    CHECK_RC(qdirty_txn_remove_bitmap(txn, a, "r", &err), 0, err);
    CHECK(qdirty_bitmap_busy(r));
    /* A failing action fails at once. */
    CHECK_RC(qdirty_txn_clear_bitmap(txn, a, "nope", &err), ENOENT, err);
    CHECK_RC(qdirty_txn_clear_bitmap(txn, a, "r", &err), EBUSY, err);

    CHECK_RC(qdirty_txn_abort(txn, &err), 0, err);
    CHECK(qdirty_image_find_bitmap(a, "new") == NULL);
    CHECK(same_sha(c, c_sha));
    CHECK(same_sha(m, m_sha));
    CHECK(!qdirty_bitmap_get(m, 500000));
    CHECK(!qdirty_bitmap_enabled(e));
    CHECK(qdirty_bitmap_enabled(d));
    CHECK(!qdirty_bitmap_busy(r));
    CHECK(qdirty_image_find_bitmap(a, "r") == r);
    CHECK(qdirty_bitmap_get(r, 0));
    /* Abort of an empty transaction is fine; the txn is reusable. */
    CHECK_RC(qdirty_txn_abort(txn, &err), 0, err);
    CHECK_RC(qdirty_txn_commit(txn, &err), 0, err);
    qdirty_txn_free(txn);

out:
    qdirty_string_free(c_sha);
    qdirty_string_free(m_sha);
    if (a) CHECK_RC(qdirty_image_close(a, &err), 0, err);
    if (b) CHECK_RC(qdirty_image_close(b, &err), 0, err);
}

static void test_commit_and_free(const char *dir)
{
    qdirty_error *err = NULL;
    char *path = qt_path(dir, "txn.qcow2");
    qdirty_image *img;
    qdirty_bitmap *keep, *gone, *added;
    qdirty_txn *txn;
    if (!path) {
        return;
    }
    CHECK_RC(qdirty_image_create(path, 4 * MIB, 0, &err), 0, err);
    img = CHECK_PTR(qdirty_image_open(path, QDIRTY_OPEN_RDWR, &err), 0, err);
    if (!img) {
        free(path);
        return;
    }
    keep = CHECK_PTR(qdirty_image_add_bitmap(img, "keep", 0, QDIRTY_BITMAP_PERSISTENT, &err), 0, err);
    gone = CHECK_PTR(qdirty_image_add_bitmap(img, "gone", 0, QDIRTY_BITMAP_PERSISTENT, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(keep, 0, 65536, &err), 0, err);
    CHECK_RC(qdirty_image_store_bitmaps(img, &err), 0, err);

    /* Commit: clear final, remove releases the bitmap, add stays. */
    txn = qdirty_txn_new();
    CHECK_RC(qdirty_txn_clear_bitmap(txn, img, "keep", &err), 0, err);
    CHECK_RC(qdirty_txn_remove_bitmap(txn, img, "gone", &err), 0, err);
    added = CHECK_PTR(qdirty_txn_add_bitmap(txn, img, "added", 0, QDIRTY_BITMAP_DISABLED, &err), 0, err);
    CHECK_RC(qdirty_txn_commit(txn, &err), 0, err);
    CHECK_EQ_U64(qdirty_bitmap_count(keep), 0);
    CHECK(qdirty_image_find_bitmap(img, "gone") == NULL);
    CHECK(qdirty_image_find_bitmap(img, "added") == added);
    CHECK(!qdirty_bitmap_enabled(added));
    (void)gone; /* freed by the commit */

    /* Free with prepared actions aborts them. */
    CHECK_RC(qdirty_txn_disable_bitmap(txn, img, "keep", &err), 0, err);
    CHECK(!qdirty_bitmap_enabled(keep));
    CHECK_RC(qdirty_txn_remove_bitmap(txn, img, "keep", &err), 0, err);
    qdirty_txn_free(txn);
    CHECK(qdirty_bitmap_enabled(keep));
    CHECK(!qdirty_bitmap_busy(keep));

    /* Bad arguments. */
    txn = qdirty_txn_new();
    CHECK_PTR(qdirty_txn_add_bitmap(NULL, img, "x", 0, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_txn_add_bitmap(txn, NULL, "x", 0, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_txn_add_bitmap(txn, img, NULL, 0, 0, &err), EINVAL, err);
    CHECK_PTR(qdirty_txn_add_bitmap(txn, img, "x", 0, 0x100, &err), EINVAL, err);
    CHECK_PTR(qdirty_txn_add_bitmap(txn, img, "keep", 0, 0, &err), EEXIST, err);
    CHECK_RC(qdirty_txn_clear_bitmap(NULL, img, "keep", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_clear_bitmap(txn, NULL, "keep", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_enable_bitmap(txn, img, NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_txn_disable_bitmap(NULL, NULL, NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_txn_merge_bitmap(txn, img, "keep", NULL, NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_txn_merge_bitmap(txn, NULL, "keep", NULL, "keep", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_merge_bitmap(NULL, img, "keep", NULL, "keep", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_remove_bitmap(txn, img, "nope", &err), ENOENT, err);
    CHECK_RC(qdirty_txn_remove_bitmap(NULL, img, "keep", &err), EINVAL, err);
    CHECK_RC(qdirty_txn_commit(NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_txn_abort(NULL, &err), EINVAL, err);
    CHECK_RC(qdirty_txn_abort(txn, &err), 0, err);
    qdirty_txn_free(txn);
    qdirty_txn_free(NULL);
    CHECK_RC(qdirty_image_close(img, &err), 0, err);

    /* On disk: keep (cleared) and added... added is transient; gone is gone. */
    img = CHECK_PTR(qdirty_image_open(path, 0, &err), 0, err);
    if (img) {
        CHECK(qdirty_image_find_bitmap(img, "keep") != NULL);
        CHECK(qdirty_image_find_bitmap(img, "gone") == NULL);
        CHECK(qdirty_image_find_bitmap(img, "added") == NULL);
        CHECK_RC(qdirty_image_close(img, &err), 0, err);
    }
    remove(path);
    free(path);
}

void test_txn(const char *dir)
{
    test_abort_restores_everything();
    test_commit_and_free(dir);
}
