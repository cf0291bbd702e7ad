"""The recipes in contrib/, each tried with the real tool it is for.

- contrib/systemd: `systemd-analyze verify` and `security --offline`; then each unit's command
  lines run by hand as systemd would run them (its directories made, the capability bounding
  set and no_new_privs applied with setpriv, SIGTERM to stop, ExecStartPost and ExecStopPost
  in their places), on the simulated controller where the unit says `kernel` (this machine
  may have no NVMe tracepoints); and the system calls nvmefs makes, traced with strace, checked
  against each unit's SystemCallFilter. systemd itself need not run.
- contrib/lnav: the format installed into a scratch HOME with `lnav -i`, its samples checked
  with `lnav -C`, then headless lnav queries on the files of a real mount and its journal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmefs.nvme.status import Translator
from nvmefs.outputs import syslog
from nvmefs.store import events as host
from nvmefs.store.events import HostEvent, NvmeEvent
from nvmefs.store.render import Clock, Renderer
from tests.mounts import BUF, cleanup, is_mounted, mounted, stats, wait_for, wait_static

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
KERNEL_UNIT = CONTRIB / "systemd" / "nvmefs-kernel.service"
WATCH_UNIT = CONTRIB / "systemd" / "nvmefs-watch.service"
LNAV_FORMAT = CONTRIB / "lnav" / "nvmefs.json"
RUN, STATE = "/run/", "/var/lib/"

# A media error (SCT 2) at LBA 2048, another error at 4096, and a command that never completes
# at 8192 (a timeout, then an abort: host events).
PLAN = """
[[fault]]
opcode = "read"
lba = [2048, 2055]
status = 0x281

[[fault]]
opcode = "read"
lba = [4096, 4096]
status = 0x4002

