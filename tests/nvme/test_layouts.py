"""Wire layouts: sizes and the offsets hardware and the kernel ABI fix."""

from __future__ import annotations

import pytest

from nvmefs.nvme.layouts import SIZES, ascii_field, ffi, set_u128, u128


@pytest.mark.parametrize(("name", "size"), sorted(SIZES.items()))
def test_struct_sizes(name: str, size: int) -> None:
    assert ffi.sizeof(name) == size


@pytest.mark.parametrize(
    ("struct", "field", "offset"),
    [
        ("struct nvme_sqe", "command_id", 2),
        ("struct nvme_sqe", "nsid", 4),
        ("struct nvme_sqe", "prp1", 24),
        ("struct nvme_sqe", "cdw10", 40),
        ("struct nvme_sqe", "cdw15", 60),
        ("struct nvme_cqe", "sq_head", 8),
        ("struct nvme_cqe", "command_id", 12),
        ("struct nvme_cqe", "status", 14),
        ("struct nvme_id_ctrl", "sn", 4),
        ("struct nvme_id_ctrl", "mn", 24),
        ("struct nvme_id_ctrl", "crdt1", 128),
        ("struct nvme_id_ctrl", "elpe", 262),
        ("struct nvme_id_ctrl", "sqes", 512),
        ("struct nvme_id_ctrl", "nn", 516),
        ("struct nvme_id_ctrl", "oncs", 520),
        ("struct nvme_id_ns", "flbas", 26),
        ("struct nvme_id_ns", "lbaf", 128),
        ("struct nvme_error_log_entry", "status_field", 12),
        ("struct nvme_error_log_entry", "lba", 16),
        ("struct nvme_error_log_entry", "nsid", 24),
        ("struct nvme_error_log_entry", "opcode", 31),
        ("struct nvme_error_log_entry", "cs", 32),
        ("struct nvme_smart_log", "media_errors", 160),
        ("struct nvme_smart_log", "num_err_log_entries", 176),
        ("struct nvme_passthru_cmd64", "addr", 24),
        ("struct nvme_passthru_cmd64", "cdw10", 40),
        ("struct nvme_passthru_cmd64", "timeout_ms", 64),
        ("struct nvme_passthru_cmd64", "result", 72),
        ("struct nvme_uring_cmd", "data_len", 36),
        ("struct nvme_uring_cmd", "timeout_ms", 64),
    ],
)
def test_field_offsets(struct: str, field: str, offset: int) -> None:
    assert ffi.offsetof(struct, field) == offset


def test_cqe_round_trips_through_raw_bytes() -> None:
    cqe = ffi.new("struct nvme_cqe *")
    cqe.command_id, cqe.status, cqe.sq_head = 0x1234, (0x4281 << 1) | 1, 7
    raw = bytes(ffi.buffer(cqe))
    assert raw[12:14] == b"\x34\x12" and int.from_bytes(raw[14:16], "little") == 0x8503


def test_helpers_for_counters_and_ascii() -> None:
    smart = ffi.new("struct nvme_smart_log *")
    set_u128(smart.media_errors, 2**70 + 5)
    assert u128(smart.media_errors) == 2**70 + 5
    ctrl = ffi.new("struct nvme_id_ctrl *")
    ffi.memmove(ctrl.sn, b"deadbeef" + b" " * 12, 20)
    assert ascii_field(ctrl.sn) == "deadbeef"
