"""Block disks from a fake /sys/block: namespace heads, native-multipath path disks, geometry."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvmefs.linux import devices
from nvmefs.linux.devices import Disk, kernel_dev


def add_disk(
    root: Path, name: str, nsid: int, lba: int = 512, dev: tuple[int, int] | None = None
) -> None:
    d = root / name
    (d / "queue").mkdir(parents=True)
    (d / "nsid").write_text(f"{nsid}\n")
    (d / "queue" / "logical_block_size").write_text(f"{lba}\n")
    if dev is not None:  # a hidden path disk has no dev attribute: the kernel gives it no number
        (d / "dev").write_text(f"{dev[0]}:{dev[1]}\n")


@pytest.fixture
def multipath(tmp_path: Path) -> Path:
    """nvme0n1 an ordinary namespace; nvme5n1 a shared one behind controllers nvme5 and nvme7,
    as the test VM's kernel lays them out; a partition and a non-NVMe disk beside them."""
    add_disk(tmp_path, "nvme0n1", 1, 4096, dev=(259, 0))
    add_disk(tmp_path, "nvme0n1p1", 1, 4096, dev=(259, 1))
    add_disk(tmp_path, "nvme5n1", 1, 512, dev=(259, 5))
    add_disk(tmp_path, "nvme5c5n1", 1, 512)
    add_disk(tmp_path, "nvme5c7n1", 1, 512)
    add_disk(tmp_path, "vda", 0, dev=(254, 0))
    return tmp_path


def test_path_disks_map_to_their_head_and_controller(multipath: Path) -> None:
    got = devices.disks(multipath)
    assert got["nvme5c7n1"] == Disk("nvme5c7n1", 0, 1, 512, head="nvme5n1", ctrl="nvme7")
    assert got["nvme5c7n1"].namespace == "nvme5n1"
    assert got["nvme5c5n1"].ctrl == "nvme5"
    head = got["nvme5n1"]
    assert (head.dev, head.nsid, head.head, head.ctrl, head.namespace) == (
        kernel_dev(259, 5), 1, None, None, "nvme5n1"
    )  # fmt: skip
    assert got["nvme0n1"] == Disk("nvme0n1", kernel_dev(259, 0), 1, 4096)
    assert "vda" not in got


def test_a_disk_without_a_device_number_is_kept_only_as_a_path(tmp_path: Path) -> None:
    add_disk(tmp_path, "nvme1n1", 1)  # no dev: not a usable disk, and not a path disk
    add_disk(tmp_path, "nvme1c2n1", 2, 4096)
    assert list(devices.disks(tmp_path)) == ["nvme1c2n1"]
    assert devices.disks(tmp_path)["nvme1c2n1"].lba_size == 4096


@pytest.mark.parametrize(
    ("name", "expected"),
    [("nvme0c1n1", ("nvme0n1", "nvme1")), ("nvme12c3n45", ("nvme12n45", "nvme3")),
     ("nvme0n1", None), ("nvme0n1p1", None), ("nvme0c1n1p1", None), ("nvme0c1", None),
     ("", None), ("sda", None)],
)  # fmt: skip
def test_path_disk_names(name: str, expected: tuple[str, str] | None) -> None:
    assert devices.path_disk(name) == expected


def test_paths_of_a_head_and_of_all(multipath: Path) -> None:
    add_disk(multipath, "nvme6c6n2", 2)
    assert devices.paths("nvme5n1", multipath) == ["nvme5c5n1", "nvme5c7n1"]
    assert devices.paths("nvme0n1", multipath) == []
    assert devices.paths(sys_block=multipath) == ["nvme5c5n1", "nvme5c7n1", "nvme6c6n2"]


def test_kernel_max_retries_from_the_module_parameter(tmp_path: Path) -> None:
    param = tmp_path / "max_retries"
    assert devices.kernel_max_retries(param) == devices.DEFAULT_MAX_RETRIES  # no nvme_core
    param.write_text("2\n")
    assert devices.kernel_max_retries(param) == 2
