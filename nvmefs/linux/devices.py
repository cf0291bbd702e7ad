"""NVMe devices the kernel exposes: discovery through sysfs, and SOURCE paths resolved to nodes.

A controller is /dev/nvmeX (admin commands); each namespace has a block node /dev/nvmeXnY and a
generic character node /dev/ngXnY, which takes any I/O command without a filesystem in the way.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from nvmefs.errors import UsageError

SYSFS = Path("/sys/class/nvme")
_CTRL = re.compile(r"^/dev/nvme(\d+)$")
_BLK = re.compile(r"^/dev/nvme(\d+)n(\d+)$")
_NG = re.compile(r"^/dev/ng(\d+)n(\d+)$")


class DeviceError(UsageError):
    """A SOURCE path that names no usable NVMe device."""


@dataclass
class NamespaceNode:
    """A namespace's nodes and geometry as sysfs shows them."""

    nsid: int
    generic: str  # /dev/ngXnY
    block: str  # /dev/nvmeXnY
    size: int  # bytes
    lba_size: int
    max_transfer: int = 0  # bytes per command the kernel allows (MDTS); 0 if unknown


@dataclass
class Controller:
    """A controller as sysfs shows it, with its namespaces."""

    name: str  # nvme0
    serial: str
    model: str
    firmware: str
    transport: str  # pcie, tcp, ...
    address: str
    namespaces: list[NamespaceNode] = field(default_factory=list)

    @property
    def node(self) -> str:
        return f"/dev/{self.name}"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def controller_serial(name: str, sysfs: Path = SYSFS) -> str:
    """The serial number of controller `name` (nvme0), or "" if there is no such controller."""
    return _read(sysfs / name / "serial")


def serials(sysfs: Path = SYSFS) -> dict[str, str]:
    """Controller name -> serial number, and nothing else: cheap enough to ask often."""
    return {
        d.name: _read(d / "serial") for d in sysfs.glob("nvme*") if re.fullmatch(r"nvme\d+", d.name)
    }


def controllers(sysfs: Path = SYSFS) -> list[Controller]:
    out = []
    for ctrl_dir in sorted(sysfs.glob("nvme*"), key=lambda p: int(p.name[4:] or 0)):
        if not re.fullmatch(r"nvme\d+", ctrl_dir.name):
            continue
        ctrl = Controller(
            name=ctrl_dir.name,
            serial=_read(ctrl_dir / "serial"),
            model=_read(ctrl_dir / "model"),
            firmware=_read(ctrl_dir / "firmware_rev"),
            transport=_read(ctrl_dir / "transport"),
            address=_read(ctrl_dir / "address"),
        )
        inst = ctrl_dir.name[4:]
        for ns_dir in sorted(ctrl_dir.glob("nvme*n*")):
            # nvme<subsys>n<head>, or with native multipath the hidden path
            # nvme<subsys>c<ctrl>n<head>, whose block node is the head's.
            m = re.fullmatch(r"nvme(\d+)(?:c\d+)?n(\d+)", ns_dir.name)
            if not m:
                continue
            nsid = int(_read(ns_dir / "nsid") or m.group(2))
            sectors = int(_read(ns_dir / "size") or 0)
            lba = int(_read(ns_dir / "queue" / "logical_block_size") or 512)
            max_kb = _read(ns_dir / "queue" / "max_hw_sectors_kb")
            ctrl.namespaces.append(
                NamespaceNode(
                    nsid=nsid,
                    generic=f"/dev/ng{inst}n{m.group(2)}",
                    block=f"/dev/nvme{m.group(1)}n{m.group(2)}",
                    size=sectors * 512,
                    lba_size=lba,
                    max_transfer=int(max_kb) * 1024 if max_kb.isdigit() else 0,
                )
            )
        ctrl.namespaces.sort(key=lambda n: n.nsid)
        out.append(ctrl)
    return out


@dataclass(frozen=True)
class Disk:
    """A block disk as sysfs shows it: its name, dev_t, namespace id and LBA size.

    With native multipath a namespace is a head disk (nvmeXnZ, the one with a device node)
    over one hidden path disk per controller (nvmeXcYnZ): a path disk has `head` set to its
    head's name and `ctrl` to the controller it goes through (nvmeY), and no dev_t of its own
    (dev 0, as its trace events carry it). Invariant: `head` is None exactly when `ctrl` is."""

    name: str
    dev: int  # the kernel's internal dev_t (major << 20 | minor), as trace events carry it
    nsid: int | None
    lba_size: int
    head: str | None = None  # a path disk's namespace head (nvmeXnZ)
    ctrl: str | None = None  # a path disk's controller (nvmeY)

    @property
    def namespace(self) -> str:
        """The name of the namespace's disk, as users know it: the head of a path disk."""
        return self.head or self.name


