"""`nvmefs report` on what real mounts wrote: its numbers equal a plain computation over the
same journal lines; its text fits the terminal and is coloured only on one; bad input is one
line and exit 2."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios
from pathlib import Path
from typing import Any

import pytest

from tests.mounts import (
    NVMEFS,
    daemon_pids,
    gone,
    is_mounted,
    mounted,
    run_nvmefs,
    wait_for,
    wait_static,
)

# Media errors in places a scrub of the 64 MiB simulated namespace (LBAs 0..131071) reads,
# one of them seeded-random, and a region that fails in many 4 KiB commands (DNR: no
# retries), so that the journal rotates.
PLAN = """
[[fault]]
opcode = "read"
lba = [2048, 2055]
status = 0x281

[[fault]]
opcode = "read"
lba = [40960, 40960]
status = 0x4281

[[fault]]
opcode = "read"
lba = [65536, 65543]
status = 0x281
probability = 0.5

[[fault]]
opcode = "read"
lba = [100000, 100007]
status = 0x4287

[[fault]]
opcode = "read"
lba = [120000, 120799]
status = 0x4281
"""
OPTS = (
    "workload=scrub,passes=3,interval=0,bs=4K,log=errors,retries=1,journal_size=64K,journal_keep=20"
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def journal_lines(path: Path) -> list[bytes]:
    """Every complete line of a journal and its rotated files, oldest first."""
    files = sorted(
        (p for p in path.parent.iterdir() if re.fullmatch(re.escape(path.name) + r"\.\d+", p.name)),
        key=lambda p: -int(p.name.rsplit(".", 1)[1]),
    )
    out: list[bytes] = []
    for f in [*files, path]:
        out += f.read_bytes().split(b"\n")[:-1]
    return out


def plain_rows(lines: list[bytes]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Per (ctrl, nsid, disk, status): count, first and last wall_ns, LBA range."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for line in lines:
        r = json.loads(line)
        if r["kind"] != "nvme" or not int(r["status"], 16) & 0x7FF:
            continue
        key = (r["ctrl"], r["nsid"], r["disk"], r["status"])
        row = rows.setdefault(key, {"count": 0, "times": [], "lbas": []})
        row["count"] += 1 + r.get("repeats", 0)  # a folded entry stands for 1 + repeats
        row["times"].append(r["wall_ns"])
        row["lbas"] += [r["slba"], r["slba"] + r["nlb"] - 1, *(r.get("lba_range") or [])]
    return {
        k: {
            "count": v["count"],
            "first_ns": min(v["times"]),
            "last_ns": max(v["times"]),
            "lba_min": min(v["lbas"]),
            "lba_max": max(v["lbas"]),
        }
        for k, v in rows.items()
    }


def report_rows(doc: dict[str, Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {
        (ns["ctrl"], ns["nsid"], ns["disk"], r["status"]): {
            k: r[k] for k in ("count", "first_ns", "last_ns", "lba_min", "lba_max")
        }
        for ns in doc["namespaces"]
        for r in ns["statuses"]
    }


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A journal written by a fault-plan scrub (the mount stopped cleanly), and what the
    mount's `report MOUNTPOINT --json` said while it was up."""
    if os.geteuid() != 0:
        pytest.fail("needs root: it mounts nvmefs", pytrace=False)
    tmp = tmp_path_factory.mktemp("report")
    jdir = tmp / "journal"  # root's, not writable by others: the journal's rule
    jdir.mkdir(mode=0o755)
    path = jdir / "nvmefs.jsonl"
    with mounted(tmp, f"{OPTS},journal={path}", PLAN) as mnt:
        wait_static(mnt)
        p = run_nvmefs("report", str(mnt), "--json")
        assert p.returncode == 0, p.stderr
        live = json.loads(p.stdout)
        live["ring_lines"] = (mnt / "nvme_circular_buffer.jsonl").read_bytes().split(b"\n")[:-1]
        (pid,) = daemon_pids(mnt)
        subprocess.run(["umount", str(mnt)], check=True)  # a clean stop: the journal complete
        wait_for(lambda: gone(pid), 10, "the daemon to end")
        assert not is_mounted(mnt)
    return path, live


@pytest.mark.fuse
def test_json_numbers_equal_a_plain_computation_over_the_journal(
    fault_run: tuple[Path, dict[str, Any]],
) -> None:
    path, _ = fault_run
    assert (path.parent / "nvmefs.jsonl.2").exists()  # the journal rotated: several files read
    lines = journal_lines(path)
    want = plain_rows(lines)
    assert {k[3] for k in want} == {"0x281", "0x4281", "0x4287"}
    p = run_nvmefs("report", str(path), "--json")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    doc = json.loads(p.stdout)
    assert report_rows(doc) == want
    assert doc["records"] == len(lines) and doc["bad"] == 0
    assert doc["errors"] == sum(r["count"] for r in want.values())
    assert doc["first_ns"] == min(r["first_ns"] for r in want.values())
    assert doc["last_ns"] == max(r["last_ns"] for r in want.values())
    (ns,) = doc["namespaces"]
    # Every error of a status is in its LBA map and in its errors over time.
    for r in ns["statuses"]:
        assert sum(ns["lba_map"][r["status"]]) == r["count"] == sum(ns["over_time"][r["status"]])
    # Naming a rotated file as well reads it once.
    again = run_nvmefs("report", str(path), f"{path}.1", "--json")
    assert report_rows(json.loads(again.stdout)) == want