[[fault]]
opcode = "read"
lba = [8192, 8192]
hang = true
count = 1
"""
SIM = "sim_size=8M,passes=1,log=errors,retries=0,io_timeout=0.5"
# What this machine says when it has no NVMe tracepoints for the kernel source (or no tracefs).
NO_TRACEPOINTS = re.compile(
    r"no nvme:nvme_complete_rq trace event|no block:\S+ trace event|tracefs"
)
# Settings that give a service a mount namespace of its own (systemd's
# exec_needs_mount_namespace): the kernel unit's FUSE mount would be made in there, unseen.
MOUNT_NAMESPACE = (
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "PrivateNetwork",
    "PrivateIPC",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "ExecPaths",
    "NoExecPaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "RootDirectory",
    "RootImage",
    "MountFlags",
)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    kw.setdefault("timeout", 60)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


# -- systemd units ------------------------------------------------------------------------------


def settings(unit: Path) -> dict[str, list[str]]:
    """A unit file's settings: every value of each key, in order (our units use every key in one
    section only, and no line continuations)."""
    out: dict[str, list[str]] = {}
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;[":
            continue
        key, eq, value = line.partition("=")
        assert eq, f"{unit.name}: not a setting: {raw!r}"
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def command(unit: dict[str, list[str]], key: str, root: Path) -> tuple[list[str], bool]:
    """The one command line of `key` as argv (with /run and /var/lib under `root`, where the test
    makes the unit's directories), and whether systemd ignores its failure (a `-` prefix)."""
    (value,) = unit[key]
    ignore = value.startswith("-")
    argv = shlex.split(value.lstrip("-@:+!"))
    assert "$" not in value and "%" not in value, "no systemd expansions to mimic"
    for prefix in (RUN, STATE):
        argv = [arg.replace(prefix, f"{root}{prefix}") for arg in argv]
    return argv, ignore


def directories(unit: dict[str, list[str]], root: Path) -> tuple[Path, Path]:
    """The unit's RuntimeDirectory and StateDirectory under `root`, made as systemd makes them."""
    runtime = root / RUN.strip("/") / unit["RuntimeDirectory"][0]
    runtime.mkdir(parents=True, mode=int(unit["RuntimeDirectoryMode"][0], 8))
    state = root / STATE.strip("/") / unit["StateDirectory"][0]
    state.mkdir(parents=True, mode=int(unit["StateDirectoryMode"][0], 8))
    return runtime, state


def confined(unit: dict[str, list[str]]) -> list[str]:
    """setpriv with the unit's capability bounding set and no_new_privs: what systemd applies
    before it runs the command."""
    caps = ",".join(
        "+" + cap.removeprefix("CAP_").lower() for cap in unit["CapabilityBoundingSet"][0].split()
    )
    cmd = ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all"]
    if unit.get("NoNewPrivileges") == ["yes"]:
        cmd.append("--no-new-privs")
    return [*cmd, "--"]


def on_sim(argv: list[str], plan: Path) -> list[str]:
    """`argv` with the simulated controller and a fault plan where it names the kernel source."""
    i = argv.index("kernel")
    return [*argv[:i], "sim", *argv[i + 1 :], "-o", f"{SIM},faults={plan}"]


def started(main: subprocess.Popen[str], post: list[str]) -> None:
    """ExecStartPost run as systemd runs it: the start has failed if the main process ends
    before the command does (whose wait for the mount then ends too)."""
    waiter = subprocess.Popen(post, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: waiter.poll() is not None or main.poll() is not None, 15, "the start")
        if main.poll() is not None:
            raise AssertionError(f"the service ended while starting: {main.communicate()[1]}")
        assert waiter.returncode == 0
    finally:
        if waiter.poll() is None:
            waiter.kill()
        waiter.wait(timeout=15)


@pytest.fixture
def public_root() -> Iterator[Path]:
    """Where the units' /run and /var/lib go: a directory others can reach (allow_other is tried
    with a non-root reader; pytest's tmp root is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="nvmefs-units-", dir="/tmp"))
    os.chmod(root, 0o755)
    yield root
    for mnt in root.glob(f"{RUN.strip('/')}/*"):
        cleanup(mnt)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("unit", [KERNEL_UNIT, WATCH_UNIT], ids=lambda p: p.name)
def test_units_pass_systemd_analyze_verify(unit: Path) -> None:
    # verify also checks that ExecStart's /usr/local/bin/nvmefs exists (contrib/bootstrap setup)
    p = run(["systemd-analyze", "verify", str(unit)])
    said = [line for line in (p.stdout + p.stderr).splitlines() if unit.name in line]
    assert p.returncode == 0 and not said, p.stdout + p.stderr


@pytest.mark.parametrize(
    ("unit", "most"), [(KERNEL_UNIT, 5.0), (WATCH_UNIT, 3.0)], ids=["kernel", "watch"]
)
def test_units_are_hardened(unit: Path, most: float) -> None:
    p = run(
        [
            "systemd-analyze",
            "security",
            "--no-pager",
            "--offline=true",
            f"--threshold={round(most * 10)}",
            str(unit),
        ]
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    assert p.returncode == 0 and m and float(m.group(1)) <= most, p.stdout[-2000:] + p.stderr


def test_the_kernel_unit_keeps_the_machines_mount_namespace() -> None:
    unit = settings(KERNEL_UNIT)
    assert not [key for key in MOUNT_NAMESPACE if key in unit]
    # Devices: FUSE and the NVMe controllers (health polls), nothing else.
    assert unit["DevicePolicy"] == ["closed"]
    assert unit["DeviceAllow"] == ["/dev/fuse rw", "char-nvme rw"]


@pytest.mark.fuse
def test_kernel_unit_lifecycle_run_by_hand(public_root: Path) -> None:
    unit = settings(KERNEL_UNIT)
    start, _ = command(unit, "ExecStart", public_root)
    runtime, state = directories(unit, public_root)
    # The unit's own paths: the mount on its RuntimeDirectory, the journal in its StateDirectory.
    assert start[:3] == ["/usr/local/bin/nvmefs", "kernel", str(runtime)] and "-f" in start
    journal = state / "journal.jsonl"
    assert any(f"journal={journal}" in arg for arg in start)
    post, post_ignored = command(unit, "ExecStartPost", public_root)
    stop_post, stop_post_ignored = command(unit, "ExecStopPost", public_root)
    assert not post_ignored and stop_post_ignored
    plan = public_root / "plan.toml"
    plan.write_text(PLAN)
    argv = [*confined(unit), *on_sim(start, plan)]

    def service() -> subprocess.Popen[str]:
        main = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started(main, post)
        assert is_mounted(runtime)
        # The main process is nvmefs itself, in the foreground: what Type=exec supervises.
        assert stats(runtime)["pid"] == str(main.pid)
        return main

    main = service()
    try:
        wait_static(runtime)
        text = (runtime / BUF).read_text()
        assert "Status = 0x281 (Unrecovered Read Error)" in text and "nvmefs abort:" in text
        # allow_other: a reader that is not root (node_exporter, a shipper) reads the ring.
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        p = run([*nobody, "cat", str(runtime / BUF)])
        assert p.returncode == 0 and "0x281" in p.stdout, p.stderr
        wait_for(lambda: "nvmefs abort:" in journal.read_text(), 10, "the journal")

        # systemctl stop: SIGTERM; the daemon unmounts and exits 0 (no restart: not a failure).
        main.send_signal(signal.SIGTERM)
        out, err = main.communicate(timeout=15)
        assert main.returncode == 0 and out == "" and "unmounting" in err
        assert not is_mounted(runtime)
        assert run(stop_post).returncode != 0  # nothing left to unmount: ignored ("-")
        seqs = [json.loads(line)["seq"] for line in journal.read_text().splitlines()]
        assert seqs == list(range(1, len(seqs) + 1))

        # A crash (SIGKILL) leaves a dead mount; ExecStopPost takes it away, and the restart
        # (Restart=on-failure) mounts again, with the journal's entries replayed.
        main = service()
        assert "(replayed)" in (runtime / BUF).read_text()
        main.kill()
        main.communicate(timeout=15)
        assert is_mounted(runtime)
        assert run(stop_post).returncode == 0 and not is_mounted(runtime)
        main = service()
        records = [json.loads(line) for line in (runtime / f"{BUF}.jsonl").read_text().splitlines()]
        assert records[0].get("replayed") and records[-1]["seq"] > len(seqs)
        main.send_signal(signal.SIGTERM)
        main.communicate(timeout=15)
        assert main.returncode == 0 and not is_mounted(runtime)
    finally:
        if main.poll() is None:
            main.kill()
            main.communicate(timeout=15)
        cleanup(runtime)


@pytest.mark.fuse
def test_kernel_unit_command_as_written(public_root: Path) -> None:
    """The unit's ExecStart itself, `kernel` source included: it mounts where the kernel has the
    NVMe tracepoints; elsewhere it is refused for that reason alone, after its options and
    mountpoint were accepted (nvmefs checks those first)."""
    unit = settings(KERNEL_UNIT)
    start, _ = command(unit, "ExecStart", public_root)
    runtime, _ = directories(unit, public_root)
    main = subprocess.Popen(
        [*confined(unit), *start], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        try:
            main.wait(timeout=10)
        except subprocess.TimeoutExpired:  # it serves: this kernel has the NVMe tracepoints
            started(main, command(unit, "ExecStartPost", public_root)[0])
            assert is_mounted(runtime)
            main.send_signal(signal.SIGTERM)
            main.wait(timeout=15)
            assert main.returncode == 0 and not is_mounted(runtime)
        else:
            err = main.communicate(timeout=15)[1]
            assert main.returncode == 2 and len(err.splitlines()) == 1, err
            assert NO_TRACEPOINTS.search(err), err
            assert not is_mounted(runtime)
    finally:
        if main.poll() is None:
            main.kill()
        main.communicate(timeout=15)
        cleanup(runtime)


def test_watch_unit_command_writes_json_lines_for_the_journal(tmp_path: Path) -> None:
    unit = settings(WATCH_UNIT)
    assert unit["SyslogIdentifier"] == ["nvmefs"] and unit["StandardOutput"] == ["journal"]
    start, _ = command(unit, "ExecStart", tmp_path)
    assert start == ["/usr/local/bin/nvmefs", "watch", "kernel", "-o", "format=json"]
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    stream = tmp_path / "stdout"  # what journald takes, one message per line
    with stream.open("w") as out:
        main = subprocess.Popen(
            [*confined(unit), *on_sim(start, plan)], stdout=out, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for(lambda: "nvmefs abort:" in stream.read_text(), 15, "the abort entry")
            main.send_signal(signal.SIGTERM)
            err = main.communicate(timeout=15)[1]
        finally:
            if main.poll() is None:
                main.kill()
                main.communicate(timeout=15)
    assert main.returncode == 0 and err == ""
    records = [json.loads(line) for line in stream.read_text().splitlines()]
    media = [r for r in records if r.get("status") == "0x281"]
    assert media and media[0]["slba"] == 2048 and all(r["wall"] for r in records)
    # `journalctl -t nvmefs -o cat` gives these lines back: lnav reads them with the format.
    rows = lnav_rows(lnav_home(tmp_path), "SELECT log_level, status FROM nvmefs_json", stream)
    assert len(rows) == len(records)
    assert {"log_format": "nvmefs_json", "log_level": "error", "status": "0x281"} in rows

    # The command as written: it runs where the kernel has the NVMe tracepoints; elsewhere it
    # is refused for that reason alone.
    main = subprocess.Popen(
        [*confined(unit), *start], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        main.wait(timeout=10)
    except subprocess.TimeoutExpired:
        main.send_signal(signal.SIGTERM)
        out_text = main.communicate(timeout=15)[0]
        assert main.returncode == 0
        assert all(json.loads(line)["kind"] for line in out_text.splitlines())
    else:
        err = main.communicate(timeout=15)[1]
        assert main.returncode == 2 and NO_TRACEPOINTS.search(err), err


def syscall_sets() -> dict[str, set[str]]:
    """Every @group of systemd's SystemCallFilter, expanded to system call names."""
    text = run(["systemd-analyze", "syscall-filter", "--no-pager"]).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith(" ") and current is not None:
            word = line.strip()
            if word and not word.startswith("#"):  # "# description"
                current.append(word)
        else:
            current = None

    def expand(name: str) -> set[str]:
        out: set[str] = set()
        for member in groups[name]:
            out |= expand(member) if member.startswith("@") else {member}
        return out

    return {name: expand(name) for name in groups}


@contextlib.contextmanager
def traced(argv: list[str], trace: Path, stdout: object = None) -> Iterator[int]:
    """`argv` run under strace -f; yields the traced program's pid. Signals go to the program
    (strace itself would detach and leave it running); strace ends when the program has, with
    its exit status, which must be 0."""
    log = trace.with_suffix(".stderr")
    with log.open("w") as err:
        tracer = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", str(trace), "--", *argv], stdout=stdout, stderr=err
        )
    children = Path(f"/proc/{tracer.pid}/task/{tracer.pid}/children")

    def program() -> int | None:
        """strace's child once it runs the program (strace forks probes of its own first)."""
        for child in children.read_text().split():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[:-1]
                if cmd and cmd[0] != b"strace" and cmd[-1] == argv[-1].encode():
                    return int(child)
        return None

    pid = None
    try:
        wait_for(lambda: program() is not None, 10, "the traced program")
        pid = program()
        assert pid is not None
        yield pid
        assert tracer.wait(timeout=20) == 0, log.read_text()
    finally:
        if tracer.poll() is None:
            pid = pid or program()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            tracer.kill()
            tracer.wait(timeout=15)


