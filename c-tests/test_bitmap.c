/* One bitmap's bits: set/reset/get/count, iteration, sha256, enable/disable, clear. */
#define _POSIX_C_SOURCE 200809L

#include "qdirty_test.h"

#define MiB (1024u * 1024u)
#define G 4096u /* the granularity used here */

/* Collects the dirty extents with next_dirty_area, as a backup tool would. */
static int extents(qdirty_bitmap *bm, uint64_t max_count, uint64_t out[][2], int max)
{
    uint64_t start = 0, s = 0, c = 0;
    int n = 0;
    while (n < max && qdirty_bitmap_next_dirty_area(bm, start, UINT64_MAX, max_count, &s, &c)) {
        out[n][0] = s;
        out[n][1] = c;
        n++;
        start = s + c;
    }
    return n;
}

void test_bitmap(const char *dir)
{
    qdirty_error *err = NULL;
    char *path = qt_path(dir, "bits.qcow2");
    const uint64_t size = 1 * MiB + 512; /* the last granule is partial */
    qdirty_image *img;
    qdirty_bitmap *bm;
    uint64_t ext[8][2] = {{0}};
    uint64_t s = 1, c = 1;
    char *hex;

    CHECK_RC(qdirty_image_create(path, size, 0, &err), 0, err);
    img = CHECK_PTR(qdirty_image_open(path, QDIRTY_OPEN_RDWR, &err), 0, err);
    CHECK_EQ_U64(qdirty_image_size(img), size);
    bm = CHECK_PTR(qdirty_image_add_bitmap(img, "bits", G, 0, &err), 0, err);
    CHECK_EQ_U64(qdirty_bitmap_size(bm), size);
    CHECK_EQ_U64(qdirty_bitmap_granularity(bm), G);

    /* Empty: 257 granules are five 64-bit words of zeros. */
    hex = CHECK_PTR(qdirty_bitmap_sha256(bm, &err), 0, err);
    CHECK_STR(hex, "2c34ce1df23b838c5abf2a7f6437cca3d3067ed509ff25f11df6b11b582b51eb");
    qdirty_string_free(hex);
    CHECK_EQ_I64(qdirty_bitmap_next_dirty(bm, 0, UINT64_MAX), -1);
    CHECK_EQ_I64(qdirty_bitmap_next_zero(bm, 0, UINT64_MAX), 0);
    CHECK(!qdirty_bitmap_next_dirty_area(bm, 0, UINT64_MAX, UINT64_MAX, &s, &c));
    CHECK_EQ_U64(s, 0);
    CHECK_EQ_U64(c, 0);

    /* set rounds outward to granules. */
    CHECK_RC(qdirty_bitmap_set_dirty(bm, 5000, 1, &err), 0, err);
    CHECK(!qdirty_bitmap_get(bm, G - 1));
    CHECK(qdirty_bitmap_get(bm, G));
    CHECK(qdirty_bitmap_get(bm, 2 * G - 1));
    CHECK(!qdirty_bitmap_get(bm, 2 * G));
    CHECK(!qdirty_bitmap_get(bm, 100 * MiB)); /* beyond the end */
    CHECK_EQ_U64(qdirty_bitmap_count(bm), G);
    CHECK_EQ_I64(qdirty_bitmap_next_dirty(bm, 0, UINT64_MAX), G);
    CHECK_EQ_I64(qdirty_bitmap_next_dirty(bm, 0, G), -1); /* [0, G) only */
    CHECK_EQ_I64(qdirty_bitmap_next_zero(bm, G, UINT64_MAX), 2 * G);
    CHECK_EQ_I64(qdirty_bitmap_next_dirty(bm, 2 * G, UINT64_MAX), -1);

    CHECK_RC(qdirty_bitmap_set_dirty(bm, 16 * G, 3 * G, &err), 0, err);
    CHECK_EQ_U64(qdirty_bitmap_count(bm), 4 * G);
    CHECK_EQ_I64(extents(bm, UINT64_MAX, ext, 8), 2);
    CHECK_EQ_U64(ext[0][0], G);
    CHECK_EQ_U64(ext[0][1], G);
    CHECK_EQ_U64(ext[1][0], 16 * G);
    CHECK_EQ_U64(ext[1][1], 3 * G);
    /* max_count splits runs; 0 finds nothing. */
    CHECK_EQ_I64(extents(bm, G, ext, 8), 4);
    CHECK(!qdirty_bitmap_next_dirty_area(bm, 0, UINT64_MAX, 0, &s, &c));
    /* end bounds the search. */
    CHECK(!qdirty_bitmap_next_dirty_area(bm, 2 * G, 16 * G, UINT64_MAX, &s, &c));
    CHECK(qdirty_bitmap_next_dirty_area(bm, 2 * G, 17 * G, UINT64_MAX, &s, &c));
    CHECK_EQ_U64(s, 16 * G);
    CHECK_EQ_U64(c, G);
    /* NULL out-parameters: no crash, false. */
    CHECK(!qdirty_bitmap_next_dirty_area(bm, 0, UINT64_MAX, UINT64_MAX, NULL, &c));
    CHECK(!qdirty_bitmap_next_dirty_area(bm, 0, UINT64_MAX, UINT64_MAX, &s, NULL));

    /* Ranges beyond the end are errors. */
    CHECK_RC(qdirty_bitmap_set_dirty(bm, size, 1, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_set_dirty(bm, UINT64_MAX, 2, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_reset_dirty(bm, 0, size + G, &err), EINVAL, err);

    /* reset must be granule-aligned, except for a range that ends at the end of the disk. */
    CHECK_RC(qdirty_bitmap_reset_dirty(bm, G + 1, G, &err), EINVAL, err);
    CHECK_RC(qdirty_bitmap_reset_dirty(bm, G, 100, &err), EINVAL, err);
    CHECK_EQ_U64(qdirty_bitmap_count(bm), 4 * G); /* failed resets change nothing */
    CHECK_RC(qdirty_bitmap_reset_dirty(bm, 17 * G, G, &err), 0, err);
    CHECK_EQ_U64(qdirty_bitmap_count(bm), 3 * G);
    CHECK(!qdirty_bitmap_get(bm, 17 * G));
    CHECK(qdirty_bitmap_get(bm, 18 * G));
    CHECK_RC(qdirty_bitmap_set_dirty(bm, size - 1, 1, &err), 0, err);
    CHECK(qdirty_bitmap_get(bm, size - 1));
    CHECK_EQ_U64(qdirty_bitmap_count(bm), 4 * G); /* the partial granule counts in full */
    CHECK_RC(qdirty_bitmap_reset_dirty(bm, 256 * G, size - 256 * G, &err), 0, err);
    CHECK(!qdirty_bitmap_get(bm, size - 1));

    /* Disabled bitmaps ignore the image's write hook but take explicit sets. */
    CHECK_RC(qdirty_bitmap_disable(bm, &err), 0, err);
    CHECK(!qdirty_bitmap_enabled(bm));
    qdirty_image_set_dirty(img, 100 * G, 1);
    CHECK(!qdirty_bitmap_get(bm, 100 * G));
    CHECK_RC(qdirty_bitmap_set_dirty(bm, 100 * G, 1, &err), 0, err);
    CHECK(qdirty_bitmap_get(bm, 100 * G));
    CHECK_RC(qdirty_bitmap_enable(bm, &err), 0, err);
    qdirty_image_set_dirty(img, 200 * G, 1);
    CHECK(qdirty_bitmap_get(bm, 200 * G));

    /* Equal bits, equal digests; clear empties the bitmap. */
    {
        qdirty_bitmap *twin = CHECK_PTR(qdirty_image_add_bitmap(img, "twin", G, 0, &err), 0, err);
        char *a, *b;
        CHECK_RC(qdirty_image_merge_bitmap(img, "twin", NULL, "bits", &err), 0, err);
        a = qdirty_bitmap_sha256(bm, NULL);
        b = qdirty_bitmap_sha256(twin, NULL);
        CHECK(a != NULL && b != NULL && strcmp(a, b) == 0);
        qdirty_string_free(a);
        qdirty_string_free(b);
        CHECK_RC(qdirty_bitmap_clear(bm, &err), 0, err);
        CHECK_EQ_U64(qdirty_bitmap_count(bm), 0);
        CHECK(qdirty_bitmap_count(twin) > 0);
        CHECK_RC(qdirty_image_remove_bitmap(img, "twin", &err), 0, err);
    }

    CHECK_RC(qdirty_image_close(img, &err), 0, err);
    remove(path);
    free(path);
}
