"""NVMe wire layouts as cffi structs (ABI mode: nothing is compiled).

Sizes are checked at import: a wrong layout would corrupt queue memory, so it must never load.
All multi-byte fields are little-endian on the wire; the hosts we run on (x86_64, arm64) are too.
"""

from __future__ import annotations

import sys

import cffi

CDEF = """
/* Submission queue entry, 64 bytes (NVMe base spec, Common Command Format). */
struct nvme_sqe {
    uint8_t  opcode;
    uint8_t  flags;
    uint16_t command_id;
    uint32_t nsid;
    uint32_t cdw2;
    uint32_t cdw3;
    uint64_t metadata;
    uint64_t prp1;
    uint64_t prp2;
    uint32_t cdw10;
    uint32_t cdw11;
    uint32_t cdw12;
    uint32_t cdw13;
    uint32_t cdw14;
    uint32_t cdw15;
};

/* Completion queue entry, 16 bytes. status: bit 0 phase tag, bits 15:1 the status word. */
struct nvme_cqe {
    uint32_t result;
    uint32_t dw1;
    uint16_t sq_head;
    uint16_t sq_id;
    uint16_t command_id;
    uint16_t status;
};

struct nvme_lbaf {
    uint16_t ms;
    uint8_t  ds;
    uint8_t  rp;
};

/* Identify Controller (CNS 01h), 4096 bytes; the fields nvmefs reads, the rest as padding. */
struct nvme_id_ctrl {
    uint16_t vid;
    uint16_t ssvid;
    char     sn[20];
    char     mn[40];
    char     fr[8];
    uint8_t  rab;
    uint8_t  ieee[3];
    uint8_t  cmic;
    uint8_t  mdts;
    uint16_t cntlid;
    uint32_t ver;
    uint32_t rtd3r;
    uint32_t rtd3e;
    uint32_t oaes;
    uint32_t ctratt;
    uint16_t rrls;
    uint8_t  rsvd102[9];
    uint8_t  cntrltype;
    uint8_t  fguid[16];
    uint16_t crdt1;
    uint16_t crdt2;
    uint16_t crdt3;
    uint8_t  rsvd134[122];
    uint16_t oacs;
    uint8_t  acl;
    uint8_t  aerl;
    uint8_t  frmw;
    uint8_t  lpa;
    uint8_t  elpe;
    uint8_t  npss;
    uint8_t  avscc;
    uint8_t  apsta;
    uint16_t wctemp;
    uint16_t cctemp;
    uint8_t  rsvd270[242];
    uint8_t  sqes;
    uint8_t  cqes;
    uint16_t maxcmd;
    uint32_t nn;
    uint16_t oncs;
    uint16_t fuses;
    uint8_t  fna;
    uint8_t  vwc;
    uint16_t awun;
    uint16_t awupf;
    uint8_t  rsvd530[3566];
};

/* Identify Namespace (CNS 00h), 4096 bytes. */
struct nvme_id_ns {
    uint64_t nsze;
    uint64_t ncap;
    uint64_t nuse;
    uint8_t  nsfeat;
    uint8_t  nlbaf;
    uint8_t  flbas;
    uint8_t  mc;
    uint8_t  dpc;
    uint8_t  dps;
    uint8_t  nmic;
    uint8_t  rescap;
    uint8_t  fpi;
    uint8_t  dlfeat;
    uint8_t  rsvd34[94];
    struct nvme_lbaf lbaf[64];
    uint8_t  vs[3712];
};

/* Error Information log entry (log page 01h), 64 bytes. */
struct nvme_error_log_entry {
    uint64_t error_count;
    uint16_t sqid;
    uint16_t cmdid;
    uint16_t status_field;
    uint16_t parm_error_location;
    uint64_t lba;
    uint32_t nsid;
    uint8_t  vs;
    uint8_t  trtype;
    uint8_t  csi;
    uint8_t  opcode;
    uint64_t cs;
    uint16_t trtype_spec_info;
    uint8_t  rsvd42[21];
    uint8_t  log_page_version;
};

/* SMART / Health Information log (log page 02h), 512 bytes. 128-bit counters as byte arrays. */
struct nvme_smart_log {
    uint8_t  critical_warning;
    uint8_t  temperature[2];
    uint8_t  avail_spare;
    uint8_t  spare_thresh;
    uint8_t  percent_used;
    uint8_t  endu_grp_crit_warn_sumry;
    uint8_t  rsvd7[25];
    uint8_t  data_units_read[16];
    uint8_t  data_units_written[16];
    uint8_t  host_reads[16];
    uint8_t  host_writes[16];
    uint8_t  ctrl_busy_time[16];
    uint8_t  power_cycles[16];
    uint8_t  power_on_hours[16];
    uint8_t  unsafe_shutdowns[16];
    uint8_t  media_errors[16];
    uint8_t  num_err_log_entries[16];
    uint32_t warning_temp_time;
    uint32_t critical_comp_time;
    uint16_t temp_sensor[8];
    uint8_t  rsvd216[296];
};

/* include/uapi/linux/nvme_ioctl.h: NVME_IOCTL_ADMIN64_CMD / NVME_IOCTL_IO64_CMD argument. */
struct nvme_passthru_cmd64 {
    uint8_t  opcode;
    uint8_t  flags;
    uint16_t rsvd1;
    uint32_t nsid;
    uint32_t cdw2;
    uint32_t cdw3;
    uint64_t metadata;
    uint64_t addr;
    uint32_t metadata_len;
    uint32_t data_len;
    uint32_t cdw10;
    uint32_t cdw11;
    uint32_t cdw12;
    uint32_t cdw13;
    uint32_t cdw14;
    uint32_t cdw15;
    uint32_t timeout_ms;
    uint32_t rsvd2;
    uint64_t result;
};

/* The 72-byte command carried in a 128-byte io_uring SQE for NVME_URING_CMD_IO/ADMIN. */
struct nvme_uring_cmd {
    uint8_t  opcode;
    uint8_t  flags;
    uint16_t rsvd1;
    uint32_t nsid;
    uint32_t cdw2;
    uint32_t cdw3;
    uint64_t metadata;
    uint64_t addr;
    uint32_t metadata_len;
    uint32_t data_len;
    uint32_t cdw10;
    uint32_t cdw11;
    uint32_t cdw12;
    uint32_t cdw13;
    uint32_t cdw14;
    uint32_t cdw15;
    uint32_t timeout_ms;
    uint32_t rsvd2;
};
"""

