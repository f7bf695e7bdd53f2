/*
 * vmtest: the guest-side block I/O checker of the vhostmem QEMU harness.
 *
 * Runs inside the test VM against a virtio-blk disk and prints one machine-readable line per
 * check:  VHOSTMEM-TEST r<round>.<name> PASS|FAIL <detail>
 * Exit status is 0 when every check passed, 1 otherwise, 2 on a usage error.
 *
 * The data pattern is the MT19937 stream seeded like CPython's random.Random(seed) with a
 * non-negative seed below 2**32, consumed as little-endian 32-bit words: exactly what
 * random.Random(seed).randbytes(n) returns, so the host can rebuild the expected image.
 *
 * Built with `gcc -static -O2` by qemu/assets.py; it needs nothing but the kernel.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- MT19937 (the published algorithm: Matsumoto & Nishimura 1998) ---- */
enum { MT_N = 624, MT_M = 397 };
#define MT_MATRIX_A 0x9908b0dfU
#define MT_UPPER_MASK 0x80000000U
#define MT_LOWER_MASK 0x7fffffffU
#define MT_INIT_MULT 1812433253U
#define MT_ARRAY_SEED 19650218U
#define MT_ARRAY_MULT1 1664525U
#define MT_ARRAY_MULT2 1566083941U

struct mt {
    uint32_t s[MT_N];
    int i;
};

static void mt_init_scalar(struct mt *m, uint32_t seed)
{
    m->s[0] = seed;
    for (int k = 1; k < MT_N; k++)
        m->s[k] = MT_INIT_MULT * (m->s[k - 1] ^ (m->s[k - 1] >> 30)) + (uint32_t)k;
    m->i = MT_N;
}

/* CPython seeds an int through the array initialiser with its 32-bit digits as the key. */
static void mt_seed(struct mt *m, uint32_t key)
{
    int i = 1;
    mt_init_scalar(m, MT_ARRAY_SEED);
    for (int k = MT_N; k > 0; k--) {
        m->s[i] = (m->s[i] ^ ((m->s[i - 1] ^ (m->s[i - 1] >> 30)) * MT_ARRAY_MULT1)) + key;
        i++;
        if (i >= MT_N) { m->s[0] = m->s[MT_N - 1]; i = 1; }
    }
    for (int k = MT_N - 1; k > 0; k--) {
        m->s[i] = (m->s[i] ^ ((m->s[i - 1] ^ (m->s[i - 1] >> 30)) * MT_ARRAY_MULT2)) - (uint32_t)i;
        i++;
        if (i >= MT_N) { m->s[0] = m->s[MT_N - 1]; i = 1; }
    }
    m->s[0] = MT_UPPER_MASK; /* guarantees a non-zero state */
}

static void mt_twist(struct mt *m)
{
    for (int k = 0; k < MT_N; k++) {
        uint32_t y = (m->s[k] & MT_UPPER_MASK) | (m->s[(k + 1) % MT_N] & MT_LOWER_MASK);
        m->s[k] = m->s[(k + MT_M) % MT_N] ^ (y >> 1) ^ ((y & 1U) ? MT_MATRIX_A : 0U);
    }
    m->i = 0;
}

