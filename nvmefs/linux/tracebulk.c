/* The compiled consumer of the kernel source's trace pages (nvmefs.linux.tracebulk).
 *
 * Theory of operation: trace_pipe_raw hands out one CPU's ring-buffer pages. nvmefs_tb_feed()
 * walks one page exactly as nvmefs.linux.tracefs.parse_page() does (same bounds, same treatment
 * of padding, time extends, length words and a commit beyond the page), decodes the records of
 * nvme:nvme_complete_rq (one per attempt) and block:block_rq_complete (one per failed request)
 * at the offsets the format files gave, and pairs them per CPU as the Python consumer does
 * (nvmefs.linux.tracebulk.PythonConsumer): each CPU's last failed attempt waits; the block
 * event that follows on that CPU makes it final; the next attempt on that CPU means it was
 * retried; a success is final at once, and so is a failed admin or user passthrough attempt
 * (never retried). Time-based expiry of a waiting attempt is an explicit
 * call (nvmefs_tb_expire), with the caller's clock.
 *
 * Every attempt and every failed request is counted here, in a small table keyed by controller,
 * disk (or dev) and status word that Python drains (nvmefs_tb_take); only what the log policy
 * keeps (a 2048-byte table indexed by SCT/SC, handed in), and retried attempts whose status
 * Python watches (another such table: path errors, which multipath may fail over), go back to
 * Python, one `struct nvmefs_tb_final` each. In a storm, finals like the one whose entry opened
 * the kernel source's fold (nvmefs_tb_fold) are only counted, with their LBA range
 * (nvmefs_tb_take_folded): a storm's requests cost Python nothing each. A page is hostile
 * input: every read is checked against its length, and nothing a page holds can make this code
 * read or write outside it or its tables.
 *
 * Everything between the cdef markers is also given to cffi's cdef
 * (nvmefs/linux/tracebulk_build.py): one declaration for both. */

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* cdef-begin */
#define NVMEFS_TB_PAGE_MAX 65536 /* bytes: the largest ring-buffer page (64 KiB base pages) */
#define NVMEFS_TB_CPU_MAX 65536
#define NVMEFS_TB_DISK_MAX 64 /* a format's disk[] may be this long (the kernel's is 32) */
#define NVMEFS_TB_RWBS_MAX 16 /* and its rwbs[] this long (the kernel's is 8) */
#define NVMEFS_TB_FINAL 0     /* an attempt made final by its block event */
#define NVMEFS_TB_SUCCESS 1   /* a successful attempt: final at once, no block event */
#define NVMEFS_TB_RETRIED 2   /* an attempt that was retried (reported if watched or logged) */
#define NVMEFS_TB_ALONE 3     /* a failed admin or passthrough attempt: final, no block event */
#define NVMEFS_TB_USER_CMD 0x2 /* NVME_REQ_USERCMD in an attempt's flags: a user passthrough */
#define NVMEFS_TB_ATTEMPT 0   /* a count of attempts */
#define NVMEFS_TB_FAILED 1    /* a count of requests that ended failing */

/* Where a field is in its event's record (from the format file). */
struct nvmefs_tb_field {
    uint32_t offset;
    uint32_t size;      /* integers: 1..8 bytes; strings: 1..their maximum */
    uint32_t is_signed; /* integers: sign-extended when set */
};

/* The two events' ids and the fields the consumer reads. */
struct nvmefs_tb_formats {
    uint32_t nvme_id;
    uint32_t block_id;
    struct nvmefs_tb_field disk, ctrl_id, qid, cid, retries, flags, status; /* nvme_complete_rq */
    struct nvmefs_tb_field dev, sector, nr_sector, error, rwbs;             /* block_rq_complete */
};

/* One attempt (an nvme_complete_rq record). Integers are the field's value as a signed 64-bit
 * number (an unsigned 8-byte field's bit pattern: Python masks it back). Strings stop at their
 * first NUL. */
struct nvmefs_tb_attempt {
    double seen; /* the `now` of the feed that brought it */
    int64_t ctrl_id, qid, cid, retries, flags, status;
    uint32_t cpu;
    uint32_t disk_len;
    char disk[64];
};