def calls(trace: Path) -> list[tuple[str, str]]:
    """(system call, its line) for every call in an strace -f log."""
    out = []
    for line in trace.read_text().splitlines():
        m = re.match(r"\d+ +([a-z0-9_]+)\(", line)
        if m:
            out.append((m.group(1), line))
    return out


@pytest.mark.fuse
def test_units_system_call_filters_admit_what_nvmefs_calls(tmp_path: Path) -> None:
    """Under strace: the kernel unit's command serving a mount that is read, then stopped; the
    watch unit's command printing entries. (The simulated controller stands in for the kernel
    source: tracefs is read with the same open/read/poll calls; its admin passthrough with
    ioctl.) Every call is in the unit's SystemCallFilter; and with MemoryDenyWriteExecute, no
    mapping is made writable and executable, nor made executable later."""
    groups = syscall_sets()
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)

    kernel = settings(KERNEL_UNIT)
    start, _ = command(kernel, "ExecStart", tmp_path)
    runtime, _ = directories(kernel, tmp_path)
    trace = tmp_path / "kernel.trace"
    try:
        with traced(on_sim(start, plan), trace) as pid:
            wait_for(lambda: is_mounted(runtime), 30, "the mount")
            wait_static(runtime)
            for name in (BUF, f"{BUF}.jsonl", "stats"):
                (runtime / name).read_bytes()
            (runtime / "control").write_text("log=all")
            # ExecStartPost runs under the same filter: its shell, findmnt and sleep too.
            post_trace = tmp_path / "post.trace"
            post, _ = command(kernel, "ExecStartPost", tmp_path)
            assert run(["strace", "-f", "-qq", "-o", str(post_trace), "--", *post]).returncode == 0
            os.kill(pid, signal.SIGTERM)
        assert not is_mounted(runtime)
    finally:
        cleanup(runtime)
    made = calls(trace)
    check_filter(kernel, groups, made)
    assert {"mount", "umount2"} <= {name for name, _ in made}  # hence @mount
    check_filter(kernel, groups, calls(post_trace))

    watch = settings(WATCH_UNIT)
    start, _ = command(watch, "ExecStart", tmp_path)
    trace = tmp_path / "watch.trace"
    stream = tmp_path / "watch.out"
    with stream.open("w") as out, traced(on_sim(start, plan), trace, out) as pid:
        wait_for(lambda: "nvmefs abort:" in stream.read_text(), 20, "the abort entry")
        os.kill(pid, signal.SIGTERM)
    made = calls(trace)
    check_filter(watch, groups, made)
    assert watch["MemoryDenyWriteExecute"] == ["yes"]
    for name, line in made:
        if name in ("mmap", "mprotect", "pkey_mprotect"):
            prot = line.split(", ")[2]
            assert not ("PROT_EXEC" in prot and (name != "mmap" or "PROT_WRITE" in prot)), line


