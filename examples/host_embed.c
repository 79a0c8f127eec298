/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * A hypervisor's qcow2 driver, reduced to what matters for qdirty's embedding interface: this
 * program owns the image file and its cluster allocator, and hands qdirty its I/O through
 * qdirty_io_ops (qdirty_image_open_with_io), so that qdirty never allocates a cluster behind its
 * back.
 *
 *   host_embed [--durable [--crash]] IMAGE BITMAP OFFSET:LENGTH... [-- OFFSET:LENGTH...]
 *
 * With --durable the image is opened in durable mode (QDIRTY_OPEN_DURABLE) and every guest write
 * is announced with qdirty_image_prepare_write before the hook records it; with --crash the
 * program then dies without closing the image (_exit), as a host killed after the guest's
 * writes: its bitmaps must be consistent on disk and cover every write.
 *
 * It opens IMAGE (an existing qcow2 v3 file), reads the header and the refcount table and blocks
 * itself, opens the image in qdirty read-write through its callbacks, adds the persistent bitmap
 * BITMAP, reports the guest writes given before "--" with qdirty_image_set_dirty, stores the
 * bitmaps (a checkpoint), reports the writes after "--", closes the image (which stores the
 * bitmaps again and frees the clusters of the first store through the host), checks its own
 * refcounts against what it handed out, and exits 0. tests/embed.rs builds and runs it and then
 * asks qemu-img check, qemu-img info and qemu-nbd what they think of the file.
 *
 * The allocator is deliberately minimal:
 * - only 16-bit refcounts (refcount_order 4, qemu-img's default) are supported; anything else
 *   fails clearly at startup;
 * - the free list holds every cluster whose refcount is 0 and that an existing refcount block
 *   covers, including clusters beyond the end of the file (a write there grows the file);
 * - it never creates refcount blocks or grows the refcount table: when no covered cluster range
 *   is free, allocation fails with ENOSPC (a real driver would allocate a new refcount block at
 *   the end of the file here);
 * - changed refcount blocks are written back by the flush callback, before its fdatasync:
 *   qdirty calls flush before it commits a new bitmap directory, so refcount increments are
 *   durable before anything references the clusters, and after it frees, so decrements are
 *   durable too.
 * - The host keeps no copy of cluster 0: it reads the header once at startup for the refcount
 *   geometry, which qdirty never changes when the host allocates.
 */

#define _GNU_SOURCE
#include <qdirty.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define REFTABLE_OFFSET_MASK UINT64_C(0xfffffffffffffe00)

/* A run of free clusters (cluster indexes). */
struct extent {
    uint64_t start, count;
};

struct host {
    int fd;
    uint64_t cluster_size;
    uint64_t entries_per_block; /* refcounts per refcount block */
    uint64_t *reftable;         /* refcount block offsets (0: none) */
    uint64_t reftable_len;
    uint16_t **blocks; /* refcount blocks in memory (host byte order), NULL when absent */
    unsigned char *dirty;
    struct extent *free_list; /* sorted, merged */
    size_t nfree, free_cap;
    /* Statistics. */
    uint64_t allocated, freed, flushes;
};

static uint16_t be16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t be64(const unsigned char *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }

static int full_pread(int fd, void *buf, uint64_t len, uint64_t off)
{
    unsigned char *p = buf;
    while (len > 0) {
        ssize_t r = pread(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO; /* past the end of the file */
        p += r, len -= (uint64_t)r, off += (uint64_t)r;
    }
    return 0;
}

static int full_pwrite(int fd, const void *buf, uint64_t len, uint64_t off)
{
    const unsigned char *p = buf;
    while (len > 0) {
        ssize_t r = pwrite(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += r, len -= (uint64_t)r, off += (uint64_t)r;
    }
    return 0;
}

/* ---- the refcounts ---------------------------------------------------------------------- */

/* The refcount of cluster c; -1 when no refcount block covers it. */
static int refcount(const struct host *h, uint64_t c)
{
    uint64_t t = c / h->entries_per_block;
    if (t >= h->reftable_len || !h->blocks[t])
        return -1;
    return h->blocks[t][c % h->entries_per_block];
}

static void set_refcount(struct host *h, uint64_t c, uint16_t v)
{
    uint64_t t = c / h->entries_per_block;
    h->blocks[t][c % h->entries_per_block] = v;
    h->dirty[t] = 1;
}

static int free_list_push(struct host *h, uint64_t start, uint64_t count)
{
    if (h->nfree == h->free_cap) {
        size_t cap = h->free_cap ? 2 * h->free_cap : 64;
        struct extent *n = realloc(h->free_list, cap * sizeof *n);
        if (!n)
            return -ENOMEM;
        h->free_list = n, h->free_cap = cap;
    }
    h->free_list[h->nfree++] = (struct extent){start, count};
    return 0;
}

/* Gives clusters back to the free list, keeping it sorted and merged. */
static int free_list_insert(struct host *h, uint64_t start, uint64_t count)
{
    size_t i = 0;
    while (i < h->nfree && h->free_list[i].start < start)
        i++;
    int r = free_list_push(h, 0, 0);
    if (r < 0)
        return r;
    memmove(&h->free_list[i + 1], &h->free_list[i], (h->nfree - 1 - i) * sizeof *h->free_list);
    h->free_list[i] = (struct extent){start, count};
    /* Merge with the neighbours. */
    if (i + 1 < h->nfree && h->free_list[i].start + h->free_list[i].count == h->free_list[i + 1].start) {
        h->free_list[i].count += h->free_list[i + 1].count;
        memmove(&h->free_list[i + 1], &h->free_list[i + 2], (h->nfree - i - 2) * sizeof *h->free_list);
        h->nfree--;
    }
    if (i > 0 && h->free_list[i - 1].start + h->free_list[i - 1].count == h->free_list[i].start) {
        h->free_list[i - 1].count += h->free_list[i].count;
        memmove(&h->free_list[i], &h->free_list[i + 1], (h->nfree - i - 1) * sizeof *h->free_list);
        h->nfree--;
    }
    return 0;
}

/* Reads the header's refcount geometry, the refcount table and every refcount block, and builds
 * the free list. Returns 0 or prints why not and returns -1. */
static int host_load(struct host *h)
{
    unsigned char hdr[104];
    int r = full_pread(h->fd, hdr, sizeof hdr, 0);
    if (r < 0) {
        fprintf(stderr, "host_embed: cannot read the header: %s\n", strerror(-r));
        return -1;
    }
    if (be32(hdr) != 0x514649fb) {
        fprintf(stderr, "host_embed: not a qcow2 image\n");
        return -1;
    }
    uint32_t version = be32(hdr + 4);
    if (version < 3) {
        fprintf(stderr, "host_embed: qcow2 v%" PRIu32 " image: only v3 is supported\n", version);
        return -1;
    }
    uint32_t cluster_bits = be32(hdr + 20);
    if (cluster_bits < 9 || cluster_bits > 21) {
        fprintf(stderr, "host_embed: bad cluster_bits %" PRIu32 "\n", cluster_bits);
        return -1;
    }
    uint32_t refcount_order = be32(hdr + 96);
    if (refcount_order != 4) {
        fprintf(stderr,
                "host_embed: refcount_order %" PRIu32 " (%u-bit refcounts) is not supported: "
                "this example host handles only 16-bit refcounts (refcount_order 4)\n",
                refcount_order, 1u << (refcount_order & 31));
        return -1;
    }
    h->cluster_size = UINT64_C(1) << cluster_bits;
    h->entries_per_block = h->cluster_size / 2;
    uint64_t rt_offset = be64(hdr + 48);
    uint32_t rt_clusters = be32(hdr + 56);
    h->reftable_len = rt_clusters * h->cluster_size / 8;

    unsigned char *raw = malloc(rt_clusters * h->cluster_size);
    unsigned char *block = malloc(h->cluster_size);
    h->reftable = calloc(h->reftable_len, sizeof *h->reftable);
    h->blocks = calloc(h->reftable_len, sizeof *h->blocks);
    h->dirty = calloc(h->reftable_len, 1);
    if (!raw || !block || !h->reftable || !h->blocks || !h->dirty) {
        fprintf(stderr, "host_embed: out of memory\n");
        return -1;
    }
    r = full_pread(h->fd, raw, rt_clusters * h->cluster_size, rt_offset);
    if (r < 0) {
        fprintf(stderr, "host_embed: cannot read the refcount table: %s\n", strerror(-r));
        return -1;
    }
    for (uint64_t t = 0; t < h->reftable_len; t++) {
        h->reftable[t] = be64(raw + 8 * t) & REFTABLE_OFFSET_MASK;
        if (!h->reftable[t])
            continue;
        r = full_pread(h->fd, block, h->cluster_size, h->reftable[t]);
        if (r < 0) {
            fprintf(stderr, "host_embed: cannot read refcount block %" PRIu64 ": %s\n", t,
                    strerror(-r));
            return -1;
        }
        h->blocks[t] = malloc(h->entries_per_block * sizeof(uint16_t));
        if (!h->blocks[t]) {
            fprintf(stderr, "host_embed: out of memory\n");
            return -1;
        }
        for (uint64_t i = 0; i < h->entries_per_block; i++)
            h->blocks[t][i] = be16(block + 2 * i);
    }
    free(raw);
    free(block);

    /* The free list: every covered cluster with refcount 0, inside or beyond the file. */
    uint64_t covered = h->reftable_len * h->entries_per_block;
    for (uint64_t c = 1; c < covered; c++) {
        if (refcount(h, c) != 0)
            continue;
        if (h->nfree > 0) {
            struct extent *last = &h->free_list[h->nfree - 1];
            if (last->start + last->count == c) {
                last->count++;
                continue;
            }
        }
        if (free_list_push(h, c, 1) < 0) {
            fprintf(stderr, "host_embed: out of memory\n");
            return -1;
        }
    }
    return 0;
}

/* ---- the callbacks ---------------------------------------------------------------------- */

static int host_pread(void *opaque, void *buf, uint64_t len, uint64_t offset)
{
    struct host *h = opaque;
    return full_pread(h->fd, buf, len, offset);
}

static int host_pwrite(void *opaque, const void *buf, uint64_t len, uint64_t offset)
{
    struct host *h = opaque;
    return full_pwrite(h->fd, buf, len, offset);
}

/* Writes the changed refcount blocks, then makes everything durable. */
static int host_flush(void *opaque)
{
    struct host *h = opaque;
    unsigned char *raw = malloc(h->cluster_size);
    if (!raw)
        return -ENOMEM;
    for (uint64_t t = 0; t < h->reftable_len; t++) {
        if (!h->dirty[t])
            continue;
        for (uint64_t i = 0; i < h->entries_per_block; i++) {
            raw[2 * i] = (unsigned char)(h->blocks[t][i] >> 8);
            raw[2 * i + 1] = (unsigned char)h->blocks[t][i];
        }
        int r = full_pwrite(h->fd, raw, h->cluster_size, h->reftable[t]);
        if (r < 0) {
            free(raw);
            return r;
        }
        h->dirty[t] = 0;
    }
    free(raw);
    h->flushes++;
    return fdatasync(h->fd) < 0 ? -errno : 0;
}

static int64_t host_get_length(void *opaque)
{
    struct host *h = opaque;
    struct stat st;
    if (fstat(h->fd, &st) < 0)
        return -errno;
    return (int64_t)st.st_size;
}

/* First fit from the free list. */
static int host_alloc_clusters(void *opaque, uint64_t n, uint64_t cluster_size, uint64_t *offset)
{
    struct host *h = opaque;
    if (cluster_size != h->cluster_size || n == 0)
        return -EINVAL;
    for (size_t i = 0; i < h->nfree; i++) {
        struct extent *e = &h->free_list[i];
        if (e->count < n)
            continue;
        uint64_t start = e->start;
        e->start += n, e->count -= n;
        if (e->count == 0) {
            memmove(e, e + 1, (h->nfree - i - 1) * sizeof *e);
            h->nfree--;
        }
        for (uint64_t c = start; c < start + n; c++)
            set_refcount(h, c, 1);
        *offset = start * h->cluster_size;
        h->allocated += n;
        return 0;
    }
    /* A real driver would add a refcount block at the end of the file here. */
    return -ENOSPC;
}

static int host_free_clusters(void *opaque, uint64_t offset, uint64_t n, uint64_t cluster_size)
{
    struct host *h = opaque;
    if (cluster_size != h->cluster_size || offset % cluster_size != 0)
        return -EINVAL;
    uint64_t first = offset / cluster_size;
    for (uint64_t c = first; c < first + n; c++) {
        if (refcount(h, c) <= 0)
            return -EINVAL; /* double free, or not a cluster of this image */
    }
    for (uint64_t c = first; c < first + n; c++) {
        uint16_t v = (uint16_t)(refcount(h, c) - 1);
        set_refcount(h, c, v);
        if (v == 0) {
            int r = free_list_insert(h, c, 1);
            if (r < 0)
                return r;
        }
    }
    h->freed += n;
    return 0;
}

/* ---- the program ------------------------------------------------------------------------ */

static int failed(const char *what, qdirty_error *err)
{
    fprintf(stderr, "host_embed: %s: %s (errno %d)\n", what,
            err ? qdirty_error_message(err) : "no details", qdirty_error_errno(err));
    qdirty_error_free(err);
    return 1;
}

static int parse_range(const char *s, uint64_t *off, uint64_t *len)
{
    char *end;
    errno = 0;
    *off = strtoull(s, &end, 0);
    if (errno || *end != ':')
        return -1;
    *len = strtoull(end + 1, &end, 0);
    return errno || *end ? -1 : 0;
}

int main(int argc, char **argv)
{
    int durable = 0, crash = 0;
    while (argc > 1 && (strcmp(argv[1], "--durable") == 0 || strcmp(argv[1], "--crash") == 0)) {
        if (strcmp(argv[1], "--durable") == 0)
            durable = 1;
        else
            crash = 1;
        argv++, argc--;
    }
    if (argc < 3 || (crash && !durable)) {
        fprintf(stderr, "usage: host_embed [--durable [--crash]] IMAGE BITMAP OFFSET:LENGTH... "
                        "[-- OFFSET:LENGTH...]\n");
        return 2;
    }
    struct host h = {0};
    h.fd = open(argv[1], O_RDWR);
    if (h.fd < 0) {
        fprintf(stderr, "host_embed: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    if (host_load(&h) < 0)
        return 1;

    qdirty_io_ops ops = {
        .size = sizeof ops,
        .pread = host_pread,
        .pwrite = host_pwrite,
        .flush = host_flush,
        .get_length = host_get_length,
        .alloc_clusters = host_alloc_clusters,
        .free_clusters = host_free_clusters,
    };
    qdirty_error *err = NULL;
    /* Load: when the host opens the image, before the guest runs. */
    uint32_t flags = QDIRTY_OPEN_RDWR | (durable ? QDIRTY_OPEN_DURABLE : 0);
    qdirty_image *img = qdirty_image_open_with_io(&ops, &h, argv[1], flags, &err);
    if (!img)
        return failed("open", err);
    if (!qdirty_image_add_bitmap(img, argv[2], 0, QDIRTY_BITMAP_PERSISTENT, &err))
        return failed("add bitmap", err);

    /* The guest writes: the host's write path calls the hook. */
    int after_checkpoint = 0;
    for (int i = 3; i < argc; i++) {
        uint64_t off, len;
        if (strcmp(argv[i], "--") == 0) {
            /* A checkpoint: store now (a real host does this before snapshots/migration). */
            if (qdirty_image_store_bitmaps(img, &err) < 0)
                return failed("store", err);
            after_checkpoint = 1;
            continue;
        }
        if (parse_range(argv[i], &off, &len) < 0) {
            fprintf(stderr, "host_embed: bad range '%s' (want OFFSET:LENGTH)\n", argv[i]);
            return 2;
        }
        /* Durable mode: the bitmaps on disk cover the range before the write is issued (no-op
         * otherwise); a failure means the guest write must fail. */
        if (qdirty_image_prepare_write(img, off, len, &err) < 0)
            return failed("prepare_write", err);
        /* ... the host issues the guest write here ... */
        qdirty_image_set_dirty(img, off, len);
    }
    if (crash) {
        /* Killed: nothing is closed, stored or flushed any more. */
        printf("host_embed: crashed after the writes\n");
        fflush(stdout);
        _exit(0);
    }

    /* Close stores the bitmaps; the host releases the file only afterwards. */
    if (qdirty_image_close(img, &err) < 0)
        return failed("close", err);

    /* Nothing left to write back: qdirty flushed after its last free. */
    for (uint64_t t = 0; t < h.reftable_len; t++) {
        if (h.dirty[t]) {
            fprintf(stderr, "host_embed: refcount block %" PRIu64 " not flushed by qdirty\n", t);
            return 1;
        }
    }
    if (after_checkpoint && h.freed == 0) {
        fprintf(stderr, "host_embed: the second store freed nothing through the host\n");
        return 1;
    }
    printf("host_embed: allocated %" PRIu64 " clusters, freed %" PRIu64 ", %" PRIu64
           " flushes\n",
           h.allocated, h.freed, h.flushes);
    if (close(h.fd) < 0) {
        perror("host_embed: close");
        return 1;
    }
    for (uint64_t t = 0; t < h.reftable_len; t++)
        free(h.blocks[t]);
    free(h.blocks);
    free(h.reftable);
    free(h.dirty);
    free(h.free_list);
    return 0;
}