static uint32_t mt_next(struct mt *m)
{
    if (m->i >= MT_N)
        mt_twist(m);
    uint32_t y = m->s[m->i++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680U;
    y ^= (y << 15) & 0xefc60000U;
    y ^= y >> 18;
    return y;
}

/* Fills len bytes (a multiple of 4) with the stream, little-endian words. */
static void mt_fill(struct mt *m, unsigned char *buf, size_t len)
{
    for (size_t off = 0; off < len; off += 4) {
        uint32_t w = mt_next(m);
        buf[off] = (unsigned char)w;
        buf[off + 1] = (unsigned char)(w >> 8);
        buf[off + 2] = (unsigned char)(w >> 16);
        buf[off + 3] = (unsigned char)(w >> 24);
    }
}

/* ---- harness plumbing ---- */
enum { CHUNK = 1 << 20, PAGE = 4096 };
#define HIGH_MEMORY_START (1ULL << 32) /* hot-plugged DIMMs live above 4 GiB on q35 */
#define PAGEMAP_PRESENT (1ULL << 63)
#define PAGEMAP_PFN_MASK ((1ULL << 55) - 1)

struct opts {
    const char *dev;
    uint64_t size, discard_off, discard_len, zero_off, zero_len;
    unsigned lbs, seed, round;
    int readonly, discard_zeroes, high_buffer;
    unsigned bench_seconds, bench_jobs, writer_jobs, queue_io_ops, direct_writes, job;
    unsigned migrate_jobs;
    uint64_t first_block;
    const char *queue_io_cpus;
};

static int failures;
static unsigned current_round;

static void report(const char *name, int ok, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void report(const char *name, int ok, const char *fmt, ...)
{
    char detail[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    printf("VHOSTMEM-TEST r%u.%s %s %s\n", current_round, name, ok ? "PASS" : "FAIL", detail);
    fflush(stdout);
    if (!ok)
        failures++;
}

/* A fresh page-aligned buffer, faulted in now so its pages exist for the pagemap check. */
static unsigned char *alloc_buffer(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                   -1, 0);
    if (p == MAP_FAILED) {
        perror("vmtest: mmap");
        exit(1);
    }
    return p;
}

static int full_pread(int fd, unsigned char *buf, size_t len, uint64_t off)
{
    ssize_t n = pread(fd, buf, len, (off_t)off);
    return n == (ssize_t)len ? 0 : -1;
}

static int full_pwrite(int fd, const unsigned char *buf, size_t len, uint64_t off)
{
    ssize_t n = pwrite(fd, buf, len, (off_t)off);
    return n == (ssize_t)len ? 0 : -1;
}

static int is_zero(const unsigned char *buf, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (buf[i])
            return 0;
    return 1;
}

static void check_geometry(int fd, const struct opts *o)
{
    uint64_t bytes = 0;
    int lbs = 0;
    int ok = ioctl(fd, BLKGETSIZE64, &bytes) == 0 && ioctl(fd, BLKSSZGET, &lbs) == 0;
    report("ioctl-geometry", ok && bytes == o->size && (unsigned)lbs == o->lbs,
           "size=%llu lbs=%d expected size=%llu lbs=%u", (unsigned long long)bytes, lbs,
           (unsigned long long)o->size, o->lbs);
}

static void check_write_pattern(int fd, const struct opts *o, unsigned char *buf)
{
    struct mt m;
    mt_seed(&m, o->seed);
    for (uint64_t off = 0; off < o->size; off += CHUNK) {
        size_t len = o->size - off < CHUNK ? (size_t)(o->size - off) : CHUNK;
        mt_fill(&m, buf, len);
        if (full_pwrite(fd, buf, len, off)) {
            report("pattern-write", 0, "offset=%llu errno=%d", (unsigned long long)off, errno);
            return;
        }
    }
    report("pattern-write", 1, "bytes=%llu seed=%u", (unsigned long long)o->size, o->seed);
}

/* Compares the disk with the pattern except the ranges the host expects to be rewritten. */
static void check_read_pattern(int fd, const struct opts *o, unsigned char *buf,
                               unsigned char *want)
{
    struct mt m;
    mt_seed(&m, o->seed);
    for (uint64_t off = 0; off < o->size; off += CHUNK) {
        size_t len = o->size - off < CHUNK ? (size_t)(o->size - off) : CHUNK;
        mt_fill(&m, want, len);
        if (full_pread(fd, buf, len, off)) {
            report("pattern-read", 0, "offset=%llu errno=%d", (unsigned long long)off, errno);
            return;
        }
        if (memcmp(buf, want, len)) {
            size_t i = 0;
            while (buf[i] == want[i])
                i++;
            report("pattern-read", 0, "mismatch at byte %llu", (unsigned long long)(off + i));
            return;
        }
    }
    report("pattern-read", 1, "bytes=%llu seed=%u", (unsigned long long)o->size, o->seed);
}

static void check_flush(int fd, const char *name)
{
    int f = fsync(fd);
    int fe = errno;
    int b = ioctl(fd, BLKFLSBUF, 0);
    report(name, f == 0 && b == 0, "fsync=%d(errno %d) blkflsbuf=%d(errno %d)", f,
           f ? fe : 0, b, b ? errno : 0);
}

static void check_last_sector(int fd, const struct opts *o, unsigned char *buf,
                              unsigned char *want)
{
    struct mt m;
    uint64_t off = o->size - o->lbs;
    mt_seed(&m, o->seed + 1);
    mt_fill(&m, want, o->lbs);
    if (full_pwrite(fd, want, o->lbs, off) || fdatasync(fd) || full_pread(fd, buf, o->lbs, off)) {
        report("last-sector", 0, "offset=%llu errno=%d", (unsigned long long)off, errno);
        return;
    }
    report("last-sector", !memcmp(buf, want, o->lbs), "offset=%llu", (unsigned long long)off);
}

/* The kernel must end reads at the disk's end and refuse writes beyond it. */
static void check_past_end(int fd, const struct opts *o, unsigned char *buf)
{
    ssize_t at_end = pread(fd, buf, o->lbs, (off_t)o->size);
    ssize_t straddle = pread(fd, buf, 2 * (size_t)o->lbs, (off_t)(o->size - o->lbs));
    report("read-past-end", at_end == 0 && straddle == (ssize_t)o->lbs,
           "read@end=%zd straddling=%zd (want 0 and %u)", at_end, straddle, o->lbs);
    if (o->readonly)
        return;
    memset(buf, 0xa5, o->lbs);
    ssize_t w = pwrite(fd, buf, o->lbs, (off_t)o->size);
    int we = errno;
    report("write-past-end", w < 0 && we == ENOSPC, "write@end=%zd errno=%d (want ENOSPC)", w,
           w < 0 ? we : 0);
}

/* Reads [off, off+len) and requires zeroes; the bytes just outside must keep the pattern. */
static int range_is_zero(int fd, uint64_t off, uint64_t len, unsigned char *buf)
{
    for (uint64_t pos = off; pos < off + len; pos += CHUNK) {
        size_t n = off + len - pos < CHUNK ? (size_t)(off + len - pos) : CHUNK;
        if (full_pread(fd, buf, n, pos) || !is_zero(buf, n))
            return 0;
    }
    return 1;
}

static int neighbour_intact(int fd, const struct opts *o, uint64_t off, uint64_t len,
                            unsigned char *buf)
{
    /* The sector after the range must not be zero (the pattern is random enough). */
    if (off + len + o->lbs > o->size - o->lbs)
        return 1;
    return full_pread(fd, buf, o->lbs, off + len) == 0 && !is_zero(buf, o->lbs);
}

static void check_range_op(int fd, const struct opts *o, const char *name, unsigned long op,
                           uint64_t off, uint64_t len, int need_zero, unsigned char *buf)
{
    uint64_t range[2] = {off, len};
    if (!len)
        return;
    if (ioctl(fd, op, range)) {
        report(name, 0, "ioctl offset=%llu len=%llu errno=%d", (unsigned long long)off,
               (unsigned long long)len, errno);
        return;
    }
    int zero = range_is_zero(fd, off, len, buf);
    int intact = neighbour_intact(fd, o, off, len, buf);
    report(name, (zero || !need_zero) && intact, "offset=%llu len=%llu zeroes=%d neighbour=%d",
           (unsigned long long)off, (unsigned long long)len, zero, intact);
}

/* A read-only disk must refuse to be opened for writing, or refuse the write itself. */
static void check_readonly(const struct opts *o, int rofd, unsigned char *buf)
{
    int ro = 0;
    ioctl(rofd, BLKROGET, &ro);
    int fd = open(o->dev, O_RDWR | O_DIRECT);
    int open_errno = errno;
    ssize_t w = -1;
    int write_errno = 0;
    if (fd >= 0) {
        memset(buf, 0x5a, o->lbs);
        w = pwrite(fd, buf, o->lbs, 0);
        write_errno = errno;
        fsync(fd);
        close(fd);
    }
    report("readonly-reject", ro == 1 && w < 0,
           "blkroget=%d open=%s(errno %d) write=%zd(errno %d)", ro, fd < 0 ? "refused" : "ok",
           fd < 0 ? open_errno : 0, w, w < 0 ? write_errno : 0);
}

/* Counts the buffer's pages backed by memory above 4 GiB, i.e. by a hot-plugged DIMM. */
static void check_high_buffer(const unsigned char *buf, size_t len)
{
    int fd = open("/proc/self/pagemap", O_RDONLY);
    size_t high = 0, present = 0;
    for (size_t off = 0; fd >= 0 && off < len; off += PAGE) {
        uint64_t entry = 0;
        off_t at = (off_t)(((uintptr_t)buf + off) / PAGE * sizeof(entry));
        if (pread(fd, &entry, sizeof(entry), at) != sizeof(entry) || !(entry & PAGEMAP_PRESENT))
            continue;
        present++;
        if ((entry & PAGEMAP_PFN_MASK) * PAGE >= HIGH_MEMORY_START)
            high++;
    }
    if (fd >= 0)
        close(fd);
    report("hotplug-buffer", high > 0, "pages=%zu present=%zu in-hotplugged-memory=%zu",
           len / PAGE, present, high);
}

/* `--bench SECONDS [--bench-jobs J]`: J processes each doing O_DIRECT 4 KiB random reads at
 * queue depth 1 for SECONDS; one `VHOSTMEM-INFO bench job=J ops=N ns=T` line per process. */
enum { BENCH_BLOCK = 4096, MAX_BENCH_JOBS = 64 };
#define NS_PER_S 1000000000ULL
#define XORSHIFT_SEED 0x9E3779B97F4A7C15ULL

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS_PER_S + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift64(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static int bench_job(const struct opts *o, unsigned job)
{
    int fd = open(o->dev, O_RDONLY | O_DIRECT);
    if (fd < 0)
        return 1;
    unsigned char *buf = alloc_buffer(BENCH_BLOCK);
    uint64_t blocks = o->size / BENCH_BLOCK, x = XORSHIFT_SEED + job, ops = 0;
    uint64_t start = now_ns(), end = start + o->bench_seconds * NS_PER_S, t = start;
    while (t < end) {
        off_t off = (off_t)(xorshift64(&x) % blocks * BENCH_BLOCK);
        if (pread(fd, buf, BENCH_BLOCK, off) != BENCH_BLOCK) {
            printf("VHOSTMEM-INFO bench job=%u error errno=%d\n", job, errno);
            return 1;
        }
        ops++;
        t = now_ns();
    }
    printf("VHOSTMEM-INFO bench job=%u ops=%llu ns=%llu\n", job, (unsigned long long)ops,
           (unsigned long long)(t - start));
    fflush(stdout);
    close(fd);
    return 0;
}

static int bench(const struct opts *o)
{
    unsigned jobs = o->bench_jobs ? o->bench_jobs : 1, failed = 0;
    if (jobs > MAX_BENCH_JOBS || o->size < BENCH_BLOCK)
        return 2;
    fflush(stdout);
    for (unsigned j = 0; j < jobs; j++) {
        pid_t pid = fork();
        if (pid == 0)
            _exit(bench_job(o, j));
        if (pid < 0)
            failed++;
    }
    int status;
    while (wait(&status) > 0)
        failed += !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    return failed ? 1 : 0;
}

/* `--queue-io CPU[,CPU...] [--queue-io-ops N]`: one process per listed CPU, pinned to it with
 * sched_setaffinity, does N O_DIRECT 4 KiB reads. blk-mq maps each CPU to a hardware queue, so
 * pinned submitters put I/O on the queues of those CPUs; init.sh counts each virtqueue's
 * interrupts around this run to see which queues carried it. One line per process:
 * `VHOSTMEM-INFO queue-io cpu=C ops=N on-cpu=0|1` (on-cpu: it ran on C at the start and end). */
enum { QIO_BLOCK = 4096, QIO_DEFAULT_OPS = 64, MAX_QIO_CPUS = 64 };

static int queue_io_job(const struct opts *o, int cpu, unsigned ops)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set)) {
        printf("VHOSTMEM-INFO queue-io cpu=%d error sched_setaffinity errno=%d\n", cpu, errno);
        return 1;
    }
    int fd = open(o->dev, O_RDONLY | O_DIRECT);
    if (fd < 0)
        return 1;
    unsigned char *buf = alloc_buffer(QIO_BLOCK);
    uint64_t blocks = o->size / QIO_BLOCK, x = XORSHIFT_SEED + (uint64_t)cpu;
    int on_cpu = sched_getcpu() == cpu;
    unsigned done = 0;
    for (; done < ops; done++) {
        off_t off = (off_t)(xorshift64(&x) % blocks * QIO_BLOCK);
        if (pread(fd, buf, QIO_BLOCK, off) != QIO_BLOCK)
            break;
    }
    on_cpu = on_cpu && sched_getcpu() == cpu;
    printf("VHOSTMEM-INFO queue-io cpu=%d ops=%u on-cpu=%d\n", cpu, done, on_cpu);
    fflush(stdout);
    close(fd);
    return done == ops && on_cpu ? 0 : 1;
}

