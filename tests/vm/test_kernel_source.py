"""The `kernel` source in the VM: other processes' NVMe errors, from the guest's tracepoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.mounts import BUF, cleanup, daemon_pids, gone, is_mounted, stats, wait_for
from tests.vm.guest import controller, dmesg, qmp

NVMEFS = [sys.executable, "-m", "nvmefs"]
TRACING = Path("/sys/kernel/tracing")
JSONL = BUF + ".jsonl"


def err_nodes() -> tuple[str, str, str]:
    """(controller node, block node, disk name) of the controller with injected errors."""
    ctrl = controller("nvmefs-err")
    block = ctrl.namespaces[0].block
    return ctrl.node, block, block.rsplit("/", 1)[1]


def instances() -> list[str]:
    return sorted(p.name for p in (TRACING / "instances").glob("nvmefs-*"))


def guardians(pid: int) -> list[int]:
    """The guardians of daemon `pid`'s instance: its children whose argv names that instance."""
    (inst,) = [i for i in instances() if i.startswith(f"nvmefs-{pid}-")]
    children = [c for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]  # fmt: skip
    return [int(c) for c in children
            if f"/instances/{inst}\0" in Path(f"/proc/{c}/cmdline").read_text()]  # fmt: skip


def guardian(pid: int) -> int:
    (g,) = guardians(pid)
    return g


@contextmanager
def kernel_mount(tmp_path: Path, opts: str = "log=errors", name: str = "k") -> Iterator[Path]:
    mnt = tmp_path / name
    mnt.mkdir()
    if "backfill=" not in opts:  # the tests count their own errors; backfill has tests of its own
        opts += ",backfill=off"
    p = subprocess.run([*NVMEFS, "kernel", str(mnt), "-o", opts], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    try:
        yield mnt
    finally:
        # As a user ends it: umount, and the daemon removes its instance on its way out.
        if daemon_pids(mnt):
            subprocess.run(["umount", str(mnt)], capture_output=True)
            wait_for(lambda: not daemon_pids(mnt), 10, "the daemon to exit")
        cleanup(mnt)


def records(mnt: Path) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in (mnt / JSONL).read_text().splitlines()]


def nvme_records(mnt: Path) -> list[dict[str, object]]:
    return [r for r in records(mnt) if r["kind"] == "nvme"]


def dd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dd", *args, "status=none"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def read_lba(block: str, lba: int) -> None:
    p = dd(f"if={block}", "of=/dev/null", "bs=512", f"skip={lba}", "count=1", "iflag=direct")
    assert p.returncode != 0 and "No data available" in p.stderr, p.stderr


def test_other_processes_errors_one_entry_per_failed_request(tmp_path: Path) -> None:
    ctrl, block, disk = err_nodes()
    with kernel_mount(tmp_path) as mnt:
        for _ in range(3):
            read_lba(block, 2048)
        wait_for(lambda: len(nvme_records(mnt)) >= 3, 10, "three entries")
        time.sleep(1.5)  # anything more would have arrived by now
        recs = nvme_records(mnt)
        # Six attempts each (the kernel retried five times), one entry each: as the patch.
        assert [(r["status"], r["slba"], r["nlb"], r["retries"], r["op"]) for r in recs] == [
            ("0x281", 2048, 1, 5, "read")
        ] * 3
        assert {(r["ctrl"], r["disk"], r["nsid"]) for r in recs} == {(ctrl[5:], disk, 1)}

        p = dd("if=/dev/zero", f"of={block}", "bs=512", "seek=8192", "count=1", "oflag=direct")
        assert p.returncode != 0
        wait_for(lambda: any(r["status"] == "0x280" for r in nvme_records(mnt)), 10, "0x280")
        (w,) = [r for r in nvme_records(mnt) if r["status"] == "0x280"]
        assert (w["slba"], w["op"], w["retries"], w["name"]) == (8192, "write", 5, "Write Fault")

        # Each entry decodes as `nvmefs decode` decodes its status.
        for r in nvme_records(mnt):
            out = subprocess.run([*NVMEFS, "decode", str(r["status"])], capture_output=True)
            d = json.loads(out.stdout)
            for key in ("status", "sct", "sc", "crd", "more", "dnr", "name", "blk_status"):
                assert r[key] == d[key], (key, r, d)


