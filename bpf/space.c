/* ENOSPC and EDQUOT, counted in the kernel.
 *
 * raw_syscalls:sys_exit sees every syscall's return on the host; the first instructions drop
 * everything that is not -ENOSPC or -EDQUOT, so the cost elsewhere is the tracepoint call
 * itself. Failures are counted per (cgroup, process, syscall, errno) in a hash. With
 * FSND_EXT4_DEVICES (config sources.bpf_space.ext4_devices), the ext4 block-mapping
 * tracepoints add, per (cgroup, device, errno), the failures that reached ext4's allocator,
 * which is how an event learns its device; they fire on every ext4 extent lookup of the host
 * (measured +70 ns on a failing write), so they are off unless asked for.
 *
 * Exact counts without losing increments: the programs reach their counting maps (and the
 * per-CPU cache in front of them) through one-slot arrays of maps. To drain, the daemon points the slot at the spare map; that update
 * returns only after an RCU grace period (kernel/bpf/syscall.c maybe_wait_bpf_programs), so
 * no program still holds the old map when the daemon reads and clears it.
 *
 * A full map is not a lost count: the failure goes to a per-(cgroup, errno) fallback map, and
 * only when that is full too to an unattributed per-errno counter the daemon reports as lost
 * attribution (overflow[]).
 */
#include <linux/ptrace.h>
#ifdef FSND_EXT4_DEVICES
#include <linux/fs.h>
#endif

#define ENOSPC_ 28
#define EDQUOT_ 122
#ifndef FSND_KEYS
#define FSND_KEYS 10240
#endif
#ifndef FSND_CG_KEYS
#define FSND_CG_KEYS 1024
#endif

struct call_key {
    u64 cgroup_id;
    u32 pid;
    u32 syscall;
    s32 err;
    u32 _pad;
};

/* Per CPU (the maps are per-CPU hashes): a plain add, no atomic; the daemon sums the CPUs.
 * The time and the comm are taken only when an entry is made: the hot path of a storm is a
 * lookup of a 24-byte key and an add. */
struct call_val {
    u64 count;
    u64 first_ns;
    char comm[16];
};

struct cg_key {
    u64 cgroup_id;
    s32 err;
    u32 _pad;
};

struct dev_key {
    u64 cgroup_id;
    u32 dev;
    s32 err;
};

BPF_PERCPU_HASH(calls_a, struct call_key, struct call_val, FSND_KEYS);
BPF_PERCPU_HASH(calls_b, struct call_key, struct call_val, FSND_KEYS);
BPF_PERCPU_HASH(cgs_a, struct cg_key, struct call_val, FSND_CG_KEYS);
BPF_PERCPU_HASH(cgs_b, struct cg_key, struct call_val, FSND_CG_KEYS);
BPF_HASH(devs_a, struct dev_key, u64, 1024);
BPF_HASH(devs_b, struct dev_key, u64, 1024);
/* Each CPU remembers the last key it counted and how often since: a storm from one process is
 * an array lookup, a compare and an add; the hash is touched only when the key changes. The
 * cache is swapped with the maps, so the daemon drains it with them. */
struct cache_val {
    struct call_key key;
    struct call_val val;   /* val.count == 0: empty */
};
BPF_PERCPU_ARRAY(cache_a, struct cache_val, 1);
BPF_PERCPU_ARRAY(cache_b, struct cache_val, 1);
BPF_ARRAY_OF_MAPS(cache_now, "cache_a", 1);
BPF_ARRAY_OF_MAPS(calls_now, "calls_a", 1);
BPF_ARRAY_OF_MAPS(cgs_now, "cgs_a", 1);
BPF_ARRAY_OF_MAPS(devs_now, "devs_a", 1);
/* [0] ENOSPC, [1] EDQUOT: failures neither map could take; [2] device counts dropped */
BPF_PERCPU_ARRAY(overflow, u64, 3);

static __always_inline void bump(struct call_val *v, u64 n) {
    v->count += n;
}

static __always_inline void count_fallback(u64 cgroup_id, s32 err, struct call_val *c) {
    int zero = 0;
    void *cgs = cgs_now.lookup(&zero);
    if (cgs) {
        struct cg_key k = {.cgroup_id = cgroup_id, .err = err};
        struct call_val *v = bpf_map_lookup_elem(cgs, &k);
        if (v) {
            bump(v, c->count);
            return;
        }
        if (bpf_map_update_elem(cgs, &k, c, BPF_NOEXIST) == 0)
            return;
        v = bpf_map_lookup_elem(cgs, &k);   /* another CPU inserted it first */
        if (v) {
            bump(v, c->count);
            return;
        }
    }
    int slot = err == ENOSPC_ ? 0 : 1;
    u64 *n = overflow.lookup(&slot);
    if (n)
        *n += c->count;
}