/* A request's final completion (a block_rq_complete record). */
struct nvmefs_tb_block {
    int64_t dev, sector, nr_sector, error;
    uint32_t rwbs_len;
    char rwbs[16];
};

/* What Python must see: an attempt the policy keeps, with its block event when FINAL. */
struct nvmefs_tb_final {
    uint32_t kind; /* NVMEFS_TB_FINAL, _SUCCESS, _RETRIED or _ALONE */
    struct nvmefs_tb_attempt a;
    struct nvmefs_tb_block b; /* zero unless FINAL */
};

/* One counter: attempts by (ctrl_id, disk, status), or failed requests by (ctrl_id, disk, dev,
 * admin, status), where dev is 0 when the attempt named its disk (it is then looked up by
 * name, as the Python consumer does) and admin means qid 0. */
struct nvmefs_tb_count {
    uint32_t kind; /* NVMEFS_TB_ATTEMPT or NVMEFS_TB_FAILED */
    uint32_t admin;
    int64_t ctrl_id, dev, status;
    uint32_t disk_len;
    char disk[64];
    uint64_t n;
};

/* A fold (nvmefs_tb_fold): finals like the one whose entry opened the kernel source's open
 * fold are counted here instead of handed back. Like: the same kind, controller, disk, status
 * word, admin (qid 0) and user-passthrough flag, and for a FINAL the same dev and rwbs of its
 * block event: all an entry holds but the LBA, blocks, cid, qid and retries. */
struct nvmefs_tb_like {
    uint32_t kind; /* NVMEFS_TB_FINAL, _SUCCESS or _ALONE */
    uint32_t admin, user;
    int64_t ctrl_id, status, dev;
    uint32_t disk_len, rwbs_len;
    char disk[64];
    char rwbs[16];
    uint64_t lba_sectors; /* 512-byte sectors per LBA of the disk (FINAL): 0 for none known */
};

/* What a fold counted since the last take: `n` finals; over those with an LBA (`has_lba`), the
 * lowest first LBA and the highest last LBA (first + blocks - 1, 65 bits: hi + 2^64 hi_carry). */
struct nvmefs_tb_folded {
    uint64_t n, lo, hi;
    uint32_t hi_carry, has_lba;
};

/* Plain counters since the last take. */
struct nvmefs_tb_totals {
    uint64_t retried;   /* attempts superseded on their CPU or expired: they were retried */
    uint64_t malformed; /* records of either event too short for the fields read */
};

struct nvmefs_tb;
struct nvmefs_tb *nvmefs_tb_new(const struct nvmefs_tb_formats *f);
void nvmefs_tb_free(struct nvmefs_tb *c);
void nvmefs_tb_configure(struct nvmefs_tb *c, const uint8_t *keep, const uint8_t *watch,
                         uint32_t log_attempts);
int nvmefs_tb_feed(struct nvmefs_tb *c, uint32_t cpu, const char *page, size_t len, double now,
                   struct nvmefs_tb_final *out, uint32_t cap, int64_t *lost);
int nvmefs_tb_expire(struct nvmefs_tb *c, double now, double grace, struct nvmefs_tb_final *out,
                     uint32_t cap);
void nvmefs_tb_fold(struct nvmefs_tb *c, const struct nvmefs_tb_like *like);
void nvmefs_tb_take_folded(struct nvmefs_tb *c, struct nvmefs_tb_folded *out);
uint32_t nvmefs_tb_pending(const struct nvmefs_tb *c);
uint32_t nvmefs_tb_used(const struct nvmefs_tb *c);
int nvmefs_tb_take(struct nvmefs_tb *c, struct nvmefs_tb_count *out, uint32_t cap,
                   struct nvmefs_tb_totals *totals);
/* cdef-end */

/* The ring-buffer page layout (64-bit kernels: `commit` is a long), as in tracefs.py. */
#define HEADER 16
#define COMMIT_MASK ((1ULL << 27) - 1)
#define MISSED_EVENTS (1ULL << 31)
#define MISSED_STORED (1ULL << 30)
#define TYPE_PADDING 29
#define TYPE_TIME_EXTEND 30
#define TYPE_TIME_STAMP 31
#define SCT_SC_MASK 0x7ff

