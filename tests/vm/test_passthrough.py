"""Each status from QEMU's real NVMe controller, decoded right, through both transports."""

from __future__ import annotations

import errno
import re
import struct
import subprocess

import pytest

from nvmefs.errors import CommandError
from nvmefs.nvme import commands as c
from nvmefs.nvme.status import Translator
from nvmefs.store.events import HostEvent, NvmeEvent
from nvmefs.store.ring import EVENT, DebugRing
from tests.vm.guest import controller, dmesg, engine_on

PRACT, PRCHK_GUARD, PRCHK_APP, PRCHK_REF = 1 << 29, 1 << 28, 1 << 27, 1 << 26


def logged(ring: DebugRing) -> list[NvmeEvent]:
    return [e[EVENT] for e in ring if isinstance(e[EVENT], NvmeEvent)]


@pytest.mark.parametrize("transport", ["uring", "ioctl"])
async def test_media_write_compare_dulbe_and_range_errors(transport: str) -> None:
    async with engine_on("nvmefs-err", transport, max_retries=0) as (e, ring):
        ns = e.namespaces[0]
        assert (ns.nblocks, ns.lba_size) == (131072, 512)
        read_err = await e.submit(c.read(1, 2048, 1, 512))
        assert read_err.status.code == 0x281 and read_err.status.name == "Unrecovered Read Error"
        assert read_err.status.blk_status == "MEDIUM"
        write_err = await e.submit(c.write(1, 8192, 1, 512, b"\1" * 512))
        assert write_err.status.code == 0x280 and write_err.status.name == "Write Fault"
        assert (await e.submit(c.write(1, 10, 1, 512, b"\2" * 512))).status.ok
        cmp_err = await e.submit(c.compare(1, 10, 1, 512, b"\3" * 512))
        assert cmp_err.status.code == 0x285 and cmp_err.status.name == "Compare Failure"
        assert (await e.submit(c.compare(1, 10, 1, 512, b"\2" * 512))).status.ok
        out = await e.submit(c.read(1, ns.nblocks, 1, 512))
        assert out.status.status == 0x4080 and out.status.name == "LBA Out of Range"
        await e.submit(c.set_features(c.FEAT_ERROR_RECOVERY, c.DULBE, nsid=1))
        try:
            dulbe = await e.submit(c.read(1, 50000, 1, 512))
            assert dulbe.status.status == 0x4287
            assert dulbe.status.name == "Deallocated or Unwritten Logical Block"
        finally:
            await e.submit(c.set_features(c.FEAT_ERROR_RECOVERY, 0, nsid=1))
        codes = [ev.status.status & 0x7FF for ev in logged(ring)]
        assert codes == [0x281, 0x280, 0x285, 0x080, 0x287]
        assert all(ev.ctrl == e.ctrl_name and ev.nsid == 1 for ev in logged(ring))
        assert [ev.slba for ev in logged(ring)][:2] == [2048, 8192]


@pytest.mark.parametrize("transport", ["uring", "ioctl"])
async def test_a_foreign_namespace_is_a_host_error_not_an_nvme_status(transport: str) -> None:
    async with engine_on("nvmefs-err", transport, max_retries=0) as (e, ring):
        with pytest.raises(CommandError) as err:
            await e.submit(c.read(2, 0, 1, 512))
        assert getattr(err.value, "errno", None) == errno.EINVAL
        hosts = [x[EVENT] for x in ring if isinstance(x[EVENT], HostEvent)]
        assert hosts and hosts[0].kind == "host-error" and "EINVAL" in hosts[0].message
        assert not logged(ring) and (False, c.NVM_READ) not in e.stats.by_opcode


def pi(guard: int, app: int, ref: int) -> bytes:
    return struct.pack(">HHI", guard, app, ref)


