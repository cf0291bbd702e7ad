"""Text and JSON forms of ring entries.

The text line is the seed's `[<ticks>] <info>\\n`. With the default clock the ticks are what the
kernel's jiffies counter would read at that moment (INITIAL_JIFFIES + uptime * HZ), so a line
can be held next to dmesg and next to the seed's `[4295386259]` numbers. The info text is capped
at 255 bytes, the seed's `char info[256]`.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
from typing import Any

from nvmefs.nvme import tables
from nvmefs.nvme.status import Status
from nvmefs.store.events import CLEARED, HostEvent, NvmeEvent
from nvmefs.store.ring import Entry

INFO_MAX = 255
FORMATS = ("full", "seed", "json")  # json: the text file shows JSON lines too
CLOCKS = ("jiffies", "uptime", "realtime")
SEED_PREFIX = "Specific NVMe error encountered: Status = "
# What the text line of an entry replayed from the journal ends with (the seed format, whose
# lines are the bare status, shows none).
REPLAYED_MARK = " (replayed)"


def kernel_hz(release: str | None = None) -> int:
    """CONFIG_HZ of the running kernel, from /boot/config-* or /proc/config.gz; 1000 if unknown."""
    release = release or os.uname().release
    for text in (_read_text(f"/boot/config-{release}"), _read_text("/proc/config.gz")):
        for line in text.splitlines():
            if line.startswith("CONFIG_HZ="):
                try:
                    return int(line.split("=", 1)[1])
                except ValueError:
                    break
    return 1000


def _read_text(path: str) -> str:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rt") as gz:
                return gz.read()
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def initial_jiffies(hz: int) -> int:
    # include/linux/jiffies.h: ((unsigned long)(unsigned int) (-300*HZ)) on 64-bit.
    return (-300 * hz) & 0xFFFFFFFF


class Clock:
    """Turns an entry's CLOCK_MONOTONIC / wall-clock nanoseconds into the ticks shown."""

    def __init__(self, kind: str = "jiffies", hz: int | None = None) -> None:
        if kind not in CLOCKS:
            raise ValueError(f"clock {kind!r}: expected one of {', '.join(CLOCKS)}")
        self.kind = kind
        self.hz = hz if hz is not None else kernel_hz()
        self._base = initial_jiffies(self.hz)

    def jiffies(self, mono_ns: int) -> int:
        # CLOCK_MONOTONIC counts from boot and stops in suspend, as jiffies do.
        return self._base + mono_ns * self.hz // 1_000_000_000

    def ticks(self, mono_ns: int, wall_ns: int) -> str:
        if self.kind == "jiffies":
            return str(self.jiffies(mono_ns))
        if self.kind == "uptime":
            return f"{mono_ns // 1_000_000_000:5d}.{mono_ns // 1000 % 1_000_000:06d}"
        return _iso(wall_ns)


def _iso(wall_ns: int) -> str:
    # Integer arithmetic: a float of the nanoseconds rounds the microseconds.
    dt = datetime.datetime.fromtimestamp(wall_ns // 1_000_000_000, tz=datetime.UTC).replace(
        microsecond=wall_ns // 1000 % 1_000_000
    )
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _cap(info: str) -> str:
    raw = info.encode()
    if len(raw) <= INFO_MAX:
        return info
    return raw[:INFO_MAX].decode("utf-8", "ignore")


# What depends only on the status word (or only on the opcode) is built once, not per line.
_STATUS_TEXT: dict[tuple[int, str], str] = {}
_OPCODE_TEXT: dict[tuple[int, bool], str] = {}


def _status_text(st: Status) -> str:
    key = (st.status, st.profile)
    text = _STATUS_TEXT.get(key)
    if text is None:
        head = "NVMe command completed: Status = " if st.ok else SEED_PREFIX
        parts = [f"{head}0x{st.status:x}", f"({st.name})", f"SCT=0x{st.sct:x} SC=0x{st.sc:02x}"]
        if st.crd:
            parts.append(f"CRD={st.crd}")
        if st.more:
            parts.append("MORE")
        if st.dnr:
            parts.append("DNR")
        parts.append(
            f"blk_status={st.blk_status}" + (f" ({st.blk_string})" if st.blk_string else "")
        )
        text = _STATUS_TEXT[key] = " ".join(parts)
    return text


def _opcode_text(opcode: int, admin: bool) -> str:
    text = _OPCODE_TEXT.get((opcode, admin))
    if text is None:
        text = _OPCODE_TEXT[(opcode, admin)] = (
            f"opcode=0x{opcode:02x} ({tables.opcode_name(opcode, admin)})"
        )
    return text