/* The counter table: open addressing, never more than LOAD_MAX of its CAP slots used, so a
 * probe always ends at a free slot. A feed adds at most one key per record and a page of `len`
 * bytes holds at most len/4 records: a feed that might not fit is refused before it starts
 * (-ENOSPC: Python drains the table and feeds again). */
#define TABLE_CAP 32768
#define LOAD_MAX 24576

struct slot {
    struct nvmefs_tb_count c;
    uint32_t used;
};

struct pending {
    struct nvmefs_tb_attempt a;
    uint32_t used;
};

struct nvmefs_tb {
    struct nvmefs_tb_formats f;
    size_t nvme_need, block_need; /* a record shorter than this is malformed */
    uint8_t keep[SCT_SC_MASK + 1];
    uint8_t watch[SCT_SC_MASK + 1];
    uint32_t log_attempts;
    struct pending *pend; /* indexed by CPU, `npend` of them */
    uint32_t npend;
    uint32_t npending; /* of them, those holding an attempt */
    struct slot *table;
    uint32_t *order; /* the used slots, in the order they were first used */
    uint32_t used;
    struct nvmefs_tb_totals totals;
    struct nvmefs_tb_like like;
    uint32_t fold;    /* a fold is set (nvmefs_tb_fold) */
    uint32_t folding; /* within a feed: it still folds (no final was handed back before) */
    struct nvmefs_tb_folded folded;
};

static uint16_t rd16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (uint16_t)p[1] << 8);
}

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd64(const uint8_t *p)
{
    return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32;
}

/* An integer field of a record already known to be long enough (see `need`). */
static int64_t get_int(const uint8_t *rec, const struct nvmefs_tb_field *f)
{
    uint64_t v = 0;

    for (uint32_t i = 0; i < f->size; i++)
        v |= (uint64_t)rec[f->offset + i] << (8 * i);
    if (f->is_signed && f->size < 8 && (v >> (8 * f->size - 1)) & 1)
        v |= ~0ULL << (8 * f->size);
    return (int64_t)v;
}

/* A string field, up to its first NUL; returns its length. */
static uint32_t get_str(const uint8_t *rec, const struct nvmefs_tb_field *f, char *dst)
{
    const uint8_t *s = rec + f->offset;
    uint32_t n = 0;

    while (n < f->size && s[n] != 0)
        n++;
    memcpy(dst, s, n);
    return n;
}

static int int_ok(const struct nvmefs_tb_field *f)
{
    return f->size >= 1 && f->size <= 8;
}

static size_t field_end(const struct nvmefs_tb_field *f)
{
    return (size_t)f->offset + f->size; /* u32 + u32: no overflow in a 64-bit size_t */
}

static size_t max_end(const struct nvmefs_tb_field *const *fs, size_t n)
{
    size_t need = 2; /* common_type */

    for (size_t i = 0; i < n; i++)
        if (field_end(fs[i]) > need)
            need = field_end(fs[i]);
    return need;
}

/* A consumer for these formats; NULL with errno EINVAL if a field is of a size it cannot read,
 * or ENOMEM. Its policy keeps nothing until nvmefs_tb_configure(). */
struct nvmefs_tb *nvmefs_tb_new(const struct nvmefs_tb_formats *f)
{
    const struct nvmefs_tb_field *ints[] = {&f->ctrl_id, &f->qid,    &f->cid,       &f->retries,
                                            &f->flags,   &f->status, &f->dev,       &f->sector,
                                            &f->nr_sector, &f->error};
    const struct nvmefs_tb_field *nvme[] = {&f->disk, &f->ctrl_id, &f->qid,   &f->cid,
                                            &f->retries, &f->flags, &f->status};
    const struct nvmefs_tb_field *block[] = {&f->dev, &f->sector, &f->nr_sector, &f->error,
                                             &f->rwbs};
    struct nvmefs_tb *c;

    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++)
        if (!int_ok(ints[i])) {
            errno = EINVAL;
            return NULL;
        }
    if (f->disk.size < 1 || f->disk.size > NVMEFS_TB_DISK_MAX || f->rwbs.size < 1 ||
        f->rwbs.size > NVMEFS_TB_RWBS_MAX) {
        errno = EINVAL;
        return NULL;
    }
    c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->f = *f;
    c->nvme_need = max_end(nvme, sizeof(nvme) / sizeof(nvme[0]));
    c->block_need = max_end(block, sizeof(block) / sizeof(block[0]));
    /* calloc: the kernel hands out pages only as they are touched, and a storm touches few. */
    c->table = calloc(TABLE_CAP, sizeof(*c->table));
    c->order = calloc(LOAD_MAX, sizeof(*c->order));
    if (c->table == NULL || c->order == NULL) {
        nvmefs_tb_free(c);
        errno = ENOMEM;
        return NULL;
    }
    return c;
}

