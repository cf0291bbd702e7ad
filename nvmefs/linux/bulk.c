/* The compiled submit/reap loop of the passthrough engine's bulk data path (scrub, randread).
 *
 * Theory of operation: one io_uring (liburing, SQE128/CQE32 as NVMe passthrough needs) with `qd`
 * slots, each with its own page-aligned data buffer. nvmefs_bulk_run() keeps every free slot busy
 * with the next command of a job (Read or Verify, in LBA order or at random), submits them and
 * waits in io_uring_enter for completions; cffi releases the GIL around the call, and Python
 * runs it in a worker thread. The wait has no timeout of its own (a timed io_uring_enter arms
 * and cancels a kernel timer at every wait, that is at every command at QD1): a TIMEOUT request
 * in the same ring, armed once per call, wakes it at `max_ms` instead. A successful completion is only counted here; it never reaches
 * Python. The call returns with what Python must see (failed completions, or every completion
 * when the job asks for them all) as soon as there is any, and otherwise every `max_ms`, so that
 * Python can show progress, pace the job and notice cancellation between calls. Commands still in
 * flight when it returns stay in flight: the next call reaps them.
 *
 * Nothing here decides anything about a failure: the status word, or -errno from the host, goes
 * back to Python, which translates it, retries it by the kernel's rule and logs it.
 *
 * Everything between the cdef markers is also given to cffi's cdef (nvmefs/linux/bulk_build.py):
 * one declaration for both. */

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>
#include <linux/nvme_ioctl.h>

/* cdef-begin */
/* What to send and where the job stands. Python writes the first block before a run and `budget`,
 * `report_all`, `stop` and `fd` between runs (never during one); the rest is the loop's. */
struct nvmefs_job {
    int32_t fd;          /* the namespace's generic node, /dev/ngXnY */
    uint32_t nsid;
    uint32_t opcode;     /* 0x02 Read (into the slot's buffer) or 0x0c Verify (no data) */
    uint32_t lba_size;   /* bytes per logical block */
    uint32_t nlb;        /* blocks per command, 1..65536 (the last in-order one may be shorter) */
    uint32_t timeout_ms; /* per command; the kernel enforces it */
    uint64_t start;      /* in order: the LBAs [start, end); at random: slots of nlb from start */
    uint64_t end;
    uint64_t count;      /* at random: commands to send, 0 for no end */
    uint64_t seed;       /* at random: the generator's state (splitmix64), advanced as it goes */
    uint32_t random;     /* 0: in LBA order; 1: uniformly random slots */
    uint32_t report_all; /* hand every completion back, successes too (a policy that logs them) */
    uint64_t budget;     /* bytes it may still submit; UINT64_MAX for no cap (rate limits) */
    int32_t stop;        /* nonzero: submit nothing more, only reap (cancellation, draining) */
    uint32_t inflight;   /* commands in the kernel */
    uint64_t next;       /* in order: the next LBA to submit */
    uint64_t low;        /* in order: every LBA below it has completed */
    uint64_t sent;       /* commands submitted */
    uint64_t done;       /* commands completed (abandoned ones excepted) */
    uint64_t bytes_done; /* their bytes (nlb * lba_size, also for Verify) */
    /* Successes not handed back, since Python last took them (it zeroes these). */
    uint64_t ok;
    uint64_t ok_lat_ns;     /* the sum of their latencies */
    uint64_t ok_lat_ns_max;
};

/* One completion for Python: failed, or any when the job reports all. */
struct nvmefs_report {
    uint64_t tag;    /* the command's number in its loop, from 1 */
    uint64_t slba;
    uint32_t nlb;
    int32_t res;     /* the NVMe status (>= 0), -errno from the host, or NVMEFS_NO_COMPLETION */
    uint64_t result; /* completion dwords 0 and 1 */
    int64_t t0_ns;   /* CLOCK_MONOTONIC at submission, as Python's time.monotonic_ns() */
};

