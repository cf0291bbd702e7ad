"""What the register-level engine needs from a controller connection (the simulated one).

The interface is the PCIe view of an NVMe controller and nothing more:
- registers: 32/64-bit reads and writes at BAR0 offsets (nvme.registers names them);
- doorbells: SQ tail and CQ head writes, by doorbell index (2*qid, 2*qid+1);
- host memory the controller reaches by bus address (queues, data buffers, PRP lists);
- a way to wait for an interrupt vector.

Kernel passthrough has no registers: the kernel owns the NVMe queues, so that engine
(engine.passthrough) does not use this interface.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from dataclasses import dataclass

import trio

from nvmefs.nvme.prp import PAGE, PrpError


@dataclass(slots=True)
class DmaBuffer:
    """A region of host memory at bus address `addr`, at least a page, page aligned."""

    addr: int
    view: memoryview

    @property
    def size(self) -> int:
        return len(self.view)


class DmaMemory:
    """Host memory with bus addresses: page-aligned regions a controller can reach."""

    def __init__(self, base: int = 0x1_0000_0000) -> None:
        self._next = base
        self._addrs: list[int] = []
        self._views: list[memoryview] = []
        # The same few (address, length) pairs come back for every command (a command id's
        # buffer, the queues): their views are kept until any region is freed.
        self._cache: dict[tuple[int, int], memoryview] = {}

    def alloc(self, size: int) -> DmaBuffer:
        size = max(PAGE, -(-size // PAGE) * PAGE)
        addr = self._next
        self._next += size + PAGE  # a guard page: overruns hit no other buffer
        view = memoryview(bytearray(size))
        self._addrs.append(addr)
        self._views.append(view)
        return DmaBuffer(addr, view)

    def free(self, buf: DmaBuffer) -> None:
        i = bisect.bisect_left(self._addrs, buf.addr)
        if i < len(self._addrs) and self._addrs[i] == buf.addr:
            del self._addrs[i]
            del self._views[i]
            self._cache.clear()

    def view(self, addr: int, length: int) -> memoryview:
        """The device's view of [addr, addr+length); raises PrpError outside any region."""
        view = self._cache.get((addr, length))
        if view is not None:
            return view
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i >= 0:
            off = addr - self._addrs[i]
            mv = self._views[i]
            if off + length <= len(mv):
                if len(self._cache) >= 4096:  # bounded: a stream of odd addresses must not grow it
                    self._cache.clear()
                view = self._cache[(addr, length)] = mv[off : off + length]
                return view
        raise PrpError(f"DMA to unmapped address {addr:#x}+{length}")


class Transport(ABC):
    """A register-level NVMe controller connection, with the host memory it can reach."""

    name: str = "transport"

    def __init__(self) -> None:
        self.dma = DmaMemory()

    async def start(self, nursery: trio.Nursery) -> None:  # noqa: B027 - optional hook
        """Begin any background work (delayed completions, device watching)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        pass

    @abstractmethod
    def read32(self, offset: int) -> int: ...

    @abstractmethod
    def write32(self, offset: int, value: int) -> None: ...

    @abstractmethod
    def read64(self, offset: int) -> int: ...

    @abstractmethod
    def write64(self, offset: int, value: int) -> None: ...

    @abstractmethod
    def doorbell(self, index: int, value: int) -> None:
        """Write doorbell `index` (2*qid: SQ tail, 2*qid+1: CQ head)."""

    @abstractmethod
    async def wait_interrupt(self, vector: int) -> None:
        """Return once `vector` has fired since the last return (or a poll interval passed)."""

    def mask_interrupt(self, vector: int) -> None:  # noqa: B027 - optional, like INTMS
        """Hold `vector` back while the host polls its completion queue itself."""

    def unmask_interrupt(self, vector: int) -> None:  # noqa: B027 - optional, like INTMC
        """Release `vector`: it fires if its completion queues still hold unconsumed entries."""
