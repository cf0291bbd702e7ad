"""The trace page consumer: the compiled one and the Python fallback agree, on any page.

Every test that runs both implementations fails when the compiled module was not built (the
test setup builds it); the Python-only tests run everywhere."""

from __future__ import annotations

import dataclasses
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvmefs.linux import tracebulk
from nvmefs.linux.tracebulk import (
    FINAL,
    RETRIED,
    SUCCESS,
    CompiledConsumer,
    Consumer,
    Counts,
    Final,
    Folded,
    Like,
    PythonConsumer,
)
from nvmefs.linux.tracefs import EventFormat, Field, TraceError
from nvmefs.nvme.policy import LogPolicy
from tests.linux.tracepages import (
    BLOCK_FORMAT,
    NVME_FORMAT,
    block_record,
    event,
    nvme_record,
    padding,
    page,
    raw_page,
    time_extend,
    time_stamp,
)

NVME = EventFormat.parse("nvme", "nvme_complete_rq", NVME_FORMAT)
BLOCK = EventFormat.parse("block", "block_rq_complete", BLOCK_FORMAT)
MEDIA = LogPolicy("media").table
ERRORS = LogPolicy("errors").table
ALL = LogPolicy("all").table
NO_SECTOR = (1 << 64) - 1
SRC = Path(tracebulk.__file__).with_name("tracebulk.c")


needs_compiled = pytest.mark.usefixtures("compiled_built")
IMPLS = [
    pytest.param(PythonConsumer, id="python"),
    pytest.param(CompiledConsumer, id="compiled"),  # fails where it was not built
]
Make = Callable[..., Consumer]


def a_failed_read(cid: int = 100) -> list[bytes]:
    """A direct read of LBA 256 as traced: six attempts, then its block error."""
    return [*(nvme_record(0x281, n, cid=cid + n) for n in range(6)), block_record(2048, 8, -61)]


class Both:
    """The two implementations side by side: every call goes to both, and must agree."""

    def __init__(
        self,
        keep: bytes = MEDIA,
        log_attempts: bool = False,
        nvme: EventFormat = NVME,
        block: EventFormat = BLOCK,
        watch: bytes | None = None,
    ) -> None:
        self.py = PythonConsumer(nvme, block, keep, log_attempts, watch)
        self.c = CompiledConsumer(nvme, block, keep, log_attempts, watch)

    def field_by_field(self) -> Both:
        """Have the compiled one read its finals with cffi, as where the struct layout differs."""
        self.c._final = None
        return self

    def feed(self, cpu: int, pg: bytes, now: float = 1.0) -> tracebulk.Fed:
        a, b = self.py.feed(cpu, pg, now), self.c.feed(cpu, pg, now)
        assert a == b
        return a

    def expire(self, now: float, grace: float = tracebulk.GRACE_S) -> list[Final]:
        a, b = self.py.expire(now, grace), self.c.expire(now, grace)
        assert a == b and self.py.pending() == self.c.pending()
        return a

    def configure(self, keep: bytes, log_attempts: bool, watch: bytes | None = None) -> None:
        self.py.configure(keep, log_attempts, watch)
        self.c.configure(keep, log_attempts, watch)

    def counts(self) -> Counts:
        a, b = self.py.take_counts(), self.c.take_counts()
        assert a == b
        return a

    def fold(self, like: Like | None) -> None:
        self.py.fold(like)
        self.c.fold(like)


# -- behaviour, on each implementation ---------------------------------------------------------


@pytest.mark.parametrize("make", IMPLS)
def test_six_attempts_and_one_block_error_make_one_final(make: Make) -> None:
    c = make(NVME, BLOCK, MEDIA)
    fed = c.feed(0, page(*a_failed_read()), 5.0)
    (f,) = fed.finals
    assert fed.lost == 0 and f.kind == FINAL and f.block is not None
    a = f.attempt
    assert (a.status, a.retries, a.cid, a.seen) == (0x281, 5, 105, 5.0)
    assert (f.block.sector, f.block.nr_sector, f.block.error, f.block.rwbs) == (2048, 8, -61, "RS")
    counts = c.take_counts()
    assert counts.attempts == {(0, "nvme0n1", 0x281): 6} and counts.retried == 5
    assert counts.failed == {(0, "nvme0n1", 0, False, 0x281): 1}  # the request, not its attempts
    assert c.take_counts() == Counts() and c.pending() == 0