def check_filter(
    unit: dict[str, list[str]], groups: dict[str, set[str]], made: list[tuple[str, str]]
) -> None:
    allowed: set[str] = set()
    for item in unit["SystemCallFilter"][0].split():
        allowed |= groups[item] if item.startswith("@") else {item}
    used = {name for name, _ in made}
    assert {"execve", "openat"} <= used  # the trace saw the program
    assert used <= allowed, sorted(used - allowed)
    families = set(unit["RestrictAddressFamilies"][0].split())
    for name, line in made:
        if name in ("socket", "socketpair"):
            assert line.split("(", 1)[1].split(",")[0] in families, line


# -- lnav ---------------------------------------------------------------------------------------


def lnav_home(tmp: Path) -> Path:
    """A HOME with the format installed the way users install it."""
    home = tmp / "lnav-home"
    home.mkdir(exist_ok=True)
    p = run(["lnav", "-i", str(LNAV_FORMAT)], env=lnav_env(home))
    assert p.returncode == 0 and "installed" in p.stdout + p.stderr, p.stdout + p.stderr
    return home


def lnav_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    return {**env, "HOME": str(home), "TERM": "dumb"}


def lnav_rows(home: Path, sql: str, path: Path) -> list[dict[str, object]]:
    """The rows of a headless lnav query over one file, with the format lnav picked."""
    sql = sql.replace("SELECT ", "SELECT log_format, ", 1)
    p = run(
        ["lnav", "-n", "-c", f";{sql}", "-c", ":write-json-to -", str(path)], env=lnav_env(home)
    )
    assert p.returncode == 0 and "error" not in p.stderr, p.stderr
    rows: list[dict[str, object]] = json.loads(p.stdout)
    return rows


