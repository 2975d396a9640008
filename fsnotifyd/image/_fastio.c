/* The exporter's common requests in C: a read or a write that falls inside clusters the top
 * delta already maps.
 *
 * Why: the exporter is one thread, and in Python each request costs more than the copy it
 * does (the GIL, a ctypes callback, the stack walk). With the FUSE loop and these two
 * functions in C, a mapped read or write never takes the GIL, and the control threads run
 * beside it.
 *
 * What it may do is narrow on purpose. Python (fsnotifyd/image/fastio.py) owns every
 * decision: it loads a copy of the top delta's mapping here (virtual cluster -> physical
 * cluster, 0 = not here) and updates it, under the same mutex, whenever a mapping changes
 * (allocation, discard, compaction, snapshot, close). Anything else goes to the Python
 * callbacks mfusepy made: a request over a cluster the top does not have (allocation, the
 * deltas below, zeros), a write of all zeros (zero detection), a write to a read-only image,
 * a failed system call (Python does the whole request again and reports the error). A write here is acknowledged as Python's is: in
 * the host page cache or written O_DIRECT, durable at the next flush, which Python does.
 *
 * The mutex is the exporter's lock: Python takes it (fastio.Lock) around everything it does
 * to the stack, so a snapshot or a compaction never lands in the middle of a request here.
 * One exporter per process, so the state is one static struct.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <linux/aio_abi.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

typedef int (*read_fn)(const char *, char *, size_t, off_t, void *);
typedef int (*write_fn)(const char *, const char *, size_t, off_t, void *);

/* As delta.py: direct I/O for aligned requests of at least DIRECT_MIN (smaller ones are
 * absorbed by the host page cache until the next flush). */
#define DIRECT_ALIGN 4096u
#define DIRECT_MIN (64u << 10)

/* Large direct writes in flight (write-behind: the exporter takes the next request while the
 * disk writes the last, as writebehind.py), and read-ahead windows of a cluster each (the
 * next RA_DEPTH clusters of a sequential reader are read while it takes this one: the disk
 * gets several reads at once, as a reader with a queue depth would give it). */
#define WB_SLOTS 4
#define RA_DEPTH 4
#define RA_SLOTS (RA_DEPTH + 1)
#define NSLOTS (WB_SLOTS + RA_SLOTS)

struct fio_stats {  /* read by Python through ctypes (fastio.Stats): keep the layouts equal */
    uint64_t reads, writes, read_bytes, written_bytes;
    uint64_t fallbacks;      /* requests handed to Python */
    uint64_t busy_since_ns;  /* CLOCK_MONOTONIC start of the request in progress, 0: idle */
    uint64_t write_waits;    /* large writes that found every write-behind slot busy */
    uint64_t ahead_hits;     /* reads served from a read-ahead window */
};

enum slot_state {
    FREE,
    WRITING,   /* a write-behind write in flight */
    READING,   /* a read-ahead read in flight */
    DROPPED,   /* a read-ahead read in flight whose data is no longer wanted */
    HELD,      /* a read-ahead window, read and current */
};

struct slot {
    char *buf;            /* a cluster, page-aligned */
    enum slot_state state;
    uint64_t pos, len;    /* the file range */
    struct iocb cb;
};

static struct {
    pthread_mutex_t lock;
    int on;           /* 0: every request goes to Python */
    int readonly;     /* writes go to Python (which answers EROFS) */
    int fd, dfd;      /* the top delta, buffered and O_DIRECT (-1: none) */
    int direct_ok;    /* a direct write went through: later ones may go behind */
    uint64_t cluster, entries, size;
    uint32_t *map;    /* entries: physical cluster in the top delta, 0: ask Python */
    char *stage;      /* a page-aligned cluster for synchronous direct I/O */
    aio_context_t ctx;  /* 0: no AIO (no write-behind, no read-ahead) */
    struct slot slots[NSLOTS];  /* write-behind first, then the read-ahead windows */
    int inflight;     /* submitted, not reaped */
    int werr;         /* errno of the first failed write-behind write, until Python takes it */
    uint64_t last_read_end;  /* virtual offset where the last read ended */
    read_fn py_read;
    write_fn py_write;
    struct fio_stats st;
} S = {.lock = PTHREAD_MUTEX_INITIALIZER, .fd = -1, .dfd = -1};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* -- asynchronous I/O (Linux AIO: O_DIRECT reads and writes really are asynchronous) ------- */