static int queue_io(const struct opts *o)
{
    unsigned ops = o->queue_io_ops ? o->queue_io_ops : QIO_DEFAULT_OPS, failed = 0, n = 0;
    const char *p = o->queue_io_cpus;
    if (o->size < QIO_BLOCK)
        return 2;
    fflush(stdout);
    while (*p && n < MAX_QIO_CPUS) {
        char *end;
        long cpu = strtol(p, &end, 10);
        if (end == p || cpu < 0 || cpu >= CPU_SETSIZE)
            return 2;
        pid_t pid = fork();
        if (pid == 0)
            _exit(queue_io_job(o, (int)cpu, ops));
        failed += pid < 0;
        n++;
        p = *end == ',' ? end + 1 : end;
    }
    int status;
    while (wait(&status) > 0)
        failed += !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    return failed || n == 0 ? 1 : 0;
}

/* `--writer J`: J processes write checksummed 4 KiB blocks (O_DIRECT) over their own slice of
 * the disk until SIGTERM, reading back acknowledged blocks as they go, then verify every block
 * of the slice holds exactly the last write that was acknowledged (or zeroes if none was).
 * Block layout: magic u32, job u32, block u64, seq u64, xorshift fill, FNV-1a u64 of the rest.
 * Lines: `VHOSTMEM-INFO writer job=J writes=N` (progress), `VHOSTMEM-TEST writer.jobJ ...`. */