def test_a_buffered_read_gives_an_entry_per_block_error_the_kernel_reports(
    tmp_path: Path,
) -> None:
    _, block, disk = err_nodes()
    with kernel_mount(tmp_path, "log=media") as mnt:
        subprocess.run(["blockdev", "--flushbufs", block], check=True)
        before = dmesg().count(f"critical medium error, dev {disk}, sector 2048")
        p = dd(f"if={block}", "of=/dev/null", "bs=4096", "skip=256", "count=1")
        assert p.returncode != 0
        time.sleep(2)
        reported = dmesg().count(f"critical medium error, dev {disk}, sector 2048") - before
        recs = [r for r in nvme_records(mnt) if r["slba"] == 2048]
        assert reported >= 1 and len(recs) == reported, (reported, recs)


def test_passthrough_and_admin_errors_are_marked(tmp_path: Path) -> None:
    ctrl, block, _ = err_nodes()
    with kernel_mount(tmp_path) as mnt:
        p = subprocess.run(
            ["nvme", "read", block, "-s", "2048", "-c", "0", "-z", "512"],
            capture_output=True,
            text=True,
        )
        assert "0x281" in p.stdout + p.stderr
        wait_for(lambda: any(r["op"] == "passthrough" for r in nvme_records(mnt)), 10, "pt")
        p = subprocess.run(
            ["nvme", "get-log", ctrl, "--log-id=0xc0", "--log-len=512"],
            capture_output=True,
            text=True,
        )
        assert "0x4002" in p.stdout + p.stderr
        wait_for(lambda: any(r["op"] == "admin" for r in nvme_records(mnt)), 10, "admin")
        recs = nvme_records(mnt)
        (pt,) = [r for r in recs if r["op"] == "passthrough"]
        assert (pt["status"], pt["retries"], pt["qid"] != 0) == ("0x281", 0, True)
        (adm,) = [r for r in recs if r["op"] == "admin"]
        assert (adm["status"], adm["qid"], adm["ctrl"]) == ("0x4002", 0, ctrl[5:])


def test_tail_f_and_watch_see_an_error_within_2_s(tmp_path: Path) -> None:
    _, block, _ = err_nodes()
    watch = subprocess.Popen(
        [*NVMEFS, "watch", "kernel", "-o", "format=json,clock=realtime"],
        stdout=subprocess.PIPE,
        text=True,
    )
    with kernel_mount(tmp_path, "log=media,clock=realtime") as mnt:
        tail = subprocess.Popen(["tail", "-f", str(mnt / BUF)], stdout=subprocess.PIPE, text=True)
        got: list[tuple[float, str]] = []

        def collect() -> None:
            assert tail.stdout is not None
            for line in iter(tail.stdout.readline, ""):
                got.append((time.time(), line))

        threading.Thread(target=collect, daemon=True).start()
        time.sleep(2)  # tail and watch are up
        t0 = time.time()
        read_lba(block, 40960)
        wait_for(lambda: any("slba=40960" in ln for _, ln in got), 10, "tail -f to show it")
        seen = next(t for t, ln in got if "slba=40960" in ln)
        assert seen - t0 < 2.0
        tail.terminate()
    watch.send_signal(signal.SIGTERM)
    out, _ = watch.communicate(timeout=20)
    assert watch.returncode == 0
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert any(r.get("slba") == 40960 and r["status"] == "0x281" for r in lines), out[-2000:]