static int in_flight(const struct slot *s) {
    return s->state == WRITING || s->state == READING || s->state == DROPPED;
}

static int overlaps(const struct slot *s, uint64_t pos, uint64_t len) {
    return s->pos < pos + len && pos < s->pos + s->len;
}

static void complete(const struct io_event *ev) {
    struct slot *s = &S.slots[ev->data];
    S.inflight--;
    if (s->state == WRITING) {
        if (ev->res != (int64_t)s->len && S.werr == 0)
            S.werr = ev->res < 0 ? (int)-ev->res : EIO;
        s->state = FREE;
    } else if (s->state == READING) {
        /* A short read (the end of the file) or a failed one leaves no window: the request
         * reads for itself then, and sees the error itself. */
        s->state = ev->res == (int64_t)s->len ? HELD : FREE;
    } else {
        s->state = FREE;
    }
}

/* Reap at least one completion (waiting for it). */
static void reap(void) {
    struct io_event ev[NSLOTS];
    long n;
    do
        n = syscall(SYS_io_getevents, S.ctx, 1L, (long)NSLOTS, ev, NULL);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        /* Cannot happen with a valid context; if it does, nothing in flight can be trusted
         * any more: the writes count as failed and AIO is off. */
        for (int i = 0; i < NSLOTS; i++) {
            if (S.slots[i].state == WRITING && S.werr == 0)
                S.werr = EIO;
            S.slots[i].state = FREE;
        }
        S.inflight = 0;
        syscall(SYS_io_destroy, S.ctx);
        S.ctx = 0;
        return;
    }
    for (long i = 0; i < n; i++)
        complete(&ev[i]);
}

static void wait_for(const struct slot *s) {
    while (S.ctx && in_flight(s))
        reap();
}

static void drain(void) {
    while (S.ctx && S.inflight > 0)
        reap();
}

static void drop_windows(void) {
    for (int i = WB_SLOTS; i < NSLOTS; i++) {
        struct slot *s = &S.slots[i];
        if (s->state == READING)
            s->state = DROPPED;
        else if (s->state == HELD)
            s->state = FREE;
    }
}

static int submit(struct slot *s, int write, uint64_t pos, uint64_t len) {
    struct iocb *cbp = &s->cb;
    memset(cbp, 0, sizeof *cbp);
    cbp->aio_data = (uint64_t)(s - S.slots);
    cbp->aio_lio_opcode = write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
    cbp->aio_fildes = (uint32_t)S.dfd;
    cbp->aio_buf = (uint64_t)(uintptr_t)s->buf;
    cbp->aio_nbytes = len;
    cbp->aio_offset = (int64_t)pos;
    long r;
    do
        r = syscall(SYS_io_submit, S.ctx, 1L, &cbp);
    while (r < 0 && errno == EINTR);
    if (r != 1)
        return -1;
    s->state = write ? WRITING : READING;
    s->pos = pos;
    s->len = len;
    S.inflight++;
    return 0;
}

/* Before a write to [pos, pos + len): writes in flight over it finish first (two writes to
 * one place land in order), and read-ahead windows over it go. */
static void before_write(uint64_t pos, uint64_t len) {
    for (int i = 0; i < NSLOTS; i++) {
        struct slot *s = &S.slots[i];
        if (s->state == FREE || !overlaps(s, pos, len))
            continue;
        if (s->state == WRITING)
            wait_for(s);
        else if (s->state == READING)
            s->state = DROPPED;
        else if (s->state == HELD)
            s->state = FREE;
    }
}