struct nvmefs_bulk;
struct nvmefs_bulk *nvmefs_bulk_new(uint32_t qd, uint32_t buf_bytes, uint32_t backstop_ms);
int nvmefs_bulk_run(struct nvmefs_bulk *b, struct nvmefs_job *job, struct nvmefs_report *out,
                    uint32_t cap, uint32_t max_ms);
void nvmefs_bulk_free(struct nvmefs_bulk *b);
/* cdef-end */

/* A command the kernel has not answered `backstop_ms` after it was sent: reported once with this
 * `res`, its slot kept until the kernel does answer (the buffer is still the kernel's). */
#define NVMEFS_NO_COMPLETION INT32_MIN
/* The user_data of the turn's TIMEOUT request; commands use their slot index. */
#define TIMER_TAG UINT64_MAX

struct slot {
    uint64_t tag; /* 0: free */
    uint64_t slba;
    uint32_t nlb;
    uint8_t abandoned; /* reported as NVMEFS_NO_COMPLETION; its completion is dropped */
    int64_t t0_ns;
};

struct nvmefs_bulk {
    struct io_uring ring;
    uint32_t qd;
    size_t buf_bytes; /* per slot, whole pages; 0 when no command moves data */
    uint8_t *bufs;    /* qd * buf_bytes, mmap'd (see nvmefs_bulk_free) */
    struct slot *slots;
    uint32_t *free; /* a stack of free slot indexes */
    uint32_t nfree;
    uint64_t tags;
    int64_t backstop_ns;
    int timer_armed;                   /* a TIMEOUT request is in the ring */
    struct __kernel_timespec timer_ts; /* its interval (read by the kernel at submission) */
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void nvmefs_bulk_free(struct nvmefs_bulk *b)
{
    if (b == NULL)
        return;
    /* Commands still in flight (a drain that gave up on a hung device) keep what they need: the
     * kernel holds its own reference to the ring, and has the buffer's pages pinned, so unmapping
     * them only takes them out of our address space (nothing of ours can be handed those pages
     * while the device may still write them: they are freed only once the command completes). */
    io_uring_queue_exit(&b->ring);
    if (b->bufs != NULL)
        munmap(b->bufs, b->buf_bytes * b->qd);
    free(b->slots);
    free(b->free);
    free(b);
}

/* A loop of `qd` slots with `buf_bytes` of buffer each; NULL with errno set on failure. */
struct nvmefs_bulk *nvmefs_bulk_new(uint32_t qd, uint32_t buf_bytes, uint32_t backstop_ms)
{
    struct io_uring_params p;
    struct nvmefs_bulk *b;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    int ret;

