/* Every ext4 error, as it happens: ext4:ext4_error fires in __ext4_error, __ext4_error_inode
 * and __ext4_error_file before ext4's printk rate limit applies, so unlike kmsg it sees them all.
 * One ring buffer record per error; a full ring buffer is counted (lost[0]), never silent.
 */
struct error_event {
    u64 ts_ns;          /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
    u64 cgroup_id;
    u32 dev;            /* kernel dev_t */
    u32 line;
    u32 pid;            /* thread group id */
    u32 _pad;
    char comm[16];
    char function[64];
};

BPF_RINGBUF_OUTPUT(errors, 64);   /* pages: 256 KiB */
BPF_PERCPU_ARRAY(lost, u64, 1);

TRACEPOINT_PROBE(ext4, ext4_error) {
    struct error_event *e = errors.ringbuf_reserve(sizeof(*e));
    if (!e) {
        int zero = 0;
        u64 *n = lost.lookup(&zero);
        if (n)
            *n += 1;   /* per-CPU slot: no atomic needed */
        return 0;
    }
    e->ts_ns = bpf_ktime_get_ns();
    e->cgroup_id = bpf_get_current_cgroup_id();
    e->dev = args->dev;
    e->line = args->line;
    e->pid = bpf_get_current_pid_tgid() >> 32;
    e->_pad = 0;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    bpf_probe_read_kernel_str(e->function, sizeof(e->function), args->function);
    errors.ringbuf_submit(e, 0);
    return 0;
}