@pytest.mark.fuse
def test_a_mountpoint_is_read_through_its_json_file_with_the_controllers_identity(
    fault_run: tuple[Path, dict[str, Any]],
) -> None:
    _, live = fault_run
    assert report_rows(live) == plain_rows(live["ring_lines"])
    (ns,) = live["namespaces"]
    assert (ns["ctrl"], ns["serial"], ns["model"]) == (
        "sim0",
        "NVMEFS-SIM-0001",
        "nvmefs simulated controller",
    )


@pytest.mark.fuse
def test_text_piped_fits_80_columns_without_escape_codes(
    fault_run: tuple[Path, dict[str, Any]],
) -> None:
    path, _ = fault_run
    p = subprocess.run(
        [*NVMEFS, "report", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},  # piped: 80 whatever the environment says
        timeout=60,
    )
    assert p.returncode == 0 and p.stderr == "", p.stderr
    print(p.stdout)
    assert "\x1b" not in p.stdout
    lines = p.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "sim0 nsid 1" in lines
    want = plain_rows(journal_lines(path))
    for (_, _, _, status), row in want.items():
        assert re.search(rf"^  {status} .* {row['count']} ", p.stdout, re.M), status
    assert "LBA map" in p.stdout and "errors over time" in p.stdout


def run_in_pty(args: list[str], columns: int) -> str:
    """What a command writes to a terminal of `columns` columns (carriage returns removed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    return out.decode().replace("\r", "")


@pytest.mark.fuse
@pytest.mark.parametrize("columns", [80, 132])
def test_text_on_a_terminal_is_coloured_and_fits_its_width(
    fault_run: tuple[Path, dict[str, Any]], columns: int
) -> None:
    path, _ = fault_run
    out = run_in_pty([*NVMEFS, "report", str(path)], columns)
    print(out)
    assert "\x1b[31m" in out and "\x1b[0m" in out
    shown = ANSI.sub("", out).splitlines()
    assert "\x1b" not in "".join(shown)
    assert max(len(line) for line in shown) <= columns
    # The charts use the width: on a wide terminal, the LBA map is wider than 80 columns.
    bars = [line for line in shown if re.fullmatch(r"  \S+ +\|.*\| +\d+", line)]
    assert bars and (max(map(len, bars)) > 80) == (columns > 80)


def write_journal(path: Path, records: list[Any], tail: bytes = b"") -> None:
    path.write_bytes(
        b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)
        + tail
    )


def rec(seq: int, wall: int, status: str = "0x281", slba: int = 8, **more: Any) -> dict[str, Any]:
    return {
        "seq": seq,
        "kind": "nvme",
        "wall_ns": wall,
        "status": status,
        "name": "Unrecovered Read Error",
        "ctrl": "nvme0",
        "nsid": 1,
        "disk": "nvme0n1",
        "slba": slba,
        "nlb": 8,
        **more,
    }


DAY = 86_400 * 10**9
T0 = 1_796_000_000 * 10**9  # 2026-11-30T00:53:20Z


def test_unreadable_lines_are_counted_and_a_line_cut_short_is_not_read(tmp_path: Path) -> None:
    j = tmp_path / "j.jsonl"
    write_journal(
        j,
        [
            rec(1, T0),
            b"not json",
            b'{"seq": 2, "kind": "nvme", "wall_ns": NaN}',
            b"x" * (200 << 10),  # longer than any line of ours: passed over, not held
            b"[1, 2]",
            b"",
            rec(2, T0 + 1, status="0x4287"),
            {"seq": 3, "kind": "notice", "message": "hello", "wall_ns": T0},
        ],
        tail=json.dumps(rec(4, T0 + 2)).encode(),  # no newline: a write cut short
    )
    p = run_nvmefs("report", str(j), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert (doc["records"], doc["errors"], doc["skipped"], doc["bad"]) == (7, 2, 1, 4)


def test_rotated_files_are_read_oldest_first_and_since_filters(tmp_path: Path) -> None:
    j = tmp_path / "j.jsonl"
    write_journal(Path(f"{j}.2"), [rec(1, T0, slba=100)])
    write_journal(Path(f"{j}.1"), [rec(2, T0 + DAY, slba=200)])
    write_journal(j, [rec(3, T0 + 3 * DAY, slba=300)])
    Path(f"{j}.x").write_text("not a rotated name\n")
    doc = json.loads(run_nvmefs("report", str(j), "--json").stdout)
    (row,) = doc["namespaces"][0]["statuses"]
    assert (row["count"], row["first_ns"], row["last_ns"]) == (3, T0, T0 + 3 * DAY)
    assert (row["lba_min"], row["lba_max"]) == (100, 307)
    assert row["rate_per_day"] == 1.0
    for since in ("2026-12-01", "2026-12-01T00:00:00Z", "2026-12-01T01:00+01:00"):
        doc = json.loads(run_nvmefs("report", str(j), "--since", since, "--json").stdout)
        (row,) = doc["namespaces"][0]["statuses"]
        assert (row["count"], row["first_ns"], doc["before_since"]) == (2, T0 + DAY, 1), since
    doc = json.loads(run_nvmefs("report", str(j), "--since", "1h", "--json").stdout)
    assert (doc["errors"], doc["before_since"]) == (0, 3)


def test_svg_option_writes_a_standalone_document(tmp_path: Path) -> None:
    j = tmp_path / "j.jsonl"
    write_journal(j, [rec(1, T0), rec(2, T0 + DAY, status="0x4287", slba=5000)])
    out = tmp_path / "errors.svg"
    p = run_nvmefs("report", str(j), "--svg", str(out))
    assert p.returncode == 0 and "nvmefs report: 2 NVMe errors on 1 namespace" in p.stdout
    text = out.read_text()
    assert (
        text.startswith("<?xml") and 'id="lba-map-1"' in text and 'id="errors-over-time-1"' in text
    )
    assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a MOUNTPOINT or JOURNAL"),
        (["sim"], "sim: a SOURCE is not read directly"),
        (["kernel:nvme0"], "kernel:nvme0: a SOURCE is not read directly"),
        (["/dev/null"], "/dev/null: a SOURCE is not read directly"),
        (["{tmp}/missing.jsonl"], "{tmp}/missing.jsonl: no such file or directory"),
        (["{tmp}"], "not an nvmefs mount (no nvme_circular_buffer.jsonl)"),
        (["{tmp}/fifo"], "not a journal file or an nvmefs mount"),
        (["{tmp}/j.jsonl", "--since", "yesterday"], "--since yesterday: expected an age"),
        (["{tmp}/j.jsonl", "--since", "\u0662\u0660\u0662\u0666-12-01"], "expected an age"),
        (["{tmp}/j.jsonl", "--svg", "{tmp}/no/such/dir.svg"], "No such file or directory"),
        (["{tmp}/j.jsonl", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    write_journal(tmp_path / "j.jsonl", [rec(1, T0)])
    os.mkfifo(tmp_path / "fifo")  # never opened: a FIFO would hang a reader
    p = run_nvmefs("report", *(a.format(tmp=tmp_path) for a in args), timeout=30)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("nvmefs: report: "), p.stderr
    assert message.format(tmp=tmp_path) in p.stderr, p.stderr


def test_folded_entries_count_as_every_error_they_stand_for(tmp_path: Path) -> None:
    """A storm's folded entries (issue 20) in a journal: the report counts 1 + repeats for
    each, in its totals, rows, LBA map and errors over time."""
    from nvmefs.nvme.status import Translator
    from nvmefs.store.events import NvmeEvent
    from nvmefs.store.render import Renderer

    st = Translator().decode(0x4281)
    wall = 1_796_213_948_000_000_000
    events = [
        NvmeEvent(st, "sim0", 1, 1, 3, 2, False, 4096, 8, 0),
        NvmeEvent(st, "sim0", 1, 1, 4, 2, False, 8192, 8, 0, repeats=4999,
                  lba_range=(8192, 60_000)),
        NvmeEvent(st, "sim0", 1, 1, 5, 2, False, 70_000, 8, 0, repeats=20,
                  lba_range=(70_000, 70_167)),
    ]  # fmt: skip
    r = Renderer()
    path = tmp_path / "j.jsonl"
    path.write_text(
        "".join(r.json_line((i + 1, i, wall + i * 10**9, e)) for i, e in enumerate(events))
    )
    p = run_nvmefs("report", str(path), "--json")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    doc = json.loads(p.stdout)
    assert (doc["records"], doc["errors"], doc["folded"]) == (3, 5022, 5019)
    (ns,) = doc["namespaces"]
    (row,) = ns["statuses"]
    assert (row["count"], row["lba_min"], row["lba_max"]) == (5022, 4096, 70_167)
    assert sum(ns["lba_map"]["0x4281"]) == sum(ns["over_time"]["0x4281"]) == 5022
    assert report_rows(doc) == plain_rows(path.read_bytes().splitlines())
    text = run_nvmefs("report", str(path)).stdout
    assert "nvmefs report: 5022 NVMe errors on 1 namespace" in text
    assert "5019 errors folded into like entries" in text