void nvmefs_tb_free(struct nvmefs_tb *c)
{
    if (c == NULL)
        return;
    free(c->pend);
    free(c->table);
    free(c->order);
    free(c);
}

/* The log policy: keep[code] nonzero for the SCT/SC codes whose completions Python wants (2048
 * bytes each); with log_attempts, retried attempts too. watch[code] nonzero: a retried attempt
 * with that code goes back to Python whatever the policy (it may have been failed over to
 * another path, which Python decides). */
void nvmefs_tb_configure(struct nvmefs_tb *c, const uint8_t *keep, const uint8_t *watch,
                         uint32_t log_attempts)
{
    memcpy(c->keep, keep, sizeof(c->keep));
    memcpy(c->watch, watch, sizeof(c->watch));
    c->log_attempts = log_attempts;
}

/* Fold the finals like `like` from the next feed on (NULL: none). A feed folds nothing of a
 * page that says events were lost before it (Python logs the loss first, which ends the fold),
 * nor anything after a final it hands back. */
void nvmefs_tb_fold(struct nvmefs_tb *c, const struct nvmefs_tb_like *like)
{
    c->fold = like != NULL;
    if (like != NULL) {
        c->like = *like;
        if (c->like.disk_len > NVMEFS_TB_DISK_MAX)
            c->like.disk_len = NVMEFS_TB_DISK_MAX;
        if (c->like.rwbs_len > NVMEFS_TB_RWBS_MAX)
            c->like.rwbs_len = NVMEFS_TB_RWBS_MAX;
    }
}

/* What the fold counted since the last take; it starts again from zero. */
void nvmefs_tb_take_folded(struct nvmefs_tb *c, struct nvmefs_tb_folded *out)
{
    *out = c->folded;
    memset(&c->folded, 0, sizeof(c->folded));
}

uint32_t nvmefs_tb_pending(const struct nvmefs_tb *c)
{
    return c->npending;
}

uint32_t nvmefs_tb_used(const struct nvmefs_tb *c)
{
    return c->used;
}

static uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v;
    h *= 0x100000001b3ULL; /* FNV-1a's prime */
    return h ^ (h >> 29);
}

static void count(struct nvmefs_tb *c, uint32_t kind, uint32_t admin, int64_t ctrl_id,
                  int64_t dev, int64_t status, const char *disk, uint32_t disk_len)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    uint32_t i;

    h = mix(h, kind | (uint64_t)admin << 8 | (uint64_t)disk_len << 16);
    h = mix(h, (uint64_t)ctrl_id);
    h = mix(h, (uint64_t)dev);
    h = mix(h, (uint64_t)status);
    for (uint32_t k = 0; k < disk_len; k++)
        h = mix(h, (uint8_t)disk[k]);
    for (i = (uint32_t)(h % TABLE_CAP);; i = (i + 1) % TABLE_CAP) {
        struct slot *s = &c->table[i];
        if (!s->used)
            break;
        if (s->c.kind == kind && s->c.admin == admin && s->c.ctrl_id == ctrl_id &&
            s->c.dev == dev && s->c.status == status && s->c.disk_len == disk_len &&
            memcmp(s->c.disk, disk, disk_len) == 0) {
            s->c.n++;
            return;
        }
    }
    /* A free slot: used < LOAD_MAX < TABLE_CAP here (nvmefs_tb_feed checks before it starts). */
    memset(&c->table[i], 0, sizeof(c->table[i]));
    c->table[i].used = 1;
    c->table[i].c.kind = kind;
    c->table[i].c.admin = admin;
    c->table[i].c.ctrl_id = ctrl_id;
    c->table[i].c.dev = dev;
    c->table[i].c.status = status;
    c->table[i].c.disk_len = disk_len;
    memcpy(c->table[i].c.disk, disk, disk_len);
    c->table[i].c.n = 1;
    c->order[c->used++] = i;
}

