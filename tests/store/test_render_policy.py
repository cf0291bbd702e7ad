"""Log policy, entry text/JSON and the jiffies clock."""

from __future__ import annotations

import json

import pytest

from nvmefs.nvme.policy import LogPolicy, PolicyError
from nvmefs.nvme.status import Translator
from nvmefs.store.events import HostEvent, NvmeEvent
from nvmefs.store.render import INFO_MAX, Clock, Renderer, initial_jiffies, kernel_hz
from nvmefs.store.ring import DebugRing

SEED_SIX = {0x280, 0x281, 0x287, 0x286, 0x182, 0x285}


def test_media_policy_is_exactly_the_seed_six_on_sct_sc() -> None:
    p = LogPolicy()
    logged = {w for w in range(0x8000) if p.logs(w)}
    assert {w & 0x7FF for w in logged} == SEED_SIX
    assert p.logs(0x4281) and p.logs(0x7A87)  # DNR/MORE/CRD do not matter
    assert len(logged) == 6 * 16


def test_errors_all_and_explicit_policies() -> None:
    errors, every = LogPolicy("errors"), LogPolicy("all")
    assert not errors.logs(0) and not errors.logs(0x4000) and errors.logs(0x2)
    assert all(every.logs(w) for w in range(0x8000))
    explicit = LogPolicy("0x281:0x4285")
    assert {w for w in range(0x800) if explicit.logs(w)} == {0x281, 0x285}
    for bad in ("", "nope", "0x281:zz", "0x8000"):
        with pytest.raises(PolicyError):
            LogPolicy(bad)


def test_initial_jiffies_matches_the_seed_timestamps() -> None:
    # The seed's [4295386259] is HZ=1000 at about 719 s of uptime.
    clock = Clock("jiffies", hz=1000)
    assert initial_jiffies(1000) == 2**32 - 300_000
    assert clock.jiffies(718_963_000_000) == 4295386259
    assert Clock("jiffies", hz=250).jiffies(4_000_000_000) == 2**32 - 75_000 + 1000


def test_kernel_hz_reads_the_running_kernels_config_or_falls_back(tmp_path: object) -> None:
    hz = kernel_hz()
    assert hz in (100, 250, 300, 1000)
    assert kernel_hz("no-such-release-xyz") in (1000, hz)


def test_uptime_and_realtime_clocks() -> None:
    assert Clock("uptime", hz=1000).ticks(719_193_448_123, 0) == "  719.193448"
    assert Clock("realtime", hz=1000).ticks(0, 1_700_000_000_123_456_789) == (
        "2023-11-14T22:13:20.123456Z"
    )
    with pytest.raises(ValueError):
        Clock("sundial")


def _entry(event: object) -> tuple[int, int, int, object]:
    ring = DebugRing(4)
    ring.append(event)
    return next(iter(ring))


def test_error_line_starts_with_the_seed_words_then_context() -> None:
    ev = NvmeEvent(
        Translator().decode(0x4281),
        ctrl="sim0",
        nsid=1,
        qid=1,
        cid=7,
        opcode=0x02,
        slba=2048,
        nlb=8,
        retries=0,
    )
    r = Renderer(Clock("jiffies", hz=1000))
    line = r.line(_entry(ev))
    assert line.startswith("[") and line.endswith("\n") and line.count("\n") == 1
    ticks, info = line[1:].split("] ", 1)
    assert int(ticks) > 2**32 - 300_000
    assert info.startswith("Specific NVMe error encountered: Status = 0x4281 ")
    for part in (
        "(Unrecovered Read Error)",
        "SCT=0x2 SC=0x81",
        "DNR",
        "blk_status=MEDIUM (critical medium)",
        "ctrl=sim0",
        "nsid=1",
        "qid=1",
        "cid=7",
        "opcode=0x02 (Read)",
        "slba=2048",
        "nlb=8",
        "retries=0",
    ):
        assert part in info
    assert "MORE" not in info and "CRD" not in info


def test_seed_format_is_the_bare_seed_text() -> None:
    ev = NvmeEvent(Translator().decode(0x4287), nsid=1, slba=5)
    line = Renderer(Clock("jiffies", hz=1000), fmt="seed").line(_entry(ev))
    assert line.split("] ", 1)[1] == "Specific NVMe error encountered: Status = 0x4287\n"


def test_info_is_capped_at_255_bytes() -> None:
    ev = HostEvent("notice", "x" * 1000)
    line = Renderer(Clock("jiffies", hz=100)).line(_entry(ev))
    assert len(line.split("] ", 1)[1].rstrip("\n").encode()) == INFO_MAX
    ev = HostEvent("notice", "é" * 300)  # never a broken UTF-8 sequence at the cut
    info = Renderer(Clock("jiffies", hz=100)).line(_entry(ev)).split("] ", 1)[1]
    assert len(info.rstrip("\n").encode()) <= INFO_MAX
    info.encode("utf-8")


def test_json_record_carries_every_field_and_both_timestamps() -> None:
    ev = NvmeEvent(
        Translator("linux-5.14").decode(0x183),
        ctrl="nvme0",
        nsid=2,
        qid=3,
        cid=4,
        opcode=0x09,
        slba=None,
        nlb=None,
        retries=2,
    )
    rec = json.loads(Renderer(Clock("jiffies", hz=1000)).json_line(_entry(ev)))
    assert rec["seq"] == 1 and rec["kind"] == "nvme"
    assert rec["status"] == "0x183" and rec["sct"] == 1 and rec["sc"] == 0x83
    assert rec["blk_status"] == "NOTSUPP" and rec["profile"] == "linux-5.14"
    assert rec["opcode_name"] == "Dataset Management" and rec["retries"] == 2
    assert rec["monotonic_ns"] > 0 and rec["wall_ns"] > 0 and rec["wall"].endswith("Z")
    assert rec["info"].startswith("Specific NVMe error encountered: Status = 0x183 ")


def test_missed_line_is_one_whole_line() -> None:
    r = Renderer(Clock("jiffies", hz=1000))
    line = r.missed_line(17, 1_000_000_000, 0)
    assert line.endswith("\n") and line.count("\n") == 1 and "17 entries missed" in line
    assert json.loads(r.missed_json_line(1, 0, 0))["missed"] == 1
    assert json.loads(r.missed_json_line(3, 0, 0))["info"].startswith("nvmefs: 3 entries missed")
