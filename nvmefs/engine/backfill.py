"""Backfill: the NVMe errors of this boot from before the kernel source started, read once at
start from the kernel's own log (/dev/kmsg, which hands out its printk ring from the oldest
record it still holds).

Each failed request the log tells of (nvme/kernlog.py pairs its NVMe and block lines) becomes
one entry marked `origin = kmsg`, timed when the kernel printed it:
  - with an NVMe line (Linux >= 5.18): an NvmeEvent, its status decoded by the translator as
    a traced one would be, with the disk, controller, nsid, LBA and blocks the lines give;
  - with the block layer's line alone (older kernels): a `kernel-log` host entry with the disk,
    the LBA (from the 512-byte sector) and the blk_status;
  - `callbacks suppressed`: a `kernel-log` host entry with the count the rate limit dropped.
The log policy applies as to traced errors. Backfilled entries are not counted as this run's
completions (no source of this run saw them): the counters stay what the sources saw.

Only records printed after the newest entry replayed from the journal are taken: an error the
previous run of this boot traced is journaled at or after the moment the kernel logged it, so a
restart within a boot adds nothing twice (an error that run missed, before its last entry, is
not recovered: that run counted it lost). A log that has wrapped (its first record is not the
boot's first) is said so in a notice, with the time it covers from. The log is read before
tracing starts: an error in the moment between the two is in neither.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nvmefs.linux import devices
from nvmefs.nvme.kernlog import Failure, Record, Suppressed, pair, parse_record
from nvmefs.nvme.policy import LogPolicy
from nvmefs.nvme.status import Translator
from nvmefs.store import events
from nvmefs.store.events import KMSG, HostEvent, NvmeEvent
from nvmefs.store.ring import Cursor, DebugRing

log = logging.getLogger("nvmefs")

KMSG_PATH = "/dev/kmsg"
# One read(2) of /dev/kmsg returns one record; records are at most about 1 KiB (LOG_LINE_MAX
# plus the dictionary), and a shorter buffer fails with EINVAL.
RECORD_MAX = 8192
# The most records read: the printk ring holds a few thousand at its usual sizes; this bounds
# a start on a machine with a huge log_buf_len.
RECORDS_MAX = 1 << 20


def read_kmsg(path: str = KMSG_PATH) -> Iterator[Record]:
    """The records the kernel log holds now, oldest first (at most RECORDS_MAX); records the
    kernel overwrites while they are read are passed over. OSError if it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        for _ in range(RECORDS_MAX):
            try:
                raw = os.read(fd, RECORD_MAX)
            except BlockingIOError:
                return  # all of it read
            except OSError as e:
                if e.errno == errno.EPIPE:  # overwritten before we got to it: go on
                    continue
                raise
            if not raw:
                return
            rec = parse_record(raw)
            if rec is not None:
                yield rec
    finally:
        os.close(fd)


@dataclass
class DiskInfo:
    """What sysfs says of a disk the log names: its controller, namespace and block size."""

    ctrl: str | None = None
    nsid: int | None = None
    lba_size: int | None = None


@dataclass
class Disks:
    """Disk name -> DiskInfo from sysfs (`root` is /sys), looked up once each."""

    root: Path = Path("/sys")
    _known: dict[str, DiskInfo] = field(default_factory=dict)

    def info(self, name: str) -> DiskInfo:
        found = self._known.get(name)
        if found is None:
            found = self._known[name] = self._look_up(name)
        return found

    def lba_size(self, name: str) -> int | None:
        return self.info(name).lba_size

    def _look_up(self, name: str) -> DiskInfo:
        base = self.root / "class" / "block" / name  # path disks (nvmeXcYnZ) are only here
        info = DiskInfo(lba_size=_read_int(base / "queue" / "logical_block_size"))
        info.nsid = _read_int(base / "nsid")
        path = devices.path_disk(name)
        if path is not None:  # the controller the path goes through
            info.ctrl = path[1]
        else:
            try:
                device = os.path.basename(os.readlink(base / "device"))
            except OSError:
                device = ""
            info.ctrl = device if re.fullmatch(r"nvme\d+", device) else None
        return info


