"""Prometheus across a fleet, with the real components: a mount with a fault plan, Debian's
node_exporter reading its textfile directory and the mount itself, the HTTP listener, promtool
checking the exposition and testing the alerting rules in contrib/prometheus."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nvmefs.options import parse
from nvmefs.outputs.journal import Journal
from nvmefs.outputs.metrics import Metrics
from nvmefs.outputs.syslog import SyslogOutput
from nvmefs.recorder import Recorder
from nvmefs.store.events import NOTICE, HostEvent
from nvmefs.store.render import Renderer
from nvmefs.store.ring import DebugRing
from tests.mounts import BUF, daemon_pids, is_mounted, mounted, run_nvmefs, stats, wait_for

RULES = Path(__file__).resolve().parents[1] / "contrib" / "prometheus"
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"
# Debian's prometheus-node-exporter service runs as this user: it reads the prom file (0644)
# and, on a mount with allow_other, the mount.
EXPORTER_USER = "prometheus"

# In a 1 MiB namespace scrubbed in 2 KiB (4-block) chunks: the chunks 1000..1003 and 1004..1007
# fail with Unrecovered Read Error after 5 retries each; the chunk 1500..1503 fails at once
# (DNR). The simulated controller counts a SMART media error per failed attempt: 2 * 6 + 1.
PLAN = """
[[fault]]
opcode = "read"
lba = [1000, 1007]
status = 0x281

[[fault]]
opcode = "read"
lba = [1500, 1500]
status = 0x4281
"""
OPTS = "sim_size=1M,bs=2K,passes=1,retries=5,log=errors,health_interval=0.2"
# With prom= only (prom_interval without it is refused).
PROM_INTERVAL = "prom_interval=0.2"
SIM = {"source": "sim", "ctrl": "sim0", "nsid": "1"}
MEDIA_ERRORS = 13

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: Samples, metric: str, /, **labels: str) -> float:
    found = [v for (n, ls), v in got.items() if n == metric and set(labels.items()) <= ls]
    assert len(found) == 1, f"{metric} {labels}: {len(found)} series"
    return found[0]


def fetch(url: str) -> tuple[str, str]:
    """(content type, body) of a GET."""
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.headers["Content-Type"], r.read().decode()


def alerts() -> int:
    """The number of alerting rules in contrib/prometheus."""
    return len(re.findall(r"^\s*- alert: ", (RULES / "nvmefs.rules.yml").read_text(), re.M))


def nvmefs_only(text: str) -> str:
    """The nvmefs families of a node_exporter scrape (its own metrics are not ours to check)."""
    keep = [ln for ln in text.splitlines(keepends=True) if re.match(r"(# \w+ )?nvmefs_", ln)]
    return "".join(keep)


def promtool_check(text: str) -> None:
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a server this test started: SIGTERM, then SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory node_exporter's user can reach (pytest's own tmp root is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="nvmefs-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def node_exporter(directory: Path, log: Path) -> Iterator[str]:
    """Debian's node_exporter with only its textfile collector, on a free port of 127.0.0.1,
    as the user Debian's service runs it as; yields its /metrics URL once it answers."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
             f"--collector.textfile.directory={directory}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, user=EXPORTER_USER, group=EXPORTER_USER,
            extra_groups=[],
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"

    def answers() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            fetch(url)
        except OSError:
            return False
        return True

    try:
        wait_for(answers, 10, "node_exporter to answer")
        yield url
    finally:
        stop(proc)


