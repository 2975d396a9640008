/* ENOSPC and EDQUOT, counted in the kernel.
 *
 * raw_syscalls:sys_exit sees every syscall's return on the host; the first instructions drop
 * everything that is not -ENOSPC or -EDQUOT, so the cost elsewhere is the tracepoint call
 * itself. Failures are counted per (cgroup, process, syscall, errno) in a hash; the ext4
 * block-mapping tracepoints add, per (cgroup, device, errno), the failures that reached ext4's
 * allocator, which is how an event learns its device.
 *
 * Exact counts without losing increments: the programs reach their counting maps through a
 * one-slot array of maps. To drain, the daemon points the slot at the spare map; that update
 * returns only after an RCU grace period (kernel/bpf/syscall.c maybe_wait_bpf_programs), so
 * no program still holds the old map when the daemon reads and clears it.
 *
 * A full map is not a lost count: the failure goes to a per-(cgroup, errno) fallback map, and
 * only when that is full too to an unattributed per-errno counter the daemon reports as lost
 * attribution (overflow[]).
 */
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
    char comm[16];
};

struct call_val {
    u64 count;
    u64 first_ns;
    u64 last_ns;
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

BPF_HASH(calls_a, struct call_key, struct call_val, FSND_KEYS);
BPF_HASH(calls_b, struct call_key, struct call_val, FSND_KEYS);
BPF_HASH(cgs_a, struct cg_key, struct call_val, FSND_CG_KEYS);
BPF_HASH(cgs_b, struct cg_key, struct call_val, FSND_CG_KEYS);
BPF_HASH(devs_a, struct dev_key, u64, 1024);
BPF_HASH(devs_b, struct dev_key, u64, 1024);
BPF_ARRAY_OF_MAPS(calls_now, "calls_a", 1);
BPF_ARRAY_OF_MAPS(cgs_now, "cgs_a", 1);
BPF_ARRAY_OF_MAPS(devs_now, "devs_a", 1);
/* [0] ENOSPC, [1] EDQUOT: failures neither map could take; [2] device counts dropped */
BPF_PERCPU_ARRAY(overflow, u64, 3);

static __always_inline void bump(struct call_val *v, u64 now) {
    __sync_fetch_and_add(&v->count, 1);
    v->last_ns = now;
}

static __always_inline void count_fallback(u64 cgroup_id, s32 err, u64 now) {
    int zero = 0;
    void *cgs = cgs_now.lookup(&zero);
    if (cgs) {
        struct cg_key k = {.cgroup_id = cgroup_id, .err = err};
        struct call_val *v = bpf_map_lookup_elem(cgs, &k);
        if (v) {
            bump(v, now);
            return;
        }
        struct call_val init = {.count = 1, .first_ns = now, .last_ns = now};
        if (bpf_map_update_elem(cgs, &k, &init, BPF_NOEXIST) == 0)
            return;
        v = bpf_map_lookup_elem(cgs, &k);   /* another CPU inserted it first */
        if (v) {
            bump(v, now);
            return;
        }
    }
    int slot = err == ENOSPC_ ? 0 : 1;
    u64 *n = overflow.lookup(&slot);
    if (n)
        *n += 1;
}

TRACEPOINT_PROBE(raw_syscalls, sys_exit) {
    long ret = args->ret;
    if (ret != -ENOSPC_ && ret != -EDQUOT_)
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct call_key k = {};
    k.cgroup_id = bpf_get_current_cgroup_id();
    k.pid = bpf_get_current_pid_tgid() >> 32;
    k.syscall = args->id;
    k.err = -ret;
    bpf_get_current_comm(k.comm, sizeof(k.comm));
    int zero = 0;
    void *calls = calls_now.lookup(&zero);
    if (!calls)
        return 0;
    struct call_val *v = bpf_map_lookup_elem(calls, &k);
    if (v) {
        bump(v, now);
        return 0;
    }
    struct call_val init = {.count = 1, .first_ns = now, .last_ns = now};
    if (bpf_map_update_elem(calls, &k, &init, BPF_NOEXIST) == 0)
        return 0;
    v = bpf_map_lookup_elem(calls, &k);
    if (v) {
        bump(v, now);
        return 0;
    }
    count_fallback(k.cgroup_id, k.err, now);
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

TRACEPOINT_PROBE(ext4, ext4_ext_map_blocks_exit) {
    count_dev(args->dev, args->ret);
    return 0;
}

TRACEPOINT_PROBE(ext4, ext4_ind_map_blocks_exit) {
    count_dev(args->dev, args->ret);
    return 0;
}