def test_lnav_format_installs_and_its_samples_pass(tmp_path: Path) -> None:
    home = lnav_home(tmp_path)
    installed = list((home / ".lnav" / "formats" / "installed").glob("*.json"))
    assert [p.name for p in installed] == ["nvmefs_log.json"]
    assert json.loads(installed[0].read_text()).keys() >= {"nvmefs_log", "nvmefs_json"}
    # -C checks every format: each sample line must match a regex and have its stated level.
    p = run(["lnav", "-C"], env=lnav_env(home))
    assert p.returncode == 0 and "error" not in p.stdout + p.stderr, p.stdout + p.stderr


# lnav's levels for syslog's severities (nvmefs.outputs.syslog): the format follows that table.
LNAV_LEVEL = {syslog.ERR: "error", syslog.WARNING: "warning", syslog.NOTICE: "notice"}
LNAV_LEVEL[syslog.INFO] = "info"
HOST_KINDS = {host.START, host.HOST_ERROR, host.TIMEOUT, host.ABORT, host.RESET, host.NOTICE}
HOST_KINDS.add(host.LOST)


def test_lnav_levels_follow_the_syslog_severities_for_every_status_and_event(
    tmp_path: Path,
) -> None:
    """Every 15-bit status word (in the full and the seed text, and as JSON), every kind of host
    event, replayed entries and a missed line, rendered by nvmefs itself: lnav gives each the
    level that matches the severity nvmefs sends to syslog (media errors error, other errors
    warning, ...)."""
    translator = Translator()
    events: list[NvmeEvent | HostEvent] = [
        NvmeEvent(translator.decode(word), "nvme0", 1, 1, word % 1024, 2, slba=word, nlb=8)
        for word in range(0x8000)
    ]
    kinds = [k for k in syslog.SEVERITY if k in HOST_KINDS]
    assert len(kinds) == len(HOST_KINDS)  # syslog's table names every kind of host event
    kinds.append("some-new-kind")  # one it does not name yet: warning, as syslog's default
    events += [HostEvent(kind, "a message", {"ctrl": "nvme0"}) for kind in kinds]
    events += [
        dataclasses.replace(ev, replayed=True) for ev in (events[0x281], events[2], events[-1])
    ]
    clock = Clock("realtime")
    full, seed = Renderer(clock, "full"), Renderer(clock, "seed")
    wall = 1_796_213_948_000_000_000
    text, jsonl, want_text, want_json = [], [], [], []
    for seq, ev in enumerate(events, 1):
        level = LNAV_LEVEL[syslog.severity(ev)]
        entry = (seq, seq * 1000, wall + seq * 1000, ev)
        text.append(full.line(entry))
        want_text.append(level)
        jsonl.append(full.json_line(entry))
        want_json.append(level)
        if isinstance(ev, NvmeEvent) and not ev.status.ok:  # seed: a bare status, errors only
            text.append(seed.line((seq, seq * 1000, wall + seq * 1000 + 1, ev)))
            want_text.append(level)
    text.append(full.missed_line(3, 0, wall + len(events) * 1000 + 1000))
    want_text.append("warning")
    home = lnav_home(tmp_path)
    for lines, want, table in ((text, want_text, "nvmefs_log"), (jsonl, want_json, "nvmefs_json")):
        path = tmp_path / f"{table}.log"
        path.write_text("".join(lines))
        rows = lnav_rows(home, f"SELECT log_level FROM {table}", path)
        assert {r["log_format"] for r in rows} == {table}
        got = [r["log_level"] for r in rows]
        wrong = [(line, g, w) for line, g, w in zip(lines, got, want, strict=True) if g != w]
        assert not wrong, wrong[:5]


