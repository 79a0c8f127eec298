/* Write-hook benchmark through the C ABI (built and run by benches/write_hook.rs).
 *
 * Random 4 KiB writes over a 1 TiB standalone image whose bitmaps have 64 KiB granularity:
 * ns per qdirty_image_set_dirty call with NBITMAPS enabled bitmaps, with and without the fold
 * that applies the logged writes to the bitmaps (done by the next locked call; here
 * qdirty_bitmap_count, timed separately), 1 thread and 2 threads. The next call absorbs the
 * log into one shared epoch and brings only the bitmap it reads up to date; with several
 * bitmaps, "fold_all" then reads every other bitmap too (qdirty_bitmap_count on each, timed
 * separately): the whole fan-out, each write applied to every enabled bitmap.
 *
 * With 1 bitmap, two C baselines run in the same process, interleaved with the hook round by
 * round, each as a hook function of its own (not inlined into the loop, same signature, same
 * clamping and rounding, reading granularity and size from its object, as a C hypervisor's
 * own hook would):
 * - atomic_flat: a flat uint64_t array (one bit per 64 KiB granule, allocated up front)
 *   updated with a seq_cst atomic fetch_or per word, lock-free: the least a lock-free hook
 *   can do (it has the same cache miss on the random word and one locked instruction);
 * - mutex_flat: the same array behind a pthread mutex (QEMU's way, for one bitmap).
 *
 * Method: offsets are generated before timing (xorshift, as benches/write_hook.rs), so the
 * timed loops only load them from an array; the clock is read once before and once after each
 * loop (CLOCK_MONOTONIC). Timed threads are pinned: a single thread always to the same CPU,
 * two threads to two CPUs. A warm-up pass with other offsets allocates the log's chunks and the
 * bitmaps' memory and touches the baselines' arrays. Then ROUNDS rounds; in each, every
 * variant runs on the same offsets, in an order rotated from round to round, the baselines on
 * a cleared array (the hook's log is empty too: the fold took its words). Reported: the
 * median over rounds (and the minimum) of each figure, and the median of the per-round ratios
 * hook / baseline (both measured within a few hundred milliseconds of each other, so a
 * shared machine's load mostly cancels out).
 *
 * Steady state with management calls (1 bitmap only): a host calls into the image while the
 * guest writes, and each call absorbs the log. The same writes on 1 thread, with a call after
 * every K writes, K calibrated to 1 ms and to 10 ms of the mutex baseline's writes in the
 * warm-up (the same K for every variant, so every variant does the same work between two
 * calls). The hook's call is qdirty_bitmap_count on its bitmap (it absorbs the log); the mutex
 * baseline's call takes and releases its mutex (QEMU's count is O(1), kept by its hbitmap, so
 * what a call costs the writes there is the lock); the atomic baseline's call is a seq_cst
 * load of one word (nothing to absorb). The clock is read around each batch of K writes: the
 * writes' time and the calls' time are reported apart ("cadence_*" keys), interleaved with the
 * other variants round by round, ratios per round. Then the same with the calls made by a
 * second thread (a host's management thread, pinned to the other CPU) every 1 ms and 10 ms of
 * wall time while the writer runs ("caller_thread_*" keys: the writer's time per write, the
 * calls' own time per call; both need the second CPU free).
 *
 * Usage: write_hook NBITMAPS WRITES_PER_THREAD [ROUNDS]   (ROUNDS defaults to 7)
 * Output: "key value..." lines. */
#define _GNU_SOURCE /* pthread_attr_setaffinity_np */

#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qdirty.h"

#define DISK (1ull << 40)
#define GRAN 65536ull
#define GRAN_BITS 16
#define WRITE 4096ull
#define MAX_ROUNDS 64

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t *random_offsets(uint64_t n, uint64_t seed)
{
    uint64_t *v = malloc(n * sizeof *v);
    if (!v) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    uint64_t x = seed * 0x9E3779B97F4A7C15ull | 1;
    for (uint64_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v[i] = (x % (DISK / WRITE)) * WRITE;
    }
    return v;
}

/* ---- Baselines: a C hypervisor's own hook for one bitmap. ---- */