@pytest.mark.parametrize("make", IMPLS)
def test_pairing_is_per_cpu_and_across_pages(make: Make) -> None:
    c = make(NVME, BLOCK, ERRORS)
    assert c.feed(1, page(nvme_record(0x281, 5, cid=1))).finals == []
    (w,) = c.feed(0, page(nvme_record(0x280, 5, cid=2), block_record(64, 8, -61, "WS"))).finals
    assert (w.attempt.status, w.attempt.cpu, w.block and w.block.rwbs) == (0x280, 0, "WS")
    assert c.pending() == 1
    (r,) = c.feed(1, page(block_record(2048, 8, -61))).finals
    assert (r.attempt.status, r.attempt.cpu) == (0x281, 1) and c.pending() == 0


@pytest.mark.parametrize("make", IMPLS)
def test_the_policy_decides_what_comes_back_and_everything_is_counted(make: Make) -> None:
    c = make(NVME, BLOCK, MEDIA)
    admin = [nvme_record(0x4002, 0, qid=0, disk="", flags=2), block_record(0, 0, -95, "N", dev=0)]
    assert c.feed(0, page(*admin)).finals == []
    counts = c.take_counts()
    assert counts.attempts == {(0, "", 0x4002): 1}
    assert counts.failed == {(0, "", 0, True, 0x4002): 1}  # no disk, no block event: dev 0
    c.configure(ERRORS, False)
    (f,) = c.feed(0, page(*admin)).finals
    assert (f.attempt.qid, f.attempt.flags, f.block) == (0, 2, None)  # final before its block


@pytest.mark.parametrize("make", IMPLS)
def test_admin_and_passthrough_attempts_are_final_at_once_with_or_without_a_block(
    make: Make,
) -> None:
    # The driver never retries them. On 6.1 their block event follows with the error; since 6.x
    # it carries none and the in-kernel filter drops it: neither may count them twice or lose one.
    c = make(NVME, BLOCK, ERRORS)
    recs = [
        nvme_record(0x281, 0),  # a read's failed attempt, waiting on cpu 0
        nvme_record(0x281, flags=2, cid=8),  # a user passthrough read (6.1: its block follows)
        block_record(NO_SECTOR, 1, -61),
        nvme_record(0x4002, qid=0, disk="", cid=9),  # an admin command (6.12: no block event)
    ]
    finals = c.feed(0, page(*recs)).finals
    assert [(f.kind, f.attempt.status, f.attempt.cid, f.block) for f in finals] == [
        (FINAL, 0x281, 8, None),
        (FINAL, 0x4002, 9, None),
    ]
    counts = c.take_counts()
    assert counts.failed == {(0, "nvme0n1", 0, False, 0x281): 1, (0, "", 0, True, 0x4002): 1}
    assert counts.retried == 1 and c.pending() == 0  # the read was retried: the next attempt


@pytest.mark.parametrize("make", IMPLS)
def test_log_attempts_hands_back_each_retried_attempt(make: Make) -> None:
    c = make(NVME, BLOCK, MEDIA, True)
    finals = c.feed(0, page(*a_failed_read())).finals
    assert [(f.kind, f.attempt.retries) for f in finals] == [
        *((RETRIED, n) for n in range(5)),
        (FINAL, 5),
    ]


