"""A journal record with hostile strings, replayed into a real mount (issue 18, item 5): the
text view shows each entry as one line, with every control character escaped, whatever field
holds it, and the JSON view gives the strings back exactly.

The journal is written by hand, as an attacker who could write one would: the replay is the
way strings of another origin reach the ring, and the renderer is what must hold."""

from __future__ import annotations

import json
import re
import subprocess
import unicodedata
from pathlib import Path

import pytest

from nvmefs.nvme.status import Translator
from nvmefs.store import events
from nvmefs.store.events import HostEvent, NvmeEvent
from nvmefs.store.render import Clock, Renderer
from tests.mounts import BUF, LINE, mounted

pytestmark = pytest.mark.fuse

FORGED_CTRL = "nvme0\n[1] Specific NVMe error encountered: FORGED2\x1b[31m"
# The other strings a record carries, each with something a terminal would act on: a C1
# control (CSI), a line separator, a right-to-left override, DEL, a carriage return.
HOSTILE_DISK = "nvme0n1\u2028[2] FORGED3"
HOSTILE_OP = "READ\u202egnp.exe"
HOSTILE_KIND = "notice\r[3] FORGED4"
HOSTILE_MESSAGE = "path\x9b31m\x7f\\x0a"
HOSTILE_FIELDS = {"key\n[4] FORGED5": "value\x1b]0;title\x07", "ctrl": "nvme1\x85[5] FORGED6"}
WALL = 1_764_672_000_000_000_000
WHOLE_ESCAPES = re.compile(r"(?:[^\\]|\\(?:\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}))*\n")


def hostile_journal(tmp_path: Path) -> Path:
    """A journal of two records, in a root-owned directory no one else may write to (as the
    journal requires of its directory)."""
    jdir = tmp_path / "journal"
    jdir.mkdir()
    jdir.chmod(0o755)
    r = Renderer(Clock("jiffies", hz=1000), "full")
    nvme = NvmeEvent(
        Translator().decode(0x4281),
        ctrl=FORGED_CTRL,
        nsid=1,
        qid=1,
        cid=7,
        slba=0,
        nlb=8,
        disk=HOSTILE_DISK,
        op=HOSTILE_OP,
    )
    host = HostEvent(HOSTILE_KIND, HOSTILE_MESSAGE, dict(HOSTILE_FIELDS))
    path = jdir / "nvmefs.jsonl"
    path.write_text(
        r.json_line((1, 1_000_000_000, WALL, nvme)) + r.json_line((2, 2_000_000_000, WALL, host))
    )
    path.chmod(0o644)
    return path


def controls(data: str) -> list[str]:
    """The characters of `data` that a terminal acts on or that split or reorder a line."""
    return [ch for ch in data if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")]


def test_a_replayed_record_forges_no_line_and_carries_no_control_character(
    tmp_path: Path,
) -> None:
    path = hostile_journal(tmp_path)
    with mounted(tmp_path, f"workload=idle,journal={path}") as mnt:
        text = subprocess.run(
            ["cat", str(mnt / BUF)], capture_output=True, check=True, timeout=30
        ).stdout
        jsonl = subprocess.run(
            ["cat", str(mnt / f"{BUF}.jsonl")], capture_output=True, check=True, timeout=30
        ).stdout
    lines = text.decode().splitlines(keepends=True)
    # The two replayed entries, the journal's notice and the start entry: one line each.
    assert len(lines) == 4, lines
    for line in lines:
        assert LINE.match(line.encode()), line
        assert controls(line[:-1]) == [], line
    assert b"\x1b" not in text and b"\x7f" not in text
    # Each line is the entry it says it is: no line starts with what a string forged.
    heads = [line.split("] ", 1)[1].split(":", 1)[0] for line in lines]
    assert heads == [
        "Specific NVMe error encountered",
        "nvmefs notice\\x0d[3] FORGED4",
        "nvmefs notice",
        "nvmefs start",
    ]
    nvme_line, host_line = lines[0], lines[1]
    assert "ctrl=nvme0\\x0a[1] Specific NVMe error encountered: FORGED2\\x1b[31m " in nvme_line
    assert " disk=nvme0n1\\u2028[2] FORGED3 " in nvme_line
    assert nvme_line.endswith(" (replayed)\n")
    # Every backslash starts a whole escape, where the 255-byte cap cut the line too.
    for line in lines:
        assert WHOLE_ESCAPES.fullmatch(line), line
    assert host_line.startswith("[") and "nvmefs notice\\x0d[3] FORGED4: " in host_line
    assert "path\\x9b31m\\x7f\\\\x0a" in host_line  # the backslash escaped: unambiguous
    # The JSON lines carry the strings as they were.
    recs = [json.loads(line) for line in jsonl.splitlines()]
    assert (recs[0]["ctrl"], recs[0]["disk"], recs[0]["op"]) == (
        FORGED_CTRL,
        HOSTILE_DISK,
        HOSTILE_OP,
    )
    assert (recs[1]["kind"], recs[1]["message"]) == (HOSTILE_KIND, HOSTILE_MESSAGE)
    assert {k: recs[1][k] for k in HOSTILE_FIELDS} == HOSTILE_FIELDS
    assert recs[2]["kind"] == events.NOTICE and recs[3]["kind"] == events.START
