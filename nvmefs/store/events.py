"""What a ring entry records. Plain data: rendering lives in render.py.

The strings of an event (ctrl, disk, op; kind, message, field keys and values) are held as
they came, whatever characters they hold: from this run, from a journal replayed, from the
kernel. Nothing here cleans them; render.py escapes every one of them, by one rule, where it
puts them into text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nvmefs.nvme.status import Status

# Who owns an LBA (nvmefs locate's answer, and an entry's `place`): a file, filesystem metadata,
# free space, or nobody nvmefs could find (with the reason).
OWNERS = ("file", "metadata", "free", "unresolved")


@dataclass(frozen=True, slots=True)
class Place:
    """What owns the first LBA of an entry's request, as `nvmefs locate` found it: `owner` is one
    of OWNERS; `file` and `file_range` ([start, end) in bytes of the file) when a file does;
    `reason` says why for "unresolved" and which for "metadata". `partition` and `fs` name the
    block device and filesystem type the LBA lies in, `fs_block` its filesystem block."""

    owner: str
    partition: str | None = None
    fs: str | None = None
    fs_block: int | None = None
    file: str | None = None
    file_range: tuple[int, int] | None = None
    reason: str | None = None


@dataclass(slots=True)
class NvmeEvent:
    """A completion with an NVMe status, and what is known about the command behind it."""

    status: Status
    ctrl: str | None = None
    nsid: int | None = None
    qid: int | None = None
    cid: int | None = None
    opcode: int | None = None
    admin: bool = False
    slba: int | None = None
    nlb: int | None = None  # number of logical blocks (1-based, unlike the 0-based NLB field)
    retries: int | None = None  # earlier attempts of this command (the kernel's nvme_req->retries)
    disk: str | None = None  # the block disk (kernel source)
    op: str | None = None  # what the request was when the opcode is unknown (kernel source)
    replayed: bool = False  # read back from the journal of an earlier run, not seen by this one
    origin: str | None = None  # KMSG: read from the kernel log, not seen by a source
    place: Place | None = None  # what owns slba (kernel source, `locate`), when it was found
    # A folded entry (engine/sink.py's Folder, in a storm) stands for 1 + `repeats` failed
    # requests: this one and `repeats` more like it (same status, opcode, controller and
    # namespace) that differed only in LBA, cid, qid or retries. `lba_range` is the lowest
    # first LBA .. the highest last LBA of all of them (this one's included); None when the
    # entry folds nothing (repeats 0) or none of them had an LBA.
    repeats: int = 0
    lba_range: tuple[int, int] | None = None

    kind = "nvme"


# Kinds of host-side event: none of them carries an NVMe status.
START = "start"  # the recorder came up (the seed's "driver finished loading")
HOST_ERROR = "host-error"  # a negative passthrough result: -ENODEV, -EINTR, -EINVAL...
TIMEOUT = "timeout"
ABORT = "abort"
RESET = "reset"
NOTICE = "notice"  # controller error-log entries, SMART critical warnings, device attach/detach
LOST = "lost"  # trace events the kernel dropped before nvmefs read them (kernel source)
# A failed request the kernel log tells of without an NVMe status (the block layer's line alone:
# kernels before 5.18), or lines of it the kernel's rate limit suppressed.
KERNEL_LOG = "kernel-log"

# Every kind above, in the order shown.
HOST_KINDS = (START, HOST_ERROR, TIMEOUT, ABORT, RESET, NOTICE, LOST, KERNEL_LOG)

# The origin of an entry read from the kernel log (/dev/kmsg) at start: an error from before
# the source started, which no source of this run saw.
KMSG = "kmsg"
ORIGINS = (KMSG,)

# The field of the notice a clear leaves: how many entries it removed. A journal's replay stops
# there, as the ring's history did.
CLEARED = "cleared"


def lba_range(value: Any) -> tuple[int, int] | None:
    """A record's `lba_range` (the JSON form of NvmeEvent.lba_range: [lowest, highest], LBAs
    of 64 bits), or None for null or no key; ValueError for anything else."""
    if value is None:
        return None
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(type(x) is int and 0 <= x < 1 << 64 for x in value)
        and value[0] <= value[1]
    ):
        raise ValueError("lba_range is not an LBA range")
    return (value[0], value[1])


@dataclass(slots=True)
class HostEvent:
    """Something the host saw or did, with no NVMe status: `kind` is one of the kinds above."""

    kind: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    replayed: bool = False  # read back from the journal of an earlier run, not seen by this one
    origin: str | None = None  # KMSG: read from the kernel log, not seen by a source