SYS_BLOCK = Path("/sys/block")
MINORBITS = 20
_PATH_DISK = re.compile(r"nvme(\d+)c(\d+)n(\d+)")


def path_disk(name: str) -> tuple[str, str] | None:
    """(head, controller) of a native-multipath path disk name (nvme0c1n1 -> nvme0n1, nvme1);
    None for any other name."""
    m = _PATH_DISK.fullmatch(name)
    return (f"nvme{m[1]}n{m[3]}", f"nvme{m[2]}") if m else None


def kernel_dev(major: int, minor: int) -> int:
    """The kernel's internal dev_t, as trace events carry it (not the userspace encoding)."""
    return major << MINORBITS | minor


def disks(sys_block: Path = SYS_BLOCK) -> dict[str, Disk]:
    """Every NVMe block disk by name (nvme0n1), with what an entry needs to say about it; the
    hidden path disks of native multipath (nvme0c1n1) too, which have no dev_t (dev 0)."""
    out = {}
    for d in sys_block.glob("nvme*"):
        major, _, minor = _read(d / "dev").partition(":")
        path = path_disk(d.name)
        if major.isdigit() and minor.isdigit():
            dev = kernel_dev(int(major), int(minor))
        elif path is not None and d.is_dir():
            dev = 0  # a hidden disk: the kernel gives it no device number
        else:
            continue
        nsid = _read(d / "nsid")
        out[d.name] = Disk(
            name=d.name,
            dev=dev,
            nsid=int(nsid) if nsid.isdigit() else None,
            lba_size=int(_read(d / "queue" / "logical_block_size") or 512),
            head=path[0] if path else None,
            ctrl=path[1] if path else None,
        )
    return out


def paths(head: str | None = None, sys_block: Path = SYS_BLOCK) -> list[str]:
    """The path disks of the namespace head `head` (nvme0n1 -> [nvme0c0n1, nvme0c1n1]), or of
    every head: cheap enough to ask often (names only)."""
    return sorted(
        d.name
        for d in sys_block.glob("nvme*c*n*")
        if (p := path_disk(d.name)) and head in (None, p[0])
    )


MAX_RETRIES = Path("/sys/module/nvme_core/parameters/max_retries")
DEFAULT_MAX_RETRIES = 5  # nvme_core's default


def kernel_max_retries(param: Path = MAX_RETRIES) -> int:
    """The kernel's nvme_core.max_retries: attempts after the first before a request fails."""
    value = _read(param)
    return int(value) if value.isdigit() else DEFAULT_MAX_RETRIES


@dataclass
class DeviceSource:
    """What a device SOURCE names: a controller and the namespaces to use."""

    path: str
    controller: Controller
    namespaces: list[NamespaceNode]


def resolve(path: str, sysfs: Path = SYSFS) -> DeviceSource:
    """/dev/ngXnY, /dev/nvmeXnY (mapped to its generic node) or /dev/nvmeX (all namespaces)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DeviceError(f"{path}: no such device") from None
    except OSError as e:
        raise DeviceError(f"{path}: {e.strerror}") from None
    real = os.path.realpath(path)
    if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise DeviceError(f"{path}: not a device node")
    m_ctrl, m_blk, m_ng = _CTRL.match(real), _BLK.match(real), _NG.match(real)
    if not (m_ctrl or m_blk or m_ng):
        raise DeviceError(
            f"{path}: not an NVMe device (expected /dev/ngXnY, /dev/nvmeXnY or /dev/nvmeX)"
        )
    ctrls = controllers(sysfs)
    if m_ctrl:
        ctrl = next((c for c in ctrls if c.node == real), None)
        if ctrl is None:
            raise DeviceError(f"{path}: no NVMe controller {real[5:]} in {sysfs}")
        namespaces = ctrl.namespaces
        if not namespaces:
            raise DeviceError(f"{path}: controller has no namespaces")
    else:
        # Look the node up: with native multipath a block node is named after the subsystem
        # (nvme<subsys>n<head>), which need not be the controller's number.
        found = [(c, n) for c in ctrls for n in c.namespaces if real in (n.generic, n.block)]
        if not found:
            raise DeviceError(f"{path}: no NVMe namespace with this node in {sysfs}")
        ctrl, namespaces = found[0][0], [found[0][1]]
    generic = [n.generic for n in namespaces]
    for node_path in [ctrl.node, *generic]:
        try:
            os.close(os.open(node_path, os.O_RDWR))
        except OSError as e:
            if isinstance(e, FileNotFoundError) and node_path in generic:
                raise DeviceError(
                    f"{path}: no generic node {node_path} (device sources need it: Linux 5.13"
                    " or later; `nvmefs kernel` records this drive's errors without it)"
                ) from None
            raise DeviceError(f"{node_path}: cannot open: {e.strerror}") from None
    return DeviceSource(path, ctrl, namespaces)
