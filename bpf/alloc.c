/* Where ext4 allocates, per device: the telemetry that shows a thin image swelling.
 *
 * Counters per device (blocks allocated, freed, discarded) are cumulative and only ever added
 * to; the daemon reads them on a period and publishes the differences. The set of image-
 * cluster sized regions the filesystem has put data in is a hash of (device, region): a region
 * enters on the first allocation in it and leaves when a discard covers it whole (the image
 * manager frees a cluster only then). Inserts and removals are counted per device, so
 * live regions = inserted - removed, without reading the set.
 *
 * A region is 2^shift filesystem blocks. The daemon writes each filesystem's shift (from its
 * block size and the configured region size) into region_shift; FSND_DEFAULT_SHIFT (1 MiB of
 * 4 KiB blocks) covers devices it has not seen yet.
 */
#ifndef FSND_DEFAULT_SHIFT
#define FSND_DEFAULT_SHIFT 8
#endif
#ifndef FSND_REGIONS
#define FSND_REGIONS 262144
#endif
/* An ext4 allocation covers at most one block group (32768 blocks), 129 regions of 1 MiB over
 * 4 KiB blocks; beyond the bound the rest of a span is counted in overflow[1]. */
#define FSND_MAX_SPAN 1024

struct dev_stats {
    u64 allocated;      /* blocks */
    u64 freed;
    u64 discarded;
    u64 regions_added;
    u64 regions_removed;
    u64 allocations;    /* calls */
};

struct region_key {
    u32 dev;
    u32 _pad;
    u64 region;
};

BPF_HASH(stats, u32, struct dev_stats, 1024);
BPF_HASH(regions, struct region_key, u8, FSND_REGIONS);
BPF_HASH(region_shift, u32, u32, 1024);
/* [0] regions the set could not take (full), [1] regions past FSND_MAX_SPAN, [2] devices
 * the stats map could not take */
BPF_PERCPU_ARRAY(overflow, u64, 3);

static __always_inline void over(int slot, u64 n) {
    u64 *o = overflow.lookup(&slot);
    if (o)
        *o += n;
}

static __always_inline struct dev_stats *dev_stats(u32 dev) {
    struct dev_stats *s = stats.lookup(&dev);
    if (s)
        return s;
    struct dev_stats zero = {};
    stats.insert(&dev, &zero);
    s = stats.lookup(&dev);
    if (!s)
        over(2, 1);
    return s;
}

static __always_inline u32 shift_of(u32 dev) {
    u32 *sh = region_shift.lookup(&dev);
    return sh ? (*sh & 63) : FSND_DEFAULT_SHIFT;
}

/* The walks over a span of regions keep their tallies in map memory, not in registers: the
 * verifier then sees every iteration's state as equal and prunes, where register counters
 * would make it follow each combination of outcomes. (bpf_loop would do too, but bcc 0.26
 * cannot pass a callback.) Loops are not unrolled so the program stays small. */
TRACEPOINT_PROBE(ext4, ext4_allocate_blocks) {
    u32 dev = args->dev;
    u64 block = args->block;
    u64 len = args->len;
    struct dev_stats *s = dev_stats(dev);
    if (!s || len == 0)
        return 0;
    __sync_fetch_and_add(&s->allocated, len);
    __sync_fetch_and_add(&s->allocations, 1);
    u32 shift = shift_of(dev);
    u64 first = block >> shift;
    u64 n = ((block + len - 1) >> shift) - first + 1;
    if (n > FSND_MAX_SPAN) {
        over(1, n - FSND_MAX_SPAN);
        n = FSND_MAX_SPAN;
    }
    struct region_key k = {.dev = dev};
    u8 one = 1;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < FSND_MAX_SPAN; i++) {
        if (i >= n)
            break;
        k.region = first + i;
        int err = regions.insert(&k, &one);   /* BPF_NOEXIST */
        if (err == 0)
            __sync_fetch_and_add(&s->regions_added, 1);
        else if (err != -17 /* EEXIST */)
            over(0, 1);
    }
    return 0;
}

TRACEPOINT_PROBE(ext4, ext4_free_blocks) {
    struct dev_stats *s = dev_stats(args->dev);
    if (s)
        __sync_fetch_and_add(&s->freed, args->count);
    return 0;
}

TRACEPOINT_PROBE(ext4, ext4_discard_blocks) {
    u32 dev = args->dev;
    u64 blk = args->blk;
    u64 count = args->count;
    struct dev_stats *s = dev_stats(dev);
    if (!s || count == 0)
        return 0;
    __sync_fetch_and_add(&s->discarded, count);
    u32 shift = shift_of(dev);
    u64 size = 1ULL << shift;
    u64 first = (blk + size - 1) >> shift;   /* the first region wholly inside */
    u64 end = (blk + count) >> shift;        /* one past the last */
    if (end <= first)
        return 0;
    u64 n = end - first;   /* past FSND_MAX_SPAN the rest stays counted as live: errs high */
    struct region_key k = {.dev = dev};
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < FSND_MAX_SPAN; i++) {
        if (i >= n)
            break;
        k.region = first + i;
        if (regions.delete(&k) == 0)
            __sync_fetch_and_add(&s->regions_removed, 1);
    }
    return 0;
}