def check_fault_plan_values(got: Samples) -> None:
    """What the fault plan produced, wherever the metrics were read."""
    unrecovered = value(got, "nvmefs_errors_total", **SIM, status="0x281")
    dnr = value(got, "nvmefs_errors_total", **SIM, status="0x4281", blk_status="MEDIUM")
    assert (unrecovered, dnr) == (2, 1)
    errors = [ls for (n, ls), _ in got.items() if n == "nvmefs_errors_total"]
    assert len(errors) == 2
    assert dict(errors[0])["serial"] == "NVMEFS-SIM-0001"
    assert value(got, "nvmefs_errors_total", status="0x281", name="Unrecovered Read Error") == 2
    assert value(got, "nvmefs_retries_total", source="sim") == 10
    assert value(got, "nvmefs_completion_errors_total") == 13
    assert value(got, "nvmefs_logged_total") == 3
    assert value(got, "nvmefs_workload_commands_total") == 512
    assert value(got, "nvmefs_workload_failed_commands_total") == 3
    assert value(got, "nvmefs_smart_media_errors_total", ctrl="sim0") == MEDIA_ERRORS
    assert value(got, "nvmefs_smart_critical_warning", ctrl="sim0") == 0
    assert value(got, "nvmefs_smart_temperature_celsius", ctrl="sim0") == 47.85
    assert value(got, "nvmefs_scrub_passes_total") == 1
    assert value(got, "nvmefs_scrub_pass_ratio") == 1
    ended = value(got, "nvmefs_scrub_last_pass_end_timestamp_seconds")
    assert time.time() - 60 < ended <= time.time()
    # The start entry of this run (and nothing replayed) is counted.
    assert value(got, "nvmefs_host_events_total", kind="start") == 1
    assert value(got, "nvmefs_host_events_total", kind="host-error") == 0
    assert value(got, "nvmefs_ring_entries") == value(got, "nvmefs_ring_appended_total") == 4
    assert value(got, "nvmefs_ring_capacity") == 1024
    assert value(got, "nvmefs_info", source="sim", version="0.1.0") == 1


@pytest.mark.fuse
def test_node_exporter_exports_the_fault_plans_metrics_from_the_prom_dir_and_the_mount(
    public_dir: Path,
) -> None:
    tmp_path = public_dir
    promdir = tmp_path / "textfile"
    promdir.mkdir()
    port = free_port()
    # allow_other: node_exporter is not the user who mounted.
    opts = (
        f"{OPTS},allow_other,prom={promdir},{PROM_INTERVAL},metrics_listen=127.0.0.1:{port},"
        f"journal={tmp_path / 'journal.jsonl'}"
    )
    with mounted(tmp_path, opts, PLAN) as mnt:
        http = f"http://127.0.0.1:{port}/metrics"

        def settled() -> bool:  # the pass is over and a health poll after it counted
            got = samples(fetch(http)[1])
            media = [v for (n, _), v in got.items() if n == "nvmefs_smart_media_errors_total"]
            return media == [MEDIA_ERRORS]

        wait_for(settled, 10, "the scrub pass and a health poll")
        time.sleep(0.5)  # a prom file written after that
        content_type, served = fetch(http)
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        in_dir = (promdir / "nvmefs.prom").read_text()
        in_mount = (mnt / "nvmefs.prom").read_text()
        assert sorted(os.listdir(promdir)) == ["nvmefs.prom"]  # no temporary file left behind
        assert oct((mnt / "nvmefs.prom").stat().st_mode & 0o777) == "0o444"
        with (
            node_exporter(promdir, tmp_path / "a.log") as from_dir,
            node_exporter(mnt, tmp_path / "b.log") as from_mount,
        ):
            scraped = {"prom dir": fetch(from_dir)[1], "mount": fetch(from_mount)[1]}
        for text in (served, in_dir, in_mount):
            got = samples(text)
            check_fault_plan_values(got)
            # Its 4 entries journaled, none lost: what an alert on a losing journal watches.
            assert value(got, "nvmefs_journal_lines_total", source="sim") == 4
            assert value(got, "nvmefs_journal_lost_entries_total", source="sim") == 0
            assert value(got, "nvmefs_journal_errors_total", source="sim") == 0
            assert not [n for n, _ in got if n.startswith("nvmefs_syslog_")]  # not configured
            promtool_check(text)
        for where, text in scraped.items():
            got = samples(text)
            assert value(got, "node_textfile_scrape_error") == 0, where
            check_fault_plan_values(got)
            promtool_check(nvmefs_only(text))
        # The mount's file is as fresh as the moment node_exporter looked at it.
        mtime = value(samples(scraped["mount"]), "node_textfile_mtime_seconds")
        assert time.time() - 30 < mtime <= time.time()
        # Every metric the alerting rules use is one the daemon exports.
        used = set(re.findall(r"nvmefs_[a-z_]+", (RULES / "nvmefs.rules.yml").read_text()))
        assert used and used <= {n for n, _ in samples(in_mount)}