def test_two_mounts_both_see_every_error_and_leave_no_instance(tmp_path: Path) -> None:
    _, block, _ = err_nodes()
    with kernel_mount(tmp_path, name="a") as a, kernel_mount(tmp_path, name="b") as b:
        assert len(instances()) == 2
        read_lba(block, 2048)
        for m in (a, b):
            wait_for(lambda m=m: len(nvme_records(m)) == 1, 10, "the entry in both")  # type: ignore[misc]
        (pid_a,) = daemon_pids(a)
        guards = [guardian(pid_a)]
        # SIGKILL one with its guardian (a cgroup killed whole): its instance stays behind
        # until the next start removes it.
        (pid,) = daemon_pids(b)
        killed = [i for i in instances() if i.startswith(f"nvmefs-{pid}-")]
        os.kill(guardian(pid), signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not daemon_pids(b), 10, "the daemon to die")
        cleanup(b)
        assert killed and killed[0] in instances()
        with kernel_mount(tmp_path, name="c") as c:
            assert killed[0] not in instances() and len(instances()) == 2
            text = (c / BUF).read_text()
            assert f"removed stale instances {killed[0]}" in text
            (pid_c,) = daemon_pids(c)
            guards.append(guardian(pid_c))
    assert instances() == [] and not is_mounted(a)
    # A clean stop lets its guardian go.
    wait_for(lambda: all(gone(g) for g in guards), 5, "the guardians to exit")


def test_a_killed_daemons_instance_goes_within_seconds(tmp_path: Path) -> None:
    with kernel_mount(tmp_path) as mnt:
        (pid,) = daemon_pids(mnt)  # its guardian is not taken for a second daemon
        (inst,) = instances()
        guards = guardians(pid)
        for g in guards:  # it holds neither the FUSE device, nor the mount, nor a trace pipe
            held = [os.readlink(f"/proc/{g}/fd/{n}") for n in os.listdir(f"/proc/{g}/fd")]
            assert len(held) == 3 and not any(
                "fuse" in f or str(mnt) in f or "tracing" in f for f in held
            ), held
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        wait_for(lambda: inst not in instances(), 5, "the instance to go")
        took = time.monotonic() - t0
        assert len(guards) == 1
        wait_for(lambda: gone(guards[0]), 5, "the guardian to exit")
        wait_for(lambda: not daemon_pids(mnt), 10, "the daemon to die")
    print(f"the killed daemon's instance went in {took:.2f} s")
    assert instances() == []


def samples(mnt: Path, ctrl: str) -> list[str]:
    """nvmefs_errors_total's samples of controller `ctrl`."""
    return [ln for ln in (mnt / "nvmefs.prom").read_text().splitlines()
            if ln.startswith("nvmefs_errors_total{") and f'ctrl="{ctrl}"' in ln]  # fmt: skip


def errors_total(mnt: Path, ctrl: str) -> int:
    """nvmefs_errors_total of controller `ctrl` (every failed request, logged or not)."""
    return sum(int(float(ln.rsplit(" ", 1)[1])) for ln in samples(mnt, ctrl))


def kernel_dropped(inst: str) -> int:
    """What the kernel's buffers of instance `inst` dropped (overrun and dropped events)."""
    n = 0
    for cpu_dir in (TRACING / "instances" / inst / "per_cpu").glob("cpu*"):
        for line in (cpu_dir / "stats").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("overrun", "dropped events"):
                n += int(value)
    return n


