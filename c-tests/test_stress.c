/*
 * The thread-safety contract under load, on a real qcow2 file, as a C host uses it: writer
 * threads call the write hook with random ranges (and record them) while other threads iterate,
 * merge (within the image and across images), query, count, hash, enable/disable another
 * bitmap and store the bitmaps, over and over. Afterwards, and again after a final store, close
 * and reopen, every recorded range is dirty in "always" (enabled throughout) and "toggle" only
 * holds written granules; `qemu-img check` on the file is clean (skipped visibly without
 * qemu-img). QDIRTY_STRESS_ITERS sets the writes per writer (default 20000; 500 when
 * QDIRTY_VALGRIND=1).
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#include "qdirty_test.h"

#define S_SIZE (128ull << 20)
#define S_WRITERS 3
#define S_MIN_ROUNDS 5

struct range {
    uint64_t off, len;
};

struct stress {
    qdirty_image *img, *other;
    atomic_int writers_left;
    atomic_int failures; /* checks failed inside threads (the harness is not thread-safe) */
    atomic_int stores;
    int iters;
};

struct writer {
    struct stress *s;
    uint64_t seed;
    struct range *ranges;
    int n;
};

static uint64_t rnd(uint64_t *st)
{
    uint64_t z = (*st += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void nap(long usec)
{
    struct timespec ts = {0, usec * 1000};
    nanosleep(&ts, NULL);
}

/* A failed call inside a thread: count it, print it, free the error. */
static void t_fail(struct stress *s, const char *what, qdirty_error **errp)
{
    atomic_fetch_add(&s->failures, 1);
    fprintf(stderr, "test_stress: %s failed: %s\n", what,
            *errp ? qdirty_error_message(*errp) : "(no error)");
    qdirty_error_free(*errp);
    *errp = NULL;
}

static void *writer_main(void *arg)
{
    struct writer *w = arg;
    uint64_t st = w->seed;
    for (int i = 0; i < w->s->iters; i++) {
        uint64_t off, len;
        switch (rnd(&st) % 8) {
        case 0: /* past the end: clamped */
            off = S_SIZE - 1 - rnd(&st) % 100000;
            len = 1 + rnd(&st) % 300000;
            break;
        case 1:
        case 2:
            off = rnd(&st) % S_SIZE;
            len = 1 + rnd(&st) % 600;
            break;
        default:
            off = rnd(&st) % S_SIZE;
            len = 1 + rnd(&st) % (256 << 10);
        }
        qdirty_image_set_dirty(w->s->img, off, len);
        w->ranges[w->n].off = off;
        w->ranges[w->n].len = len;
        w->n++;
        if (i % 64 == 0) {
            nap(200);
        }
    }
    atomic_fetch_sub(&w->s->writers_left, 1);
    return NULL;
}

#define RUNNING(s, rounds) (atomic_load(&(s)->writers_left) > 0 || (rounds) < S_MIN_ROUNDS)

static void *iter_main(void *arg)
{
    struct stress *s = arg;
    qdirty_bitmap *always = qdirty_image_find_bitmap(s->img, "always");
    qdirty_error *err = NULL;
    uint64_t st = 7;
    for (int r = 0; RUNNING(s, r); r++) {
        qdirty_iter *it = qdirty_bitmap_iter_new(always, &err);
        int64_t off, last = -1;
        if (!it) {
            t_fail(s, "iter_new", &err);
            continue;
        }
        for (int k = 0; k < 128 && (off = qdirty_iter_next(it)) >= 0; k++) {
            if (off % 4096 != 0 || off <= last || (uint64_t)off >= S_SIZE) {
                t_fail(s, "iter_next order", &err);
            }
            last = off;
        }
        if (qdirty_iter_seek(it, rnd(&st) % S_SIZE, &err) != 0) {
            t_fail(s, "iter_seek", &err);
        }
        (void)qdirty_iter_next(it);
        qdirty_iter_free(it);
        nap(100);
    }
    return NULL;
}

static void *merge_main(void *arg)
{
    struct stress *s = arg;
    qdirty_bitmap *always = qdirty_image_find_bitmap(s->img, "always");
    qdirty_bitmap *merged = qdirty_image_find_bitmap(s->img, "merged");
    qdirty_bitmap *sink = qdirty_image_find_bitmap(s->other, "sink");
    qdirty_error *err = NULL;
    for (int r = 0; RUNNING(s, r); r++) {
        qdirty_backup *bk = NULL;
        if (qdirty_bitmap_merge(merged, always, &bk, &err) != 0) {
            t_fail(s, "merge", &err);
        }
        qdirty_backup_free(bk);
        if (qdirty_image_merge_bitmap(s->img, "merged", s->other, "ext", &err) != 0) {
            t_fail(s, "merge from other", &err);
        }
        if (qdirty_image_merge_bitmap(s->other, "sink", s->img, "always", &err) != 0) {
            t_fail(s, "merge into other", &err);
        }
        if (qdirty_bitmap_merge(sink, always, NULL, &err) != 0) {
            t_fail(s, "bitmap merge into other", &err);
        }
        nap(100);
    }
    return NULL;
}

static void *query_main(void *arg)
{
    struct stress *s = arg;
    qdirty_bitmap *always = qdirty_image_find_bitmap(s->img, "always");
    qdirty_error *err = NULL;
    uint64_t last = 0;
    for (int r = 0; RUNNING(s, r); r++) {
        qdirty_bitmap_info *info = NULL;
        size_t n = 0;
        uint64_t c;
        char *sha;
        if (qdirty_image_query_bitmaps(s->img, &info, &n, &err) != 0 || n != 4) {
            t_fail(s, "query", &err);
        }
        qdirty_bitmap_info_free(info, n);
        c = qdirty_bitmap_count(always);
        if (c < last) {
            t_fail(s, "count went down", &err);
        }
        last = c;
        sha = qdirty_bitmap_sha256(always, &err);
        if (!sha || strlen(sha) != 64) {
            t_fail(s, "sha256", &err);
        }
        qdirty_string_free(sha);
        nap(100);
    }
    return NULL;
}

static void *toggle_main(void *arg)
{
    struct stress *s = arg;
    qdirty_bitmap *toggle = qdirty_image_find_bitmap(s->img, "toggle");
    qdirty_error *err = NULL;
    for (int r = 0; RUNNING(s, r); r++) {
        if (qdirty_bitmap_disable(toggle, &err) != 0) {
            t_fail(s, "disable", &err);
        }
        sched_yield();
        if (qdirty_bitmap_enable(toggle, &err) != 0) {
            t_fail(s, "enable", &err);
        }
        nap(100);
    }
    return NULL;
}

static void *store_main(void *arg)
{
    struct stress *s = arg;
    qdirty_error *err = NULL;
    for (int r = 0; RUNNING(s, r); r++) {
        if (qdirty_image_store_bitmaps(s->img, &err) != 0) {
            t_fail(s, "store", &err);
        }
        atomic_fetch_add(&s->stores, 1);
        nap(2000); /* a checkpoint loop, not a spin (the image lock is not fair) */
    }
    return NULL;
}

/* Every recorded range is dirty in bm; returns the number of ranges that are not. */
static int missing_ranges(qdirty_bitmap *bm, struct writer *w)
{
    int missing = 0;
    for (int t = 0; t < S_WRITERS; t++) {
        for (int i = 0; i < w[t].n; i++) {
            uint64_t off = w[t].ranges[i].off, len = w[t].ranges[i].len;
            if (len > S_SIZE - off) {
                len = S_SIZE - off;
            }
            int64_t z = qdirty_bitmap_next_zero(bm, off, len);
            if (z != -1 && missing++ < 5) {
                fprintf(stderr, "  writer %d write %d/%d: [%llu, +%llu) is clean at %lld\n", t, i,
                        w[t].n, (unsigned long long)off, (unsigned long long)len, (long long)z);
            }
        }
    }
    return missing;
}

/* Dirty granules of bm (granularity 4 KiB) that no recorded range touches. */
static uint64_t stray_granules(qdirty_bitmap *bm, struct writer *w)
{
    size_t n = S_SIZE / 4096;
    unsigned char *written = calloc(n, 1);
    uint64_t stray = 0;
    int64_t off = -1;
    qdirty_iter *it = qdirty_bitmap_iter_new(bm, NULL);
    if (!written || !it) {
        free(written);
        qdirty_iter_free(it);
        return UINT64_MAX;
    }
    for (int t = 0; t < S_WRITERS; t++) {
        for (int i = 0; i < w[t].n; i++) {
            uint64_t end = w[t].ranges[i].off + w[t].ranges[i].len;
            if (end > S_SIZE) {
                end = S_SIZE;
            }
            for (uint64_t g = w[t].ranges[i].off / 4096; g < (end + 4095) / 4096; g++) {
                written[g] = 1;
            }
        }
    }
    while ((off = qdirty_iter_next(it)) >= 0) {
        stray += !written[off / 4096];
    }
    qdirty_iter_free(it);
    free(written);
    return stray;
}

/* Writes logged while a store runs must be in the file after close and reopen (they used to be
 * lost: the store reset its change tracking after folding them; tests/stress_hook.rs has a
 * deterministic reproducer). */
static bool known_bug(bool ok, const char *what)
{
    (void)what;
    return CHECK(ok);
}

static void check_image(qdirty_image *img, struct writer *w, const char *when, bool reopened)
{
    qdirty_bitmap *always = qdirty_image_find_bitmap(img, "always");
    qdirty_bitmap *toggle = qdirty_image_find_bitmap(img, "toggle");
    qdirty_bitmap *merged = qdirty_image_find_bitmap(img, "merged");
    CHECK(always && toggle && merged);
    if (!always || !toggle || !merged) {
        return;
    }
    CHECK(!qdirty_bitmap_inconsistent(always) && !qdirty_bitmap_inconsistent(toggle));
    if (reopened) {
        known_bug(missing_ranges(always, w) == 0, "writes missing from 'always' after reopen");
        known_bug(missing_ranges(merged, w) == 0, "writes missing from 'merged' after reopen");
    } else {
        if (!CHECK(missing_ranges(always, w) == 0)) {
            fprintf(stderr, "  (%s: writes missing from 'always')\n", when);
        }
        if (!CHECK(missing_ranges(merged, w) == 0)) {
            fprintf(stderr, "  (%s: writes missing from 'merged')\n", when);
        }
    }
    if (!CHECK(stray_granules(always, w) == 0) || !CHECK(stray_granules(toggle, w) == 0)) {
        fprintf(stderr, "  (%s: dirty granules nobody wrote)\n", when);
    }
}

void test_stress(const char *dir)
{
    qdirty_error *err = NULL;
    char *p = qt_path(dir, "stress.qcow2");
    struct stress s;
    struct writer w[S_WRITERS];
    pthread_t wt[S_WRITERS], mt[5];
    void *(*mgmt[5])(void *) = {iter_main, merge_main, query_main, toggle_main, store_main};
    const char *env = getenv("QDIRTY_STRESS_ITERS");
    const char *vg = getenv("QDIRTY_VALGRIND");
    int started_w = 0, started_m = 0;
    struct timespec t0, t1;

    memset(&s, 0, sizeof s);
    memset(w, 0, sizeof w);
    s.iters = env && atoi(env) > 0 ? atoi(env) : (vg && strcmp(vg, "1") == 0 ? 500 : 20000);
    clock_gettime(CLOCK_MONOTONIC, &t0);

    CHECK_RC(qdirty_image_create(p, S_SIZE, 0, &err), 0, err);
    s.img = CHECK_PTR(qdirty_image_open(p, QDIRTY_OPEN_RDWR, &err), 0, err);
    s.other = CHECK_PTR(qdirty_image_new_memory(S_SIZE, &err), 0, err);
    if (!s.img || !s.other) {
        goto out;
    }
    CHECK_PTR(qdirty_image_add_bitmap(s.img, "always", 4096, QDIRTY_BITMAP_PERSISTENT, &err), 0,
              err);
    CHECK_PTR(qdirty_image_add_bitmap(s.img, "toggle", 4096, QDIRTY_BITMAP_PERSISTENT, &err), 0,
              err);
    CHECK_PTR(qdirty_image_add_bitmap(s.img, "merged", 16384,
                                      QDIRTY_BITMAP_PERSISTENT | QDIRTY_BITMAP_DISABLED, &err),
              0, err);
    CHECK_PTR(qdirty_image_add_bitmap(s.img, "coarse", 65536, QDIRTY_BITMAP_PERSISTENT, &err), 0,
              err);
    CHECK_PTR(qdirty_image_add_bitmap(s.other, "ext", 8192, QDIRTY_BITMAP_DISABLED, &err), 0, err);
    CHECK_PTR(qdirty_image_add_bitmap(s.other, "sink", 8192, QDIRTY_BITMAP_DISABLED, &err), 0,
              err);

    atomic_store(&s.writers_left, S_WRITERS);
    for (int i = 0; i < S_WRITERS; i++) {
        w[i].s = &s;
        w[i].seed = 0x5eed + (uint64_t)i;
        w[i].ranges = calloc((size_t)s.iters, sizeof *w[i].ranges);
        CHECK(w[i].ranges != NULL);
        if (w[i].ranges && pthread_create(&wt[i], NULL, writer_main, &w[i]) == 0) {
            started_w++;
        }
    }
    CHECK(started_w == S_WRITERS);
    if (started_w != S_WRITERS) {
        atomic_store(&s.writers_left, 0);
    }
    for (int i = 0; i < 5; i++) {
        if (pthread_create(&mt[started_m], NULL, mgmt[i], &s) == 0) {
            started_m++;
        }
    }
    CHECK(started_m == 5);
    for (int i = 0; i < started_w; i++) {
        pthread_join(wt[i], NULL);
    }
    for (int i = 0; i < started_m; i++) {
        pthread_join(mt[i], NULL);
    }
    CHECK_EQ_I64(atomic_load(&s.failures), 0);

    /* A last merge: "merged" is then a superset of "always". */
    CHECK_RC(qdirty_bitmap_merge(qdirty_image_find_bitmap(s.img, "merged"),
                                 qdirty_image_find_bitmap(s.img, "always"), NULL, &err),
             0, err);
    check_image(s.img, w, "in memory", false);
    CHECK(missing_ranges(qdirty_image_find_bitmap(s.other, "sink"), w) == 0);
    CHECK_RC(qdirty_image_store_bitmaps(s.img, &err), 0, err);
    CHECK_RC(qdirty_image_close(s.img, &err), 0, err);
    s.img = CHECK_PTR(qdirty_image_open(p, 0, &err), 0, err);
    if (s.img) {
        check_image(s.img, w, "after reopen", true);
        CHECK_RC(qdirty_image_close(s.img, &err), 0, err);
        s.img = NULL;
    }

    if (system("command -v qemu-img >/dev/null 2>&1") == 0) {
        size_t n = strlen(p) + 64;
        char *cmd = malloc(n);
        if (cmd) {
            snprintf(cmd, n, "qemu-img check -q -f qcow2 '%s'", p);
            CHECK(system(cmd) == 0);
            free(cmd);
        }
    } else {
        fprintf(stderr, "SKIP test_stress (qemu-img check): qemu-img not installed\n");
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("test_stress: %d writers x %d writes, %d stores, %.2f s\n", S_WRITERS, s.iters,
           atomic_load(&s.stores),
           (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    fflush(stdout);

out:
    if (s.img) CHECK_RC(qdirty_image_close(s.img, &err), 0, err);
    if (s.other) CHECK_RC(qdirty_image_close(s.other, &err), 0, err);
    for (int i = 0; i < S_WRITERS; i++) {
        free(w[i].ranges);
    }
    unlink(p);
    free(p);
}