/* Hand over the counters (`out` has room for `cap`, at least nvmefs_tb_used()) and the totals;
 * both start again from zero. Returns how many counters it wrote, or -EOVERFLOW before touching
 * anything. */
int nvmefs_tb_take(struct nvmefs_tb *c, struct nvmefs_tb_count *out, uint32_t cap,
                   struct nvmefs_tb_totals *totals)
{
    uint32_t n = c->used;

    if (cap < n)
        return -EOVERFLOW;
    for (uint32_t k = 0; k < n; k++) {
        struct slot *s = &c->table[c->order[k]];
        out[k] = s->c;
        s->used = 0; /* all of them go: no probe chain is left with a hole */
    }
    c->used = 0;
    *totals = c->totals;
    memset(&c->totals, 0, sizeof(c->totals));
    return (int)n;
}

static void put(uint32_t kind, const struct nvmefs_tb_attempt *a, const struct nvmefs_tb_block *b,
                struct nvmefs_tb_final *out, uint32_t *n)
{
    struct nvmefs_tb_final *f = &out[(*n)++];

    memset(f, 0, sizeof(*f));
    f->kind = kind;
    f->a = *a;
    if (b != NULL)
        f->b = *b;
}

/* Whether a final is like the fold's (see struct nvmefs_tb_like). */
static int like(const struct nvmefs_tb_like *l, uint32_t kind, const struct nvmefs_tb_attempt *a,
                const struct nvmefs_tb_block *b)
{
    if (l->kind != kind || l->ctrl_id != a->ctrl_id || l->status != a->status ||
        l->admin != (a->qid == 0) || l->user != ((a->flags & NVMEFS_TB_USER_CMD) != 0) ||
        l->disk_len != a->disk_len || memcmp(l->disk, a->disk, a->disk_len) != 0)
        return 0;
    if (kind != NVMEFS_TB_FINAL)
        return 1;
    return l->dev == b->dev && l->rwbs_len == b->rwbs_len &&
           memcmp(l->rwbs, b->rwbs, b->rwbs_len) == 0;
}

/* Count a like final into the fold, with its LBAs as the kernel source makes them: first
 * sector / sectors per LBA, blocks nr_sector / sectors per LBA (1 if none); none for a block
 * event without a sector (all ones: passthrough) or a disk of no known LBA size. */
static void fold_in(struct nvmefs_tb *c, const struct nvmefs_tb_block *b)
{
    struct nvmefs_tb_folded *f = &c->folded;
    uint64_t k = c->like.lba_sectors, slba, blocks, last;
    uint32_t carry;

    f->n++;
    if (b == NULL || k == 0 || (uint64_t)b->sector == UINT64_MAX)
        return;
    slba = (uint64_t)b->sector / k;
    blocks = (uint64_t)b->nr_sector / k;
    last = slba + (blocks ? blocks : 1) - 1;
    carry = last < slba;
    if (!f->has_lba || slba < f->lo)
        f->lo = slba;
    if (!f->has_lba || carry > f->hi_carry || (carry == f->hi_carry && last > f->hi)) {
        f->hi = last;
        f->hi_carry = carry;
    }
    f->has_lba = 1;
}

/* A final for Python if the policy keeps its status, unless the fold counts it. Once a final
 * went back in a feed, nothing more of that feed is folded: Python takes the fold's count
 * before the feed's finals, and the first of them may end the fold. */
static void emit(struct nvmefs_tb *c, uint32_t kind, const struct nvmefs_tb_attempt *a,
                 const struct nvmefs_tb_block *b, struct nvmefs_tb_final *out, uint32_t *n)
{
    if (!c->keep[(uint64_t)a->status & SCT_SC_MASK])
        return;
    if (c->folding && like(&c->like, kind, a, b)) {
        fold_in(c, b);
        return;
    }
    c->folding = 0;
    put(kind, a, b, out, n);
}

/* An attempt that was retried: counted; reported if its status is watched, or with
 * log_attempts if the policy keeps it. */