SIZES = {
    "struct nvme_sqe": 64,
    "struct nvme_cqe": 16,
    "struct nvme_lbaf": 4,
    "struct nvme_id_ctrl": 4096,
    "struct nvme_id_ns": 4096,
    "struct nvme_error_log_entry": 64,
    "struct nvme_smart_log": 512,
    "struct nvme_passthru_cmd64": 80,
    "struct nvme_uring_cmd": 72,
}

SQE_SIZE = 64
CQE_SIZE = 16
ERROR_LOG_ENTRY_SIZE = 64

if sys.byteorder != "little":  # pragma: no cover - we only ship for little-endian hosts
    raise ImportError("nvmefs needs a little-endian host: NVMe structures are little-endian")

ffi = cffi.FFI()
ffi.cdef(CDEF, packed=True)

for _name, _size in SIZES.items():
    if ffi.sizeof(_name) != _size:  # pragma: no cover - a broken layout must not load
        raise ImportError(f"{_name} is {ffi.sizeof(_name)} bytes, expected {_size}")


def u128(field: object) -> int:
    """A 16-byte little-endian counter (SMART log) as an int."""
    return int.from_bytes(bytes(ffi.buffer(field)), "little")


def set_u128(field: object, value: int) -> None:
    ffi.buffer(field)[:] = value.to_bytes(16, "little")


def ascii_field(field: object) -> str:
    """Space-padded ASCII identify fields (serial, model, firmware)."""
    return bytes(ffi.buffer(field)).decode("ascii", "replace").rstrip(" \0")