enum { WBLOCK = 4096, WRITER_PROGRESS = 32, WRITER_READBACK = 4, MAX_WRITER_JOBS = 16 };
#define WRITER_MAGIC 0x57484d56U /* "VMHW" */
#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL
#define SEQ_UNKNOWN UINT64_MAX /* a write failed: the block's contents are undefined */
static volatile sig_atomic_t writer_stop;

static void on_stop(int sig) { (void)sig; writer_stop = 1; }

static uint64_t fnv1a(const unsigned char *p, size_t n)
{
    uint64_t h = FNV_OFFSET;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * FNV_PRIME;
    return h;
}

static void writer_block(unsigned char *b, unsigned job, uint64_t block, uint64_t seq)
{
    uint32_t hdr[2] = { WRITER_MAGIC, job };
    uint64_t x = (block << 32) ^ seq ^ XORSHIFT_SEED, sum;
    memcpy(b, hdr, 8);
    memcpy(b + 8, &block, 8);
    memcpy(b + 16, &seq, 8);
    for (size_t i = 24; i < WBLOCK - 8; i += 8) {
        uint64_t v = xorshift64(&x);
        memcpy(b + i, &v, 8);
    }
    sum = fnv1a(b, WBLOCK - 8);
    memcpy(b + WBLOCK - 8, &sum, 8);
}

