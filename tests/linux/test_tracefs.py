"""tracefs material without a kernel: format files, ring-buffer pages, instances in a fake tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nvmefs.linux import tracefs
from nvmefs.linux.tracefs import EventFormat, Instance, TraceError, parse_page, record_type
from tests.linux.tracepages import BLOCK_FORMAT, NVME_FORMAT, block_record, nvme_record, page


def test_formats_are_read_from_the_format_file() -> None:
    f = EventFormat.parse("nvme", "nvme_complete_rq", NVME_FORMAT)
    assert f.id == 1403
    assert (f.fields["status"].offset, f.fields["status"].size) == (66, 2)
    assert f.fields["disk"].array and not f.fields["ctrl_id"].array
    b = EventFormat.parse("block", "block_rq_complete", BLOCK_FORMAT)
    assert "cmd" in b.fields and b.fields["error"].signed
    with pytest.raises(TraceError, match="no field status"):
        EventFormat.parse("nvme", "x", BLOCK_FORMAT).require("status")


def test_a_moved_field_is_read_where_the_format_says() -> None:
    moved = NVME_FORMAT.replace("offset:66;", "offset:60;")
    f = EventFormat.parse("nvme", "nvme_complete_rq", moved)
    rec = bytearray(68)
    rec[60:62] = (0x281).to_bytes(2, "little")
    assert f.decode(rec, ("status",)) == {"status": 0x281}


def test_pages_decode_into_records_in_order() -> None:
    nvme = EventFormat.parse("nvme", "nvme_complete_rq", NVME_FORMAT)
    blk = EventFormat.parse("block", "block_rq_complete", BLOCK_FORMAT)
    big = nvme_record(0x280) + bytes(64)  # longer than 112 bytes: the length-word form
    lost, recs = parse_page(
        page(nvme_record(0x281, 5), block_record(2048, 1, -61), big, extend=True)
    )
    assert lost == 0 and [record_type(r) for r in recs] == [1403, 1064, 1403]
    assert nvme.decode(recs[0], ("status", "retries", "disk")) == {
        "status": 0x281,
        "retries": 5,
        "disk": "nvme0n1",
    }
    assert blk.decode(recs[1], ("sector", "nr_sector", "error", "rwbs")) == {
        "sector": 2048,
        "nr_sector": 1,
        "error": -61,
        "rwbs": "RS",
    }
    assert nvme.decode(recs[2], ("status",)) == {"status": 0x280}


def test_a_page_says_how_many_events_were_lost_before_it() -> None:
    assert parse_page(page(nvme_record(0x281), lost=17))[0] == 17
    assert parse_page(b"") == (0, [])


def fake_tracefs(tmp_path: Path) -> Path:
    root = tmp_path / "tracing"
    (root / "instances").mkdir(parents=True)
    return root


def test_stale_instances_of_dead_processes_are_removed(tmp_path: Path) -> None:
    root = fake_tracefs(tmp_path)
    dead = 2**22 + 12345  # above pid_max: no such process
    (root / "instances" / f"nvmefs-{dead}-1").mkdir()
    (root / "instances" / f"nvmefs-{os.getpid()}-9").mkdir()
    (root / "instances" / "someone-else").mkdir()
    assert Instance.remove_stale(root) == [f"nvmefs-{dead}-1"]
    assert sorted(p.name for p in (root / "instances").iterdir()) == [
        f"nvmefs-{os.getpid()}-9",
        "someone-else",
    ]


def test_instance_names_are_unique_per_process(tmp_path: Path) -> None:
    root = fake_tracefs(tmp_path)
    a, b = Instance(root), Instance(root)
    assert a.name != b.name and a.name.startswith(f"nvmefs-{os.getpid()}-")
    a.path.mkdir()  # what create() does first; the rest writes files of a real tracefs
    assert a.path.is_dir() and list(tracefs.instances(root)) == [a.name]
    a.remove()
    assert not a.path.exists()