@pytest.mark.parametrize("make", IMPLS)
def test_a_watched_retried_attempt_comes_back_whatever_the_policy(make: Make) -> None:
    # Path errors (SCT 3): native multipath fails them over; the kernel source decides that.
    paths = bytes(1 if code >> 8 == 3 else 0 for code in range(2048))
    c = make(NVME, BLOCK, bytes(2048), False, paths)
    recs = [nvme_record(0x371, 0, disk="nvme0c1n1"), nvme_record(0x281, 0), nvme_record(0x281, 1)]
    (f,) = c.feed(0, page(*recs)).finals
    assert (f.kind, f.attempt.status, f.attempt.disk) == (RETRIED, 0x371, "nvme0c1n1")
    c.feed(1, page(nvme_record(0x370, 0)), now=1.0)
    assert [(f.kind, f.attempt.status) for f in c.expire(5.0)] == [(RETRIED, 0x370)]
    assert c.take_counts().retried == 3


@pytest.mark.parametrize("make", IMPLS)
def test_a_success_is_final_at_once_and_ends_the_pending_attempt(make: Make) -> None:
    c = make(NVME, BLOCK, ALL, True)
    finals = c.feed(0, page(nvme_record(0x281, 0), nvme_record(0, 0, cid=9))).finals
    assert [(f.kind, f.attempt.status, f.block) for f in finals] == [
        (RETRIED, 0x281, None),
        (SUCCESS, 0, None),
    ]
    assert c.pending() == 0 and c.take_counts().retried == 1


READ = Like(0, "nvme0n1", 0x281, False, False, (259 << 20, "RS"), 8)  # a_failed_read's request


