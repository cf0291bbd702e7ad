"""tracefs material: format files, ring-buffer pages, instances in a fake tree, and guardians (on
the machine's own tracefs where there is one or root can mount one)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nvmefs.engine import kernel
from nvmefs.linux import tracefs
from nvmefs.linux.tracefs import (
    GUARD_REAP_S,
    EventFormat,
    Guardian,
    Instance,
    TraceError,
    guard_argv,
    parse_page,
    record_type,
)
from tests.linux.tracepages import BLOCK_FORMAT, NVME_FORMAT, block_record, nvme_record, page
from tests.mounts import gone


def test_formats_are_read_from_the_format_file() -> None:
    f = EventFormat.parse("nvme", "nvme_complete_rq", NVME_FORMAT)
    assert f.id == 1403
    assert (f.fields["status"].offset, f.fields["status"].size) == (66, 2)
    assert f.fields["disk"].array and not f.fields["ctrl_id"].array
    b = EventFormat.parse("block", "block_rq_complete", BLOCK_FORMAT)
    assert "cmd" in b.fields and b.fields["error"].signed
    with pytest.raises(TraceError, match="no field status"):
        EventFormat.parse("nvme", "x", BLOCK_FORMAT).require("status")


def test_a_moved_field_is_read_where_the_format_says() -> None:
    moved = NVME_FORMAT.replace("offset:66;", "offset:60;")
    f = EventFormat.parse("nvme", "nvme_complete_rq", moved)
    rec = bytearray(68)
    rec[60:62] = (0x281).to_bytes(2, "little")
    assert f.decode(rec, ("status",)) == {"status": 0x281}


def test_pages_decode_into_records_in_order() -> None:
    nvme = EventFormat.parse("nvme", "nvme_complete_rq", NVME_FORMAT)
    blk = EventFormat.parse("block", "block_rq_complete", BLOCK_FORMAT)
    big = nvme_record(0x280) + bytes(64)  # longer than 112 bytes: the length-word form
    lost, recs = parse_page(
        page(nvme_record(0x281, 5), block_record(2048, 1, -61), big, extend=True)
    )
    assert lost == 0 and [record_type(r) for r in recs] == [1403, 1064, 1403]
    assert nvme.decode(recs[0], ("status", "retries", "disk")) == {
        "status": 0x281,
        "retries": 5,
        "disk": "nvme0n1",
    }
    assert blk.decode(recs[1], ("sector", "nr_sector", "error", "rwbs")) == {
        "sector": 2048,
        "nr_sector": 1,
        "error": -61,
        "rwbs": "RS",
    }
    assert nvme.decode(recs[2], ("status",)) == {"status": 0x280}


def test_a_page_says_how_many_events_were_lost_before_it() -> None:
    assert parse_page(page(nvme_record(0x281), lost=17))[0] == 17
    assert parse_page(b"") == (0, [])


def fake_tracefs(tmp_path: Path) -> Path:
    root = tmp_path / "tracing"
    (root / "instances").mkdir(parents=True)
    return root


def test_stale_instances_of_dead_processes_are_removed(tmp_path: Path) -> None:
    root = fake_tracefs(tmp_path)
    dead = 2**22 + 12345  # above pid_max: no such process
    (root / "instances" / f"nvmefs-{dead}-1").mkdir()
    (root / "instances" / f"nvmefs-{os.getpid()}-9").mkdir()
    (root / "instances" / "someone-else").mkdir()
    assert Instance.remove_stale(root) == [f"nvmefs-{dead}-1"]
    assert sorted(p.name for p in (root / "instances").iterdir()) == [
        f"nvmefs-{os.getpid()}-9",
        "someone-else",
    ]


def test_instance_names_are_unique_per_process(tmp_path: Path) -> None:
    root = fake_tracefs(tmp_path)
    a, b = Instance(root), Instance(root)
    assert a.name != b.name and a.name.startswith(f"nvmefs-{os.getpid()}-")
    a.path.mkdir()  # what create() does first; the rest writes files of a real tracefs
    assert a.path.is_dir() and list(tracefs.instances(root)) == [a.name]
    a.remove()
    assert not a.path.exists()


# -- the guardian: an instance whose maker is killed goes at once --------------------------------

REPO = Path(__file__).resolve().parents[2]

# A maker: starts a guardian of the directory argv[1] (an Instance with one enabled event when
# argv[2] names it), says what it made, and waits to be killed.
MAKER = """
import sys, time
from pathlib import Path
from nvmefs.linux import tracefs
if len(sys.argv) > 2:
    inst = tracefs.Instance(Path(sys.argv[1]))
    inst.create(64)
    system, event, filter_ = sys.argv[2].split(":", 2)
    inst.enable(system, event, filter_)
    print(inst.path, inst.guardian.pid, flush=True)