def head_of(name: str) -> str | None:
    """The namespace head (nvmeXnZ) of a native-multipath path disk (nvmeXcYnZ), else None."""
    path = devices.path_disk(name)
    return path[0] if path else None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def newest_replayed_wall_ns(ring: DebugRing) -> int:
    """The wall-clock time of the newest entry the ring holds from a journal (0: none)."""
    _missed, entries = Cursor(ring, 0).take()
    return max((wall for _seq, _mono, wall, event in entries if event.replayed), default=0)


def backfill(
    ring: DebugRing,
    records: Iterable[Record],
    translator: Translator,
    policy: LogPolicy,
    disks: Disks,
    after_wall_ns: int = 0,
    keep: Callable[[str, DiskInfo], bool] | None = None,
) -> int:
    """Append the failures among `records` printed after `after_wall_ns` (see the module
    docstring), in time order, of the disks (or, admin, controllers) `keep(name, info)` takes
    (all without it); returns how many entries were appended."""
    # Kernel log times are the boot's monotonic clock (local_clock): wall time is now's wall
    # time less how long ago the record was printed.
    offset = time.time_ns() - time.monotonic_ns()
    first: Record | None = None

    def noted(recs: Iterable[Record]) -> Iterator[Record]:
        nonlocal first
        for rec in recs:
            if first is None:
                first = rec
            yield rec

    found = sorted(pair(noted(records), disks.lba_size), key=lambda f: f.usec)
    appended = 0
    if first is not None and first.seq != 0:
        wall = (first.usec * 1000 + offset) // 1_000_000_000
        ring.append(
            HostEvent(
                events.NOTICE,
                f"the kernel log has wrapped: it holds records from {first.usec / 1e6:.6f} s "
                f"after boot (wall clock {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(wall))})"
                " on; errors before that are not backfilled",
                origin=KMSG,
            )
        )
        appended += 1
    for item in found:
        mono_ns = item.usec * 1000
        wall_ns = mono_ns + offset
        if wall_ns <= after_wall_ns:
            continue
        if keep is not None and isinstance(item, Failure):
            info = disks.info(item.name) if not item.admin else DiskInfo(ctrl=item.name)
            if not keep(item.name, info):
                continue
        event = _event(item, translator, policy, disks)
        if event is not None:
            ring.append(event, mono_ns, wall_ns)
            appended += 1
    return appended


def _event(
    item: Failure | Suppressed, translator: Translator, policy: LogPolicy, disks: Disks
) -> NvmeEvent | HostEvent | None:
    if isinstance(item, Suppressed):
        return HostEvent(
            events.KERNEL_LOG,
            f"{item.function}: {item.count} kernel log lines suppressed by its rate limit",
            {"suppressed": item.count},
            origin=KMSG,
        )
    info = disks.info(item.name) if not item.admin else DiskInfo(ctrl=item.name)
    lba_size = info.lba_size
    if item.status is None:
        lba = item.sector * 512 // lba_size if item.sector is not None and lba_size else None
        return HostEvent(
            events.KERNEL_LOG,
            f"{item.blk_status} error, dev {item.name}, sector {item.sector} ({item.op})",
            {
                "disk": head_of(item.name) or item.name,
                "slba": lba,
                "blk_status": item.blk_status,
                "op": item.op,
            },
            origin=KMSG,
        )
    if not policy.logs(item.status):
        return None
    return NvmeEvent(
        translator.table[item.status],
        ctrl=info.ctrl,
        nsid=None if item.admin else info.nsid,
        opcode=item.opcode,
        admin=item.admin,
        slba=item.lba,
        nlb=item.blocks,
        disk=None if item.admin else head_of(item.name) or item.name,
        op=item.op,
        origin=KMSG,
    )