@pytest.mark.parametrize("make", IMPLS)
def test_a_fold_counts_like_finals_with_their_lbas_until_a_final_goes_back(make: Make) -> None:
    c = make(NVME, BLOCK, ALL)
    c.fold(READ)
    storm = [r for i in range(8) for r in a_failed_read(cid=10 * i)]
    fed = c.feed(0, page(*storm))
    assert fed.finals == [] and fed.folded == Folded(8, 256, 256)  # sector 2048, 8 sectors
    # Another LBA, a passthrough one (no sector: no LBA), one of blocks beyond 64 bits.
    fed = c.feed(0, page(nvme_record(0x281, 5), block_record(4096 + 8 * 7, 16, -61),
                         nvme_record(0x281, 5), block_record(NO_SECTOR, 8, -61),
                         nvme_record(0x281, 5), block_record(NO_SECTOR - 7, 16, -61)))  # fmt: skip
    assert fed.finals == [] and fed.folded == Folded(3, 519, (NO_SECTOR - 7) // 8 + 2 - 1)
    # Where a sector is an LBA, the last LBA of the highest request may pass 64 bits.
    c.fold(dataclasses.replace(READ, lba_sectors=1))
    fed = c.feed(0, page(nvme_record(0x281, 5), block_record(NO_SECTOR - 1, 16, -61)))
    assert fed.folded == Folded(1, NO_SECTOR - 1, NO_SECTOR - 1 + 15)
    c.fold(READ)
    # An unlike final (a write) goes back, and so does every final after it in that page.
    fed = c.feed(0, page(*a_failed_read(), nvme_record(0x281, 5),
                         block_record(64, 8, -61, "WS"), *a_failed_read()))  # fmt: skip
    assert fed.folded == Folded(1, 256, 256) and [f.block.rwbs for f in fed.finals] == ["WS", "RS"]  # type: ignore[union-attr]
    # A page that says events were lost before it folds nothing; nor does an unset fold.
    assert len(c.feed(0, raw_page(b"".join(event(r) for r in a_failed_read()), lost=3)).finals) == 1
    c.fold(None)
    fed = c.feed(0, page(*a_failed_read()))
    assert fed.folded is None and len(fed.finals) == 1
    # Successes fold as successes; and counters count every attempt and request all along.
    c.fold(Like(0, "nvme0n1", 0, False, False, None))
    fed = c.feed(0, page(*(nvme_record(0, cid=i) for i in range(30))))
    assert fed.finals == [] and fed.folded == Folded(30, None, None)
    counts = c.take_counts()
    assert counts.failed == {(0, "nvme0n1", 0, False, 0x281): 8 + 3 + 1 + 3 + 2}
    assert counts.attempts[(0, "nvme0n1", 0)] == 30


@pytest.mark.parametrize("make", IMPLS)
def test_an_attempt_with_no_block_event_expires_as_retried(make: Make) -> None:
    c = make(NVME, BLOCK, MEDIA, True)
    c.feed(3, page(nvme_record(0x281, 5)), now=10.0)
    c.feed(1, page(nvme_record(0x281, 4)), now=10.2)
    assert c.expire(10.5) == [] and c.pending() == 2
    (f,) = c.expire(11.0)
    assert (f.kind, f.attempt.cpu, f.attempt.seen) == (RETRIED, 3, 10.0) and c.pending() == 1
    assert [f.attempt.cpu for f in c.expire(20.0)] == [1]
    assert c.take_counts().retried == 2
    assert c.feed(3, page(block_record(2048, 8, -61))).finals == []  # it expired: no pair


@pytest.mark.parametrize("make", IMPLS)
def test_a_page_says_how_many_events_were_lost_before_it(make: Make) -> None:
    c = make(NVME, BLOCK, MEDIA)
    assert c.feed(0, page(nvme_record(0x281), lost=17)).lost == 17
    assert c.feed(0, raw_page(b"", commit=1 << 31)).lost == -1  # lost, count not stored
    counts = c.take_counts()
    assert (counts.lost_pages, counts.lost_events) == (2, 17)


@pytest.mark.parametrize("make", IMPLS)
def test_a_record_too_short_for_its_fields_is_malformed_and_ignored(make: Make) -> None:
    c = make(NVME, BLOCK, MEDIA)
    short = nvme_record(0x281)[:40]
    fed = c.feed(0, page(nvme_record(0x281, 5), short, block_record(2048, 8, -61)))
    assert [f.attempt.retries for f in fed.finals] == [5]  # the short one superseded nothing
    assert c.take_counts().malformed == 1


@pytest.mark.parametrize("make", IMPLS)
def test_caller_errors_are_value_errors(make: Make) -> None:
    c = make(NVME, BLOCK, MEDIA)
    with pytest.raises(ValueError, match="cpu"):
        c.feed(-1, page())
    with pytest.raises(ValueError, match="cpu"):
        c.feed(tracebulk.CPU_MAX, page())
    with pytest.raises(ValueError, match="at most"):
        c.feed(0, bytes(tracebulk.PAGE_MAX + 1))
    with pytest.raises(ValueError, match="keep table"):
        c.configure(b"\1", False)
    with pytest.raises(ValueError, match="watch table"):
        c.configure(MEDIA, False, bytes(2047))


@pytest.mark.parametrize("make", IMPLS)
def test_formats_neither_could_read_are_refused(make: Make) -> None:
    wide = dict(NVME.fields, status=dataclasses.replace(NVME.fields["status"], size=16))
    with pytest.raises(TraceError, match="field status"):
        make(dataclasses.replace(NVME, fields=wide), BLOCK, MEDIA)
    long_disk = dict(NVME.fields, disk=dataclasses.replace(NVME.fields["disk"], size=65))
    with pytest.raises(TraceError, match="field disk"):
        make(dataclasses.replace(NVME, fields=long_disk), BLOCK, MEDIA)
    with pytest.raises(TraceError, match="no field dev, sector"):
        make(NVME, dataclasses.replace(BLOCK, fields={}), MEDIA)


@needs_compiled
def test_consumer_picks_the_compiled_one_when_it_is_there() -> None:
    assert tracebulk.consumer(NVME, BLOCK, MEDIA).impl == "compiled"
    assert tracebulk.consumer(NVME, BLOCK, MEDIA, compiled=False).impl == "python"


def test_without_the_module_the_python_one_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracebulk, "lib", None)
    monkeypatch.setattr(tracebulk, "_WHY_NOT", "not built")
    assert tracebulk.consumer(NVME, BLOCK, MEDIA).impl == "python"
    with pytest.raises(OSError, match="not built"):
        tracebulk.consumer(NVME, BLOCK, MEDIA, compiled=True)


