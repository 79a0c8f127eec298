/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * A C program that uses an installed libqdirty the way a backup tool does: it creates an image,
 * starts tracking writes in a persistent bitmap, records some guest writes, closes the image
 * (which stores the bitmap), then reopens it read-only and lists the dirty extents that the next
 * incremental backup would copy.
 *
 * Build it against an installed copy (scripts/install.sh or cargo cinstall) with nothing but
 * pkg-config:
 *
 *   cc examples/consumer.c $(pkg-config --cflags --libs qdirty) -o consumer
 *   ./consumer "$(mktemp -d)"
 *
 * (add PKG_CONFIG_PATH=PREFIX/lib/pkgconfig, and -Wl,-rpath,PREFIX/lib or LD_LIBRARY_PATH, for a
 * prefix outside the system paths). It prints the extents and the library version and exits 0
 * when everything is as expected. tests/install.rs runs it.
 */

#include <qdirty.h>

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#define MiB (UINT64_C(1) << 20)
#define DISK_SIZE (64 * MiB)
#define BITMAP "backup-1"
#define GRANULE (UINT64_C(64) << 10) /* QEMU's default granularity for 64 KiB clusters */

struct extent {
    uint64_t start, count;
};

/* Reports a failed call with its message and hint, and frees the error. */
static int failed(const char *what, qdirty_error *err)
{
    const char *hint = qdirty_error_hint(err);
    fprintf(stderr, "consumer: %s: %s (errno %d)\n", what,
            err ? qdirty_error_message(err) : "no details", qdirty_error_errno(err));
    if (hint) {
        fprintf(stderr, "consumer: hint: %s\n", hint);
    }
    qdirty_error_free(err);
    return 1;
}

/* Step 1: a new image with a persistent bitmap that records the guest's writes. */
static int record_writes(const char *path)
{
    qdirty_error *err = NULL;
    if (qdirty_image_create(path, DISK_SIZE, 0, &err) < 0) {
        return failed("qdirty_image_create", err);
    }
    qdirty_image *img = qdirty_image_open(path, QDIRTY_OPEN_RDWR, &err);
    if (!img) {
        return failed("qdirty_image_open (read-write)", err);
    }
    qdirty_bitmap *bm = qdirty_image_add_bitmap(img, BITMAP, 0, QDIRTY_BITMAP_PERSISTENT, &err);
    if (!bm) {
        failed("qdirty_image_add_bitmap", err);
        qdirty_image_close(img, NULL);
        return 1;
    }
    if (qdirty_bitmap_granularity(bm) != GRANULE) {
        fprintf(stderr, "consumer: granularity %" PRIu32 ", expected %" PRIu64 "\n",
                qdirty_bitmap_granularity(bm), GRANULE);
        qdirty_image_close(img, NULL);
        return 1;
    }

    /* The guest write path: every write marks the granules it touches. */
    qdirty_image_set_dirty(img, 1 * MiB, 4096);             /* one granule */
    qdirty_image_set_dirty(img, 8 * MiB + 100, 200000);     /* four granules */
    qdirty_image_set_dirty(img, 8 * MiB + 300000, 1);       /* adjacent: the run grows */
    qdirty_image_set_dirty(img, DISK_SIZE - 1, 1);          /* the last granule */

    /* Closing stores the bitmap in the image (and frees img and bm, even on failure). */
    if (qdirty_image_close(img, &err) < 0) {
        return failed("qdirty_image_close", err);
    }
    return 0;
}

/* Step 2: what a backup reads: the stored bitmap's dirty extents, from a read-only open. */
static int list_extents(const char *path)
{
    static const struct extent expected[] = {
        {1 * MiB, GRANULE},
        {8 * MiB, 5 * GRANULE},
        {DISK_SIZE - GRANULE, GRANULE},
    };
    const size_t n_expected = sizeof expected / sizeof expected[0];
    qdirty_error *err = NULL;
    int bad = 0;

    qdirty_image *img = qdirty_image_open(path, 0, &err);
    if (!img) {
        return failed("qdirty_image_open (read-only)", err);
    }
    qdirty_bitmap *bm = qdirty_image_find_bitmap(img, BITMAP);
    if (!bm) {
        fprintf(stderr, "consumer: bitmap '%s' was not stored\n", BITMAP);
        qdirty_image_close(img, NULL);
        return 1;
    }
    if (!qdirty_image_read_only(img) || !qdirty_bitmap_persistent(bm) ||
        !qdirty_bitmap_enabled(bm) || qdirty_bitmap_inconsistent(bm)) {
        fprintf(stderr, "consumer: unexpected state: read_only %d persistent %d enabled %d "
                        "inconsistent %d\n",
                qdirty_image_read_only(img), qdirty_bitmap_persistent(bm),
                qdirty_bitmap_enabled(bm), qdirty_bitmap_inconsistent(bm));
        bad = 1;
    }

    printf("bitmap %s: granularity %" PRIu32 ", %" PRIu64 " dirty bytes\n",
           qdirty_bitmap_name(bm), qdirty_bitmap_granularity(bm), qdirty_bitmap_count(bm));
    size_t n = 0;
    uint64_t total = 0, start, count;
    for (uint64_t pos = 0;
         qdirty_bitmap_next_dirty_area(bm, pos, UINT64_MAX, UINT64_MAX, &start, &count);
         pos = start + count) {
        printf("dirty extent: offset %" PRIu64 " length %" PRIu64 "\n", start, count);
        if (n >= n_expected || expected[n].start != start || expected[n].count != count) {
            fprintf(stderr, "consumer: unexpected extent %" PRIu64 " +%" PRIu64 "\n", start,
                    count);
            bad = 1;
        }
        n++;
        total += count;
    }
    if (n != n_expected) {
        fprintf(stderr, "consumer: %zu extents, expected %zu\n", n, n_expected);
        bad = 1;
    }
    if (total != qdirty_bitmap_count(bm)) {
        fprintf(stderr, "consumer: extents cover %" PRIu64 " bytes, count says %" PRIu64 "\n",
                total, qdirty_bitmap_count(bm));
        bad = 1;
    }

    if (qdirty_image_close(img, &err) < 0) {
        return failed("qdirty_image_close (read-only)", err);
    }
    return bad;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s EMPTY_DIRECTORY\n", argv[0]);
        return 2;
    }
    char path[4096];
    int len = snprintf(path, sizeof path, "%s/consumer.qcow2", argv[1]);
    if (len < 0 || (size_t)len >= sizeof path) {
        fprintf(stderr, "consumer: directory name too long\n");
        return 2;
    }
    remove(path); /* a leftover from an earlier run; qdirty_image_create refuses to overwrite */

    /* The header this program was compiled with and the library it runs with. */
    printf("qdirty %s (ABI %u)\n", qdirty_version(), (unsigned)QDIRTY_ABI_MAJOR);

    if (record_writes(path) != 0 || list_extents(path) != 0) {
        return 1;
    }
    remove(path);
    printf("ok\n");
    return 0;
}
