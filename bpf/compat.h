/* Prepended to every program in bpf/ by fsnotifyd's loader (fsnotifyd/sources/bpfload.py).
 *
 * bcc builds each tracepoint's argument struct from the running kernel's tracefs format file,
 * but compiles it against the headers at /lib/modules/$(uname -r)/build. When those headers
 * are older than the kernel (this project's machines run 6.18 with Debian's 6.1 headers), the
 * ext4 types named in the format files are unknown to them. Repeating a typedef with the same
 * type is legal C11, so these are harmless where the headers do define them.
 */
typedef u32 ext4_lblk_t;
typedef u64 ext4_fsblk_t;
typedef unsigned int tid_t;
typedef u32 blk_opf_t;

/* Tracepoints carry the kernel's internal dev_t (major << 20 | minor). */
#define FSND_MINORBITS 20