/* 0 if the block on disk is what `seq` wrote (all zeroes for seq 0). */
static int writer_check(int fd, unsigned job, uint64_t block, uint64_t seq, unsigned char *got,
                        unsigned char *want, unsigned *errors)
{
    if (seq == SEQ_UNKNOWN)
        return 0;
    if (pread(fd, got, WBLOCK, (off_t)(block * WBLOCK)) != WBLOCK) {
        printf("VHOSTMEM-INFO writer job=%u read-error block=%llu errno=%d\n", job,
               (unsigned long long)block, errno);
        (*errors)++;
        return 1;
    }
    if (seq == 0)
        return is_zero(got, WBLOCK) ? 0 : 1;
    writer_block(want, job, block, seq);
    return memcmp(got, want, WBLOCK) ? 1 : 0;
}

static int writer_job(const struct opts *o, unsigned job, uint64_t first, uint64_t count)
{
    int fd = open(o->dev, O_RDWR | O_DIRECT);
    unsigned char *buf = alloc_buffer(WBLOCK), *got = alloc_buffer(WBLOCK);
    uint64_t *last = calloc(count, sizeof(*last)), writes = 0, checked = 0, x = XORSHIFT_SEED;
    unsigned errors = 0, bad = 0;
    if (fd < 0 || !last)
        return 1;
    x += job;
    for (uint64_t seq = 1; !writer_stop; seq++) {
        uint64_t i = xorshift64(&x) % count;
        writer_block(buf, job, first + i, seq);
        if (pwrite(fd, buf, WBLOCK, (off_t)((first + i) * WBLOCK)) != WBLOCK) {
            printf("VHOSTMEM-INFO writer job=%u write-error block=%llu errno=%d\n", job,
                   (unsigned long long)(first + i), errno);
            errors++;
            last[i] = SEQ_UNKNOWN;
            continue;
        }
        last[i] = seq; /* acknowledged: from now on the disk must hold exactly this */
        writes++;
        if (writes % WRITER_READBACK == 0) {
            uint64_t j = xorshift64(&x) % count;
            bad += writer_check(fd, job, first + j, last[j], got, buf, &errors);
            checked++;
        }
        if (writes % WRITER_PROGRESS == 0) {
            printf("VHOSTMEM-INFO writer job=%u writes=%llu\n", job, (unsigned long long)writes);
            fflush(stdout);
        }
    }
    for (uint64_t i = 0; i < count; i++, checked++)
        bad += writer_check(fd, job, first + i, last[i], got, buf, &errors);
    printf("VHOSTMEM-TEST writer.job%u %s writes=%llu verified=%llu mismatches=%u errors=%u\n",
           job, bad || errors || !writes ? "FAIL" : "PASS", (unsigned long long)writes,
           (unsigned long long)checked, bad, errors);
    fflush(stdout);
    close(fd);
    return bad || errors || !writes;
}

/* `--migrate-io J` (qemu/migrate.py): J writer jobs as above (jobs 0..J-1) and J cache jobs
 * (jobs J..2J-1), each on its own slice, until SIGTERM. A cache job rewrites a random block of
 * its slice with O_DIRECT, then reads it through the page cache (a buffered fd, readahead off):
 * a real request whose data the backend writes into a page-cache page of guest RAM. Each turn
 * it also re-reads CACHE_SWEEP blocks of its slice through the page cache, round-robin, and
 * compares each with the last version it wrote (zeroes if none). Those re-reads are served
 * from guest RAM without a request, so a page the backend wrote during a live migration but
 * did not mark in the dirty log reaches the destination stale, and the next sweep over it
 * finds the block's previous contents (or another block's); the guest must boot with
 * init_on_alloc=0, or the kernel's zeroing of each new page marks it dirty from the vCPU just
 * before the backend fills it, and hides the missing mark. At SIGTERM: one last sweep through
 * the page cache, then every block read with O_DIRECT (the disk holds the last version).
 * Lines: `VHOSTMEM-INFO cache job=J loads=N sweeps=S verified=V mismatches=M` (progress; a
 * sweep is one pass over the slice), `VHOSTMEM-INFO cache job=J stale block=B want-seq=S cached=...
 * disk=...` (a mismatch, the cached and the on-disk block described), and
 * `VHOSTMEM-TEST cache.jobJ PASS|FAIL ...`. */
