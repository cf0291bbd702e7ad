"""The storm benchmark's parsing (contrib/bench/vm_storm.py), without a VM: fio's JSON, tracefs
histograms, the journal's count of failed requests, nvmefs.prom, trace-cmd's report and stats."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from types import ModuleType

import pytest

from nvmefs.linux import tracefs
from tests import contrib

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def storm() -> ModuleType:
    return contrib.load("contrib/bench/vm_storm.py", "nvmefs_vm_storm_bench")


def test_fio_failed_requests_are_its_total_err(storm: ModuleType) -> None:
    job = {"total_err": 14745, "job_runtime": 5004, "read": {"total_ios": 14745, "iops": 0.0}}
    out = "some warning\n" + json.dumps({"jobs": [job]})
    fio = storm.parse_fio(out)
    assert (fio.failed, fio.ios, fio.runtime_s) == (14745, 14745, 5.004)


def test_a_histogram_gives_its_hits(storm: ModuleType) -> None:
    text = (
        "# event histogram\n#\n# trigger info: hist:keys=error:vals=hitcount:sort=hitcount"
        ":size=2048 if error != 0 && dev == 271581186 [active]\n#\n\n"
        "{ error: 18446744073709551555 } hitcount:      14745\n\n"
        "Totals:\n    Hits: 14745\n    Entries: 1\n    Dropped: 0\n"
    )
    assert storm.parse_hist(text) == 14745
    empty = "# event histogram\n\nTotals:\n    Hits: 0\n    Entries: 0\n    Dropped: 0\n"
    assert storm.parse_hist(empty) == 0
    assert storm.parse_hist("{ status: 641 } hitcount: 3\n{ status: 642 } hitcount: 4\n") == 7


def test_a_histogram_gives_its_hits_by_key_errnos_signed(storm: ModuleType) -> None:
    # The storm of a run whose controller stalled: medium errors, and three requests the
    # reset's cancellation failed with EIO (as the test VM's 6.12 guest printed them).
    text = (
        "# trigger info: hist:keys=error:vals=hitcount:sort=hitcount:size=2048 if error != 0"
        " && dev == 271581185 [active]\n#\n\n"
        "{ error: 18446744073709551611 } hitcount:          3\n"
        "{ error: 18446744073709551555 } hitcount:       4443\n\n"
        "Totals:\n    Hits: 4446\n    Entries: 2\n    Dropped: 0\n"
    )
    assert storm.parse_hist_keys(text) == {-errno.EIO: 3, -errno.ENODATA: 4443}
    assert storm.parse_hist_keys("{ status:        641 } hitcount:      7\n") == {641: 7}
    assert storm.parse_hist_keys("# event histogram\n\nTotals:\n    Hits: 0\n") == {}


def test_the_journal_counts_entries_and_repeats_of_the_disk_only(storm: ModuleType) -> None:
    lines = [
        json.dumps({"kind": "start", "info": "x"}),
        json.dumps({"kind": "nvme", "disk": "nvme7n1", "status": "0x281"}),
        json.dumps({"kind": "nvme", "disk": "nvme7n1", "repeats": 41}),
        json.dumps({"kind": "nvme", "disk": "nvme7n1", "origin": "kmsg"}),  # backfill
        json.dumps({"kind": "nvme", "disk": "nvme7n1", "replayed": True}),
        json.dumps({"kind": "nvme", "disk": "nvme1n1"}),
        json.dumps({"kind": "lost", "lost": 120, "cpu": 1}),
        '{"kind": "nvme", "disk": "nvme7n1"',  # cut short by a kill
    ]
    c = storm.count_journal(lines, "nvme7n1")
    assert (c.entries, c.repeats, c.accounted) == (2, 41, 43)
    assert (c.kmsg, c.lost, c.lost_entries, c.other_disks) == (1, 120, 1, {"nvme1n1": 1})


def test_the_journal_is_read_with_its_rotated_files(storm: ModuleType, tmp_path: Path) -> None:
    j = tmp_path / "j.jsonl"
    j.write_text("c\n")
    (tmp_path / "j.jsonl.2").write_text("a\n")
    (tmp_path / "j.jsonl.1").write_text("b\n")
    (tmp_path / "j.jsonl.lock").write_text("not a journal\n")
    assert list(storm.read_journal(j)) == ["c\n", "b\n", "a\n"]


def test_prom_errors_of_one_namespace(storm: ModuleType) -> None:
    text = (
        "# HELP nvmefs_errors_total Commands ...\n# TYPE nvmefs_errors_total counter\n"
        'nvmefs_errors_total{blk_status="MEDIUM",ctrl="nvme7",model="QEMU NVMe Ctrl",'
        'name="Unrecovered Read Error",nsid="1",serial="nvmefs-storm",source="kernel",'
        'status="0x281"} 58360.0\n'
        'nvmefs_errors_total{blk_status="MEDIUM",ctrl="nvme7",model="a \\"b\\"",'
        'name="x",nsid="1",serial="s",source="kernel",status="0x2281"} 2.0\n'
        'nvmefs_errors_total{blk_status="MEDIUM",ctrl="nvme0",model="m",name="x",nsid="1",'
        'serial="s",source="kernel",status="0x281"} 5.0\n'
        'nvmefs_errors_created{ctrl="nvme7",nsid="1"} 1.7e9\n'
    )
    assert storm.prom_errors(text, "nvme7", 1) == 58362
    assert storm.prom_errors(text, "nvme7", 2) == 0


def test_stats_rows(storm: ModuleType) -> None:
    st = storm.parse_stats("source kernel\npid 123\ntrace_consumer compiled\nlog media\n")
    assert st["pid"] == "123" and st["trace_consumer"] == "compiled"


def test_tracecmd_stat_sums_overrun_and_dropped_not_commit_overrun(storm: ModuleType) -> None:
    text = (
        "cpus=2\n\nKernel buffer statistics:\n\nBuffer: storm\n\nCPU: 0\nentries: 6197\n"
        "overrun: 3\ncommit overrun: 100\nbytes: 456332\ndropped events: 4\n"
        "read events: 50848\n\nCPU: 1\nentries: 0\noverrun: 0\ncommit overrun: 0\n"
        "dropped events: 10\n"
    )
    assert tracefs.lost_events(text) == 17


def test_tracecmd_report_counts_the_disks_events(storm: ModuleType) -> None:
    lines = [
        "tc: fio-301 [001] 73.993806: nvme_complete_rq:     [FAILED TO PARSE] disk=nvme7n1 "
        "ctrl_id=7 qid=2 cid=45182 result=0 retries=5 flags=0 status=641\n",
        "tc: fio-301 [001] 73.994763: block_rq_complete:    259,2 R () 7904 + 8 [-61]\n",
        "tc: fio-301 [001] 73.994763: block_rq_complete:    259,12 R () 7904 + 8 [-61]\n",
        "tc: fio-301 [001] 73.99: nvme_complete_rq: [FAILED TO PARSE] disk=nvme7n10 status=641\n",
        "CPU:1 [120 EVENTS DROPPED]\n",
        "CPU:0 [LOST EVENTS]\n",
    ]
    c = storm.count_tracecmd_report(lines, (259, 2), "nvme7n1")
    assert (c.block, c.nvme, c.dropped, c.lost_markers) == (1, 1, 120, 1)
    assert c.per_cpu == {1: (1, 73.994763)}


def test_cpu_seconds_from_proc_stat(storm: ModuleType) -> None:
    tck = os.sysconf("SC_CLK_TCK")
    stat = f"123 (python3 -m (x)) S 1 123 123 0 -1 4194560 1 0 0 0 {tck} {2 * tck} {tck} 0 20"
    assert storm.proc_cpu_s(stat) == 4.0
    assert storm.proc_cpu_s(stat, children=False) == 3.0


def test_the_summary_names_the_first_option_sets_figures_plainly(storm: ModuleType) -> None:
    def run(variant: str, failed: int, kept: int | None, **extra: float) -> object:
        fio = storm.FioStorm(failed=failed, ios=failed, runtime_s=10.0)
        r = storm.Run(variant, fio, failed, failed * 6, kept, 0, 0.25, dict(extra))
        return r

    label = storm.nvmefs_label("trace_buffer_kb=8192")
    assert label == "nvmefs[trace_buffer_kb=8192]"
    runs = [
        run("fio", 40000, None),
        run("nvmefs", 12000, 6000, errors_total=6000),
        run("nvmefs", 10000, 6000, errors_total=7000),
        run(label, 12000, 12000, errors_total=12000),
        run("trace-cmd", 30000, 29990, total_cpu_s=3.0),
    ]
    res: dict[str, float] = {}
    storm.summarise(runs, res, ["nvmefs", label])
    assert res["vm_kernel_storm_accounted_ratio"] == (0.5 + 0.6) / 2
    assert res["vm_kernel_storm_accounted_ratio__trace_buffer_kb_8192"] == 1.0
    assert res["vm_kernel_storm_tracecmd_ratio"] == 29990 / 30000
    assert res["vm_kernel_storm_rate_vs_alone_nvmefs"] == 1100 / 4000
    assert res["vm_kernel_storm_daemon_vcpu"] == 0.25