struct flat {
    unsigned gran_bits;
    uint64_t size;
    size_t words;
    _Atomic uint64_t *atomic_bits; /* atomic_flat */
    uint64_t *bits;                /* mutex_flat */
    pthread_mutex_t mu;
};

/* The last byte of the write clamped to the disk, or 0 with *skip set for an empty or
 * out-of-range write (the hook's clamping). */
static inline uint64_t flat_last(const struct flat *f, uint64_t offset, uint64_t bytes, int *skip)
{
    *skip = !f || bytes == 0 || offset >= f->size;
    if (*skip) {
        return 0;
    }
    uint64_t end = offset + bytes - 1 < offset ? UINT64_MAX : offset + bytes - 1;
    return end > f->size - 1 ? f->size - 1 : end;
}

__attribute__((noinline)) static void atomic_flat_set(struct flat *f, uint64_t offset,
                                                      uint64_t bytes)
{
    int skip;
    uint64_t end = flat_last(f, offset, bytes, &skip);
    if (skip) {
        return;
    }
    for (uint64_t g = offset >> f->gran_bits; g <= end >> f->gran_bits; g++) {
        atomic_fetch_or_explicit(&f->atomic_bits[g / 64], 1ull << (g % 64), memory_order_seq_cst);
    }
}

__attribute__((noinline)) static void mutex_flat_set(struct flat *f, uint64_t offset,
                                                     uint64_t bytes)
{
    int skip;
    uint64_t end = flat_last(f, offset, bytes, &skip);
    if (skip) {
        return;
    }
    pthread_mutex_lock(&f->mu);
    for (uint64_t g = offset >> f->gran_bits; g <= end >> f->gran_bits; g++) {
        f->bits[g / 64] |= 1ull << (g % 64);
    }
    pthread_mutex_unlock(&f->mu);
}

/* ---- Timed loops. ---- */

struct job {
    qdirty_image *img;
    struct flat *flat;
    const uint64_t *offs;
    uint64_t n;
    /* Cadence runs: the bitmap whose count is the hook's call, the writes between two calls,
     * the variant, and what was measured (seconds of writes, of calls; calls made). */
    qdirty_bitmap *bm;
    uint64_t every;
    int variant;
    double write_s, call_s;
    uint64_t calls;
};

static void *hook_job(void *arg)
{
    struct job *j = arg;
    for (uint64_t i = 0; i < j->n; i++) {
        qdirty_image_set_dirty(j->img, j->offs[i], WRITE);
    }
    return NULL;
}

static void *atomic_flat_job(void *arg)
{
    struct job *j = arg;
    for (uint64_t i = 0; i < j->n; i++) {
        atomic_flat_set(j->flat, j->offs[i], WRITE);
    }
    return NULL;
}

static void *mutex_flat_job(void *arg)
{
    struct job *j = arg;
    for (uint64_t i = 0; i < j->n; i++) {
        mutex_flat_set(j->flat, j->offs[i], WRITE);
    }
    return NULL;
}

enum { HOOK, ATOMIC_FLAT, MUTEX_FLAT, VARIANTS };

/* The baselines' management call (see the header comment). */
static uint64_t flat_call(struct flat *f, int variant)
{
    uint64_t v;
    if (variant == MUTEX_FLAT) {
        pthread_mutex_lock(&f->mu);
        v = f->bits[0];
        pthread_mutex_unlock(&f->mu);
    } else {
        v = atomic_load_explicit(&f->atomic_bits[0], memory_order_seq_cst);
    }
    return v;
}

/* The writes of a job with a management call after every `every` writes; the clock is read
 * around each batch and each call. */
static void *cadence_job(void *arg)
{
    struct job *j = arg;
    uint64_t sink = 0;
    j->write_s = j->call_s = 0;
    j->calls = 0;
    for (uint64_t i = 0; i < j->n;) {
        uint64_t end = i + j->every < j->n ? i + j->every : j->n;
        double t0 = now();
        switch (j->variant) {
        case HOOK:
            for (; i < end; i++) {
                qdirty_image_set_dirty(j->img, j->offs[i], WRITE);
            }
            break;
        case ATOMIC_FLAT:
            for (; i < end; i++) {
                atomic_flat_set(j->flat, j->offs[i], WRITE);
            }
            break;
        default:
            for (; i < end; i++) {
                mutex_flat_set(j->flat, j->offs[i], WRITE);
            }
        }
        double t1 = now();
        sink += j->variant == HOOK ? qdirty_bitmap_count(j->bm) : flat_call(j->flat, j->variant);
        double t2 = now();
        j->write_s += t1 - t0;
        j->call_s += t2 - t1;
        j->calls++;
    }
    /* Keeps the calls' results alive. */
    if (sink == UINT64_MAX) {
        fprintf(stderr, "unlikely\n");
    }
    return NULL;
}

