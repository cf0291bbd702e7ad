"""The kernel log's NVMe error lines: each format the kernels print, and one failure per request."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given

from nvmefs.nvme.kernlog import (
    BlockLine,
    Failure,
    NvmeLine,
    Record,
    Suppressed,
    classify,
    pair,
    parse_record,
)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        # Debian 6.1/6.12 (no CONFIG_NVME_VERBOSE_ERRORS), with DNR; note the trailing space.
        (
            "nvme0n1: I/O Cmd(0x2) @ LBA 2048, 1 blocks, I/O Error (sct 0x2 / sc 0x81) DNR ",
            NvmeLine("nvme0n1", False, 0x2, 0x4281, 2048, 1),
        ),
        # Verbose errors, as blktests nvme/039 expects them; MORE and DNR both.
        (
            "nvme1n2: Read(0x2) @ LBA 0, 8 blocks, Unrecovered Read Error (sct 0x2 / sc 0x81) "
            "MORE DNR ",
            NvmeLine("nvme1n2", False, 0x2, 0x6281, 0, 8),
        ),
        # A path disk of native multipath; a write fault without DNR.
        (
            "nvme0c1n1: I/O Cmd(0x1) @ LBA 8192, 16 blocks, I/O Error (sct 0x2 / sc 0x80) ",
            NvmeLine("nvme0c1n1", False, 0x1, 0x280, 8192, 16),
        ),
        # Admin: the controller's name, no LBA.
        (
            "nvme0: Admin Cmd(0x6), I/O Error (sct 0x0 / sc 0x2) DNR ",
            NvmeLine("nvme0", True, 0x6, 0x4002),
        ),
        # The block layer, 6.x.
        (
            "critical medium error, dev nvme0n1, sector 2048 op 0x0:(READ) flags 0x800 "
            "phys_seg 1 prio class 2",
            BlockLine("nvme0n1", 2048, 0, "READ", "MEDIUM"),
        ),
        # The block layer, 5.10: the caller first.
        (
            "blk_update_request: I/O error, dev nvme2n1, sector 16384 op 0x1:(WRITE) flags 0x0 "
            "phys_seg 1 prio class 0",
            BlockLine("nvme2n1", 16384, 1, "WRITE", "IOERR"),
        ),
        ("nvme_log_error: 7 callbacks suppressed", Suppressed("nvme_log_error", 7)),
        # Not ours: other disks, other messages.
        ("critical medium error, dev sda, sector 8 op 0x0:(READ) flags 0x0 phys_seg 1", None),
        ("Buffer I/O error on dev nvme0n1, logical block 256, async page read", None),
        ("nvme nvme0: pci function 0000:00:04.0", None),
    ],
)
def test_each_kernel_line_is_read_for_what_it_says(
    message: str, expected: NvmeLine | BlockLine | Suppressed | None
) -> None:
    assert classify(message) == expected


def test_a_kmsg_record_gives_its_number_time_and_first_line() -> None:
    raw = (
        b"3,1042,5123456,-;nvme0n1: I/O Cmd(0x2) @ LBA 2048, 1 blocks, I/O Error "
        b"(sct 0x2 / sc 0x81) DNR \n SUBSYSTEM=block\n"
    )
    message = "nvme0n1: I/O Cmd(0x2) @ LBA 2048, 1 blocks, I/O Error (sct 0x2 / sc 0x81) DNR "
    assert parse_record(raw) == Record(1042, 5123456, message)
    assert parse_record(b"garbage") is None


def _records(*messages: tuple[int, str]) -> list[Record]:
    return [Record(i + 1, usec, m) for i, (usec, m) in enumerate(messages)]


IO = "nvme0n1: I/O Cmd(0x2) @ LBA {lba}, 1 blocks, I/O Error (sct 0x2 / sc 0x81) DNR "
BLK = "critical medium error, dev nvme0n1, sector {sector} op 0x0:(READ) flags 0x0 phys_seg 1"


def test_the_two_lines_of_a_request_make_one_failure_and_lone_lines_make_their_own() -> None:
    recs = _records(
        (100, IO.format(lba=256)),
        (105, IO.format(lba=512)),  # another request's line in between
        (110, BLK.format(sector=2048)),  # LBA 256 at 4 KiB blocks
        (120, BLK.format(sector=4096)),
        (3_000_000, BLK.format(sector=8192)),  # no NVMe line (5.10)
        (3_000_010, IO.format(lba=9)),  # no block line (never printed, or suppressed)
    )
    out = list(pair(recs, lambda disk: 4096))
    assert out == [
        Failure(110, 1, "nvme0n1", opcode=2, status=0x4281, lba=256, blocks=1, sector=2048,
                op="READ", blk_status="MEDIUM"),
        Failure(120, 2, "nvme0n1", opcode=2, status=0x4281, lba=512, blocks=1, sector=4096,
                op="READ", blk_status="MEDIUM"),
        Failure(3_000_000, 5, "nvme0n1", lba=1024, sector=8192, op="READ", blk_status="MEDIUM"),
        Failure(3_000_010, 6, "nvme0n1", opcode=2, status=0x4281, lba=9, blocks=1),
    ]  # fmt: skip


@given(
    st.lists(
        st.tuples(st.sampled_from(["nvme0n1", "nvme1n1"]), st.integers(0, 1 << 20), st.booleans()),
        max_size=60,
    )
)
def test_every_request_is_one_failure_however_lines_interleave(
    requests: list[tuple[str, int, bool]],
) -> None:
    # Each request prints its NVMe line, then (if `blk`) its block line, a little later; lines
    # of requests in flight together interleave, as on several CPUs.
    lines: list[tuple[int, str]] = []
    for i, (disk, lba, blk) in enumerate(requests):
        t = i * 10
        lines.append((t, IO.replace("nvme0n1", disk).format(lba=lba)))
        if blk:
            lines.append((t + 15, BLK.replace("nvme0n1", disk).format(sector=lba * 8)))
    lines.sort(key=lambda x: x[0])
    out = list(pair(_records(*lines), lambda disk: 4096))
    assert all(isinstance(f, Failure) for f in out)
    assert len(out) == len(requests)
    got = sorted((f.name, f.lba, f.blk_status is not None) for f in out if isinstance(f, Failure))
    want = sorted((d, lba, blk) for d, lba, blk in requests)
    assert got == want
    assert all(f.status == 0x4281 for f in out if isinstance(f, Failure))
