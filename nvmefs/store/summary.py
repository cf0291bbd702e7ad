"""A bounded summary of NVMe error records: per namespace the errors by status, where on the
namespace they are (an LBA map) and when (errors over time), and its JSON form.

Records are the JSON form of ring entries (render.Renderer.record, the lines of
`nvme_circular_buffer.jsonl` and of a journal). Only NVMe entries with a failing status count
(`kind` "nvme", a status whose SCT/SC is not zero); host events, notices and successes are
skipped and counted. A folded entry (`repeats` N, `lba_range` [a, b]: a storm's like failures)
counts as the 1 + N errors it stands for, everywhere: its own at its first LBA, the N others
spread evenly over the LBA map's buckets of a..b (where they fell within that range is not
recorded), all of them at its time (a fold spans at most a second, the finest time bucket).
Records are not trusted (a journal may have been edited): a field of the wrong type or range
makes the record `bad`, counted, never an exception.

Identity: an entry carries `ctrl` (nvme0, sim0), `nsid` and, from the kernel source, `disk`
(nvme0n1); it carries no serial number or model. A namespace is grouped by (ctrl, nsid, disk) as
they are; `Summary.identify` adds a controller's serial and model where the caller knows them
(the report reads them from a mount's `stats`).

Memory is bounded whatever the number of records: every series has BUCKETS counters, at most
MAX_NAMESPACES namespaces with at most MAX_STATUSES statuses each are kept (records beyond are
counted as `overflow`), and the strings kept are capped at MAX_TEXT bytes.

Why adaptive bins (`Histogram`) rather than two passes or a first pass for min/max: `summarize`
takes any iterable (a ring's records, stdin, a journal being written), which can be read only
once, and one pass costs half the reading of two. A histogram covers `n` equal buckets of a
width that is a power-of-two multiple of its minimum, aligned to multiples of that width; a
value outside moves the buckets, or doubles their width (neighbour pairs merge) as often as
needed, so that everything seen fits. Counts stay exact per bucket; only the resolution
adapts, and the values seen always span more than a quarter of the buckets once the width has
grown, so a chart is never squeezed into a corner.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nvmefs.store import events
from nvmefs.store.render import cap, escape

# Buckets of every series (LBA map and errors over time). Even, as merging takes pairs.
BUCKETS = 256
# The finest time bucket: one second (wall-clock nanoseconds).
MIN_TIME_BUCKET_NS = 1_000_000_000
DAY_NS = 86_400 * 1_000_000_000
MAX_NAMESPACES = 64
MAX_STATUSES = 32
# Bytes of UTF-8 a kept string (ctrl, disk, status name, serial, model) is cut to.
MAX_TEXT = 64

MAX_I64 = (1 << 63) - 1
MAX_U64 = (1 << 64) - 1
_STATUS = re.compile(r"0x[0-9a-f]{1,4}")
# SCT and SC: a status word whose code is zero is a success (CRD/MORE/DNR aside).
CODE_MASK = 0x7FF


class BadRecord(ValueError):
    """A record nvmefs would not have written (a field missing, of the wrong type or range)."""


def _int(rec: Mapping[str, Any], key: str, hi: int, *, optional: bool = False) -> int | None:
    value = rec.get(key)
    if value is None and optional:
        return None
    if type(value) is not int or not 0 <= value <= hi:  # bool is an int too: not here
        raise BadRecord(f"{key} is not an integer in 0..{hi}")
    return value


def _text(value: Any) -> str | None:
    """A record's string as it may be shown anywhere: escaped (no control or bidi character:
    render.escape) and capped; None for anything that is not a string."""
    if not isinstance(value, str):
        return None
    if len(value) <= MAX_TEXT and value.isascii() and value.isprintable() and "\\" not in value:
        return value  # the common case (nvme0, nvme0n1): nothing to escape or cut
    return cap(escape(value), MAX_TEXT)


def iso(ns: int) -> str:
    """Wall-clock nanoseconds as ISO 8601 UTC to the second."""
    dt = datetime.datetime.fromtimestamp(ns // 1_000_000_000, tz=datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


class Histogram:
    """Counts of values in `n` equal buckets, per series key.

    Invariant: every value added lies in [origin, origin + n * width), in bucket
    (value - origin) // width; origin is a multiple of width, width is min_width times a power
    of two; the counts of all series sum to the counts added (`n` of each `add` and `spread`);
    lo and hi are the least and greatest value added; an origin given at the start stays
    covered."""

    def __init__(self, n: int = BUCKETS, min_width: int = 1, origin: int | None = None) -> None:
        if n < 2 or n % 2:
            raise ValueError("n must be even and at least 2")
        self.n = n
        self.width = min_width
        self.origin = origin  # None until the first value, unless given
        # A given origin stays covered (an LBA map always shows LBA 0).
        self.anchor = origin
        self.series: dict[Any, list[int]] = {}
        self.lo: int | None = None
        self.hi: int | None = None

    def add(self, key: Any, value: int, n: int = 1) -> int:
        """Count `value` `n` times in `key`'s series (a new series if the key is new); its
        bucket index."""
        counts = self._cover(key, value)
        assert self.origin is not None
        i = (value - self.origin) // self.width
        counts[i] += n
        return i

    def spread(self, key: Any, lo: int, hi: int, n: int) -> None:
        """Count `n` values somewhere in lo..hi (which of them is not known) in `key`'s series:
        spread evenly over the buckets that range covers, the remainder one each to the
        first ones, so the counts stay exact."""
        self._cover(key, lo)
        counts = self._cover(key, hi)
        first, last = self.bucket_of(lo), self.bucket_of(hi)
        each, rest = divmod(n, last - first + 1)
        for i in range(first, last + 1):
            counts[i] += each + (i - first < rest)

    def _cover(self, key: Any, value: int) -> list[int]:
        """Make the buckets cover `value` (and count it in lo and hi); `key`'s series."""
        if self.origin is None:
            self.origin = value - value % self.width
        if not self.origin <= value < self.origin + self.n * self.width:
            self._grow(value)
        self.lo = value if self.lo is None else min(self.lo, value)
        self.hi = value if self.hi is None else max(self.hi, value)
        counts = self.series.get(key)
        if counts is None:
            counts = self.series[key] = [0] * self.n
        return counts

    def _grow(self, value: int) -> None:
        assert self.origin is not None
        lo = value if self.lo is None else min(self.lo, value)
        hi = value if self.hi is None else max(self.hi, value)
        if self.anchor is not None:
            lo, hi = min(lo, self.anchor), max(hi, self.anchor)
        # The narrowest width that covers every value seen: the same width moved (values
        # earlier than the first one, say), or doubled as often as needed.
        width = self.width
        while True:
            origin = lo - lo % width
            if hi < origin + self.n * width:
                break
            width *= 2
        # Old buckets are aligned to the old width, so each lies inside one new bucket.
        old_origin, old_width = self.origin, self.width
        for key, counts in self.series.items():
            merged = [0] * self.n
            for i, c in enumerate(counts):
                if c:
                    merged[(old_origin + i * old_width - origin) // width] += c
            self.series[key] = merged
        self.origin, self.width = origin, width

    def bucket_of(self, value: int) -> int:
        """The bucket `value` is counted in (it must lie in the covered range)."""
        assert self.origin is not None
        return (value - self.origin) // self.width

    def view(
        self, columns: int, keys: Iterable[Any], start: int | None = None, end: int | None = None
    ) -> tuple[int, int, dict[Any, list[int]]]:
        """The series of `keys` regrouped into at most `columns` columns of equal width over
        the buckets holding [start, end] (default: the values seen): (first value, values
        per column, counts per column). Every count of those buckets is in exactly one column."""
        if self.origin is None or self.lo is None or self.hi is None:
            return 0, self.width, {k: [] for k in keys}
        first = self.bucket_of(self.lo if start is None else max(start, self.origin))
        last = self.bucket_of(self.hi if end is None else min(end, self.hi))
        last = max(first, last)
        per = max(1, math.ceil((last - first + 1) / max(1, columns)))
        ncols = math.ceil((last - first + 1) / per)
        out: dict[Any, list[int]] = {}
        for key in keys:
            counts = self.series.get(key, [])
            cols = [0] * ncols
            for i in range(first, min(last + 1, len(counts))):
                cols[(i - first) // per] += counts[i]
            out[key] = cols
        return self.origin + first * self.width, per * self.width, out


@dataclass
class StatusRow:
    """The errors of one status word on one namespace.

    Invariant: count >= 1; first_ns <= last_ns are the least and greatest wall-clock times
    seen; lba_min..lba_max covers every LBA of the commands that carried one (None if none
    did)."""

    status: str
    name: str
    count: int = 0
    first_ns: int = MAX_I64
    last_ns: int = 0
    lba_min: int | None = None
    lba_max: int | None = None

    def rate_per_day(self) -> float:
        """Errors per day between the first and the last: a span shorter than a day counts as
        one day, so a burst is not blown up into a huge daily rate."""
        return self.count * DAY_NS / max(self.last_ns - self.first_ns, DAY_NS)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "name": self.name,
            "count": self.count,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "first": iso(self.first_ns),
            "last": iso(self.last_ns),
            "lba_min": self.lba_min,
            "lba_max": self.lba_max,
            "rate_per_day": round(self.rate_per_day(), 3),
        }


# A namespace's key: (ctrl, nsid, disk), each None when the entries do not say.
NsKey = tuple[str | None, int | None, str | None]


@dataclass
class Namespace:
    """The errors of one namespace: rows by status word, and its LBA map (bucketed by the
    first LBA of each command; commands without one are counted in `no_lba`)."""

    key: NsKey
    rows: dict[str, StatusRow] = field(default_factory=dict)
    lba: Histogram = field(default_factory=lambda: Histogram(BUCKETS, 1, 0))
    no_lba: int = 0
    serial: str | None = None
    model: str | None = None

    @property
    def errors(self) -> int:
        return sum(r.count for r in self.rows.values())

    def label(self) -> str:
        ctrl, nsid, disk = self.key
        parts = [ctrl or "?", f"nsid {nsid if nsid is not None else '?'}"]
        if disk:
            parts.append(f"({disk})")
        return " ".join(parts)

    def sorted_rows(self) -> list[StatusRow]:
        """Most errors first, then by status word."""
        return sorted(self.rows.values(), key=lambda r: (-r.count, int(r.status, 16)))


@dataclass
class Summary:
    """What `summarize` found: the namespaces (at most MAX_NAMESPACES) with their rows, LBA
    maps and one shared time histogram keyed by (namespace key, status), and how many records
    were read, counted, skipped (not NVMe errors), bad, before `since` and over the bounds.

    Invariant: records == errors - folded + skipped + bad + before_since + overflow (a folded
    entry's record counts 1 + repeats errors, `folded` the repeats), and errors is the sum of
    every row's count, of every LBA map's counts plus no_lba, and of the time counts."""

    namespaces: dict[NsKey, Namespace] = field(default_factory=dict)
    time: Histogram = field(default_factory=lambda: Histogram(BUCKETS, MIN_TIME_BUCKET_NS))
    records: int = 0
    errors: int = 0
    skipped: int = 0
    bad: int = 0
    before_since: int = 0
    overflow: int = 0
    folded: int = 0  # errors counted from folded entries' repeats (beyond one per record)
    missed: int = 0  # entries a mount's reader lost (its missed lines), of any kind
    since_ns: int | None = None

    def add(self, rec: Mapping[str, Any] | None) -> None:
        """Count one record (see the module's docstring for which ones count); anything but a
        mapping (None for a line that was no JSON object) counts as bad."""
        self.records += 1
        try:
            if not isinstance(rec, Mapping):
                raise BadRecord("not a JSON object")  # None: a line that did not parse
            if rec.get("kind") != "nvme":
                self.skipped += 1
                missed = rec.get("missed")
                if rec.get("kind") == "missed" and type(missed) is int and missed > 0:
                    self.missed += missed  # a reader's missed line: entries it never saw
                return
            word = rec.get("status")
            if not isinstance(word, str) or not _STATUS.fullmatch(word) or int(word, 16) > 0x7FFF:
                raise BadRecord("status is not a 15-bit word")
            if not int(word, 16) & CODE_MASK:
                self.skipped += 1  # a success (log=all)
                return
            wall = _int(rec, "wall_ns", MAX_I64)
            nsid = _int(rec, "nsid", MAX_U64 >> 32, optional=True)
            slba = _int(rec, "slba", MAX_U64, optional=True)
            nlb = _int(rec, "nlb", MAX_U64 >> 32, optional=True)
            repeats = _int(rec, "repeats", MAX_I64, optional=True) or 0
            try:
                lba_range = events.lba_range(rec.get("lba_range"))
            except ValueError as e:
                raise BadRecord(str(e)) from None
        except BadRecord:
            self.bad += 1
            return
        assert wall is not None
        if self.since_ns is not None and wall < self.since_ns:
            self.before_since += 1
            return
        key: NsKey = (_text(rec.get("ctrl")), nsid, _text(rec.get("disk")))
        ns = self.namespaces.get(key)
        if ns is None:
            if len(self.namespaces) >= MAX_NAMESPACES:
                self.overflow += 1
                return
            ns = self.namespaces[key] = Namespace(key)
        row = ns.rows.get(word)
        if row is None:
            if len(ns.rows) >= MAX_STATUSES:
                self.overflow += 1
                return
            row = ns.rows[word] = StatusRow(word, _text(rec.get("name")) or "")
        n = 1 + repeats  # the failed requests the entry stands for
        self.errors += n
        self.folded += repeats
        row.count += n
        row.first_ns = min(row.first_ns, wall)
        row.last_ns = max(row.last_ns, wall)
        if slba is None:
            ns.no_lba += 1
        else:
            last = slba + max(1, nlb or 1) - 1
            row.lba_min = slba if row.lba_min is None else min(row.lba_min, slba)
            row.lba_max = last if row.lba_max is None else max(row.lba_max, last)
            ns.lba.add(word, slba)
        if repeats:
            if lba_range is None:
                ns.no_lba += repeats
            else:
                lo, hi = lba_range
                row.lba_min = lo if row.lba_min is None else min(row.lba_min, lo)
                row.lba_max = hi if row.lba_max is None else max(row.lba_max, hi)
                ns.lba.spread(word, lo, hi, repeats)
        self.time.add((key, word), wall, n)

    def identify(self, ctrl: str, serial: str | None, model: str | None) -> None:
        """Give the namespaces of controller `ctrl` its serial number and model."""
        for ns in self.namespaces.values():
            if ns.key[0] == ctrl:
                ns.serial, ns.model = _text(serial), _text(model)

    def sorted_namespaces(self) -> list[Namespace]:
        """By controller, nsid, disk (unknown ones first)."""

        def order(ns: Namespace) -> tuple[str, int, str]:
            ctrl, nsid, disk = ns.key
            return (ctrl or "", -1 if nsid is None else nsid, disk or "")

        return sorted(self.namespaces.values(), key=order)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: every number of the summary, series as lists of BUCKETS counts."""
        t = self.time
        out: dict[str, Any] = {
            "records": self.records,
            "errors": self.errors,
            "skipped": self.skipped,
            "bad": self.bad,
            "before_since": self.before_since,
            "overflow": self.overflow,
            "folded": self.folded,
            "missed": self.missed,
            "since_ns": self.since_ns,
            "first_ns": t.lo,
            "last_ns": t.hi,
            "first": None if t.lo is None else iso(t.lo),
            "last": None if t.hi is None else iso(t.hi),
            "time_axis": {"origin_ns": t.origin, "bucket_ns": t.width, "buckets": t.n},
            "namespaces": [],
        }
        for ns in self.sorted_namespaces():
            ctrl, nsid, disk = ns.key
            rows = ns.sorted_rows()
            out["namespaces"].append(
                {
                    "ctrl": ctrl,
                    "nsid": nsid,
                    "disk": disk,
                    "serial": ns.serial,
                    "model": ns.model,
                    "errors": ns.errors,
                    "no_lba": ns.no_lba,
                    "statuses": [r.as_dict() for r in rows],
                    "lba_axis": {
                        "origin": ns.lba.origin,
                        "bucket_lbas": ns.lba.width,
                        "buckets": ns.lba.n,
                    },
                    "lba_map": {r.status: ns.lba.series.get(r.status, [0] * BUCKETS) for r in rows},
                    "over_time": {r.status: t.series[(ns.key, r.status)] for r in rows},
                }
            )
        return out


def summarize(records: Iterable[Mapping[str, Any] | None], since_ns: int | None = None) -> Summary:
    """The summary of `records` (JSON-form ring entries, oldest first or in any order), reading
    each once and holding none: memory is bounded whatever their number. Records with a
    wall-clock time before `since_ns` are left out (counted)."""
    summary = Summary(since_ns=since_ns)
    for rec in records:
        summary.add(rec)
    return summary