    if (qd == 0 || qd > 4096) {
        errno = EINVAL;
        return NULL;
    }
    b = calloc(1, sizeof(*b));
    if (b == NULL)
        return NULL;
    b->qd = qd;
    b->backstop_ns = (int64_t)backstop_ms * 1000000;
    b->buf_bytes = ((size_t)buf_bytes + page - 1) / page * page;
    b->slots = calloc(qd, sizeof(*b->slots));
    b->free = calloc(qd, sizeof(*b->free));
    if (b->slots == NULL || b->free == NULL)
        goto fail;
    if (b->buf_bytes) {
        /* mmap, not malloc: page aligned (the kernel maps the pages for DMA instead of bouncing
         * through a copy), and given back to the kernel, never to a heap, when freed. */
        b->bufs = mmap(NULL, b->buf_bytes * qd, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (b->bufs == MAP_FAILED) {
            b->bufs = NULL;
            goto fail;
        }
    }
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQE32;
    ret = io_uring_queue_init_params(qd + 1, &b->ring, &p); /* qd commands and the timer */
    if (ret < 0) {
        errno = -ret;
        goto fail;
    }
    for (uint32_t i = 0; i < qd; i++)
        b->free[i] = qd - 1 - i; /* slot 0 first: the same few buffers stay warm */
    b->nfree = qd;
    return b;
fail:
    ret = errno; /* the ring was not set up: only memory to give back */
    if (b->bufs != NULL)
        munmap(b->bufs, b->buf_bytes * qd);
    free(b->slots);
    free(b->free);
    free(b);
    errno = ret;
    return NULL;
}

/* The next command of the job, if it has one within its budget: its LBA and block count. */
static int next_command(struct nvmefs_job *job, uint64_t *slba, uint32_t *nlb)
{
    uint64_t bytes;

    if (job->stop)
        return 0;
    if (job->random) {
        uint64_t slots = (job->end - job->start) / job->nlb;
        if (slots == 0 || (job->count && job->sent >= job->count))
            return 0;
        *nlb = job->nlb;
        *slba = job->start + (splitmix64(&job->seed) % slots) * job->nlb;
    } else {
        if (job->next >= job->end)
            return 0;
        *slba = job->next;
        *nlb = job->end - job->next < job->nlb ? (uint32_t)(job->end - job->next) : job->nlb;
    }
    bytes = (uint64_t)*nlb * job->lba_size;
    if (job->budget != UINT64_MAX) {
        if (job->budget < bytes)
            return 0;
        job->budget -= bytes;
    }
    if (!job->random)
        job->next += *nlb;
    return 1;
}

static void prep(struct nvmefs_bulk *b, struct io_uring_sqe *sqe, struct nvmefs_job *job,
                 uint32_t idx, uint64_t slba, uint32_t nlb, int64_t t0)
{
    struct nvme_uring_cmd *cmd = (struct nvme_uring_cmd *)sqe->cmd;
    struct slot *s = &b->slots[idx];

    memset((void *)sqe, 0, 128); /* an SQE128 entry: twice liburing's struct io_uring_sqe */
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = job->fd;
    sqe->cmd_op = NVME_URING_CMD_IO;
    sqe->user_data = idx;
    cmd->opcode = job->opcode;
    cmd->nsid = job->nsid;
    if (job->opcode == 0x02 && b->bufs != NULL) { /* Read: Verify moves no data */
        cmd->addr = (uint64_t)(uintptr_t)(b->bufs + (size_t)idx * b->buf_bytes);
        cmd->data_len = nlb * job->lba_size;
    }
    cmd->cdw10 = (uint32_t)slba;
    cmd->cdw11 = (uint32_t)(slba >> 32);
    cmd->cdw12 = nlb - 1;
    cmd->timeout_ms = job->timeout_ms;
    s->tag = ++b->tags;
    s->slba = slba;
    s->nlb = nlb;
    s->abandoned = 0;
    s->t0_ns = t0;
    job->sent++;
    job->inflight++;
}

static void report(struct nvmefs_report *r, const struct slot *s, int32_t res, uint64_t result)
{
    r->tag = s->tag;
    r->slba = s->slba;
    r->nlb = s->nlb;
    r->res = res;
    r->result = result;
    r->t0_ns = s->t0_ns;
}

/* Where an in-order job stands: below the lowest LBA still in flight, everything completed. */
static void update_low(struct nvmefs_bulk *b, struct nvmefs_job *job)
{
    uint64_t low = job->next;

    for (uint32_t i = 0; i < b->qd; i++)
        if (b->slots[i].tag && b->slots[i].slba < low)
            low = b->slots[i].slba;
    job->low = low;
}

/* Commands out longer than the backstop: reported once each (the kernel should have answered
 * by its own timeout_ms long before). Returns how many reports it added. */
static uint32_t backstop(struct nvmefs_bulk *b, struct nvmefs_report *out, uint32_t room,
                         int64_t now)
{
    uint32_t n = 0;

    for (uint32_t i = 0; i < b->qd && n < room; i++) {
        struct slot *s = &b->slots[i];
        if (s->tag && !s->abandoned && now - s->t0_ns > b->backstop_ns) {
            s->abandoned = 1;
            report(&out[n++], s, NVMEFS_NO_COMPLETION, 0);
        }
    }
    return n;
}

/* Run the job until there is something to report, `max_ms` have passed, or nothing is left to
 * submit or reap. Returns the number of reports written to `out` (which has room for `cap`, at
 * least qd), or -errno if io_uring itself failed. */
int nvmefs_bulk_run(struct nvmefs_bulk *b, struct nvmefs_job *job, struct nvmefs_report *out,
                    uint32_t cap, uint32_t max_ms)
{
    int64_t now = now_ns(), deadline = now + (int64_t)max_ms * 1000000;
    uint32_t n = 0;
    int expired = 0;

    if (cap < b->qd || job->nlb == 0 || job->nlb > 0x10000 ||
        (job->opcode == 0x02 && (uint64_t)job->nlb * job->lba_size > b->buf_bytes))
        return -EINVAL;
    for (;;) {
        struct io_uring_cqe *cqe;
        uint32_t seen = 0;
        unsigned head;
        uint64_t slba;
        uint32_t nlb;
        int ret;

        /* Fill every free slot. One clock read per batch: a command's latency counts from the
         * submission of its batch, as fio's does. */
        while (b->nfree && next_command(job, &slba, &nlb)) {
            /* Never NULL: the SQ has room for qd commands and the timer. */
            struct io_uring_sqe *sqe = io_uring_get_sqe(&b->ring);
            if (sqe == NULL)
                return -EBUSY;
            prep(b, sqe, job, b->free[--b->nfree], slba, nlb, now);
        }
        if (job->inflight == 0 || expired)
            break; /* done, out of budget or stopped with nothing to reap; or time is up */
        if (!b->timer_armed) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&b->ring);
            if (sqe == NULL)
                return -EBUSY;
            b->timer_ts.tv_sec = max_ms / 1000;
            b->timer_ts.tv_nsec = (long long)(max_ms % 1000) * 1000000;
            io_uring_prep_timeout(sqe, &b->timer_ts, 0, 0);
            sqe->user_data = TIMER_TAG;
            b->timer_armed = 1;
        }
        /* Submit, and sleep until a completion (or the timer's): one io_uring_enter. */
        ret = io_uring_submit_and_wait(&b->ring, 1);
        if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
            update_low(b, job);
            return ret;
        }
        now = now_ns();
        io_uring_for_each_cqe(&b->ring, head, cqe) {
            uint64_t idx = cqe->user_data;
            struct slot *s;

            seen++;
            if (idx == TIMER_TAG) { /* the turn's time is up (or an earlier call's was) */
                b->timer_armed = 0;
                expired = 1;
                continue;
            }
            s = &b->slots[idx];
            job->inflight--;
            if (!s->abandoned) {
                job->done++;
                job->bytes_done += (uint64_t)s->nlb * job->lba_size;
                if (cqe->res == 0 && !job->report_all) {
                    uint64_t lat = (uint64_t)(now - s->t0_ns);
                    job->ok++;
                    job->ok_lat_ns += lat;
                    if (lat > job->ok_lat_ns_max)
                        job->ok_lat_ns_max = lat;
                } else {
                    /* At most qd commands are out at once: `cap` >= qd always has room. */
                    report(&out[n++], s, cqe->res, cqe->big_cqe[0]);
                }
            }
            s->tag = 0;
            b->free[b->nfree++] = (uint32_t)idx;
        }
        io_uring_cq_advance(&b->ring, seen);
        if (now >= deadline) /* the timer is a wake-up; the clock decides */
            expired = 1;
        if (expired && b->backstop_ns)
            n += backstop(b, out + n, cap - n, now);
        if (n || expired)
            break;
    }
    update_low(b, job);
    return (int)n;
}