/* Move a cache entry's count into the hash (or the fallbacks when it is full). */
static __always_inline void flush(struct cache_val *c) {
    int zero = 0;
    void *calls = calls_now.lookup(&zero);
    if (!calls)
        return;
    struct call_val *v = bpf_map_lookup_elem(calls, &c->key);
    if (v) {
        bump(v, c->val.count);
        return;
    }
    if (bpf_map_update_elem(calls, &c->key, &c->val, BPF_NOEXIST) == 0)
        return;
    v = bpf_map_lookup_elem(calls, &c->key);
    if (v) {
        bump(v, c->val.count);
        return;
    }
    count_fallback(c->key.cgroup_id, c->key.err, &c->val);
}

/* A raw tracepoint: the arguments are the kernel's own (pt_regs, ret), not a copy into a perf
 * buffer as with TRACEPOINT_PROBE, which measured ~30 ns cheaper on every syscall of the host.
 * The syscall number is read from pt_regs only on the failing path. */
RAW_TRACEPOINT_PROBE(sys_exit) {
    long ret = (long)ctx->args[1];
    if (ret != -ENOSPC_ && ret != -EDQUOT_)
        return 0;
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long nr = -1;
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
    u64 cgroup_id = bpf_get_current_cgroup_id();
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    int zero = 0;
    void *cache = cache_now.lookup(&zero);
    if (!cache)
        return 0;
    struct cache_val *c = bpf_map_lookup_elem(cache, &zero);
    if (!c)
        return 0;
    if (c->val.count && c->key.cgroup_id == cgroup_id && c->key.pid == pid &&
        c->key.syscall == (u32)nr && c->key.err == (s32)-ret) {
        c->val.count += 1;
        return 0;
    }
    if (c->val.count)
        flush(c);
    c->key.cgroup_id = cgroup_id;
    c->key.pid = pid;
    c->key.syscall = nr;
    c->key.err = -ret;
    c->key._pad = 0;
    c->val.count = 1;
    c->val.first_ns = bpf_ktime_get_ns();
    bpf_get_current_comm(c->val.comm, sizeof(c->val.comm));
    return 0;
}

static __always_inline void count_dev(u32 dev, int ret) {
    if (ret != -ENOSPC_ && ret != -EDQUOT_)
        return;
    int zero = 0;
    void *devs = devs_now.lookup(&zero);
    if (!devs)
        return;
    struct dev_key k = {.cgroup_id = bpf_get_current_cgroup_id(), .dev = dev, .err = -ret};
    u64 *n = bpf_map_lookup_elem(devs, &k);
    if (n) {
        __sync_fetch_and_add(n, 1);
        return;
    }
    u64 one = 1;
    if (bpf_map_update_elem(devs, &k, &one, BPF_NOEXIST) == 0)
        return;
    n = bpf_map_lookup_elem(devs, &k);
    if (n) {
        __sync_fetch_and_add(n, 1);
        return;
    }
    int slot = 2;
    u64 *o = overflow.lookup(&slot);
    if (o)
        *o += 1;
}

#ifdef FSND_EXT4_DEVICES
/* Raw tracepoints here too: ext4_ext_map_blocks_exit fires on every extent lookup (a failing
 * buffered write makes one), and the perf-buffer copy of a plain tracepoint costs that lookup
 * more than the program. The device is read from inode->i_sb->s_dev only for a failure; those
 * two fields lead their structs and have not moved between the headers and the kernel (the
 * live test checks the device against the loop device). */
static __always_inline void count_raw(struct bpf_raw_tracepoint_args *ctx) {
    int ret = (int)ctx->args[3];
    if (ret != -ENOSPC_ && ret != -EDQUOT_)
        return;
    struct inode *inode = (struct inode *)ctx->args[0];
    struct super_block *sb = NULL;
    dev_t dev = 0;
    bpf_probe_read_kernel(&sb, sizeof(sb), &inode->i_sb);
    if (sb)
        bpf_probe_read_kernel(&dev, sizeof(dev), &sb->s_dev);
    count_dev(dev, ret);
}

RAW_TRACEPOINT_PROBE(ext4_ext_map_blocks_exit) {
    count_raw(ctx);
    return 0;
}

RAW_TRACEPOINT_PROBE(ext4_ind_map_blocks_exit) {
    count_raw(ctx);
    return 0;
}
#endif /* FSND_EXT4_DEVICES */