static void superseded(struct nvmefs_tb *c, const struct nvmefs_tb_attempt *a,
                       struct nvmefs_tb_final *out, uint32_t *n)
{
    uint64_t code = (uint64_t)a->status & SCT_SC_MASK;

    c->totals.retried++;
    if (c->watch[code] || (c->log_attempts && c->keep[code])) {
        c->folding = 0;
        put(NVMEFS_TB_RETRIED, a, NULL, out, n);
    }
}

static void record(struct nvmefs_tb *c, uint32_t cpu, const uint8_t *rec, size_t len, double now,
                   struct nvmefs_tb_final *out, uint32_t *n)
{
    const struct nvmefs_tb_formats *f = &c->f;
    struct pending *p = &c->pend[cpu];
    uint32_t type = len >= 2 ? rd16(rec) : len == 1 ? rec[0] : 0;

    if (type == f->nvme_id) {
        struct nvmefs_tb_attempt a;
        if (len < c->nvme_need) {
            c->totals.malformed++;
            return;
        }
        memset(&a, 0, sizeof(a));
        a.seen = now;
        a.cpu = cpu;
        a.disk_len = get_str(rec, &f->disk, a.disk);
        a.ctrl_id = get_int(rec, &f->ctrl_id);
        a.qid = get_int(rec, &f->qid);
        a.cid = get_int(rec, &f->cid);
        a.retries = get_int(rec, &f->retries);
        a.flags = get_int(rec, &f->flags);
        a.status = get_int(rec, &f->status);
        count(c, NVMEFS_TB_ATTEMPT, 0, a.ctrl_id, 0, a.status, a.disk, a.disk_len);
        if (p->used)
            superseded(c, &p->a, out, n); /* any later attempt on this CPU: it was retried */
        if (a.status == 0) { /* a success is final at once (seen only under log=all) */
            if (p->used) {
                p->used = 0;
                c->npending--;
            }
            emit(c, NVMEFS_TB_SUCCESS, &a, NULL, out, n);
            return;
        }
        if (a.qid == 0 || (a.flags & NVMEFS_TB_USER_CMD)) {
            /* Admin and user passthrough commands are never retried (the driver marks them
             * REQ_FAILFAST_DRIVER): final at once. Since 6.x their block event carries no
             * error, so the in-kernel filter drops it; where it comes, nothing waits for it. */
            if (p->used) {
                p->used = 0;
                c->npending--;
            }
            count(c, NVMEFS_TB_FAILED, a.qid == 0, a.ctrl_id, 0, a.status, a.disk, a.disk_len);
            emit(c, NVMEFS_TB_ALONE, &a, NULL, out, n);
            return;
        }
        if (!p->used)
            c->npending++;
        p->a = a;
        p->used = 1;
    } else if (type == f->block_id) {
        struct nvmefs_tb_block b;
        if (len < c->block_need) {
            c->totals.malformed++;
            return;
        }
        if (!p->used)
            return; /* no attempt waits on this CPU: not a request of ours to pair */
        p->used = 0;
        c->npending--;
        memset(&b, 0, sizeof(b));
        b.dev = get_int(rec, &f->dev);
        b.sector = get_int(rec, &f->sector);
        b.nr_sector = get_int(rec, &f->nr_sector);
        b.error = get_int(rec, &f->error);
        b.rwbs_len = get_str(rec, &f->rwbs, b.rwbs);
        if ((uint64_t)p->a.status & SCT_SC_MASK)
            count(c, NVMEFS_TB_FAILED, p->a.qid == 0, p->a.ctrl_id, p->a.disk_len ? 0 : b.dev,
                  p->a.status, p->a.disk, p->a.disk_len);
        emit(c, NVMEFS_TB_FINAL, &p->a, &b, out, n);
    }
}

static int ensure_cpu(struct nvmefs_tb *c, uint32_t cpu)
{
    uint32_t want = 64;
    struct pending *p;

    if (cpu < c->npend)
        return 0;
    while (want <= cpu)
        want *= 2;
    p = realloc(c->pend, (size_t)want * sizeof(*p));
    if (p == NULL)
        return -ENOMEM;
    memset(p + c->npend, 0, (size_t)(want - c->npend) * sizeof(*p));
    c->pend = p;
    c->npend = want;
    return 0;
}