/* Before a read of [pos, pos + len): writes in flight over it finish first. */
static void before_read(uint64_t pos, uint64_t len) {
    for (int i = 0; i < WB_SLOTS; i++)
        if (S.slots[i].state == WRITING && overlaps(&S.slots[i], pos, len))
            wait_for(&S.slots[i]);
}

/* -- called from Python (which holds the lock, except for lock/unlock themselves) -- */

/* Python's turn: nothing of ours in flight, no window that a change by Python would leave stale. */
int fio_lock(void) {
    int r = pthread_mutex_lock(&S.lock);
    if (r == 0) {
        drain();
        drop_windows();
    }
    return r;
}

int fio_unlock(void) { return pthread_mutex_unlock(&S.lock); }

/* The errno of the first write-behind write that failed since the last call, 0: none. */
int fio_take_error(void) {
    int e = S.werr;
    S.werr = 0;
    return e;
}

void fio_set_fallbacks(read_fn r, write_fn w) {
    S.py_read = r;
    S.py_write = w;
}

void fio_off(void) {
    drain();
    drop_windows();
    S.on = 0;
    free(S.map);
    S.map = NULL;
    S.entries = 0;
    S.fd = S.dfd = -1;
    S.direct_ok = 0;
    S.last_read_end = UINT64_MAX;
}

/* Serve the top delta (fd, dfd or -1, cluster bytes, BAT entries, disk size): the mapping
 * starts empty (every request to Python) until fio_set/fio_load fill it. 0 or -errno. */
int fio_configure(int fd, int dfd, uint64_t cluster, uint64_t entries, uint64_t size) {
    fio_off();
    if (cluster == 0 || cluster % DIRECT_ALIGN || entries == 0)
        return -EINVAL;
    if (S.stage == NULL || S.cluster != cluster) {
        for (int i = 0; i < NSLOTS; i++) {
            free(S.slots[i].buf);
            S.slots[i].buf = NULL;
        }
        free(S.stage);
        S.stage = NULL;
        if (posix_memalign((void **)&S.stage, DIRECT_ALIGN, cluster) != 0)
            return -ENOMEM;
        for (int i = 0; i < NSLOTS; i++)
            if (posix_memalign((void **)&S.slots[i].buf, DIRECT_ALIGN, cluster) != 0)
                return -ENOMEM;
        S.cluster = cluster;
    }
    if (S.ctx == 0 && syscall(SYS_io_setup, (long)NSLOTS, &S.ctx) != 0)
        S.ctx = 0;  /* no AIO: every request is synchronous */
    S.map = calloc(entries, sizeof(uint32_t));
    if (S.map == NULL)
        return -ENOMEM;
    S.fd = fd;
    S.dfd = dfd;
    S.entries = entries;
    S.size = size;
    S.on = 1;
    return 0;
}

void fio_set(uint64_t vc, uint32_t phys) {
    if (S.map != NULL && vc < S.entries)
        S.map[vc] = phys;
}

void fio_load(const uint32_t *bat, uint64_t n) {
    if (S.map != NULL)
        memcpy(S.map, bat, (n < S.entries ? n : S.entries) * sizeof(uint32_t));
}

uint32_t fio_get(uint64_t vc) { return S.map != NULL && vc < S.entries ? S.map[vc] : 0; }

void fio_set_readonly(int ro) { S.readonly = ro; }

struct fio_stats *fio_stats(void) { return &S.st; }

/* -- the FUSE callbacks ---------------------------------------------------------------- */

/* Whether every cluster of [off, off + size) is mapped in the top. */
static int mapped(size_t size, off_t off) {
    if (!S.on || off < 0 || size == 0 || (uint64_t)off + size > S.size)
        return 0;
    for (uint64_t vc = (uint64_t)off / S.cluster; vc * S.cluster < (uint64_t)off + size; vc++)
        if (vc >= S.entries || S.map[vc] == 0)
            return 0;
    return 1;
}

static int direct(uint64_t pos, uint64_t len) {
    return S.dfd >= 0 && len >= DIRECT_MIN && ((pos | len) & (DIRECT_ALIGN - 1)) == 0;
}

