"""The VM runner's own logic (contrib/qemu/vm.py), without a VM: what of the guest's output is
shown, what keeps the stall watchdog quiet, and how a stalled guest's vCPUs are named."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from nvmefs.linux import devices
from tests import contrib
from tests.vm import guest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vm() -> ModuleType:
    return contrib.load("contrib/qemu/vm.py", "nvmefs_vm_runner")


QEMU_AIO = "qemu-system-x86_64: aio failed: Input/output error\n"


def test_qemus_reports_and_the_heartbeat_are_cut_out_the_rest_kept(vm: ModuleType) -> None:
    name = "tests/vm/test_admin.py::test_x "
    assert vm.shown(name + QEMU_AIO) == name  # pytest's "PASSED" follows on the next line
    assert vm.shown(name + vm.HEARTBEAT + "\n") == name
    assert vm.shown(QEMU_AIO) == ""
    assert vm.shown(vm.HEARTBEAT + "\n") == ""
    assert vm.shown("PASSED [  2%]\n") == "PASSED [  2%]\n"


def test_kernel_lines_are_shown_unless_boot_chatter_or_an_injected_io_error(vm: ModuleType) -> None:
    lockup = "[  812.104233] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [python3:912]\n"
    hung = "[  900.000001] INFO: task python3:77 blocked for more than 40 seconds.\n"
    assert vm.shown(lockup) == lockup and vm.shown(hung) == hung
    for noise in [
        "[    0.000000] Linux version 6.1.0-57-amd64\n",
        "Probing EDD (edd=off to disable)... ok\n",
        "[   16.7] nvme7n1: I/O Cmd(0x2) @ LBA 2048, 8 blocks, I/O Error (sct 0x2 / sc 0x81) \n",
        "[   16.8] critical medium error, dev nvme7n1, sector 2048 op 0x0:(READ) flags 0x80700\n",
        "[   16.9] Buffer I/O error on dev nvme7n1, logical block 256, async page read\n",
    ]:
        assert vm.shown(noise) == "", noise


def test_only_the_guests_programs_restart_the_stall_watchdog(vm: ModuleType) -> None:
    # A locked-up kernel repeats its report: that must not pass for a living guest.
    assert not vm.alive("[  834.1] watchdog: BUG: soft lockup - CPU#1 stuck for 44s!\n")
    assert not vm.alive(QEMU_AIO)
    assert vm.alive(vm.HEARTBEAT + "\n")
    assert vm.alive("tests/vm/test_admin.py::test_x " + QEMU_AIO)


KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81001000 t do_idle
ffffffff81002000 T native_safe_halt
ffffffff81a00000 D some_data
ffffffffc0100000 t rb_get_reader_page\t[ring_buffer_test]
"""

REGISTERS = """\
CPU#0
RAX=0000000000000000 RBX=ffff888003f0c000
RSI=0000000000000000 RDI=0000000000000000 RBP=ffffc90000093e90 RSP=ffffc90000093e40
RIP=ffffffffc0100042 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0
CPU#1
RSI=0000000000000000 RDI=0000000000000000 RBP=0000000000000000 RSP=ffffc9000008be80
RIP=ffffffff8100200b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
"""


class FakeMonitor:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None]] = []

    def hmp(self, command: str, cpu: int | None = None) -> str:
        self.calls.append((command, cpu))
        if command == "info registers -a":
            return REGISTERS
        # x /96gx: the stack words, a return address into do_idle among data
        return "ffffc9000008be80: 0x0000000000000000 0xffffffff81001234\n" \
               "ffffc9000008be90: 0xffffffff81a00010 0x00007ffd12345678\n"  # fmt: skip


