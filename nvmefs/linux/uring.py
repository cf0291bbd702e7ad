"""A minimal io_uring for NVMe passthrough (IORING_OP_URING_CMD), through cffi and raw syscalls.

The ring is set up with SQE128/CQE32, as NVMe passthrough requires: the 72-byte nvme_uring_cmd
rides in the SQE from byte 48, and the command's 64-bit result comes back in the big CQE. An
eventfd registered with the ring wakes the reaper; there is no busy loop and no thread.

This ring carries the engine's per-command I/O (single commands, retries, requeues after a
hot-unplug) and, with `datapath=python`, the bulk reads too. The compiled bulk loop has its own
ring, set up by liburing (bulk.c). This one stays on plain syscalls through cffi's ABI mode on
purpose: it is the fallback where the compiled module was not built or does not load, and a
fallback must not need what it falls back from.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
from collections.abc import Iterator

import cffi

ffi = cffi.FFI()
ffi.cdef(
    """
    struct io_sqring_offsets {
        uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1;
        uint64_t user_addr;
    };
    struct io_cqring_offsets {
        uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1;
        uint64_t user_addr;
    };
    struct io_uring_params {
        uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features, wq_fd;
        uint32_t resv[3];
        struct io_sqring_offsets sq_off;
        struct io_cqring_offsets cq_off;
    };
    long syscall(long number, ...);
    """
)
_libc = ffi.dlopen(None)

SYS_IO_URING_SETUP, SYS_IO_URING_ENTER, SYS_IO_URING_REGISTER = 425, 426, 427  # x86_64, arm64
IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_CQE32 = 1 << 11
IORING_FEAT_SINGLE_MMAP = 1
IORING_OFF_SQ_RING, IORING_OFF_CQ_RING, IORING_OFF_SQES = 0, 0x8000000, 0x10000000
IORING_REGISTER_EVENTFD = 4
IORING_OP_URING_CMD = 46
NVME_URING_CMD_IO = 0xC0484E80
NVME_URING_CMD_ADMIN = 0xC0484E82

SQE_SIZE, CQE_SIZE = 128, 32
# A whole 128-byte SQE in one pack (every byte written, so no clearing first):
#   opcode, flags, ioprio, fd, cmd_op, pad, addr, len, uring_cmd_flags, user_data, 8 zero bytes,
#   then from byte 48 the nvme_uring_cmd: opcode flags rsvd1 nsid cdw2 cdw3 metadata addr
#   metadata_len data_len cdw10..cdw15 timeout_ms rsvd2, and 8 bytes of padding.
_SQE_NVME = struct.Struct("<BBHiIIQIIQ8x" + "BBHIIIQQIIIIIIIIII" + "8x")
assert _SQE_NVME.size == SQE_SIZE
_CQE = struct.Struct("<QiIQQ")
_ZERO_U, _ZERO_SIZE = ffi.cast("unsigned", 0), ffi.cast("size_t", 0)
_U32 = struct.Struct("<I")


def _syscall(nr: int, *args: object) -> int:
    ret = int(_libc.syscall(ffi.cast("long", nr), *args))
    if ret < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    return ret


def supported() -> bool:
    """Can this kernel set up an SQE128/CQE32 ring? (io_uring passthrough needs Linux >= 5.19.)"""
    try:
        ring = Uring(2)
    except OSError:
        return False
    ring.close()
    return True


class Uring:
    """An io_uring with 128-byte SQEs and 32-byte CQEs for NVMe passthrough, its completions
    signalled on `eventfd`. Invariant: `_tail` is where the next prepared SQE goes, and
    `_pending` SQEs have been prepared since the last submit()."""

    def __init__(self, entries: int) -> None:
        p = ffi.new("struct io_uring_params *")
        p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQE32
        self.fd = _syscall(SYS_IO_URING_SETUP, ffi.cast("unsigned", entries), p)
        self._fd_arg = ffi.cast("unsigned", self.fd)  # cast once: submit() runs per batch
        try:
            self.entries = p.sq_entries
            sq_size = p.sq_off.array + p.sq_entries * 4
            cq_size = p.cq_off.cqes + p.cq_entries * CQE_SIZE
            prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | mmap.MAP_POPULATE
            if p.features & IORING_FEAT_SINGLE_MMAP:
                self._sq = self._cq = mmap.mmap(
                    self.fd, max(sq_size, cq_size), flags, prot, offset=IORING_OFF_SQ_RING
                )
            else:
                self._sq = mmap.mmap(self.fd, sq_size, flags, prot, offset=IORING_OFF_SQ_RING)
                self._cq = mmap.mmap(self.fd, cq_size, flags, prot, offset=IORING_OFF_CQ_RING)
            self._sqes = mmap.mmap(
                self.fd, p.sq_entries * SQE_SIZE, flags, prot, offset=IORING_OFF_SQES
            )
            self._sq_tail_off, self._sq_mask = p.sq_off.tail, p.sq_entries - 1
            self._cq_head_off, self._cq_tail_off = p.cq_off.head, p.cq_off.tail
            self._cq_mask, self._cqes_off = p.cq_entries - 1, p.cq_off.cqes
            # The SQ index array never changes: slot i submits SQE i.
            for i in range(p.sq_entries):
                _U32.pack_into(self._sq, p.sq_off.array + 4 * i, i)
            self._tail = _U32.unpack_from(self._sq, self._sq_tail_off)[0]
            self._pending = 0
            self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            efd = ffi.new("int *", self.eventfd)
            _syscall(
                SYS_IO_URING_REGISTER,
                ffi.cast("unsigned", self.fd),
                ffi.cast("unsigned", IORING_REGISTER_EVENTFD),
                efd,
                ffi.cast("unsigned", 1),
            )
        except BaseException:
            os.close(self.fd)
            raise

    def prep_nvme(self, fd: int, admin: bool, user_data: int, cmd: tuple[int, ...]) -> None:
        """Queue one NVMe command for the next submit(); `cmd` is the 18 nvme_uring_cmd fields."""
        _SQE_NVME.pack_into(
            self._sqes,
            (self._tail & self._sq_mask) * SQE_SIZE,
            IORING_OP_URING_CMD,
            0,
            0,
            fd,
            NVME_URING_CMD_ADMIN if admin else NVME_URING_CMD_IO,
            0,
            0,
            0,
            0,
            user_data,
            *cmd,
        )
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        self._pending += 1

    def submit(self) -> int:
        """Publish the queued SQEs and tell the kernel; returns how many it took."""
        if not self._pending:
            return 0
        _U32.pack_into(self._sq, self._sq_tail_off, self._tail)
        n = self._pending
        done = 0
        while done < n:
            try:
                done += _syscall(
                    SYS_IO_URING_ENTER,
                    self._fd_arg,
                    ffi.cast("unsigned", n - done),
                    _ZERO_U,
                    _ZERO_U,
                    ffi.NULL,
                    _ZERO_SIZE,
                )
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    continue
                raise
        self._pending = 0
        return n

    def completions(self) -> Iterator[tuple[int, int, int]]:
        """(user_data, res, result) for every new CQE; the head advances as they are taken."""
        cq = self._cq
        head = _U32.unpack_from(cq, self._cq_head_off)[0]
        tail = _U32.unpack_from(cq, self._cq_tail_off)[0]
        while head != tail:
            off = self._cqes_off + (head & self._cq_mask) * CQE_SIZE
            user_data, res, _flags, big0, _big1 = _CQE.unpack_from(cq, off)
            head = (head + 1) & 0xFFFFFFFF
            _U32.pack_into(cq, self._cq_head_off, head)
            yield user_data, res, big0
            if head == tail:
                tail = _U32.unpack_from(cq, self._cq_tail_off)[0]

    def drain_eventfd(self) -> None:
        with contextlib.suppress(BlockingIOError):  # already drained by an earlier wake-up
            os.eventfd_read(self.eventfd)

    def close(self) -> None:
        for m in {id(x): x for x in (self._sq, self._cq, self._sqes)}.values():
            m.close()
        os.close(self.eventfd)
        os.close(self.fd)
