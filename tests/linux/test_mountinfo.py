"""The mount table parser (nvmefs/linux/mountinfo.py)."""

from __future__ import annotations

import os

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
