"""Synthetic tracefs material: the 6.1 guest's format files and trace_pipe_raw pages."""

from __future__ import annotations

import struct

NVME_FORMAT = """name: nvme_complete_rq
ID: 1403
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char disk[32];\toffset:8;\tsize:32;\tsigned:1;
\tfield:int ctrl_id;\toffset:40;\tsize:4;\tsigned:1;
\tfield:int qid;\toffset:44;\tsize:4;\tsigned:1;
\tfield:int cid;\toffset:48;\tsize:4;\tsigned:1;
\tfield:u64 result;\toffset:56;\tsize:8;\tsigned:0;
\tfield:u8 retries;\toffset:64;\tsize:1;\tsigned:0;
\tfield:u8 flags;\toffset:65;\tsize:1;\tsigned:0;
\tfield:u16 status;\toffset:66;\tsize:2;\tsigned:0;

print fmt: "nvme%d: %sqid=%d, cmdid=%u", REC->ctrl_id
"""

BLOCK_FORMAT = """name: block_rq_complete
ID: 1064
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:char rwbs[8];\toffset:32;\tsize:8;\tsigned:1;
\tfield:__data_loc char[] cmd;\toffset:40;\tsize:4;\tsigned:1;

print fmt: "%d,%d %s", REC->dev
"""


def nvme_record(
    status: int, retries: int = 0, *, disk: str = "nvme0n1", ctrl: int = 0, qid: int = 1,
    cid: int = 7, flags: int = 0,
) -> bytes:  # fmt: skip
    rec = bytearray(68)
    struct.pack_into("<H", rec, 0, 1403)
    rec[8 : 8 + len(disk)] = disk.encode()
    struct.pack_into("<iii", rec, 40, ctrl, qid, cid)
    struct.pack_into("<BBH", rec, 64, retries, flags, status)
    return bytes(rec)


def block_record(
    sector: int, nr_sector: int, error: int, rwbs: str = "RS", dev: int = 259 << 20
) -> bytes:
    rec = bytearray(44)
    struct.pack_into("<H", rec, 0, 1064)
    struct.pack_into("<IxxxxQIi", rec, 8, dev, sector, nr_sector, error)
    rec[32 : 32 + len(rwbs)] = rwbs.encode()
    return bytes(rec)


def page(*records: bytes, lost: int | None = None, extend: bool = False, size: int = 4096) -> bytes:
    """A trace_pipe_raw page holding `records` (type_len from their size; one in the 'length
    word' form when longer than 112 bytes), optionally a time extend first and a lost count."""
    data = bytearray()
    if extend:
        data += struct.pack("<II", 30 | 5 << 5, 1)
    for rec in records:
        padded = rec + bytes(-len(rec) % 4)
        if len(padded) <= 28 * 4:
            data += struct.pack("<I", len(padded) // 4 | 3 << 5) + padded
        else:
            data += struct.pack("<II", 0, len(padded) + 4) + padded
    commit = len(data)
    tail = b""
    if lost is not None:
        commit |= 1 << 31 | 1 << 30
        tail = struct.pack("<q", lost)
    body = struct.pack("<Qq", 123456, commit) + data + tail
    return body + bytes(size - len(body))


# -- building blocks for pages of any shape (the compiled consumer's tests) ---------------------


def event(rec: bytes) -> bytes:
    """One record with its header, as `page()` writes it: type_len from its size, or the length
    word form when longer than 112 bytes."""
    padded = rec + bytes(-len(rec) % 4)
    if len(padded) <= 28 * 4:
        return struct.pack("<I", len(padded) // 4 | 3 << 5) + padded
    return struct.pack("<II", 0, len(padded) + 4) + padded


def padding(words: int) -> bytes:
    """A padding record (a discarded event) with `words` u32s of data after its length word."""
    return struct.pack("<II", 29 | 1 << 5, 4 + 4 * words) + bytes(4 * words)


def time_extend() -> bytes:
    return struct.pack("<II", 30 | 5 << 5, 1)


def time_stamp() -> bytes:
    return struct.pack("<II", 31, 7)


def raw_page(
    data: bytes, *, lost: int | None = None, commit: int | None = None, size: int = 4096
) -> bytes:
    """A page whose data is `data` (records with their headers, as `event()` makes them), cut or
    zero-filled to `size`; `commit` overrides the header's commit word as it is."""
    word = len(data)
    tail = b""
    if lost is not None:
        word |= 1 << 31 | 1 << 30
        tail = struct.pack("<q", lost)
    if commit is not None:
        word = commit
    body = struct.pack("<Qq", 123456, word) + data + tail
    return (body + bytes(max(0, size - len(body))))[:size]