@needs_compiled
def test_many_distinct_counters_are_drained_exactly() -> None:
    # More keys than the C table holds between two takes: it is drained on the way, not lost.
    both = Both(keep=bytes(2048))
    n = 0
    for first in range(0, 30000, 30):
        recs = []
        for ctrl in range(first, first + 30):
            recs += [nvme_record(0x281, ctrl=ctrl), block_record(8, 8, -61)]
        both.feed(0, page(*recs))
        n += 30
    counts = both.counts()
    assert len(counts.attempts) == n == len(counts.failed) == counts.attempts.total()


@needs_compiled
def test_a_page_longer_than_4096_bytes_is_read_whole() -> None:
    both = Both(keep=ERRORS)
    recs = [r for i in range(120) for r in a_failed_read(cid=i * 8)]
    fed = both.feed(0, page(*recs, size=tracebulk.PAGE_MAX))
    assert len(fed.finals) == 120


def test_the_c_source_compiles_without_a_warning(tmp_path: Path) -> None:
    r = subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-c", "-o", str(tmp_path / "tb.o"), SRC],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


# A fuzzer of the C consumer alone, built with AddressSanitizer and UBSan: pages of every length
# in buffers of exactly that length (an overread of one byte fails), random formats, random
# tables, drains and expiries. What Python hands in is checked above; this checks the C reads.
FUZZ = r"""
#include SRC
#include <stdio.h>
static uint64_t s = 88172645463325252ULL;
static uint64_t rnd(void) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s; }
static void field(struct nvmefs_tb_field *f, uint32_t maxsize)
{
    static const uint32_t sizes[] = {1, 2, 3, 4, 8};
    f->offset = rnd() % 130;
    f->size = maxsize ? 1 + rnd() % maxsize : sizes[rnd() % 5];
    f->is_signed = rnd() & 1;
}
int main(int argc, char **argv)
{
    static struct nvmefs_tb_final out[2 * (NVMEFS_TB_PAGE_MAX / 4 + 2)];
    static struct nvmefs_tb_count counts[LOAD_MAX];
    const uint32_t cap = sizeof(out) / sizeof(out[0]);
    struct nvmefs_tb_totals tot;
    uint8_t keep[2048], watch[2048];
    long finals = 0;
    int rounds = argc > 1 ? atoi(argv[1]) : 10;
    for (int round = 0; round < rounds; round++) {
        struct nvmefs_tb_formats f;
        memset(&f, 0, sizeof(f));
        f.nvme_id = 1403;
        f.block_id = 1064;
        field(&f.disk, 64); field(&f.ctrl_id, 0); field(&f.qid, 0); field(&f.cid, 0);
        field(&f.retries, 0); field(&f.flags, 0); field(&f.status, 0);
        field(&f.dev, 0); field(&f.sector, 0); field(&f.nr_sector, 0); field(&f.error, 0);
        field(&f.rwbs, 16);
        struct nvmefs_tb *c = nvmefs_tb_new(&f);
        if (c == NULL)
            return 2;
        for (int i = 0; i < 2048; i++) {
            keep[i] = rnd() & 1;
            watch[i] = (rnd() & 7) == 0;
        }
        nvmefs_tb_configure(c, keep, watch, rnd() & 1);
        struct nvmefs_tb_folded folded;
        struct nvmefs_tb_like like;
        memset(&like, 0, sizeof(like));
        for (int it = 0; it < 1000; it++) {
            if (it % 50 == 0) { /* a fold now and then, of any values (lengths beyond its arrays) */
                like.kind = rnd() % 4;
                like.admin = rnd() & 1;
                like.user = rnd() & 1;
                like.ctrl_id = (int64_t)(rnd() % 3);
                like.status = (int64_t)(rnd() % 4 ? 0x281 : rnd());
                like.dev = (int64_t)(rnd() % 2 ? 0 : rnd());
                like.disk_len = (uint32_t)(rnd() % 80);
                like.rwbs_len = (uint32_t)(rnd() % 20);
                like.lba_sectors = rnd() % 3 ? rnd() % 9 : rnd();
                nvmefs_tb_fold(c, rnd() % 3 ? &like : NULL);
            }
            size_t len = rnd() % 3 == 0 ? rnd() % 64 : rnd() % 8192;
            uint8_t *pg = malloc(len ? len : 1);
            int64_t lost;
            int n;
            for (size_t k = 0; k < len; k += 4) {
                uint32_t w;
                switch (rnd() % 8) {
                case 0: w = 1403; break;
                case 1: w = 1064; break;
                case 2: w = (uint32_t)(rnd() % 32) | (uint32_t)(rnd() << 5); break;
                case 3: w = (uint32_t)(rnd() % 200); break;
                default: w = (uint32_t)rnd();
                }
                memcpy(pg + k, &w, len - k < 4 ? len - k : 4);
            }
            if (len >= 16 && (rnd() & 1)) {
                uint64_t commit = (rnd() & 1) ? len - 16 + rnd() % 64 : rnd();
                memcpy(pg + 8, &commit, 8);
            }
            n = nvmefs_tb_feed(c, rnd() % 8, (const char *)pg, len, it * 0.01, out, cap, &lost);
            if (n == -ENOSPC) {
                nvmefs_tb_take(c, counts, LOAD_MAX, &tot);
                n = nvmefs_tb_feed(c, rnd() % 8, (const char *)pg, len, it * 0.01, out, cap,
                                   &lost);
            }
            free(pg);
            if (n < 0)
                return 3;
            finals += n;
            nvmefs_tb_take_folded(c, &folded);
            finals += (long)folded.n;
            if (it % 97 == 0 && nvmefs_tb_expire(c, it * 0.01, 0.5, out, cap) < 0)
                return 4;
            if (it % 300 == 0 && nvmefs_tb_take(c, counts, LOAD_MAX, &tot) < 0)
                return 5;
        }
        nvmefs_tb_free(c);
    }
    printf("ok %ld\n", finals);
    return 0;
}
"""


