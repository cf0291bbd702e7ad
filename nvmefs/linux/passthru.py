"""The kernel's NVMe passthrough ABI (include/uapi/linux/nvme_ioctl.h) and host memory for it.

`fields()` lays a Command out as the fields `struct nvme_uring_cmd` and `struct
nvme_passthru_cmd64` share; the ioctl form adds the 64-bit result. A passthrough call returns the
15-bit NVMe status (>= 0) or a negative errno: the host, not the controller, failed it.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import struct

from nvmefs.nvme.commands import Command
from nvmefs.nvme.layouts import ffi

NVME_IOCTL_ADMIN64_CMD = 0xC0504E47
NVME_IOCTL_IO64_CMD = 0xC0504E48
# struct nvme_passthru_cmd64, 80 bytes: nvme_uring_cmd's 72 and the 64-bit result.
PASSTHRU64 = struct.Struct("<BBHIIIQQIIIIIIIIIIQ")
RESULT_MASK = 0xFFFFFFFF  # the result is dword 0 of the completion


def fields(cmd: Command, addr: int, meta: HostBuffer | None, timeout_s: float) -> tuple[int, ...]:
    """The fields nvme_uring_cmd and nvme_passthru_cmd64 share, in order."""
    maddr, mlen = (meta.addr, len(cmd.metadata or b"")) if meta is not None else (0, 0)
    return (
        cmd.opcode,
        0,
        0,
        cmd.nsid,
        0,
        0,
        maddr,
        addr if cmd.data_len else 0,
        mlen,
        cmd.data_len,
        cmd.cdw10,
        cmd.cdw11,
        cmd.cdw12,
        cmd.cdw13,
        cmd.cdw14,
        cmd.cdw15,
        int(timeout_s * 1000),
        0,
    )


def ioctl(fd: int, admin: bool, arg: bytearray) -> int:
    """One passthrough ioctl (blocking: run it in a worker thread); the status or -errno."""
    request = NVME_IOCTL_ADMIN64_CMD if admin else NVME_IOCTL_IO64_CMD
    try:
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as e:
        return -(e.errno or errno.EIO)


class HostBuffer:
    """Page-aligned anonymous memory and its address, for the kernel to transfer into."""

    __slots__ = ("addr", "view")

    def __init__(self, size: int) -> None:
        self.view = mmap.mmap(-1, size)
        self.addr = int(ffi.cast("uintptr_t", ffi.from_buffer(self.view)))


class BufferPool:
    """Host buffers reused by size (whole pages); `take` then `give` back when done."""

    def __init__(self) -> None:
        self._free: dict[int, list[HostBuffer]] = {}

    def take(self, size: int) -> HostBuffer:
        size = max(mmap.PAGESIZE, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        free = self._free.get(size)
        return free.pop() if free else HostBuffer(size)

    def give(self, buf: HostBuffer | None) -> None:
        if buf is not None:
            self._free.setdefault(len(buf.view), []).append(buf)
