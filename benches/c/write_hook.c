/* Write-hook benchmark through the C ABI (built and run by benches/write_hook.rs).
 *
 * Random 4 KiB writes over a 1 TiB standalone image whose bitmaps have 64 KiB granularity:
 * ns per qdirty_image_set_dirty call with NBITMAPS enabled bitmaps, with and without the fold
 * that applies the logged writes to the bitmaps (done by the next locked call; here
 * qdirty_bitmap_count, timed separately), 1 thread and 2 threads, and a baseline: a flat
 * uint64_t array behind a pthread mutex doing the same sets for one bitmap.
 *
 * Usage: write_hook NBITMAPS WRITES_PER_THREAD
 * Output: "key value" lines. */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "qdirty.h"

#define DISK (1ull << 40)
#define GRAN 65536ull
#define WRITE 4096ull

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t *random_offsets(uint64_t n, uint64_t seed)
{
    uint64_t *v = malloc(n * sizeof *v);
    uint64_t x = seed * 0x9E3779B97F4A7C15ull | 1;
    for (uint64_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v[i] = (x % (DISK / WRITE)) * WRITE;
    }
    return v;
}

struct job {
    qdirty_image *img;
    const uint64_t *offs;
    uint64_t n;
    /* baseline */
    pthread_mutex_t *mu;
    uint64_t *flat;
};

static void *hook_job(void *arg)
{
    struct job *j = arg;
    for (uint64_t i = 0; i < j->n; i++) {
        qdirty_image_set_dirty(j->img, j->offs[i], WRITE);
    }
    return NULL;
}

static void *flat_job(void *arg)
{
    struct job *j = arg;
    for (uint64_t i = 0; i < j->n; i++) {
        uint64_t first = j->offs[i] / GRAN, last = (j->offs[i] + WRITE - 1) / GRAN;
        pthread_mutex_lock(j->mu);
        for (uint64_t g = first; g <= last; g++) {
            j->flat[g / 64] |= 1ull << (g % 64);
        }
        pthread_mutex_unlock(j->mu);
    }
    return NULL;
}

/* Runs fn on `threads` threads (each its own offsets); returns the wall time. */
static double run(void *(*fn)(void *), struct job *jobs, int threads)
{
    pthread_t th[2];
    double t0 = now();
    for (int i = 0; i < threads; i++) {
        if (pthread_create(&th[i], NULL, fn, &jobs[i]) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            exit(1);
        }
    }
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
    }
    return now() - t0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s NBITMAPS WRITES_PER_THREAD\n", argv[0]);
        return 2;
    }
    int nbitmaps = atoi(argv[1]);
    uint64_t n = strtoull(argv[2], NULL, 10);
    qdirty_error *err = NULL;
    qdirty_image *img = qdirty_image_new_memory(DISK, &err);
    qdirty_bitmap *first = NULL;
    if (!img) {
        fprintf(stderr, "%s\n", qdirty_error_message(err));
        return 1;
    }
    for (int i = 0; i < nbitmaps; i++) {
        char name[32];
        snprintf(name, sizeof name, "b%d", i);
        qdirty_bitmap *b = qdirty_image_add_bitmap(img, name, (uint32_t)GRAN, 0, &err);
        if (!b) {
            fprintf(stderr, "%s\n", qdirty_error_message(err));
            return 1;
        }
        if (!first) {
            first = b;
        }
    }
    uint64_t *offs[2] = {random_offsets(n, 1), random_offsets(n, 2)};
    uint64_t *warm = random_offsets(n, 3);
    struct job jobs[2] = {{img, offs[0], n, NULL, NULL}, {img, offs[1], n, NULL, NULL}};
    struct job wjob = {img, warm, n, NULL, NULL};

    /* Warm-up: the log's chunks get allocated and the bitmaps get their memory. */
    run(hook_job, &wjob, 1);
    (void)qdirty_bitmap_count(first);

    double t1 = run(hook_job, jobs, 1);
    double f0 = now();
    uint64_t c1 = qdirty_bitmap_count(first); /* locks the image: folds the log */
    double fold1 = now() - f0;

    double t2 = run(hook_job, jobs, 2);
    f0 = now();
    uint64_t c2 = qdirty_bitmap_count(first);
    double fold2 = now() - f0;

    printf("bitmaps %d\n", nbitmaps);
    printf("writes_per_thread %" PRIu64 "\n", n);
    printf("hook_ns_1thread %.2f\n", t1 * 1e9 / (double)n);
    printf("fold_ns_per_write_1thread %.2f\n", fold1 * 1e9 / (double)n);
    printf("hook_plus_fold_ns_1thread %.2f\n", (t1 + fold1) * 1e9 / (double)n);
    printf("hook_ns_2threads %.2f\n", t2 * 1e9 / (double)(2 * n));
    printf("rate_ratio_2threads %.3f\n", (2.0 * (double)n / t2) / ((double)n / t1));
    printf("rate_ratio_2threads_with_fold %.3f\n",
           (2.0 * (double)n / (t2 + fold2)) / ((double)n / (t1 + fold1)));
    printf("count_after %" PRIu64 " %" PRIu64 "\n", c1, c2);

    if (nbitmaps == 1) {
        pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
        uint64_t *flat = calloc(DISK / GRAN / 64, sizeof(uint64_t));
        struct job fj[2] = {{NULL, offs[0], n, &mu, flat}, {NULL, offs[1], n, &mu, flat}};
        struct job fw = {NULL, warm, n, &mu, flat};
        run(flat_job, &fw, 1);
        double b1 = run(flat_job, fj, 1);
        double b2 = run(flat_job, fj, 2);
        printf("baseline_mutex_flat_ns_1thread %.2f\n", b1 * 1e9 / (double)n);
        printf("baseline_mutex_flat_ns_2threads %.2f\n", b2 * 1e9 / (double)(2 * n));
        printf("baseline_rate_ratio_2threads %.3f\n", (2.0 * (double)n / b2) / ((double)n / b1));
        free(flat);
    }
    free(offs[0]);
    free(offs[1]);
    free(warm);
    if (qdirty_image_close(img, &err) != 0) {
        fprintf(stderr, "%s\n", qdirty_error_message(err));
        return 1;
    }
    return 0;
}