def test_the_c_consumer_reads_nothing_outside_its_pages_under_sanitizers(tmp_path: Path) -> None:
    src = tmp_path / "fuzz.c"
    src.write_text(FUZZ.replace("SRC", f'"{SRC}"'))
    exe = tmp_path / "fuzz"
    flags = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    built = subprocess.run(
        ["gcc", *flags, "-o", str(exe), str(src)], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr  # gcc's sanitizer runtimes come with Debian's gcc
    r = subprocess.run([str(exe), "20"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]


# -- the same finals and counters from both, on random streams ----------------------------------

STATUSES = [0, 0x281, 0x280, 0x2, 0x4002, 0x4000, 0xC281, 0x371]
DISKS = ["nvme0n1", "", "nvme1n2", "nvme0c1n1", "x" * 32]
RWBS = ["RS", "WS", "FWS", "N", "D", "RA", "RWBSFLAG"]

nvme_recs = st.builds(
    lambda status, retries, ctrl, disk, qid, cid, flags: nvme_record(
        status, retries, disk=disk, ctrl=ctrl, qid=qid, cid=cid, flags=flags
    ),
    st.one_of(st.sampled_from(STATUSES), st.integers(0, 0xFFFF)),
    st.integers(0, 255),
    st.sampled_from([0, 1, 3, -1]),
    st.sampled_from(DISKS),
    st.sampled_from([0, 1, 2]),
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, 2, 0xFF]),
)
block_recs = st.builds(
    block_record,
    st.one_of(st.just(NO_SECTOR), st.integers(0, NO_SECTOR)),
    st.integers(0, 2**32 - 1),
    st.sampled_from([-61, -5, -95, 0, 2**31 - 1]),
    st.sampled_from(RWBS),
    st.sampled_from([0, 259 << 20, (259 << 20) | 7, 0xFFFFFFFF]),
)
other_recs = st.builds(
    lambda kind, body: struct.pack("<H", kind) + body,
    st.sampled_from([0, 1, 999, 1404]),
    st.binary(max_size=120),
)
items = st.one_of(
    nvme_recs.map(event),
    nvme_recs.map(event),
    block_recs.map(event),
    other_recs.map(event),
    st.just(time_extend()),
    st.just(time_stamp()),
    st.integers(0, 6).map(padding),
)
# A CPU's stream of record chunks, cut into pages: (cpu, chunks, lost word, now step).
pages = st.tuples(
    st.integers(0, 3),
    st.lists(items, max_size=30),
    st.one_of(st.none(), st.integers(-1, 1000)),
    st.floats(0, 0.7),
)
# Folds that the random records match now and then (and the odd ones: 64-bit words, no LBA).
likes = st.builds(
    Like,
    st.sampled_from([0, 1, -1, (1 << 64) - 1]),
    st.sampled_from([*DISKS, "nvme0n\u00e9"]),
    st.one_of(st.sampled_from(STATUSES), st.integers(0, 0xFFFF)),
    st.booleans(),
    st.booleans(),
    st.one_of(
        st.none(),
        st.tuples(
            st.sampled_from([0, 259 << 20, (259 << 20) | 7, 0xFFFFFFFF]), st.sampled_from(RWBS)
        ),
    ),
    st.sampled_from([0, 1, 8, 3, 1 << 63, (1 << 64) - 1]),
)
keeps = st.one_of(
    st.sampled_from([MEDIA, ERRORS, ALL, bytes(2048)]),
    st.binary(min_size=2048, max_size=2048),
)


