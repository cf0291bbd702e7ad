"""An error storm in the VM (issue 20): fio at QD32 whose every read fails (the 4 KiB of
nvmefs-err over its bad LBA 2048, read again and again), under the `kernel` source with the
default policy and a journal. Every failed request fio saw is counted in nvmefs_errors_total
and accounted for in the journal (its entries and what they fold, `repeats`); with a tiny
trace buffer, what the kernel dropped is said exactly and covers every request not counted."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.mounts import stats
from tests.vm.test_kernel_source import (
    err_nodes,
    errors_total,
    instances,
    kernel_dropped,
    kernel_mount,
    records,
)

BAD_OFFSET = 2048 * 512  # contrib/qemu/vm.py READ_ERROR_LBAS[0], in bytes
STORM_S = 8


def fio_storm(block: str, seconds: int = STORM_S) -> int:
    """fio's random reads at QD32 of the 4 KiB over the bad LBA, going on after each error as
    the issue's storm does; the number of requests that failed (fio's total_err)."""
    p = subprocess.run(
        ["fio", "--name=storm", f"--filename={block}", "--rw=randread", "--bs=4k",
         "--iodepth=32", "--ioengine=io_uring", "--direct=1", f"--runtime={seconds}",
         "--time_based", f"--offset={BAD_OFFSET}", "--size=4k", "--continue_on_error=all",
         "--ignore_error=61,5,84:5", "--output-format=json"],
        capture_output=True, text=True, timeout=seconds + 120,
    )  # fmt: skip
    (job,) = json.loads(p.stdout[p.stdout.index("{") :])["jobs"]
    errors = int(job["total_err"])
    assert errors > 100, (errors, p.stderr)  # a storm, not a few errors
    return errors


def test_every_failed_request_of_a_storm_is_counted_and_in_the_journal(tmp_path: Path) -> None:
    ctrl, block, disk = err_nodes()
    ctrl = ctrl.rsplit("/", 1)[1]
    journal = tmp_path / "storm.jsonl"
    with kernel_mount(tmp_path, f"journal={journal}") as mnt:  # the default policy
        failed = fio_storm(block)
        time.sleep(3)  # the last requests' block events, a housekeeping round
        counted = errors_total(mnt, ctrl)
        st = stats(mnt)
    lines = [json.loads(ln) for ln in journal.read_text().splitlines()]
    entries = [r for r in lines if r["kind"] == "nvme" and r["disk"] == disk]
    folded = sum(int(r.get("repeats") or 0) for r in entries)
    print(
        f"\nstorm: fio failed {failed} requests; nvmefs counted {counted}, journal "
        f"{len(entries)} entries + {folded} folded; lost events {st['trace_lost_events']}; "
        f"consumer {st['trace_consumer']}"
    )
    assert int(st["trace_lost_events"]) == 0, st
    assert counted == failed
    assert len(entries) + folded == failed
    assert all(r["status"] == "0x281" and r["slba"] == 2048 for r in entries), entries[:3]


def test_a_storm_through_a_tiny_buffer_says_exactly_what_it_lost(tmp_path: Path) -> None:
    ctrl, block, _ = err_nodes()
    ctrl = ctrl.rsplit("/", 1)[1]
    # A ring big enough to keep every `lost` entry.
    with kernel_mount(tmp_path, "trace_buffer_kb=4,capacity=100000") as mnt:
        (inst,) = instances()
        failed = fio_storm(block, 5)
        time.sleep(6)  # past one slow housekeeping round (the backstop for the last losses)
        dropped = kernel_dropped(inst)
        said = sum(int(str(r["lost"])) for r in records(mnt) if r["kind"] == "lost")
        counted = errors_total(mnt, ctrl)
        st = stats(mnt)
    print(f"\ntiny buffer: fio failed {failed}, counted {counted}, events lost {dropped}")
    assert dropped > 0, "the tiny buffer lost nothing: the test proves nothing"
    assert said == dropped == int(st["trace_lost_events"])
    # Each request not counted lost at least one of its events.
    assert counted <= failed and failed - counted <= dropped, (failed, counted, dropped)