async def test_protection_information_guard_app_and_ref_tag_errors() -> None:
    async with engine_on("nvmefs-pi", max_retries=0) as (e, ring):
        zeros = bytes(512)  # the T10-DIF CRC of zeros is 0: guard 0 is the right guard

        def w(slba: int, meta: bytes, prinfo: int, cdw14: int = 0, cdw15: int = 0) -> c.Command:
            cmd = c.write(1, slba, 1, 512, zeros)
            cmd.metadata, cmd.cdw12, cmd.cdw14, cmd.cdw15 = meta, cmd.cdw12 | prinfo, cdw14, cdw15
            return cmd

        ok = await e.submit(w(5, pi(0, 0, 5), PRCHK_GUARD | PRCHK_REF, cdw14=5))
        assert ok.status.ok
        guard = await e.submit(w(6, pi(0xDEAD, 0, 6), PRCHK_GUARD, cdw14=6))
        assert guard.status.code == 0x282
        app = await e.submit(w(7, pi(0, 0, 7), PRCHK_APP, cdw14=7, cdw15=0xFFFF0000 | 0x1234))
        assert app.status.code == 0x283
        ref = await e.submit(w(8, pi(0, 0, 99), PRCHK_REF, cdw14=8))
        assert ref.status.code == 0x284
        # Type 1 PI: the expected initial reference tag must be the LBA itself.
        invalid = await e.submit(w(9, pi(0, 0, 9), PRCHK_REF, cdw14=1234))
        assert invalid.status.status == 0x4181
        names = [ev.status.name for ev in logged(ring)]
        assert names == [
            "End-to-end Guard Check Error",
            "End-to-end Application Tag Check Error",
            "End-to-end Reference Tag Check Error",
            "Invalid Protection Information",
        ]
        assert {ev.status.blk_status for ev in logged(ring)} == {"PROTECTION"}


async def test_zone_errors_from_a_zoned_namespace() -> None:
    async with engine_on("nvmefs-zns", max_retries=0) as (e, ring):
        # Zone 0's write pointer is at LBA 0: a write at LBA 100 is not at the write pointer.
        bad = await e.submit(c.write(1, 100, 1, 512, bytes(512)))
        assert bad.status.status == 0x41BC and bad.status.name == "Zone Invalid Write"
        assert (await e.submit(c.write(1, 0, 1, 512, bytes(512)))).status.ok
        assert logged(ring)[0].status.status == 0x41BC


async def test_read_only_drive_write_is_a_write_fault() -> None:
    async with engine_on("nvmefs-ro", max_retries=0) as (e, _ring):
        st = (await e.submit(c.write(1, 0, 1, 512, bytes(512)))).status
        assert st.code == 0x280 and st.blk_status == "MEDIUM"


def test_the_guest_kernel_agrees_with_our_decoding() -> None:
    """The kernel's own messages for the same failing sector name the same status."""
    ctrl = controller("nvmefs-err")
    blk = ctrl.namespaces[0].block
    p = subprocess.run(
        ["dd", f"if={blk}", "of=/dev/null", "bs=512", "skip=2048", "count=1", "iflag=direct"],
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0
    log = dmesg()
    dev = blk.removeprefix("/dev/")
    m = re.search(
        rf"{dev}: I/O Cmd\(0x2\) @ LBA 2048, 1 blocks, I/O Error "
        rf"\(sct 0x([0-9a-f]+) / sc 0x([0-9a-f]+)\)",
        log,
    )
    assert m, log[-2000:]
    st = Translator().decode(int(m.group(1), 16) << 8 | int(m.group(2), 16))
    assert (st.sct, st.sc) == (2, 0x81)
    assert f"{st.blk_string} error, dev {dev}, sector 2048" in log


def test_list_and_source_paths_map_to_generic_nodes() -> None:
    import json
    import sys

    from nvmefs.linux import devices

    p = subprocess.run(
        [sys.executable, "-m", "nvmefs", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    listed = {c["serial"]: c for c in json.loads(p.stdout)}
    assert set(listed) >= {"nvmefs-err", "nvmefs-pi", "nvmefs-zns", "nvmefs-ro", "nvmefs-slow"}
    err = listed["nvmefs-err"]
    ns = err["namespaces"][0]
    assert (ns["nsid"], ns["size"], ns["lba_size"]) == (1, 64 << 20, 512)
    assert ns["generic"].startswith("/dev/ng") and err["model"] == "QEMU NVMe Ctrl"
    # /dev/nvmeXnY maps to its generic node; /dev/nvmeX takes all its namespaces.
    assert [n.generic for n in devices.resolve(ns["block"]).namespaces] == [ns["generic"]]
    whole = devices.resolve(f"/dev/{err['name']}")
    assert [n.nsid for n in whole.namespaces] == [1]
    with pytest.raises(devices.DeviceError, match="no such device"):
        devices.resolve(ns["generic"][:-1] + "9")
    with pytest.raises(devices.DeviceError, match="not an NVMe device"):
        devices.resolve("/dev/null")