static struct slot *free_slot(int from, int to) {
    for (int i = from; i < to; i++)
        if (S.slots[i].state == FREE)
            return &S.slots[i];
    return NULL;
}

static struct slot *window_over(uint64_t pos, uint64_t len) {
    for (int i = WB_SLOTS; i < NSLOTS; i++) {
        struct slot *s = &S.slots[i];
        if ((s->state == READING || s->state == HELD) && s->pos <= pos && pos + len <= s->pos + s->len)
            return s;
    }
    return NULL;
}

/* Whether the file range [pos, pos + len) is being written. */
static int writing(uint64_t pos, uint64_t len) {
    for (int i = 0; i < WB_SLOTS; i++)
        if (S.slots[i].state == WRITING && overlaps(&S.slots[i], pos, len))
            return 1;
    return 0;
}

/* Whether a read-ahead window holds (or is reading) one of the clusters from vc on. */
static int wanted(const struct slot *s, uint64_t vc) {
    for (uint64_t k = 0; k <= RA_DEPTH && vc + k < S.entries; k++)
        if (S.map[vc + k] && s->pos == (uint64_t)S.map[vc + k] * S.cluster)
            return 1;
    return 0;
}

/* A sequential reader is in virtual cluster vc: read the next RA_DEPTH clusters ahead, those
 * the top has. */
static void read_ahead(uint64_t vc) {
    if (!S.ctx || S.dfd < 0)
        return;
    for (int i = WB_SLOTS; i < NSLOTS; i++)  /* windows behind the reader are done with */
        if (S.slots[i].state == HELD && !wanted(&S.slots[i], vc))
            S.slots[i].state = FREE;
    for (uint64_t k = 1; k <= RA_DEPTH && vc + k < S.entries; k++) {
        if (S.map[vc + k] == 0)
            return;  /* not here: Python reads it (and the run is broken) */
        uint64_t pos = (uint64_t)S.map[vc + k] * S.cluster;
        if (window_over(pos, S.cluster) != NULL)
            continue;
        if (writing(pos, S.cluster))  /* a read beside a write to the same place may see either */
            return;
        struct slot *s = free_slot(WB_SLOTS, NSLOTS);
        if (s == NULL || submit(s, 0, pos, S.cluster) != 0)
            return;
    }
}

/* One piece of a read, inside virtual cluster vc: 0 or -1 (the request goes to Python). */
static int read_piece(char *buf, uint64_t len, uint64_t vc, uint64_t in) {
    uint64_t pos = (uint64_t)S.map[vc] * S.cluster + in;
    before_read(pos, len);
    struct slot *w = window_over(pos, len);
    if (w != NULL) {
        wait_for(w);
        if (w->state == HELD) {
            memcpy(buf, w->buf + (pos - w->pos), len);
            S.st.ahead_hits++;
            return 0;
        }
    }
    ssize_t n;
    if (direct(pos, len)) {
        n = pread(S.dfd, S.stage, len, (off_t)pos);
        if (n > 0)
            memcpy(buf, S.stage, (size_t)n);
    } else {
        n = pread(S.fd, buf, len, (off_t)pos);
    }
    if (n < 0)
        return -1;
    if ((uint64_t)n < len)  /* past the end of the file: zeros */
        memset(buf + n, 0, len - (uint64_t)n);
    return 0;
}

/* One piece of a write, inside virtual cluster vc: 0 or -1 (the request goes to Python). */
static int write_piece(char *buf, uint64_t len, uint64_t vc, uint64_t in) {
    uint64_t pos = (uint64_t)S.map[vc] * S.cluster + in;
    before_write(pos, len);
    if (!direct(pos, len))
        return pwrite(S.fd, buf, len, (off_t)pos) == (ssize_t)len ? 0 : -1;
    if (S.ctx && S.direct_ok) {
        struct slot *s = free_slot(0, WB_SLOTS);
        if (s == NULL) {
            S.st.write_waits++;
            while (S.ctx && (s = free_slot(0, WB_SLOTS)) == NULL)
                reap();
        }
        if (s != NULL) {
            memcpy(s->buf, buf, len);
            if (submit(s, 1, pos, len) == 0)
                return 0;
        }
    }
    memcpy(S.stage, buf, len);
    ssize_t n = pwrite(S.dfd, S.stage, len, (off_t)pos);
    if (n < 0 && errno == EINVAL) {
        S.dfd = -1;  /* the host fs wants a larger alignment: buffered from now on */
        n = pwrite(S.fd, buf, len, (off_t)pos);
    } else if (n == (ssize_t)len) {
        S.direct_ok = 1;
    }
    return n == (ssize_t)len ? 0 : -1;
}