/* A host's management thread: a call every `period_ns` (absolute deadlines) until `stop`. */
struct caller {
    struct job *job;
    long period_ns;
    _Atomic int stop;
    double call_s;
    uint64_t calls;
};

static void *caller_job(void *arg)
{
    struct caller *c = arg;
    struct timespec next;
    uint64_t sink = 0;
    clock_gettime(CLOCK_MONOTONIC, &next);
    c->call_s = 0;
    c->calls = 0;
    while (!atomic_load(&c->stop)) {
        next.tv_nsec += c->period_ns;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
        if (atomic_load(&c->stop)) {
            break;
        }
        double t0 = now();
        sink += c->job->variant == HOOK ? qdirty_bitmap_count(c->job->bm)
                                         : flat_call(c->job->flat, c->job->variant);
        c->call_s += now() - t0;
        c->calls++;
    }
    if (sink == UINT64_MAX) {
        fprintf(stderr, "unlikely\n");
    }
    return NULL;
}

/* The CPUs the timed threads run on: thread i of a run on cpus[i % ncpus] (the first two
 * CPUs this process may use), so that every variant's single thread runs on the same CPU (on
 * a VM the vCPUs can differ a lot: one may share its core with a busy neighbour). */
static int cpus[2], ncpus;

static void pick_cpus(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) {
        return;
    }
    for (int c = 0; c < CPU_SETSIZE && ncpus < 2; c++) {
        if (CPU_ISSET(c, &set)) {
            cpus[ncpus++] = c;
        }
    }
}