def fill(chunks: list[bytes], limit: int = 4096 - 16 - 8) -> Iterator[bytes]:
    """The chunks packed into pages' data, in order, none longer than `limit`."""
    data = b""
    for ch in chunks:
        if data and len(data) + len(ch) > limit:
            yield data
            data = b""
        data += ch
    yield data


@needs_compiled
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(pages, max_size=12),
    keeps,
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 11), keeps, st.booleans(), keeps), max_size=2),
    keeps,
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 11), st.one_of(st.none(), likes)), max_size=3),
)
def test_both_give_the_same_finals_and_counts_on_random_streams(
    stream: list[tuple[int, list[bytes], int | None, float]],
    keep: bytes,
    log_attempts: bool,
    changes: list[tuple[int, bytes, bool, bytes]],
    watch: bytes,
    slow: bool,
    folds: list[tuple[int, Like | None]],
) -> None:
    both = Both(keep, log_attempts, watch=watch)
    if slow:
        both.field_by_field()
    now = 0.0
    for i, (cpu, chunks, lost, step) in enumerate(stream):
        for at, k, la, w in changes:
            if at == i:
                both.configure(k, la, w)
        for at, like in folds:
            if at == i:
                both.fold(like)
        now += step
        for data in fill(chunks):
            both.feed(cpu, raw_page(data, lost=lost), now)
        if i % 3 == 2:
            both.expire(now)
        if i % 5 == 4:
            both.counts()
    both.expire(now + 10)
    both.counts()


# -- hostile pages: both agree, nothing escapes --------------------------------------------------


def a_valid_page(data: st.DrawFn) -> bytes:
    chunks = data(st.lists(items, max_size=40))
    return raw_page(b"".join(chunks)[: 4096 - 24], lost=data(st.one_of(st.none(), st.just(5))))


@st.composite
def hostile_pages(draw: st.DrawFn) -> bytes:
    base = a_valid_page(draw)
    how = draw(st.sampled_from(["truncate", "bytes", "commit", "garbage", "long"]))
    if how == "truncate":
        return base[: draw(st.integers(0, len(base)))]
    if how == "bytes":
        b = bytearray(base)
        for _ in range(draw(st.integers(1, 20))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        return bytes(b)
    if how == "commit":  # any commit word: beyond the page, lost flags, negative
        b = bytearray(base)
        struct.pack_into("<q", b, 8, draw(st.integers(-(2**63), 2**63 - 1)))
        return bytes(b[: draw(st.sampled_from([len(b), 100, 20, 16, 15]))])
    if how == "garbage":
        return draw(st.binary(max_size=5000))
    # A record whose length word runs far beyond the page, then real records behind it.
    return raw_page(struct.pack("<II", 0, draw(st.integers(0, 2**32 - 1))) + base[16:200])


@needs_compiled
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 2), hostile_pages()), min_size=1, max_size=6), keeps, keeps
)
def test_hostile_pages_neither_crash_nor_disagree(
    fed: list[tuple[int, bytes]], keep: bytes, watch: bytes
) -> None:
    both = Both(keep, log_attempts=True, watch=watch)
    both.fold(READ)  # hostile pages under a fold too
    both.feed(0, page(nvme_record(0x281, 1)))  # an attempt waits while the garbage comes
    for cpu, pg in fed:
        both.feed(cpu, pg)
        both.feed(cpu, page(*a_failed_read()))  # and the consumer still pairs afterwards
    both.expire(100.0)
    both.counts()