@pytest.mark.fuse
def test_lnav_reads_a_mounts_text_and_json_files_and_its_journal(tmp_path: Path) -> None:
    home = lnav_home(tmp_path)
    journal = tmp_path / "journal.jsonl"
    opts = f"{SIM},clock=realtime,journal={journal}"
    with mounted(tmp_path, opts, PLAN) as mnt:
        wait_static(mnt)
        wait_for(lambda: "nvmefs abort:" in (mnt / BUF).read_text(), 10, "the abort entry")
        lines = (mnt / BUF).read_text().splitlines()
        text = lnav_rows(
            home, "SELECT log_level, status, slba, kind, name FROM nvmefs_log", mnt / BUF
        )
        assert len(text) == len(lines)  # every line recognised, none a continuation
        assert {r["log_format"] for r in text} == {"nvmefs_log"}
        media = {
            "log_format": "nvmefs_log",
            "log_level": "error",
            "status": "0x281",
            "slba": 2048,
            "kind": None,
            "name": "Unrecovered Read Error",
        }
        assert media in [{**r, "slba": int(r["slba"]) if r["slba"] else None} for r in text]
        levels = {(r["status"] or r["kind"]): r["log_level"] for r in text}
        assert levels["0x4002"] == "warning" and levels["timeout"] == "warning"
        assert levels["abort"] == "warning" and levels["start"] == "notice"

        sql = "SELECT log_level, seq, status, slba, kind FROM nvmefs_json"
        for path in (mnt / f"{BUF}.jsonl", journal):
            rows = lnav_rows(home, sql, path)
            assert len(rows) == len(path.read_text().splitlines())
            assert {r["log_format"] for r in rows} == {"nvmefs_json"}
            assert [int(str(r["seq"])) for r in rows] == list(range(1, len(rows) + 1))
            levels = {(r["status"] or r["kind"]): r["log_level"] for r in rows}
            assert levels["0x281"] == "error" and levels["0x4002"] == "warning"
            assert levels["timeout"] == "warning" and levels["start"] == "notice"
            assert [int(str(r["slba"])) for r in rows if r["status"] == "0x281"] == [2048]

        # The default clock, jiffies, is no time lnav can place: the text format wants
        # clock=realtime (here switched at run time); the JSON lines always carry `wall`.
        (mnt / "control").write_text("clock=jiffies")
        assert re.match(r"\[\d+\] ", (mnt / BUF).read_text())
        count = "SELECT count(*) AS n FROM nvmefs_log"
        assert lnav_rows(home, count, mnt / BUF)[0]["n"] in (0, "0")
        assert len(lnav_rows(home, sql, mnt / f"{BUF}.jsonl")) == len(lines)

    # Mounted again on the same journal: the replayed entries are marked, their levels kept.
    with mounted(tmp_path, opts, PLAN, name="again") as mnt:
        rows = lnav_rows(home, "SELECT log_level, status, replayed FROM nvmefs_log", mnt / BUF)
        replayed = [r for r in rows if r["replayed"] == "(replayed)"]
        assert len(replayed) >= len(lines)
        media_again = {"log_level": "error", "status": "0x281", "replayed": "(replayed)"}
        assert {"log_format": "nvmefs_log", **media_again} in replayed
