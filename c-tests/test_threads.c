/* The thread-safety contract: the write hook from I/O threads while management calls run. */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>

#include "qdirty_test.h"

#define NTHREADS 4
#define SLICE (4u * 1024u * 1024u)
#define WRITE 4096u

struct writer {
    qdirty_image *img;
    uint64_t base;
};

static void *writer_main(void *arg)
{
    struct writer *w = arg;
    /* Every other 4 KiB block of the thread's slice, twice over. */
    for (int pass = 0; pass < 2; pass++) {
        for (uint64_t off = 0; off < SLICE; off += 2 * WRITE) {
            qdirty_image_set_dirty(w->img, w->base + off, WRITE);
        }
    }
    return NULL;
}

void test_threads(void)
{
    qdirty_error *err = NULL;
    qdirty_image *img = CHECK_PTR(qdirty_image_new_memory(NTHREADS * SLICE, &err), 0, err);
    qdirty_image *other = CHECK_PTR(qdirty_image_new_memory(NTHREADS * SLICE, &err), 0, err);
    qdirty_bitmap *all, *target, *ext;
    pthread_t th[NTHREADS];
    struct writer w[NTHREADS];
    int started = 0;
    if (!img || !other) {
        goto out;
    }
    all = CHECK_PTR(qdirty_image_add_bitmap(img, "all", 4096, 0, &err), 0, err);
    target = CHECK_PTR(qdirty_image_add_bitmap(img, "target", 4096, QDIRTY_BITMAP_DISABLED, &err), 0, err);
    ext = CHECK_PTR(qdirty_image_add_bitmap(other, "ext", 65536, 0, &err), 0, err);
    CHECK_RC(qdirty_bitmap_set_dirty(ext, 0, 1, &err), 0, err);

    for (int i = 0; i < NTHREADS; i++) {
        w[i].img = img;
        w[i].base = (uint64_t)i * SLICE;
        if (pthread_create(&th[i], NULL, writer_main, &w[i]) == 0) {
            started++;
        }
    }
    CHECK(started == NTHREADS);

    /* Management calls meanwhile. */
    for (int round = 0; round < 50; round++) {
        char name[32];
        qdirty_bitmap *b;
        qdirty_bitmap_info *info = NULL;
        size_t n = 0;
        qdirty_iter *it;
        int64_t off;
        int steps = 0;

        snprintf(name, sizeof name, "tmp%d", round);
        b = CHECK_PTR(qdirty_image_add_bitmap(img, name, 0, 0, &err), 0, err);
        CHECK_RC(qdirty_image_query_bitmaps(img, &info, &n, &err), 0, err);
        CHECK(n == 3);
        qdirty_bitmap_info_free(info, n);
        CHECK_RC(qdirty_bitmap_merge(target, all, NULL, &err), 0, err);
        CHECK_RC(qdirty_image_merge_bitmap(img, "target", other, "ext", &err), 0, err);
        CHECK_RC(qdirty_bitmap_merge(ext, b, NULL, &err), 0, err); /* the other direction */
        it = CHECK_PTR(qdirty_bitmap_iter_new(all, &err), 0, err);
        while ((off = qdirty_iter_next(it)) >= 0 && steps < 64) {
            CHECK(off % 4096 == 0);
            steps++;
        }
        qdirty_iter_free(it);
        CHECK_RC(qdirty_image_remove_bitmap(img, name, &err), 0, err);
    }

    for (int i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
    }

    /* Every range written is dirty in the enabled bitmap, and nothing else. */
    {
        uint64_t missing = 0, extra = 0;
        for (int i = 0; i < NTHREADS; i++) {
            for (uint64_t off = 0; off < SLICE; off += WRITE) {
                bool want = (off / WRITE) % 2 == 0;
                bool got = qdirty_bitmap_get(all, (uint64_t)i * SLICE + off);
                missing += want && !got;
                extra += !want && got;
            }
        }
        CHECK_EQ_U64(missing, 0);
        CHECK_EQ_U64(extra, 0);
        CHECK_EQ_U64(qdirty_bitmap_count(all), (uint64_t)NTHREADS * SLICE / 2);
    }

out:
    if (img) CHECK_RC(qdirty_image_close(img, &err), 0, err);
    if (other) CHECK_RC(qdirty_image_close(other, &err), 0, err);
}