def moved(fmt: EventFormat, names: tuple[str, ...], data: st.DataObject) -> EventFormat:
    """`fmt` with each field in `names` moved and resized at random (within what nvmefs reads)."""
    draw = data.draw
    fields = dict(fmt.fields)
    for n in names:
        string = tracebulk.STRINGS.get(n)
        size = draw(st.integers(1, string)) if string else draw(st.sampled_from([1, 2, 3, 4, 8]))
        fields[n] = Field(n, draw(st.integers(0, 120)), size, draw(st.booleans()), bool(string))
    return dataclasses.replace(fmt, fields=fields)


@needs_compiled
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_readable_format_is_read_the_same_by_both(data: st.DataObject) -> None:
    nvme = moved(NVME, tracebulk.NVME_FIELDS, data)
    block = moved(BLOCK, tracebulk.BLOCK_FIELDS, data)
    both = Both(data.draw(keeps), data.draw(st.booleans()), nvme, block, data.draw(keeps))
    if data.draw(st.booleans()):
        both.field_by_field()
    rec = st.builds(
        lambda kind, body: struct.pack("<H", kind) + body,
        st.sampled_from([nvme.id, block.id]),
        st.binary(min_size=0, max_size=130),
    )
    for _ in range(data.draw(st.integers(1, 4))):
        chunks = data.draw(st.lists(rec.map(event), max_size=40))
        for d in fill(chunks):
            both.feed(data.draw(st.integers(0, 1)), raw_page(d))
    both.expire(100.0)
    both.counts()


# -- the kernel source logs and counts what its consumer gives -----------------------------------


def test_the_kernel_engine_logs_and_counts_what_the_consumer_gives() -> None:
    from nvmefs.engine.kernel import KernelEngine, KernelSpec
    from nvmefs.linux.devices import Disk
    from nvmefs.store.events import NvmeEvent
    from nvmefs.store.ring import EVENT, DebugRing

    disk = Disk("nvme0n1", 259 << 20, 1, 4096)
    e = KernelEngine(KernelSpec("kernel"), DebugRing(1024), policy=LogPolicy("errors"),
                     log_attempts=True, disks=lambda: {disk.name: disk})  # fmt: skip
    e.use_formats(NVME, BLOCK)
    c = PythonConsumer(NVME, BLOCK, ERRORS, True)
    pages = [
        (0, page(*a_failed_read())),
        (1, page(nvme_record(0x281, 5, cid=1))),
        (0, page(nvme_record(0x280, 0, cid=2), nvme_record(0x280, 1, cid=3))),
        (0, page(block_record(64, 8, -61, "WS"), nvme_record(0x4002, qid=0, disk=""))),
        (1, page(block_record(2048, 8, -61), block_record(2048, 8, -61))),
    ]
    finals: list[Final] = []
    for cpu, pg in pages:
        e.page(cpu, pg)
        finals += c.feed(cpu, pg).finals
    ring = [ev for x in e.ring if isinstance(ev := x[EVENT], NvmeEvent)]
    assert len(ring) == len(e.ring)
    assert [(ev.status.status, ev.cid, ev.retries) for ev in ring] == [
        (f.attempt.status, f.attempt.cid, f.attempt.retries) for f in finals
    ]
    counts = c.take_counts()
    assert e.stats.completions == counts.attempts.total()
    assert e.stats.retries == counts.retried
    assert e.stats.failed == {
        (f"nvme{ctrl}", None if admin else disk.nsid, status): n
        for (ctrl, _, _, admin, status), n in counts.failed.items()
    }