def test_a_stall_report_names_each_vcpus_place_and_stack(vm: ModuleType, tmp_path: Path) -> None:
    syms = tmp_path / "kallsyms.txt"
    syms.write_text(KALLSYMS)
    mon = FakeMonitor()
    report = vm.stall_report(mon, syms, samples=2, pause=0)
    assert report[0] == (
        "vm: stalled guest, sample 1: cpu0 rb_get_reader_page+0x42 [ring_buffer_test], "
        "cpu1 native_safe_halt+0xb"
    )
    # Only text symbols name stack words: the data address and the user one are left out.
    assert report[1] == "vm:   cpu0 stack: do_idle+0x234"
    assert report[2] == "vm:   cpu1 stack: do_idle+0x234"
    assert report[3].startswith("vm: stalled guest, sample 2: ")
    assert len(report) == 4
    assert ("x /96gx 0xffffc9000008be80", 1) in mon.calls  # each CPU's stack from its own RSP


def test_without_kallsyms_addresses_are_shown_in_hex(vm: ModuleType, tmp_path: Path) -> None:
    name = vm.symbols(tmp_path / "missing")
    assert name(0xFFFFFFFF81002000) == "0xffffffff81002000"


def test_the_guest_script_runs_any_command_whole_with_its_status(
    vm: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command reaches the guest in a file: a retry's long --deselect list is not cut at
    the kernel command line's 2048 bytes. Run here by sh, without the 9p mounts."""
    monkeypatch.setattr(vm, "CACHED", {})
    monkeypatch.setattr(vm, "KALLSYMS", tmp_path / "kallsyms.txt")
    args = [f"--deselect=tests/vm/test_x.py::test_{i} 'quoted' $HOME" for i in range(200)]
    out = tmp_path / "args"
    command = ["python3", "-c", f"import sys; open({str(out)!r}, 'w').write(repr(sys.argv[1:])); "
               "sys.exit(3)", *args]  # fmt: skip
    script = tmp_path / "guest.sh"
    script.write_text(vm.guest_script(command, heartbeat=True))
    # Not its output: the heartbeat's last `sleep` holds that open up to 15 s after the end.
    p = subprocess.run(["sh", str(script)], stdout=subprocess.DEVNULL, timeout=60)
    assert p.returncode == 3 and out.read_text() == repr(args)
    assert "cache=loose" not in script.read_text()
    # With the trees to mount, each is mounted read-only and cached before the command runs.
    monkeypatch.setattr(vm, "CACHED", {"nvmefs-usr": Path("/usr")})
    first, *_ = vm.guest_script(["true"], heartbeat=False).splitlines()
    assert first.startswith("mount -t 9p -o ro,") and "cache=loose" in first
    assert first.endswith("nvmefs-usr /usr || exit 1")


def test_a_controller_lost_after_a_timeout_ends_the_boot_for_a_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tests/vm/guest.py bed_lost: only a controller that is gone after the driver timed out
    commands (in 5.10's or 6.x's words) ends the guest's session, with BED_LOST."""
    here = [devices.Controller("nvme3", "nvmefs-err", "QEMU", "1.0", "pcie", "0000:00:04.0")]
    lines = {
        "5.10": "[  9.1] nvme nvme3: I/O 5 QID 2 timeout, aborting\n",
        "6.12": "[ 115.9] nvme nvme7: I/O tag 68 (9044) opcode 0x2 (I/O Cmd) QID 2 timeout, "
        "reset controller\n",
    }
    for controllers, log, ends in [
        ([], lines["5.10"], True),
        ([], lines["6.12"], True),
        ([], "[  9.1] nvme nvme3: pci function 0000:00:04.0\n", False),  # removed on purpose
        (here, lines["6.12"], False),  # still there: the tests go on
    ]:
        monkeypatch.setattr(devices, "controllers", lambda c=controllers: c)
        monkeypatch.setattr(guest, "dmesg", lambda log=log: log)
        if ends:
            with pytest.raises(pytest.exit.Exception) as e:
                guest.bed_lost("nvmefs-err")
            assert e.value.returncode == guest.BED_LOST
        else:
            guest.bed_lost("nvmefs-err")