enum { CACHE_SWEEP = 16, CACHE_PROGRESS = 32, CACHE_REPORTS = 8 };

/* "zeroes", or the writer block's header and whether its checksum holds. */
static void describe_block(const unsigned char *b, char *out, size_t n)
{
    uint32_t hdr[2];
    uint64_t block, seq, sum;
    if (is_zero(b, WBLOCK)) {
        snprintf(out, n, "zeroes");
        return;
    }
    memcpy(hdr, b, 8);
    memcpy(&block, b + 8, 8);
    memcpy(&seq, b + 16, 8);
    memcpy(&sum, b + WBLOCK - 8, 8);
    snprintf(out, n, "magic=%08x/job=%u/block=%llu/seq=%llu/sum=%s", hdr[0], hdr[1],
             (unsigned long long)block, (unsigned long long)seq,
             fnv1a(b, WBLOCK - 8) == sum ? "ok" : "bad");
}

/* 0 if the block read through the page cache (cfd) is what `seq` wrote; on a mismatch, drops
 * the cached page and describes the cached and the on-disk block (read with O_DIRECT, dfd). */
static int cache_check(int cfd, int dfd, unsigned job, uint64_t block, uint64_t seq,
                       unsigned char *got, unsigned char *want, unsigned *errors,
                       unsigned *reports)
{
    char cached[96], disk[96];
    off_t off = (off_t)(block * WBLOCK);
    if (seq == SEQ_UNKNOWN)
        return 0;
    if (pread(cfd, got, WBLOCK, off) != WBLOCK) {
        printf("VHOSTMEM-INFO cache job=%u read-error block=%llu errno=%d\n", job,
               (unsigned long long)block, errno);
        (*errors)++;
        return 1;
    }
    if (seq == 0 ? is_zero(got, WBLOCK) : (writer_block(want, job, block, seq),
                                            !memcmp(got, want, WBLOCK)))
        return 0;
    if ((*reports)++ < CACHE_REPORTS) {
        describe_block(got, cached, sizeof(cached));
        if (pread(dfd, want, WBLOCK, off) == WBLOCK)
            describe_block(want, disk, sizeof(disk));
        else
            snprintf(disk, sizeof(disk), "read-error-%d", errno);
        printf("VHOSTMEM-INFO cache job=%u stale block=%llu want-seq=%llu cached=%s disk=%s\n",
               job, (unsigned long long)block, (unsigned long long)seq, cached, disk);
        fflush(stdout);
    }
    posix_fadvise(cfd, off, WBLOCK, POSIX_FADV_DONTNEED);
    return 1;
}

static int cache_job(const struct opts *o, unsigned job, uint64_t first, uint64_t count)
{
    int dfd = open(o->dev, O_RDWR | O_DIRECT), cfd = open(o->dev, O_RDONLY);
    unsigned char *buf = alloc_buffer(WBLOCK), *got = alloc_buffer(WBLOCK);
    uint64_t *last = calloc(count, sizeof(*last)), loads = 0, verified = 0, sweeps = 0;
    uint64_t next = 0, x = XORSHIFT_SEED + job;
    unsigned errors = 0, bad = 0, reports = 0;
    if (dfd < 0 || cfd < 0 || !last)
        return 1;
    posix_fadvise(cfd, 0, 0, POSIX_FADV_RANDOM); /* one page per buffered read */
    for (uint64_t seq = 1; !writer_stop; seq++) {
        uint64_t i = xorshift64(&x) % count;
        writer_block(buf, job, first + i, seq);
        if (pwrite(dfd, buf, WBLOCK, (off_t)((first + i) * WBLOCK)) != WBLOCK) {
            printf("VHOSTMEM-INFO cache job=%u write-error block=%llu errno=%d\n", job,
                   (unsigned long long)(first + i), errno);
            errors++;
            last[i] = SEQ_UNKNOWN;
            continue;
        }
        last[i] = seq;
        /* The direct write dropped the block's cached page: this read is a request. */
        bad += cache_check(cfd, dfd, job, first + i, seq, got, buf, &errors, &reports);
        loads++;
        for (unsigned k = 0; k < CACHE_SWEEP; k++, verified++) {
            bad += cache_check(cfd, dfd, job, first + next, last[next], got, buf, &errors,
                               &reports);
            if (++next == count) {
                next = 0;
                sweeps++;
            }
        }
        if (loads % CACHE_PROGRESS == 0) {
            printf("VHOSTMEM-INFO cache job=%u loads=%llu sweeps=%llu verified=%llu "
                   "mismatches=%u\n", job, (unsigned long long)loads,
                   (unsigned long long)sweeps, (unsigned long long)verified, bad);
            fflush(stdout);
        }
    }
    for (uint64_t i = 0; i < count; i++, verified++)
        bad += cache_check(cfd, dfd, job, first + i, last[i], got, buf, &errors, &reports);
    for (uint64_t i = 0; i < count; i++, verified++)
        bad += writer_check(dfd, job, first + i, last[i], got, buf, &errors);
    printf("VHOSTMEM-TEST cache.job%u %s loads=%llu sweeps=%llu verified=%llu mismatches=%u "
           "errors=%u\n", job, bad || errors || !loads ? "FAIL" : "PASS",
           (unsigned long long)loads, (unsigned long long)sweeps, (unsigned long long)verified,
           bad, errors);
    fflush(stdout);
    close(cfd);
    close(dfd);
    return bad || errors || !loads;
}