/* Do [off, off + size) one piece per cluster; 1 when every piece was done. */
static int by_cluster(char *buf, size_t size, off_t off, int (*piece)(char *, uint64_t, uint64_t, uint64_t)) {
    for (uint64_t done = 0; done < size;) {
        uint64_t at = (uint64_t)off + done, vc = at / S.cluster, in = at % S.cluster;
        uint64_t len = S.cluster - in < size - done ? S.cluster - in : size - done;
        if (piece(buf + done, len, vc, in) != 0)
            return 0;
        done += len;
    }
    return 1;
}

int fio_read(const char *path, char *buf, size_t size, off_t off, void *fi) {
    pthread_mutex_lock(&S.lock);
    if (mapped(size, off)) {
        S.st.busy_since_ns = now_ns();
        int sequential = (uint64_t)off == S.last_read_end;
        int ok = by_cluster(buf, size, off, read_piece);
        S.st.busy_since_ns = 0;
        if (ok) {
            S.last_read_end = (uint64_t)off + size;
            if (sequential && direct(0, size))
                read_ahead(((uint64_t)off + size - 1) / S.cluster);
            S.st.reads++;
            S.st.read_bytes += size;
            pthread_mutex_unlock(&S.lock);
            return (int)size;
        }
    }
    S.st.fallbacks++;
    S.last_read_end = UINT64_MAX;
    pthread_mutex_unlock(&S.lock);
    return S.py_read(path, buf, size, off, fi);
}

/* All zeros: Python makes it a discard (zero detection: the cluster may be freed). Data that
 * is not fails on its first bytes. */
static int zeros(const char *buf, size_t size) {
    return size > 0 && buf[0] == 0 && memcmp(buf, buf + 1, size - 1) == 0;
}

int fio_write(const char *path, const char *buf, size_t size, off_t off, void *fi) {
    pthread_mutex_lock(&S.lock);
    if (!S.readonly && mapped(size, off) && !zeros(buf, size)) {
        S.st.busy_since_ns = now_ns();
        /* libfuse's buffer: written from, never to (the pieces take a char * to share by_cluster) */
        int ok = by_cluster((char *)buf, size, off, write_piece);
        S.st.busy_since_ns = 0;
        if (ok) {
            S.st.writes++;
            S.st.written_bytes += size;
            pthread_mutex_unlock(&S.lock);
            return (int)size;
        }
    }
    /* Python does the whole request again: a piece already written is written again, the
     * same bytes to the same place. */
    S.st.fallbacks++;
    pthread_mutex_unlock(&S.lock);
    return S.py_write(path, buf, size, off, fi);
}

/* An importable module, so setup.py builds it like the others; Python reaches the functions
 * above through ctypes on this file (fastio.py). The ABI is that interface (the functions'
 * signatures, struct fio_stats): fsnotifyd.native refuses a module whose ABI is not
 * fastio.ABI. Raise both together when it changes. */
#define FSNOTIFYD_ABI 1

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_fastio", .m_doc = "The exporter's C data path.", .m_size = -1};

PyMODINIT_FUNC PyInit__fastio(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "ABI", FSNOTIFYD_ABI) < 0 ||
                      PyModule_AddIntConstant(m, "DIRECT_ALIGN", DIRECT_ALIGN) < 0 ||
                      PyModule_AddIntConstant(m, "DIRECT_MIN", DIRECT_MIN) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