def nvme_info(ev: NvmeEvent, fmt: str = "full") -> str:
    st = ev.status
    if fmt == "seed":
        return f"{SEED_PREFIX}0x{st.status:x}"
    if None not in (ev.ctrl, ev.nsid, ev.qid, ev.cid, ev.opcode, ev.slba, ev.nlb, ev.retries):
        # The common case, a completion with all its context, in one formatting step.
        text = (
            f"{_status_text(st)} ctrl={ev.ctrl} nsid={ev.nsid} qid={ev.qid} cid={ev.cid} "
            f"{_opcode_text(ev.opcode, ev.admin)} slba={ev.slba} nlb={ev.nlb} retries={ev.retries}"  # type: ignore[arg-type]
        )
        return text if len(text) <= INFO_MAX and text.isascii() else _cap(text)
    parts = [_status_text(st)]
    for key in ("ctrl", "disk", "nsid", "qid", "cid"):
        value = getattr(ev, key)
        if value is not None:
            parts.append(f"{key}={value}")
    if ev.opcode is not None:
        parts.append(_opcode_text(ev.opcode, ev.admin))
    elif ev.op is not None:
        parts.append(f"op={ev.op}")
    for key in ("slba", "nlb", "retries"):
        value = getattr(ev, key)
        if value is not None:
            parts.append(f"{key}={value}")
    return _cap(" ".join(parts))


# Fields of host events the text line leaves out: their message says it already.
TEXT_SILENT_FIELDS = frozenset({CLEARED})
# Control characters in a host event's text (a path with a newline, say) are shown escaped: a
# line of the text file is one entry, and no message may forge another.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}


def host_info(ev: HostEvent) -> str:
    extra = " ".join(
        f"{k}={v}" for k, v in ev.fields.items() if v is not None and k not in TEXT_SILENT_FIELDS
    )
    text = f"nvmefs {ev.kind}: {ev.message}" + (f" {extra}" if extra else "")
    return _cap(text.translate(_CONTROL))


def info(event: Any, fmt: str = "full") -> str:
    if isinstance(event, NvmeEvent):
        return nvme_info(event, fmt)
    return host_info(event)


def missed_info(missed: int) -> str:
    """The text of a reader's missed line (JSON lines carry it too, as their info)."""
    noun = "entry" if missed == 1 else "entries"
    why = "overwritten or cleared before this reader reached them"
    return f"nvmefs: {missed} {noun} missed ({why})"


class Renderer:
    """Renders entries as text lines or JSON lines under one clock and format."""

    def __init__(self, clock: Clock | None = None, fmt: str = "full") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
        self.clock = clock or Clock()
        self.fmt = fmt

    def line(self, entry: Entry) -> str:
        if self.fmt == "json":
            return self.json_line(entry)
        _seq, mono_ns, wall_ns, event = entry
        mark = REPLAYED_MARK if event.replayed and self.fmt != "seed" else ""
        return f"[{self.clock.ticks(mono_ns, wall_ns)}] {info(event, self.fmt)}{mark}\n"

    def missed_line(self, missed: int, mono_ns: int, wall_ns: int) -> str:
        if self.fmt == "json":
            return self.missed_json_line(missed, mono_ns, wall_ns)
        return f"[{self.clock.ticks(mono_ns, wall_ns)}] {missed_info(missed)}\n"

    def record(self, entry: Entry) -> dict[str, Any]:
        seq, mono_ns, wall_ns, event = entry
        rec: dict[str, Any] = {
            "seq": seq,
            "ticks": self.clock.ticks(mono_ns, wall_ns),
            "jiffies": self.clock.jiffies(mono_ns),
            "monotonic_ns": mono_ns,
            "wall_ns": wall_ns,
            "wall": _iso(wall_ns),
            "kind": event.kind,
            "info": info(event, self.fmt),
        }
        if isinstance(event, NvmeEvent):
            rec.update(event.status.as_dict())
            rec.update(
                ctrl=event.ctrl,
                nsid=event.nsid,
                qid=event.qid,
                cid=event.cid,
                opcode=event.opcode,
                opcode_name=(
                    None if event.opcode is None else tables.opcode_name(event.opcode, event.admin)
                ),
                admin=event.admin,
                disk=event.disk,
                op=event.op,
                slba=event.slba,
                nlb=event.nlb,
                retries=event.retries,
            )
        elif isinstance(event, HostEvent):
            rec["message"] = event.message
            rec.update(event.fields)
        if event.replayed:
            rec["replayed"] = True
        return rec

    def json_line(self, entry: Entry) -> str:
        return json.dumps(self.record(entry), separators=(",", ":")) + "\n"

    def missed_json_line(self, missed: int, mono_ns: int, wall_ns: int) -> str:
        return (
            json.dumps(
                {
                    "kind": "missed",
                    "info": missed_info(missed),
                    "missed": missed,
                    "monotonic_ns": mono_ns,
                    "wall_ns": wall_ns,
                    "wall": _iso(wall_ns),
                },
                separators=(",", ":"),
            )
            + "\n"
        )