/* `writers` writer jobs then `caches` cache jobs, one slice each, until SIGTERM. */
static int writer(const struct opts *o, unsigned writers, unsigned caches)
{
    unsigned jobs = writers + caches, failed = 0;
    uint64_t per = o->size / WBLOCK / (jobs ? jobs : 1);
    pid_t pids[MAX_WRITER_JOBS];
    if (jobs > MAX_WRITER_JOBS || per == 0)
        return 2;
    signal(SIGTERM, on_stop);
    fflush(stdout);
    for (unsigned j = 0; j < jobs; j++) {
        pids[j] = fork();
        if (pids[j] == 0)
            _exit(j < writers ? writer_job(o, j, j * per, per) : cache_job(o, j, j * per, per));
        if (pids[j] < 0)
            failed++;
    }
    while (!writer_stop)
        pause();
    for (unsigned j = 0; j < jobs; j++)
        if (pids[j] > 0)
            kill(pids[j], SIGTERM);
    int status;
    while (wait(&status) > 0)
        failed += !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    return failed ? 1 : 0;
}

/* `--direct-writes N [--first-block B] [--job J]`: N O_DIRECT 4 KiB writes to blocks B..B+N-1,
 * one at a time (each acknowledged before the next is issued), as vmtest --writer blocks of job
 * J with seq 1..N, so the host's image check applies. The host counts the backend's fdatasyncs
 * per acknowledged write (qemu/durability.py).
 * Line: `VHOSTMEM-INFO direct-writes first=B writes=N acknowledged=A errno=E`. */
static int direct_writes(const struct opts *o)
{
    int fd = open(o->dev, O_RDWR | O_DIRECT), err = 0;
    unsigned char *buf = alloc_buffer(WBLOCK);
    unsigned done = 0;
    if (fd < 0 || (o->first_block + o->direct_writes) * WBLOCK > o->size)
        return 2;
    for (; done < o->direct_writes; done++) {
        uint64_t block = o->first_block + done;
        writer_block(buf, o->job, block, done + 1);
        if (pwrite(fd, buf, WBLOCK, (off_t)(block * WBLOCK)) != WBLOCK) {
            err = errno;
            break;
        }
    }
    printf("VHOSTMEM-INFO direct-writes first=%llu writes=%u acknowledged=%u errno=%d\n",
           (unsigned long long)o->first_block, o->direct_writes, done, err);
    fflush(stdout);
    close(fd);
    return done == o->direct_writes ? 0 : 1;
}

static uint64_t num(const char *s)
{
    return strtoull(s, NULL, 0);
}

static void parse_range(const char *s, uint64_t *off, uint64_t *len)
{
    char *end;
    *off = strtoull(s, &end, 0);
    *len = *end == ':' ? strtoull(end + 1, NULL, 0) : 0;
}