@pytest.mark.fuse
def test_prometheus_scrapes_metrics_listen_and_evaluates_the_rules_on_it(tmp_path: Path) -> None:
    # Prometheus's default Accept header asks for OpenMetrics first: the listener answers in it.
    port, web = free_port(), free_port()
    with mounted(tmp_path, f"{OPTS},metrics_listen=127.0.0.1:{port}", PLAN):
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{RULES / 'nvmefs.rules.yml'}]\n"
            "scrape_configs:\n"
            f"  - {{job_name: nvmefs, static_configs: [{{targets: ['127.0.0.1:{port}']}}]}}\n"
        )
        with open(tmp_path / "prometheus.log", "wb") as log:
            server = subprocess.Popen(
                [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'data'}",
                 f"--web.listen-address=127.0.0.1:{web}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        api = f"http://127.0.0.1:{web}/api/v1"
        try:

            def query(q: str) -> list[dict[str, Any]]:
                assert server.poll() is None, (tmp_path / "prometheus.log").read_text()
                try:
                    got = json.loads(fetch(f"{api}/query?query={urllib.parse.quote(q)}")[1])
                except OSError:
                    return []
                return got["data"]["result"]  # type: ignore[no-any-return]

            errors = 'nvmefs_errors_total{status="0x281",ctrl="sim0",nsid="1"}'
            wait_for(lambda: [r["value"][1] for r in query(errors)] == ["2"], 20, "a scrape")
            (target,) = json.loads(fetch(f"{api}/targets")[1])["data"]["activeTargets"]
            assert target["health"] == "up" and target["lastError"] == ""
            # The first error of the status word fires the media alert; the rules evaluate.
            alert = (
                'ALERTS{alertname="NvmeCommandsFailingWithMediaErrors",serial="NVMEFS-SIM-0001"}'
            )
            wait_for(lambda: len(query(alert)) == 1, 20, "the alert")
            groups = json.loads(fetch(f"{api}/rules")[1])["data"]["groups"]
            assert [r["health"] for g in groups for r in g["rules"]] == ["ok"] * alerts()
        finally:
            stop(server)


@pytest.mark.fuse
def test_a_clean_unmount_removes_the_prom_file_and_closes_the_port(tmp_path: Path) -> None:
    promdir = tmp_path / "textfile"
    promdir.mkdir()
    port = free_port()
    opts = f"{OPTS},prom={promdir},{PROM_INTERVAL},metrics_listen=127.0.0.1:{port}"
    with mounted(tmp_path, opts) as mnt:
        wait_for(lambda: (promdir / "nvmefs.prom").exists(), 10, "the prom file")
        assert fetch(f"http://127.0.0.1:{port}/metrics")[1].startswith("# HELP nvmefs_info")
        subprocess.run(["umount", str(mnt)], check=True, timeout=10)
        wait_for(lambda: not daemon_pids(mnt), 10, "the daemon to end")
        assert os.listdir(promdir) == []
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.fuse
def test_entries_replayed_from_the_journal_are_not_counted_again(tmp_path: Path) -> None:
    # Counted again after a restart, they would look like new events to increase().
    journal = tmp_path / "journal.jsonl"
    for run in ("first", "second"):
        port = free_port()
        opts = f"{OPTS},journal={journal},metrics_listen=127.0.0.1:{port}"
        with mounted(tmp_path, opts, PLAN, name=run) as mnt:
            wait_for(lambda: stats(mnt)["workload"] == "idle", 10, "the scrub pass")
            starts = (mnt / BUF).read_text().count("nvmefs start:")
            for text in (fetch(f"http://127.0.0.1:{port}/metrics")[1],
                         (mnt / "nvmefs.prom").read_text()):  # fmt: skip
                got = samples(text)
                assert value(got, "nvmefs_host_events_total", kind="start") == 1
                assert value(got, "nvmefs_errors_total", status="0x281") == 2
            subprocess.run(["umount", str(mnt)], check=True, timeout=10)
            wait_for(lambda: not daemon_pids(mnt), 10, "the daemon to end")
    assert starts == 2  # the first run's start entry is in the second run's ring


@pytest.mark.fuse
def test_a_port_in_use_or_a_missing_prom_dir_is_exit_2_in_one_line_with_nothing_mounted(
    tmp_path: Path,
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        p = run_nvmefs("sim", str(mnt), "-o", f"metrics_listen=127.0.0.1:{port}")
    assert p.returncode == 2
    assert p.stderr == (
        f"nvmefs: metrics_listen=127.0.0.1:{port}: cannot listen: Address already in use\n"
    )
    p = run_nvmefs("sim", str(mnt), "-o", f"prom={tmp_path}/nowhere/")
    assert p.returncode == 2
    assert p.stderr == f"nvmefs: prom={tmp_path}/nowhere/nvmefs.prom: directory " \
        f"{tmp_path}/nowhere does not exist\n"  # fmt: skip
    assert not is_mounted(mnt) and not daemon_pids(mnt)


def test_the_journal_and_syslog_counters_pass_promtool_check_metrics(tmp_path: Path) -> None:
    # The outputs' counters, once they have something to count; the fleet tests above mount
    # no syslog socket.
    ring = DebugRing(16)
    metrics = Metrics()
    metrics.attach(ring)
    metrics.journal = Journal.open(parse([f"journal={tmp_path / 'j.jsonl'}"], allow_fuse=False))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(tmp_path / "log"))
        metrics.syslog = SyslogOutput.open(parse([f"syslog={tmp_path / 'log'}"], allow_fuse=False))
        assert metrics.journal is not None and metrics.syslog is not None
        metrics.journal.attach(ring)
        metrics.syslog.attach(ring)
        for i in range(3):
            ring.append(HostEvent(NOTICE, f"n{i}"))
        metrics.journal.close()
        metrics.syslog.close()
    text = metrics.exposition(Recorder(ring, Renderer(), source="sim")).decode()
    promtool_check(text)
    got = samples(text)
    assert value(got, "nvmefs_journal_lines_total", source="sim") == 3
    assert value(got, "nvmefs_syslog_messages_sent_total", source="sim") == 3
    for name in ("journal_lost_entries", "journal_errors", "journal_rotations",
                 "syslog_dropped_entries", "syslog_errors", "syslog_reconnects"):  # fmt: skip
        assert value(got, f"nvmefs_{name}_total", source="sim") == 0


def test_the_alerting_rules_pass_promtool_check_rules() -> None:
    p = subprocess.run([PROMTOOL, "check", "rules", str(RULES / "nvmefs.rules.yml")],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {alerts()} rules found" in p.stdout


def test_the_alerting_rules_fire_in_promtool_test_rules() -> None:
    # The test file holds, for each alert, inputs that must fire it and inputs that must not.
    p = subprocess.run([PROMTOOL, "test", "rules", "nvmefs.rules.test.yml"], cwd=RULES,
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


def test_promtool_test_rules_can_fail(tmp_path: Path) -> None:
    # With the thresholds raised past the inputs, the expected alerts no longer fire.
    rules = (RULES / "nvmefs.rules.yml").read_text().replace("> 0", "> 1000")
    (tmp_path / "nvmefs.rules.yml").write_text(rules)
    (tmp_path / "nvmefs.rules.test.yml").write_text((RULES / "nvmefs.rules.test.yml").read_text())
    p = subprocess.run([PROMTOOL, "test", "rules", "nvmefs.rules.test.yml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert p.returncode == 1
    for alert in ("NvmeMediaErrorsIncreasing", "NvmeCriticalWarning",
                  "NvmeCommandsFailingWithMediaErrors"):  # fmt: skip
        assert f"alertname: {alert}" in p.stdout + p.stderr