/* Runs fn on `threads` threads (each its own offsets); returns the wall time. */
static double run(void *(*fn)(void *), struct job *jobs, int threads)
{
    pthread_t th[2];
    double t0 = now();
    for (int i = 0; i < threads; i++) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        if (ncpus > 0) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(cpus[i % ncpus], &set);
            pthread_attr_setaffinity_np(&attr, sizeof set, &set);
        }
        int rc = pthread_create(&th[i], &attr, fn, &jobs[i]);
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            fprintf(stderr, "pthread_create failed\n");
            exit(1);
        }
    }
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
    }
    return now() - t0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(const double *v, int n)
{
    double s[MAX_ROUNDS];
    memcpy(s, v, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, cmp_double);
    return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

static double minimum(const double *v, int n)
{
    double m = v[0];
    for (int i = 1; i < n; i++) {
        m = v[i] < m ? v[i] : m;
    }
    return m;
}

/* "key median" and "key_min min", values already per unit. */
static void report(const char *key, const double *v, int n)
{
    printf("%s %.2f\n", key, median(v, n));
    printf("%s_min %.2f\n", key, minimum(v, n));
    printf("%s_rounds", key);
    for (int i = 0; i < n; i++) {
        printf(" %.2f", v[i]);
    }
    printf("\n");
}

int main(int argc, char **argv)
{
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: %s NBITMAPS WRITES_PER_THREAD [ROUNDS]\n", argv[0]);
        return 2;
    }
    int nbitmaps = atoi(argv[1]);
    uint64_t n = strtoull(argv[2], NULL, 10);
    int rounds = argc == 4 ? atoi(argv[3]) : 7;
    if (rounds < 1 || rounds > MAX_ROUNDS || n == 0) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    pick_cpus();
    qdirty_error *err = NULL;
    qdirty_image *img = qdirty_image_new_memory(DISK, &err);
    qdirty_bitmap *first = NULL;
    qdirty_bitmap **all = calloc((size_t)(nbitmaps > 0 ? nbitmaps : 1), sizeof *all);
    if (!img || !all) {
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
        all[i] = b;
    }
    int baselines = nbitmaps == 1;
    struct flat flat = {GRAN_BITS, DISK, DISK / GRAN / 64, NULL, NULL, PTHREAD_MUTEX_INITIALIZER};
    if (baselines) {
        flat.atomic_bits = calloc(flat.words, sizeof(uint64_t));
        flat.bits = calloc(flat.words, sizeof(uint64_t));
        if (!flat.atomic_bits || !flat.bits) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
    }
    uint64_t *offs[2] = {random_offsets(n, 1), random_offsets(n, 2)};
    uint64_t *warm = random_offsets(n, 3);
    struct job jobs[2] = {{img, &flat, offs[0], n, first, 0, 0, 0, 0, 0},
                          {img, &flat, offs[1], n, first, 0, 0, 0, 0, 0}};
    struct job wjob = {img, &flat, warm, n, first, 0, 0, 0, 0, 0};
    void *(*fns[VARIANTS])(void *) = {hook_job, atomic_flat_job, mutex_flat_job};

    /* Warm-up: the log's chunks get allocated, the bitmaps get their memory, the baselines'
     * arrays get touched. */
    run(hook_job, &wjob, 1);
    for (int i = 0; i < nbitmaps; i++) {
        (void)qdirty_bitmap_count(all[i]);
    }
    double mutex_warm_s = 0;
    if (baselines) {
        run(atomic_flat_job, &wjob, 1);
        mutex_warm_s = run(mutex_flat_job, &wjob, 1);
    }

    double t1[VARIANTS][MAX_ROUNDS], t2[VARIANTS][MAX_ROUNDS];
    double fold1[MAX_ROUNDS], fold2[MAX_ROUNDS], fold_all1[MAX_ROUNDS];
    uint64_t c1 = 0, c2 = 0;
    for (int r = 0; r < rounds; r++) {
        for (int k = 0; k < VARIANTS; k++) {
            int v = (r + k) % VARIANTS;
            if (v != HOOK && !baselines) {
                continue;
            }
            for (int threads = 1; threads <= 2; threads++) {
                if (v != HOOK) {
                    memset((void *)flat.atomic_bits, 0, flat.words * sizeof(uint64_t));
                    memset(flat.bits, 0, flat.words * sizeof(uint64_t));
                }
                double t = run(fns[v], jobs, threads);
                (threads == 1 ? t1 : t2)[v][r] = t;
                if (v == HOOK) {
                    double f0 = now();
                    uint64_t c = qdirty_bitmap_count(first); /* locks the image: folds */
                    (threads == 1 ? fold1 : fold2)[r] = now() - f0;
                    *(threads == 1 ? &c1 : &c2) = c;
                    /* Every other bitmap takes the writes too. */
                    double a0 = now();
                    for (int i = 1; i < nbitmaps; i++) {
                        if (qdirty_bitmap_count(all[i]) != c) {
                            fprintf(stderr, "bitmap %d disagrees with bitmap 0\n", i);
                            return 1;
                        }
                    }
                    if (threads == 1) {
                        fold_all1[r] = now() - a0;
                    }
                }
            }
        }
    }

    /* Steady state with a management call every 1 ms and every 10 ms (of the mutex baseline's
     * writes in the warm-up), 1 thread, interleaved round by round. */
    enum { PERIODS = 2 };
    static const double period_s[PERIODS] = {1e-3, 10e-3};
    static const char *const period_name[PERIODS] = {"1ms", "10ms"};
    uint64_t every[PERIODS];
    double cw[PERIODS][VARIANTS][MAX_ROUNDS], cc[PERIODS][VARIANTS][MAX_ROUNDS];
    uint64_t ccalls[PERIODS] = {0, 0};
    for (int p = 0; p < PERIODS && baselines; p++) {
        every[p] = (uint64_t)(period_s[p] / (mutex_warm_s / (double)n));
        every[p] = every[p] < 1 ? 1 : every[p];
    }
    for (int r = 0; r < rounds && baselines; r++) {
        for (int k = 0; k < VARIANTS; k++) {
            int v = (r + k) % VARIANTS;
            for (int p = 0; p < PERIODS; p++) {
                if (v != HOOK) {
                    memset((void *)flat.atomic_bits, 0, flat.words * sizeof(uint64_t));
                    memset(flat.bits, 0, flat.words * sizeof(uint64_t));
                }
                struct job cj = jobs[0];
                cj.every = every[p];
                cj.variant = v;
                run(cadence_job, &cj, 1);
                cw[p][v][r] = cj.write_s;
                cc[p][v][r] = cj.call_s;
                ccalls[p] = cj.calls;
            }
        }
    }

    /* The same with the calls made by a second thread (pinned to the other CPU) every 1 ms
     * and 10 ms of wall time while the writer runs: the writer's time per write. */
    double tw[PERIODS][VARIANTS][MAX_ROUNDS], tc[PERIODS][VARIANTS][MAX_ROUNDS];
    uint64_t tcalls[PERIODS][VARIANTS][MAX_ROUNDS];
    for (int r = 0; r < rounds && baselines; r++) {
        for (int k = 0; k < VARIANTS; k++) {
            int v = (r + k) % VARIANTS;
            for (int p = 0; p < PERIODS; p++) {
                if (v != HOOK) {
                    memset((void *)flat.atomic_bits, 0, flat.words * sizeof(uint64_t));
                    memset(flat.bits, 0, flat.words * sizeof(uint64_t));
                }
                struct job cj = jobs[0];
                cj.variant = v;
                struct caller c = {&cj, (long)(period_s[p] * 1e9), 0, 0, 0};
                pthread_t th;
                pthread_attr_t attr;
                pthread_attr_init(&attr);
                if (ncpus > 1) {
                    cpu_set_t set;
                    CPU_ZERO(&set);
                    CPU_SET(cpus[1], &set);
                    pthread_attr_setaffinity_np(&attr, sizeof set, &set);
                }
                if (pthread_create(&th, &attr, caller_job, &c) != 0) {
                    fprintf(stderr, "pthread_create failed\n");
                    return 1;
                }
                pthread_attr_destroy(&attr);
                void *(*fn)(void *) = v == HOOK          ? hook_job
                                      : v == ATOMIC_FLAT ? atomic_flat_job
                                                         : mutex_flat_job;
                tw[p][v][r] = run(fn, &cj, 1);
                atomic_store(&c.stop, 1);
                pthread_join(th, NULL);
                tc[p][v][r] = c.call_s;
                tcalls[p][v][r] = c.calls;
                if (v == HOOK) {
                    (void)qdirty_bitmap_count(first);
                }
            }
        }
    }

    double hook1[MAX_ROUNDS], hook2[MAX_ROUNDS], f1[MAX_ROUNDS], hf1[MAX_ROUNDS];
    double fa1[MAX_ROUNDS], hfa1[MAX_ROUNDS];
    double ratio[MAX_ROUNDS], ratio_fold[MAX_ROUNDS];
    for (int r = 0; r < rounds; r++) {
        hook1[r] = t1[HOOK][r] * 1e9 / (double)n;
        hook2[r] = t2[HOOK][r] * 1e9 / (double)(2 * n);
        f1[r] = fold1[r] * 1e9 / (double)n;
        hf1[r] = (t1[HOOK][r] + fold1[r]) * 1e9 / (double)n;
        fa1[r] = fold_all1[r] * 1e9 / (double)n;
        hfa1[r] = (t1[HOOK][r] + fold1[r] + fold_all1[r]) * 1e9 / (double)n;
        ratio[r] = 2.0 * t1[HOOK][r] / t2[HOOK][r];
        ratio_fold[r] = 2.0 * (t1[HOOK][r] + fold1[r]) / (t2[HOOK][r] + fold2[r]);
    }
    printf("bitmaps %d\n", nbitmaps);
    printf("writes_per_thread %" PRIu64 "\n", n);
    printf("rounds %d\n", rounds);
    printf("cpus %d %d\n", ncpus > 0 ? cpus[0] : -1, ncpus > 1 ? cpus[1] : -1);
    report("hook_ns_1thread", hook1, rounds);
    report("fold_ns_per_write_1thread", f1, rounds);
    report("hook_plus_fold_ns_1thread", hf1, rounds);
    report("fold_all_others_ns_per_write_1thread", fa1, rounds);
    report("hook_plus_fold_all_ns_1thread", hfa1, rounds);
    report("hook_ns_2threads", hook2, rounds);
    report("rate_ratio_2threads", ratio, rounds);
    report("rate_ratio_2threads_with_fold", ratio_fold, rounds);
    printf("count_after %" PRIu64 " %" PRIu64 "\n", c1, c2);

    if (baselines) {
        static const char *const names[VARIANTS] = {"", "atomic_flat", "mutex_flat"};
        for (int v = ATOMIC_FLAT; v <= MUTEX_FLAT; v++) {
            double b1[MAX_ROUNDS], b2[MAX_ROUNDS], br[MAX_ROUNDS], rel[MAX_ROUNDS];
            for (int r = 0; r < rounds; r++) {
                b1[r] = t1[v][r] * 1e9 / (double)n;
                b2[r] = t2[v][r] * 1e9 / (double)(2 * n);
                br[r] = 2.0 * t1[v][r] / t2[v][r];
                rel[r] = t1[HOOK][r] / t1[v][r];
            }
            char key[64];
            snprintf(key, sizeof key, "baseline_%s_ns_1thread", names[v]);
            report(key, b1, rounds);
            snprintf(key, sizeof key, "baseline_%s_ns_2threads", names[v]);
            report(key, b2, rounds);
            snprintf(key, sizeof key, "baseline_%s_rate_ratio_2threads", names[v]);
            report(key, br, rounds);
            snprintf(key, sizeof key, "hook_over_%s_1thread", names[v]);
            report(key, rel, rounds);
        }
        for (int p = 0; p < PERIODS; p++) {
            static const char *const vn[VARIANTS] = {"hook", "atomic_flat", "mutex_flat"};
            char key[96];
            printf("cadence_%s_writes_between_calls %" PRIu64 "\n", period_name[p], every[p]);
            printf("cadence_%s_calls %" PRIu64 "\n", period_name[p], ccalls[p]);
            for (int v = 0; v < VARIANTS; v++) {
                double w[MAX_ROUNDS], c[MAX_ROUNDS];
                for (int r = 0; r < rounds; r++) {
                    w[r] = cw[p][v][r] * 1e9 / (double)n;
                    c[r] = cc[p][v][r] * 1e6 / (double)ccalls[p];
                }
                snprintf(key, sizeof key, "cadence_%s_%s_ns_per_write", period_name[p], vn[v]);
                report(key, w, rounds);
                snprintf(key, sizeof key, "cadence_%s_%s_us_per_call", period_name[p], vn[v]);
                report(key, c, rounds);
            }
            for (int v = ATOMIC_FLAT; v <= MUTEX_FLAT; v++) {
                double rel[MAX_ROUNDS];
                for (int r = 0; r < rounds; r++) {
                    rel[r] = cw[p][HOOK][r] / cw[p][v][r];
                }
                snprintf(key, sizeof key, "cadence_%s_hook_over_%s", period_name[p], vn[v]);
                report(key, rel, rounds);
            }
            for (int v = 0; v < VARIANTS; v++) {
                double w[MAX_ROUNDS], c[MAX_ROUNDS];
                for (int r = 0; r < rounds; r++) {
                    w[r] = tw[p][v][r] * 1e9 / (double)n;
                    c[r] = tcalls[p][v][r] ? tc[p][v][r] * 1e6 / (double)tcalls[p][v][r] : 0;
                }
                snprintf(key, sizeof key, "caller_thread_%s_%s_ns_per_write", period_name[p],
                         vn[v]);
                report(key, w, rounds);
                snprintf(key, sizeof key, "caller_thread_%s_%s_us_per_call", period_name[p],
                         vn[v]);
                report(key, c, rounds);
            }
            for (int v = ATOMIC_FLAT; v <= MUTEX_FLAT; v++) {
                double rel[MAX_ROUNDS];
                for (int r = 0; r < rounds; r++) {
                    rel[r] = tw[p][HOOK][r] / tw[p][v][r];
                }
                snprintf(key, sizeof key, "caller_thread_%s_hook_over_%s", period_name[p],
                         vn[v]);
                report(key, rel, rounds);
            }
        }
        free((void *)flat.atomic_bits);
        free(flat.bits);
    }
    free(offs[0]);
    free(offs[1]);
    free(warm);
    free(all);
    if (qdirty_image_close(img, &err) != 0) {
        fprintf(stderr, "%s\n", qdirty_error_message(err));
        return 1;
    }
    return 0;
}