static int parse(int argc, char **argv, struct opts *o)
{
    memset(o, 0, sizeof(*o));
    o->lbs = 512;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--readonly")) o->readonly = 1;
        else if (!strcmp(a, "--discard-zeroes")) o->discard_zeroes = 1;
        else if (!strcmp(a, "--high-buffer")) o->high_buffer = 1;
        else if (!v) return -1;
        else if (!strcmp(a, "--dev")) o->dev = argv[++i];
        else if (!strcmp(a, "--size")) o->size = num(argv[++i]);
        else if (!strcmp(a, "--lbs")) o->lbs = (unsigned)num(argv[++i]);
        else if (!strcmp(a, "--seed")) o->seed = (unsigned)num(argv[++i]);
        else if (!strcmp(a, "--round")) o->round = (unsigned)num(argv[++i]);
        else if (!strcmp(a, "--discard")) parse_range(argv[++i], &o->discard_off, &o->discard_len);
        else if (!strcmp(a, "--zeroout")) parse_range(argv[++i], &o->zero_off, &o->zero_len);
        else if (!strcmp(a, "--bench")) o->bench_seconds = (unsigned)num(argv[++i]);
        else if (!strcmp(a, "--bench-jobs")) o->bench_jobs = (unsigned)num(argv[++i]);
        else if (!strcmp(a, "--writer")) o->writer_jobs = (unsigned)num(argv[++i]);
        else if (!strcmp(a, "--migrate-io")) o->migrate_jobs = (unsigned)num(argv[++i]);
        else if (!strcmp(a, "--queue-io")) o->queue_io_cpus = argv[++i];
        else if (!strcmp(a, "--queue-io-ops")) o->queue_io_ops = (unsigned)num(argv[++i]);
        else if (!strcmp(a, "--direct-writes")) o->direct_writes = (unsigned)num(argv[++i]);
        else if (!strcmp(a, "--first-block")) o->first_block = num(argv[++i]);
        else if (!strcmp(a, "--job")) o->job = (unsigned)num(argv[++i]);
        else return -1;
    }
    return o->dev && o->size && o->lbs && o->size % o->lbs == 0 && o->lbs % 4 == 0 ? 0 : -1;
}

/* `vmtest --dump-pattern SEED LEN`: the raw stream on stdout, for the host's own tests. */
static int dump_pattern(uint32_t seed, uint64_t len)
{
    static unsigned char chunk[CHUNK];
    struct mt m;
    mt_seed(&m, seed);
    for (uint64_t done = 0; done < len; done += CHUNK) {
        size_t n = len - done < CHUNK ? (size_t)(len - done) : CHUNK;
        mt_fill(&m, chunk, n);
        if (fwrite(chunk, 1, n, stdout) != n)
            return 1;
    }
    return fflush(stdout) ? 1 : 0;
}

int main(int argc, char **argv)
{
    struct opts o;
    if (argc == 4 && !strcmp(argv[1], "--dump-pattern") && num(argv[3]) % 4 == 0)
        return dump_pattern((uint32_t)num(argv[2]), num(argv[3]));
    if (parse(argc, argv, &o)) {
        fprintf(stderr, "usage: vmtest --dev DEV --size BYTES --lbs N --seed S --round R "
                        "[--readonly] [--discard OFF:LEN [--discard-zeroes]] [--zeroout OFF:LEN] "
                        "[--high-buffer] | --dev DEV --size BYTES --bench SECONDS "
                        "[--bench-jobs J] | --dev DEV --size BYTES --writer J | "
                        "--dev DEV --size BYTES --migrate-io J | "
                        "--dev DEV --size BYTES --queue-io CPU[,CPU...] [--queue-io-ops N] | "
                        "--dev DEV --size BYTES --direct-writes N [--first-block B] [--job J]\n");
        return 2;
    }
    if (o.bench_seconds)
        return bench(&o);
    if (o.writer_jobs)
        return writer(&o, o.writer_jobs, 0);
    if (o.migrate_jobs)
        return writer(&o, o.migrate_jobs, o.migrate_jobs);
    if (o.queue_io_cpus)
        return queue_io(&o);
    if (o.direct_writes)
        return direct_writes(&o);
    current_round = o.round;
    int fd = open(o.dev, (o.readonly ? O_RDONLY : O_RDWR) | O_DIRECT);
    if (fd < 0) {
        report("open", 0, "%s errno=%d", o.dev, errno);
        return 1;
    }
    unsigned char *buf = alloc_buffer(CHUNK), *want = alloc_buffer(CHUNK);
    check_geometry(fd, &o);
    if (o.readonly) {
        check_readonly(&o, fd, buf);
    } else {
        check_write_pattern(fd, &o, buf);
        check_flush(fd, "flush");
    }
    check_read_pattern(fd, &o, buf, want);
    if (!o.readonly) {
        check_last_sector(fd, &o, buf, want);
        check_range_op(fd, &o, "discard", BLKDISCARD, o.discard_off, o.discard_len,
                       o.discard_zeroes, buf);
        check_range_op(fd, &o, "write-zeroes", BLKZEROOUT, o.zero_off, o.zero_len, 1, buf);
        check_flush(fd, "flush-final");
    }
    check_past_end(fd, &o, buf);
    if (o.high_buffer)
        check_high_buffer(buf, CHUNK);
    close(fd);
    return failures ? 1 : 0;
}
