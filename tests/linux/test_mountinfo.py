"""The mount table parser (nvmefs/linux/mountinfo.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvmefs.linux import mountinfo

LINE = (
    b"36 35 98:0 /mnt1 /mnt/a\\040dir\\012x rw,noatime master:1 - ext3 /dev/root rw,errors=ro\n"
    b"40 36 0:52 / /run/nvmefs rw,nosuid,nodev - fuse.nvmefs kernel rw,user_id=0\n"
    b"garbage line without the separator\n"
)


def mangle(path: bytes) -> bytes:
    """What the kernel's show_mountinfo writes for a path."""
    return b"".join(b"\\%03o" % c if c in b" \t\n\\" else bytes([c]) for c in path)


def test_fields_and_escapes_are_read_as_the_kernel_wrote_them() -> None:
    a, b = mountinfo.parse(LINE)
    assert a == mountinfo.Mount("98:0", "/mnt/a dir\nx", "ext3", "/dev/root")
    assert b == mountinfo.Mount("0:52", "/run/nvmefs", "fuse.nvmefs", "kernel")


@given(st.binary(min_size=1, max_size=40).filter(lambda p: b"\0" not in p))
def test_any_path_survives_the_kernels_escaping(raw: bytes) -> None:
    path = b"/" + raw
    line = b"1 2 0:1 / " + mangle(path) + b" rw - tmpfs none rw\n"
    (m,) = mountinfo.parse(line)
    assert os.fsencode(m.point) == path


def test_this_process_sees_its_root_mount() -> None:
    assert any(m.point == "/" for m in mountinfo.mounts())


@pytest.mark.root
def test_the_table_is_read_again_only_when_a_mount_changed_it(tmp_path: Path) -> None:
    table = mountinfo.MountTable()
    try:
        gen, mounts = table.get()
        assert any(m.point == "/" for m in mounts)
        assert table.get()[0] == gen  # nothing changed: not read again
        point = tmp_path / "t"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "nvmefs-test", str(point)], check=True)
        try:
            gen2, mounts = table.get()
            assert gen2 > gen and any(m.point == str(point) for m in mounts)
        finally:
            subprocess.run(["umount", str(point)], check=True)
        gen3, mounts = table.get()
        assert gen3 > gen2 and not any(m.point == str(point) for m in mounts)
    finally:
        table.close()
