"""The trace consumers on pages the kernels users run wrote themselves (issue 20): Debian's
5.10, 6.1 and 6.12 in the test VM, recorded by contrib/qemu/capture_trace.py while it made
known requests fail (tests/linux/traces/<release>/manifest.json says which). Both consumers
read the same finals and counters from them whatever the policy, and those say exactly what
was done: every failed request once, with its status, its retries and its block event."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvmefs.linux import tracebulk
from nvmefs.linux.tracebulk import (
    FINAL,
    SUCCESS,
    USER_CMD,
    CompiledConsumer,
    Counts,
    Final,
    Like,
    PythonConsumer,
)
from nvmefs.linux.tracefs import EventFormat
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.status import SCT_SC_MASK
from tests.linux.tracepages import padding, time_extend

TRACES = Path(__file__).with_name("traces")
KERNELS = sorted(d for d in TRACES.iterdir() if (d / "manifest.json").exists())
# The kernels the test VM boots (tests/test_vm.py): a fixture of each must be here.
RELEASE_PREFIXES = ("5.10.", "6.1.", "6.12.")
POLICIES = ("media", "errors", "all", "0x281")
UNRECOVERED_READ = 0x281
IMPLS = (PythonConsumer, CompiledConsumer)
HOSTILE_CPU = 9  # a CPU no recording has: what a hostile page leaves pending stays there
LENGTH_MASK = (1 << 30) - 1  # a page's commit word: the data's length below the lost flags


def kernel_ids() -> list[Any]:
    return [pytest.param(d, id=d.name) for d in KERNELS]


class Recorded:
    """One kernel's recording: its formats, each CPU's pages in the order read, the manifest."""

    def __init__(self, d: Path) -> None:
        self.nvme = EventFormat.parse(
            "nvme", "nvme_complete_rq", (d / "nvme_complete_rq.format").read_text()
        )
        self.block = EventFormat.parse(
            "block", "block_rq_complete", (d / "block_rq_complete.format").read_text()
        )
        self.manifest = json.loads((d / "manifest.json").read_text())
        self.pages: dict[int, list[bytes]] = {}
        for f in sorted(d.glob("cpu*.pages")):
            data, pages = f.read_bytes(), []
            at = 0
            while at < len(data):
                (n,) = struct.unpack_from("<I", data, at)
                pages.append(data[at + 4 : at + 4 + n])
                at += 4 + n
            self.pages[int(f.name[3:].split(".")[0])] = pages

    def read(
        self, impl: type[tracebulk.Consumer], log: str, log_attempts: bool,
        fold: Like | None = None,
    ) -> tuple[list[Final], Counts, list[int]]:  # fmt: skip
        """Every page through a consumer of `impl` (folding the finals `fold` takes), then the
        grace period: (finals, counters, each page's lost-events word). A folded final is in
        the finals as None."""
        c = impl(self.nvme, self.block, LogPolicy(log).table, log_attempts)  # type: ignore[call-arg]
        c.fold(fold)
        finals: list[Final | None] = []
        lost = []
        for cpu, pages in sorted(self.pages.items()):
            for page in pages:
                fed = c.feed(cpu, page, 1.0)
                finals += [None] * (fed.folded.n if fed.folded else 0) + fed.finals
                lost.append(fed.lost)
        finals += c.expire(100.0)
        return finals, c.take_counts(), lost  # type: ignore[return-value]


def test_each_kernel_the_vm_boots_has_a_recording() -> None:
    names = [d.name for d in KERNELS]
    for prefix in RELEASE_PREFIXES:
        assert any(n.startswith(prefix) for n in names), (prefix, names)


@pytest.mark.usefixtures("compiled_built")
@pytest.mark.parametrize("log_attempts", [False, True])
@pytest.mark.parametrize("log", POLICIES)
@pytest.mark.parametrize("kernel", kernel_ids())
def test_both_consumers_read_the_same_from_the_kernels_pages(
    kernel: Path, log: str, log_attempts: bool
) -> None:
    rec = Recorded(kernel)
    py = rec.read(PythonConsumer, log, log_attempts)
    c = rec.read(CompiledConsumer, log, log_attempts)
    assert py == c


def like(f: Final, lba_sectors: int = 8) -> Like:
    a, b = f.attempt, f.block
    return Like(a.ctrl_id, a.disk, a.status, a.qid == 0, bool(a.flags & USER_CMD),
                None if b is None else (b.dev, b.rwbs), lba_sectors)  # fmt: skip


@pytest.mark.usefixtures("compiled_built")
@pytest.mark.parametrize("log", ["media", "all"])
@pytest.mark.parametrize("kernel", kernel_ids())
def test_both_consumers_fold_the_same_and_every_folded_final_is_one_of_those_unfolded(
    kernel: Path, log: str
) -> None:
    rec = Recorded(kernel)
    unfolded, counts, _ = rec.read(PythonConsumer, log, False)
    for f in unfolded[:12]:  # the first read of the bad LBA, and under log=all successes
        folds = like(f)
        py = rec.read(PythonConsumer, log, False, folds)
        assert py == rec.read(CompiledConsumer, log, False, folds)
        folded, c2, _ = py
        assert c2 == counts  # folding counts the same
        assert len(folded) == len(unfolded)  # one place each, folded or not, in order
        for x, y in zip(folded, unfolded, strict=True):
            assert x == y or (
                x is None and y is not None and folds.takes(y.kind, y.attempt, y.block)
            )


@pytest.mark.parametrize("kernel", kernel_ids())
def test_the_pages_say_exactly_what_was_done(kernel: Path) -> None:
    rec = Recorded(kernel)
    m = rec.manifest
    assert not any(m["lost_events"].values()), m  # a complete recording
    finals, counts, lost = rec.read(PythonConsumer, "errors", False)
    assert not any(lost) and counts.malformed == 0
    ctrl, disk, tries = m["ctrl_id"], m["disk"], 1 + m["max_retries"]
    assert (m["ok_reads"], m["bad_reads"], m["bad_writes"]) == (8, 3, 2), m

    # Every attempt: the reads retried max_retries times, the passthrough read never.
    pt = m["passthrough_read_status"] & SCT_SC_MASK
    assert pt == UNRECOVERED_READ, m
    by_code = Counter[tuple[str, int]]()
    for (c, d, word), n in counts.attempts.items():
        if c == ctrl:
            by_code[(d, word & SCT_SC_MASK)] += n
    assert by_code[(disk, UNRECOVERED_READ)] == m["bad_reads"] * tries + 1, by_code
    assert by_code[(disk, 0)] >= m["ok_reads"], by_code
    writes = {code: n for (d, code), n in by_code.items() if d == disk and code not in (0, pt)}
    assert len(writes) == 1, by_code  # the write errors' status, whatever QEMU makes of EIO
    ((write_code, write_attempts),) = writes.items()
    assert write_attempts == m["bad_writes"] * tries, by_code

    # Every failed request once: the block layer's, the passthrough read, the admin command.
    failed = Counter[tuple[str, bool, int]]()
    for (c, d, _dev, admin, word), n in counts.failed.items():
        if c == ctrl:
            failed[(d, admin, word & SCT_SC_MASK)] += n
    admin_code = m["admin_status"] & SCT_SC_MASK
    assert admin_code != 0, m
    assert failed == {
        (disk, False, UNRECOVERED_READ): m["bad_reads"] + 1,
        (disk, False, write_code): m["bad_writes"],
        ("", True, admin_code): 1,
    }, failed

    # log=errors: one final each, the block requests with their block event at the bad LBA.
    mine = [f for f in finals if f.attempt.ctrl_id == ctrl]
    assert all(f.kind == FINAL for f in mine), mine
    sectors_per_lba = m["lba_size"] // 512
    reads = [f for f in mine if f.block is not None and f.block.rwbs.startswith("R")]
    writes_ = [f for f in mine if f.block is not None and f.block.rwbs.startswith("W")]
    alone = [f for f in mine if f.block is None]
    assert len(reads) == m["bad_reads"] and len(writes_) == m["bad_writes"], mine
    assert all(f.block is not None and f.block.sector == 2048 * sectors_per_lba for f in reads)
    assert all(f.block is not None and f.block.sector == 8192 * sectors_per_lba for f in writes_)
    assert all(f.attempt.retries == m["max_retries"] for f in reads + writes_), mine
    assert sorted(f.attempt.status & SCT_SC_MASK for f in alone) == sorted([pt, admin_code])
    assert [f.attempt.qid == 0 for f in alone].count(True) == 1, alone

    # log=all: the successes too, each final at once.
    finals_all, _, _ = rec.read(PythonConsumer, "all", False)
    ok = [f for f in finals_all if f.kind == SUCCESS and f.attempt.disk == disk]
    assert len(ok) >= m["ok_reads"], len(ok)


def with_first(page: bytes, record: bytes) -> bytes:
    """`page` with `record` (a padding or time-extend record) before its first event, or as
    it is where there is no room."""
    (word,) = struct.unpack_from("<Q", page, 8)
    length = word & LENGTH_MASK
    if 16 + len(record) + length + 8 > len(page):
        return page
    head = page[:8] + struct.pack("<Q", word + len(record))
    return (head + record + page[16:])[: len(page)]


@pytest.mark.usefixtures("compiled_built")
@pytest.mark.parametrize("record", [time_extend(), padding(3)], ids=["time-extend", "padding"])
@pytest.mark.parametrize("kernel", kernel_ids())
def test_padding_and_time_extends_in_the_kernels_pages_change_nothing(
    kernel: Path, record: bytes
) -> None:
    clean = Recorded(kernel).read(PythonConsumer, "errors", True)
    rec = Recorded(kernel)
    rec.pages = {cpu: [with_first(p, record) for p in pages] for cpu, pages in rec.pages.items()}
    assert rec.pages != Recorded(kernel).pages  # some page had room: the test inserted some
    for impl in IMPLS:
        assert rec.read(impl, "errors", True) == clean


def plus(a: Counts, b: Counts) -> Counts:
    return Counts(
        a.attempts + b.attempts,
        a.failed + b.failed,
        a.retried + b.retried,
        a.malformed + b.malformed,
        a.lost_pages + b.lost_pages,
        a.lost_events + b.lost_events,
    )


@st.composite
def hostile(draw: st.DrawFn) -> tuple[Path, bytes]:
    """A kernel's recording and one of its pages made hostile: cut short, bytes changed, or
    a commit length beyond the page."""
    kernel = draw(st.sampled_from(KERNELS))
    pages = [p for ps in Recorded(kernel).pages.values() for p in ps]
    page = bytearray(draw(st.sampled_from(pages)))
    how = draw(st.sampled_from(["truncate", "bytes", "commit"]))
    if how == "truncate":
        return kernel, bytes(page[: draw(st.integers(0, len(page)))])
    if how == "bytes":
        for _ in range(draw(st.integers(1, 20))):
            page[draw(st.integers(0, len(page) - 1))] = draw(st.integers(0, 255))
        return kernel, bytes(page)
    struct.pack_into("<Q", page, 8, draw(st.integers(len(page) - 16, 2**64 - 1)))
    return kernel, bytes(page)


@pytest.mark.usefixtures("compiled_built")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile())
def test_a_hostile_page_miscounts_nothing_of_the_others(case: tuple[Path, bytes]) -> None:
    """Whatever one CPU's hostile page holds, the kernel's own pages on the other CPUs count
    exactly as without it: the counters are the hostile page's plus the recording's."""
    kernel, page = case
    rec = Recorded(kernel)
    for impl in IMPLS:
        alone = impl(rec.nvme, rec.block, LogPolicy("errors").table, True)
        alone.feed(HOSTILE_CPU, page, 1.0)
        alone.expire(100.0)
        mixed = impl(rec.nvme, rec.block, LogPolicy("errors").table, True)
        mixed.feed(HOSTILE_CPU, page, 1.0)
        for cpu, pages in sorted(rec.pages.items()):
            for p in pages:
                mixed.feed(cpu, p, 1.0)
        mixed.expire(100.0)
        clean = rec.read(impl, "errors", True)[1]
        assert mixed.take_counts() == plus(alone.take_counts(), clean)