/* Take one trace_pipe_raw page of `cpu` (`len` bytes, up to NVMEFS_TB_PAGE_MAX) at time `now`.
 * Writes the finals for Python (kept by the policy, or watched) to `out` (room for `cap`: at least 2 * (len / 4 + 2)) and
 * the page's lost-events word to `*lost` (0 none, -1 lost but not counted, else the count).
 * Returns the number of finals, or before touching anything: -EMSGSIZE (page too long),
 * -EINVAL (cpu), -EOVERFLOW (out too small), -ENOSPC (drain the counters first), -ENOMEM. */
int nvmefs_tb_feed(struct nvmefs_tb *c, uint32_t cpu, const char *data, size_t len, double now,
                   struct nvmefs_tb_final *out, uint32_t cap, int64_t *lost)
{
    /* `char *` in the signature: cffi passes a Python bytes object to it without a copy. */
    const uint8_t *page = (const uint8_t *)data;
    uint64_t bound = len / 4 + 2, commit, end, pos;
    uint32_t n = 0;

    *lost = 0;
    c->folding = 0;
    if (len > NVMEFS_TB_PAGE_MAX)
        return -EMSGSIZE;
    if (cpu >= NVMEFS_TB_CPU_MAX)
        return -EINVAL;
    if (cap < 2 * bound)
        return -EOVERFLOW;
    if (c->used + bound > LOAD_MAX)
        return -ENOSPC;
    if (ensure_cpu(c, cpu) < 0)
        return -ENOMEM;
    if (len < HEADER)
        return 0;
    commit = rd64(page + 8);
    end = HEADER + (commit & COMMIT_MASK);
    if (end > len)
        end = len; /* a commit beyond the page: what the page holds, no more */
    if (commit & MISSED_EVENTS) {
        *lost = -1;
        if ((commit & MISSED_STORED) && end + 8 <= len)
            *lost = (int64_t)rd64(page + end);
    }
    c->folding = c->fold && *lost == 0;
    /* Positions are 64-bit: a length word adds at most 2^32 to one below 2^17. Every record
     * starts at or before `end` <= len; its data is cut at the page's length, as parse_page
     * slices it (a record may run past `end`: the walk stops after it). */
    pos = HEADER;
    while (pos + 4 <= end) {
        uint32_t word = rd32(page + pos), type_len = word & 0x1f;
        uint64_t start, stop;

        pos += 4;
        if (type_len == TYPE_PADDING) {
            if (pos + 4 > end)
                break;
            pos += rd32(page + pos);
            continue;
        }
        if (type_len == TYPE_TIME_EXTEND || type_len == TYPE_TIME_STAMP) {
            pos += 4;
            continue;
        }
        if (type_len == 0) { /* the length word form: data length (+4) in the next u32 */
            uint32_t l;
            if (pos + 4 > end)
                break;
            l = rd32(page + pos);
            start = pos + 4;
            if (l == 0) { /* parse_page's (0 - 4 + 3) & ~3 == -4: empty, and no step */
                stop = start;
            } else {
                stop = start + (((uint64_t)l - 1) & ~3ULL);
                pos = stop;
            }
        } else {
            start = pos;
            stop = pos + (uint64_t)type_len * 4;
            pos = stop;
        }
        if (stop > len)
            stop = len;
        record(c, cpu, page + start, (size_t)(stop - start), now, out, &n);
    }
    return (int)n;
}

/* Attempts that waited `grace` seconds or more on their CPU with no block event: they were
 * retried. Written to `out` (room for `cap`, at least nvmefs_tb_pending()) when watched, or
 * with log_attempts when kept; returns how many, or -EOVERFLOW before touching anything. */
int nvmefs_tb_expire(struct nvmefs_tb *c, double now, double grace, struct nvmefs_tb_final *out,
                     uint32_t cap)
{
    uint32_t n = 0;

    if (cap < c->npending)
        return -EOVERFLOW;
    for (uint32_t cpu = 0; cpu < c->npend && c->npending; cpu++) {
        struct pending *p = &c->pend[cpu];
        if (p->used && now - p->a.seen >= grace) {
            p->used = 0;
            c->npending--;
            superseded(c, &p->a, out, &n);
        }
    }
    return (int)n;
}