else:
    print(sys.argv[1], tracefs.Guardian.start(Path(sys.argv[1])).pid, flush=True)
time.sleep(600)
"""


@contextmanager
def maker(*args: str) -> Iterator[tuple[subprocess.Popen[str], Path, int]]:
    """A process that made a guarded directory: (it, the directory, its guardian's pid)."""
    p = subprocess.Popen([sys.executable, "-c", MAKER, *args], stdout=subprocess.PIPE, text=True,
                         cwd=REPO)  # fmt: skip
    try:
        assert p.stdout is not None
        path, pid = p.stdout.readline().split()
        yield p, Path(path), int(pid)
    finally:
        p.kill()
        p.wait()


def wait_until(cond: Callable[[], bool], timeout: float) -> float:
    """Seconds until `cond()` held; AssertionError after `timeout`."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.01)
    return time.monotonic() - t0


@contextmanager
def real_tracefs(tmp_path: Path) -> Iterator[Path]:
    """The machine's tracefs: where it is mounted, else mounted for the test under tmp_path
    (root only; skips where that is impossible). Instances of dead makers go at the end."""
    for path in tracefs.MOUNTS:
        if (path / "instances").is_dir():
            yield path
            return
    if os.geteuid() != 0 or "tracefs" not in Path("/proc/filesystems").read_text():
        pytest.skip("tracefs is not mounted and cannot be mounted here")
    root = tmp_path / "tracing"
    root.mkdir()
    p = subprocess.run(["mount", "-t", "tracefs", "nodev", str(root)], capture_output=True,
                       text=True)  # fmt: skip
    if p.returncode != 0:
        pytest.skip(f"cannot mount tracefs: {p.stderr.strip()}")
    try:
        yield root
    finally:
        Instance.remove_stale(root)
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def test_a_killed_makers_instance_is_disabled_and_removed_at_once(tmp_path: Path) -> None:
    with real_tracefs(tmp_path) as root:
        if not (root / "events" / "block" / "block_rq_complete").is_dir():
            pytest.skip("this kernel has no block:block_rq_complete")
        # The event and filter the kernel source leaves enabled: what must not outlive it.
        with maker(str(root), f"block:block_rq_complete:{kernel.BLOCK_FILTER}") as (p, inst, g):
            enable = inst / "events" / "block" / "block_rq_complete" / "enable"
            assert enable.read_text().strip() == "1" and not gone(g)
            p.kill()
            p.wait()
            took = wait_until(lambda: not inst.exists(), 5)
            wait_until(lambda: gone(g), 5)
        print(f"instance removed {took * 1000:.0f} ms after the SIGKILL")
        assert inst.name not in list(tracefs.instances(root))


def test_a_guardian_removes_its_directory_when_its_maker_is_killed(tmp_path: Path) -> None:
    d = tmp_path / "inst"
    d.mkdir()
    with maker(str(d)) as (p, _, g):
        time.sleep(0.3)
        assert d.is_dir() and not gone(g)  # it waits as long as its maker lives
        p.kill()
        p.wait()
        wait_until(lambda: not d.exists(), 5)
        wait_until(lambda: gone(g), 5)


def test_a_released_guardian_exits_at_once(tmp_path: Path) -> None:
    d = tmp_path / "inst"
    d.mkdir()
    g = Guardian.start(d)
    d.rmdir()  # as a clean stop does before it lets the guardian go
    t0 = time.monotonic()
    g.release()
    assert g.proc.returncode == 0 and time.monotonic() - t0 < GUARD_REAP_S
    g.release()  # idempotent


def test_a_guardian_leaves_a_later_directory_of_the_same_name_alone(tmp_path: Path) -> None:
    d, later = tmp_path / "inst", tmp_path / "later"
    d.mkdir()
    later.mkdir()
    g = Guardian.start(d)
    d.rmdir()
    later.rename(d)  # the same name, another inode: as a new daemon with a reused pid
    g.release()
    assert g.proc.returncode == 0 and d.is_dir()


def test_a_guardian_holds_nothing_of_its_makers_and_is_no_mounts_daemon(tmp_path: Path) -> None:
    d = tmp_path / "inst"
    d.mkdir()
    held = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # not close-on-exec: as a lock fd
    os.set_inheritable(held, True)
    try:
        g = Guardian.start(d)
        # Looked at once it waits on its pipe: while the interpreter starts, the loader holds
        # files of its own for a moment (/etc/ld.so.cache).
        deadline = time.monotonic() + 30
        while Path(f"/proc/{g.pid}/syscall").read_text().split()[:2] != ["0", "0x0"]:
            assert time.monotonic() < deadline, "the guardian never waited on its stdin"
            time.sleep(0.01)
        fd_dir = f"/proc/{g.pid}/fd"
        fds = {int(n): os.readlink(f"{fd_dir}/{n}") for n in os.listdir(fd_dir)}
        assert sorted(fds) == [0, 1, 2] and fds[0].startswith("pipe:"), fds
        assert fds[1] == fds[2] == os.devnull
        assert os.readlink(f"/proc/{g.pid}/cwd") == "/"
        assert os.getsid(g.pid) == g.pid  # a terminal's ^C goes to the daemon, not to it
        # tests/mounts.py finds a mount's daemons with pgrep -f 'nvmefs .*MNT'.
        cmdline = Path(f"/proc/{g.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert not re.search(f"nvmefs .*{tmp_path}", cmdline), cmdline
        assert "nvmefs " not in " ".join(guard_argv(Path("/sys/kernel/tracing/instances/x"), 1))
        # Small: no site, no nvmefs import (most of what is resident is the shared interpreter).
        rss_kb = int(re.findall(r"VmRSS:\s+(\d+)", Path(f"/proc/{g.pid}/status").read_text())[0])
        assert rss_kb < 20_000, rss_kb
        g.release()
        assert g.proc.returncode == 0 and not d.exists()  # released with it there: removed
    finally:
        os.close(held)


def test_an_instance_whose_guardian_cannot_start_is_made_unguarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = fake_tracefs(tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    inst = Instance(root)
    inst.create()
    assert inst.path.is_dir() and inst.guardian is None
    assert inst.unguarded is not None and "No such file" in inst.unguarded
    (inst.path / "buffer_percent").unlink()  # what create() wrote: tracefs removes it with the dir
    inst.remove()
    assert not inst.path.exists()


def test_remove_lets_the_guardian_go(tmp_path: Path) -> None:
    inst = Instance(fake_tracefs(tmp_path))
    inst.create()
    assert inst.guardian is not None and inst.unguarded is None
    proc = inst.guardian.proc
    (inst.path / "buffer_percent").unlink()  # what create() wrote: tracefs removes it with the dir
    inst.remove()
    assert proc.returncode == 0 and inst.guardian is None and not inst.path.exists()


@pytest.mark.parametrize(
    ("text", "kb"), [("1408\n", 1408), ("7 (expanded: 1408)\n", 1408), ("8192\n", 8192)]
)
def test_an_instances_buffer_size_reads_as_the_kernel_writes_it(
    tmp_path: Path, text: str, kb: int
) -> None:
    inst = Instance(fake_tracefs(tmp_path))
    inst.path.mkdir()
    (inst.path / "buffer_size_kb").write_text(text)
    assert inst.buffer_kb() == kb


@pytest.mark.parametrize(
    ("cpus", "kernel_kb", "kb"),
    [(2, 1408, 8192), (4, 1408, 8192), (8, 1408, 4096), (16, 1408, 2048), (32, 1408, None),
     (256, 1408, None), (2, 16384, None), (1, 7, 8192)],
)  # fmt: skip
def test_the_default_buffer_holds_a_storm_within_a_bound_for_all_cpus(
    cpus: int, kernel_kb: int, kb: int | None
) -> None:
    assert kernel.default_buffer_kb(cpus, kernel_kb) == kb