def test_lost_events_are_counted_exactly(tmp_path: Path) -> None:
    block = controller("nvmefs-slow").namespaces[0].block  # no injected errors: fio runs clean
    # A ring big enough to keep every entry of the flood, so that no `lost` entry is dropped.
    with kernel_mount(tmp_path, "log=all,trace_buffer_kb=4,capacity=100000") as mnt:
        (inst,) = instances()
        # One read at a time (some thousands a second under TCG: far more events than 4 KiB
        # take in the daemon's half second between reads). Not 32: QEMU 7.2's controller stops
        # completing a 5.10 guest's commands under many clean reads in flight (tests/test_vm.py).
        fio = subprocess.run(
            ["fio", "--name=lose", f"--filename={block}", "--rw=randread", "--bs=4k",
             "--direct=1", "--ioengine=psync", "--runtime=4", "--time_based", "--size=16M",
             "--output-format=terse"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert fio.returncode == 0, fio.stderr
        time.sleep(6)  # past one slow housekeeping round (the backstop for the last losses)
        lost_entries = [r for r in records(mnt) if r["kind"] == "lost"]
        counted = kernel_dropped(inst)
        assert counted > 0, "the tiny buffer lost nothing: the test proves nothing"
        assert sum(int(r["lost"]) for r in lost_entries) == counted  # type: ignore[call-overload]
        assert int(stats(mnt)["completions"]) > 0


def test_refusals_one_line_exit_2_nothing_left(tmp_path: Path) -> None:
    mnt = tmp_path / "r"
    mnt.mkdir()
    for source, why in [
        ("kernel:nvme99", "no NVMe controller nvme99"),
        ("kernel:/dev/nvme99n1", "no NVMe namespace"),
        ("kernel:sda", "expected kernel, kernel:nvmeX"),
    ]:
        p = subprocess.run([*NVMEFS, source, str(mnt)], capture_output=True, text=True)
        assert p.returncode == 2 and why in p.stderr and p.stderr.count("\n") == 1, p.stderr
    p = subprocess.run([*NVMEFS, "kernel", str(mnt), "-o", "workload=scrub"], capture_output=True,
                       text=True)  # fmt: skip
    assert p.returncode == 2 and "workload must be idle" in p.stderr
    p = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *NVMEFS, "watch", "kernel"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "needs root" in p.stderr, p.stderr
    assert not is_mounted(mnt) and instances() == []


def test_an_unmounted_tracefs_is_mounted_for_the_user(tmp_path: Path) -> None:
    # In a mount namespace of its own, where unmounting tracefs only detaches it there: the
    # guest keeps the filesystem the rest of the suite uses. Unmounting it for the whole guest
    # (tearing tracefs down) once hung the guest's 6.1 kernel for good, and with it the suite.
    mnt = tmp_path / "k"
    mnt.mkdir()
    nvmefs = " ".join(NVMEFS)
    script = f"""
        set -eu
        umount /sys/kernel/debug 2>/dev/null || true  # debugfs would bring tracefs back
        umount {TRACING}
        test ! -e {TRACING}/instances
        {nvmefs} kernel {mnt} -o log=errors
        test -d {TRACING}/instances
        grep -q "through {TRACING}/instances/nvmefs-" {mnt}/{BUF}
        umount {mnt}
    """
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    wait_for(lambda: not daemon_pids(mnt), 10, "the daemon to exit")
    assert instances() == []


def test_fstab_mount_polls_the_health_of_every_controller(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"kernel {mnt} fuse.nvmefs allow_other,health_interval=1 0 0\n")
    p = subprocess.run(["mount", "-T", str(fstab), str(mnt)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    try:
        assert "watching nvme" in (mnt / BUF).read_text()
        wait_for(lambda: int(stats(mnt)["workload_polls"]) >= 10, 30, "health polls")
        assert "health polling stopped" not in (mnt / BUF).read_text()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        wait_for(lambda: not daemon_pids(mnt), 10, "the daemon to exit")
        cleanup(mnt)
    assert instances() == []


def test_a_device_source_with_kernel_adds_other_processes_errors_once(tmp_path: Path) -> None:
    ctrl = controller("nvmefs-err")
    mnt = tmp_path / "dev"
    mnt.mkdir()
    opts = "kernel,workload=scrub,passes=1,retries=0,log=errors"
    p = subprocess.run([*NVMEFS, ctrl.namespaces[0].generic, str(mnt), "-o", opts],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    try:
        wait_for(lambda: stats(mnt)["workload"] == "idle", 120, "the scrub pass")
        read_lba(ctrl.namespaces[0].block, 2048)  # another process
        wait_for(lambda: any(r["op"] == "read" for r in nvme_records(mnt)), 10, "its entry")
        time.sleep(1.5)
        recs = nvme_records(mnt)
        ours = [r["slba"] for r in recs if r["opcode"] == 2]
        theirs = [(r["slba"], r["retries"]) for r in recs if r["op"] is not None]
        assert ours == [2048, 40960]  # the scrub's own errors, once each
        assert theirs == [(2048, 5)], recs  # the other process's, from the tracepoints
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        wait_for(lambda: not daemon_pids(mnt), 10, "the daemon to exit")
        cleanup(mnt)


def test_a_device_source_without_its_generic_node_is_refused_in_one_line(tmp_path: Path) -> None:
    """Device sources use the generic node /dev/ngXnY, which kernels before 5.13 do not have:
    on 5.10 it is not there; on later kernels the test takes it away for the time of the run."""
    ns = controller("nvmefs-err").namespaces[0]
    mnt = tmp_path / "m"
    mnt.mkdir()
    node = os.stat(ns.generic) if os.path.exists(ns.generic) else None
    if node is not None:
        os.unlink(ns.generic)
    try:
        p = subprocess.run([*NVMEFS, ns.block, str(mnt)], capture_output=True, text=True)
    finally:
        if node is not None:
            os.mknod(ns.generic, node.st_mode, node.st_rdev)
    assert p.returncode == 2, p.stderr
    assert p.stderr == (
        f"nvmefs: {ns.block}: no generic node {ns.generic} (device sources need it: Linux 5.13"
        " or later; `nvmefs kernel` records this drive's errors without it)\n"
    )
    assert not is_mounted(mnt) and not any(mnt.iterdir())


def test_controllers_that_disappear_and_appear_are_logged(tmp_path: Path) -> None:
    with kernel_mount(tmp_path) as mnt:
        name = controller("nvmefs-err").name
        assert "error" not in qmp("device_del", id="hot0")
        try:
            wait_for(lambda: f"controller {name} (serial nvmefs-err) disappeared"
                     in (mnt / BUF).read_text(), 30, "the disappearance")  # fmt: skip
        finally:
            reply = qmp("device_add", driver="nvme", id="hot0", serial="nvmefs-err", drive="err",
                        bus="rp1")  # fmt: skip
            assert "error" not in reply, reply
        wait_for(lambda: "(serial nvmefs-err) appeared" in (mnt / BUF).read_text(), 30, "back")
        # The new controller's errors are recorded too, under its new name.
        read_lba(controller("nvmefs-err").namespaces[0].block, 2048)
        new = controller("nvmefs-err").name
        wait_for(lambda: any(r["ctrl"] == new for r in nvme_records(mnt)), 10, "its entry")


pytestmark = pytest.mark.vm


def test_fleet_outputs_of_the_kernel_source(tmp_path: Path) -> None:
    """Metrics name the failing drive by serial; the journal holds the entries; both survive
    the mount's end."""
    from prometheus_client.parser import text_string_to_metric_families

    ctrl, block, _ = err_nodes()
    journal, prom = tmp_path / "journal.jsonl", tmp_path / "textfile"
    prom.mkdir()
    opts = f"log=errors,health_interval=0.5,journal={journal},prom={prom},prom_interval=0.5"
    with kernel_mount(tmp_path, opts) as mnt:
        for _ in range(2):
            read_lba(block, 2048)
        wait_for(lambda: len(nvme_records(mnt)) >= 2, 10, "two entries")

        def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
            }

        def errors(text: str) -> dict[str, float]:
            return {
                dict(labels)["status"]: v
                for (name, labels), v in samples(text).items()
                if name == "nvmefs_errors_total" and dict(labels)["serial"] == "nvmefs-err"
            }

        wait_for(lambda: errors((mnt / "nvmefs.prom").read_text()) == {"0x281": 2}, 10, "metrics")
        text = (mnt / "nvmefs.prom").read_text()
        ((_, labels),) = [k for k in samples(text) if k[0] == "nvmefs_errors_total"]
        assert dict(labels)["ctrl"] == ctrl[5:] and dict(labels)["nsid"] == "1"

        def polled() -> set[str]:  # the serials of the controllers health-polled so far
            return {
                dict(labels)["serial"]
                for (name, labels) in samples((mnt / "nvmefs.prom").read_text())
                if name == "nvmefs_smart_temperature_celsius"
            }

        # Every controller is health-polled, and named by serial.
        wait_for(lambda: {"nvmefs-err", "nvmefs-slow"} <= polled(), 15, "health polls")
        wait_for(lambda: errors((prom / "nvmefs.prom").read_text()) == {"0x281": 2}, 10, "prom=")
    journaled = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [r["slba"] for r in journaled if r["kind"] == "nvme"] == [2048, 2048]
    assert [r["seq"] for r in journaled] == list(range(1, len(journaled) + 1))
    assert not (prom / "nvmefs.prom").exists()  # a clean stop takes the metrics away
