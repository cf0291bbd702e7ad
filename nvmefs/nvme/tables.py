"""Data tables the translator and renderers read: nothing here computes anything.

Names are the Linux kernel's own strings (drivers/nvme/host/constants.c and block/blk-core.c), so a
line in our ring reads the same as the kernel's verbose error messages and blk_update_request lines.
"""

from __future__ import annotations

import errno

# SCT/SC (status & 0x7ff) -> the kernel's nvme_statuses[] string. Codes absent here print "Unknown".
STATUS_NAMES: dict[int, str] = {
    0x000: "Success",
    0x001: "Invalid Command Opcode",
    0x002: "Invalid Field in Command",
    0x003: "Command ID Conflict",
    0x004: "Data Transfer Error",
    0x005: "Commands Aborted due to Power Loss Notification",
    0x006: "Internal Error",
    0x007: "Command Abort Requested",
    0x008: "Command Aborted due to SQ Deletion",
    0x009: "Command Aborted due to Failed Fused Command",
    0x00A: "Command Aborted due to Missing Fused Command",
    0x00B: "Invalid Namespace or Format",
    0x00C: "Command Sequence Error",
    0x00D: "Invalid SGL Segment Descriptor",
    0x00E: "Invalid Number of SGL Descriptors",
    0x00F: "Data SGL Length Invalid",
    0x010: "Metadata SGL Length Invalid",
    0x011: "SGL Descriptor Type Invalid",
    0x012: "Invalid Use of Controller Memory Buffer",
    0x013: "PRP Offset Invalid",
    0x014: "Atomic Write Unit Exceeded",
    0x015: "Operation Denied",
    0x016: "SGL Offset Invalid",
    0x017: "Reserved",
    0x018: "Host Identifier Inconsistent Format",
    0x019: "Keep Alive Timeout Expired",
    0x01A: "Keep Alive Timeout Invalid",
    0x01B: "Command Aborted due to Preempt and Abort",
    0x01C: "Sanitize Failed",
    0x01D: "Sanitize In Progress",
    0x01E: "SGL Data Block Granularity Invalid",
    0x01F: "Command Not Supported for Queue in CMB",
    0x020: "Namespace is Write Protected",
    0x021: "Command Interrupted",
    0x022: "Transient Transport Error",
    0x024: "Admin Command Media Not Ready",
    0x02C: "Invalid IO Command Set",
    0x080: "LBA Out of Range",
    0x081: "Capacity Exceeded",
    0x082: "Namespace Not Ready",
    0x083: "Reservation Conflict",
    0x084: "Format In Progress",
    0x100: "Completion Queue Invalid",
    0x101: "Invalid Queue Identifier",
    0x102: "Invalid Queue Size",
    0x103: "Abort Command Limit Exceeded",
    0x104: "Reserved",
    0x105: "Asynchronous Event Request Limit Exceeded",
    0x106: "Invalid Firmware Slot",
    0x107: "Invalid Firmware Image",
    0x108: "Invalid Interrupt Vector",
    0x109: "Invalid Log Page",
    0x10A: "Invalid Format",
    0x10B: "Firmware Activation Requires Conventional Reset",
    0x10C: "Invalid Queue Deletion",
    0x10D: "Feature Identifier Not Saveable",
    0x10E: "Feature Not Changeable",
    0x10F: "Feature Not Namespace Specific",
    0x110: "Firmware Activation Requires NVM Subsystem Reset",
    0x111: "Firmware Activation Requires Reset",
    0x112: "Firmware Activation Requires Maximum Time Violation",
    0x113: "Firmware Activation Prohibited",
    0x114: "Overlapping Range",
    0x115: "Namespace Insufficient Capacity",
    0x116: "Namespace Identifier Unavailable",
    0x118: "Namespace Already Attached",
    0x119: "Namespace Is Private",
    0x11A: "Namespace Not Attached",
    0x11B: "Thin Provisioning Not Supported",
    0x11C: "Controller List Invalid",
    0x11D: "Device Self-test In Progress",
    0x11E: "Boot Partition Write Prohibited",
    0x11F: "Invalid Controller Identifier",
    0x120: "Invalid Secondary Controller State",
    0x121: "Invalid Number of Controller Resources",
    0x122: "Invalid Resource Identifier",
    0x123: "Sanitize Prohibited",
    0x124: "ANA Group Identifier Invalid",
    0x125: "ANA Attach Failed",
    0x180: "Conflicting Attributes",
    0x181: "Invalid Protection Information",
    0x182: "Attempted Write to Read Only Range",
    0x183: "Command Size Limits Exceeded",
    0x1B8: "Zoned Boundary Error",
    0x1B9: "Zone Is Full",
    0x1BA: "Zone Is Read Only",
    0x1BB: "Zone Is Offline",
    0x1BC: "Zone Invalid Write",
    0x1BD: "Too Many Active Zones",
    0x1BE: "Too Many Open Zones",
    0x1BF: "Invalid Zone State Transition",
    0x280: "Write Fault",
    0x281: "Unrecovered Read Error",
    0x282: "End-to-end Guard Check Error",
    0x283: "End-to-end Application Tag Check Error",
    0x284: "End-to-end Reference Tag Check Error",
    0x285: "Compare Failure",
    0x286: "Access Denied",
    0x287: "Deallocated or Unwritten Logical Block",
    0x300: "Internal Pathing Error",
    0x301: "Asymmetric Access Persistent Loss",
    0x302: "Asymmetric Access Inaccessible",
    0x303: "Asymmetric Access Transition",
    0x360: "Controller Pathing Error",
    0x370: "Host Pathing Error",
    0x371: "Host Aborted Command",
}

# Where the seed's kernel (5.14) named a code differently. 5.14 had no verbose-errors table at
# all; we use the name of the constant it switched on so the difference stays visible.
STATUS_NAMES_5_14_OVERRIDES: dict[int, str] = {
    0x183: "ONCS Not Supported",
}

# blk_status_t -> (kernel string from blk_errors[], errno). "OK" is the empty string in the kernel.
BLK_STATUS_INFO: dict[str, tuple[str, int]] = {
    "OK": ("", 0),
    "NOTSUPP": ("operation not supported", errno.EOPNOTSUPP),
    "TIMEOUT": ("timeout", errno.ETIMEDOUT),
    "NOSPC": ("critical space allocation", errno.ENOSPC),
    "TRANSPORT": ("recoverable transport", errno.ENOLINK),
    "TARGET": ("critical target", errno.EREMOTEIO),
    "NEXUS": ("critical nexus", errno.EBADE),
    "RESV_CONFLICT": ("reservation conflict", errno.EBADE),
    "MEDIUM": ("critical medium", errno.ENODATA),
    "PROTECTION": ("protection", errno.EILSEQ),
    "RESOURCE": ("kernel resource", errno.ENOMEM),
    "DEV_RESOURCE": ("device resource", errno.EBUSY),
    "AGAIN": ("nonblocking retry", errno.EAGAIN),
    "OFFLINE": ("device offline", errno.ENODEV),
    "ZONE_OPEN_RESOURCE": ("open zones exceeded", errno.ETOOMANYREFS),
    "ZONE_ACTIVE_RESOURCE": ("active zones exceeded", errno.EOVERFLOW),
    "IOERR": ("I/O", errno.EIO),
}

# nvme_error_status(): SCT/SC -> blk_status, per kernel profile. Codes not listed map to IOERR.
_BLK_COMMON: dict[int, str] = {
    0x000: "OK",
    0x081: "NOSPC",
    0x080: "TARGET",
    0x021: "TARGET",
    0x082: "TARGET",
    0x180: "NOTSUPP",
    0x001: "NOTSUPP",
    0x002: "NOTSUPP",
    0x00B: "NOTSUPP",
    0x280: "MEDIUM",
    0x281: "MEDIUM",
    0x287: "MEDIUM",
    0x286: "MEDIUM",
    0x182: "MEDIUM",
    0x285: "MEDIUM",
    0x282: "PROTECTION",
    0x283: "PROTECTION",
    0x284: "PROTECTION",
    0x181: "PROTECTION",
    0x370: "TRANSPORT",
    0x1BD: "ZONE_ACTIVE_RESOURCE",
    0x1BE: "ZONE_OPEN_RESOURCE",
}

BLK_STATUS_BY_PROFILE: dict[str, dict[int, str]] = {
    # 0x183 was ONCS_NOT_SUPPORTED and mapped to NOTSUPP; reservation conflicts were NEXUS.
    "linux-5.14": {**_BLK_COMMON, 0x183: "NOTSUPP", 0x083: "NEXUS"},
    # 0x183 became "Command Size Limits Exceeded" and lost its mapping (IOERR);
    # reservation conflicts got their own blk_status.
    "linux-7.1": {**_BLK_COMMON, 0x083: "RESV_CONFLICT"},
}

NAME_OVERRIDES_BY_PROFILE: dict[str, dict[int, str]] = {
    "linux-5.14": STATUS_NAMES_5_14_OVERRIDES,
    "linux-7.1": {},
}

DEFAULT_PROFILE = "linux-7.1"
PROFILES = tuple(BLK_STATUS_BY_PROFILE)

# Status codes (SCT/SC) that code refers to by name; their strings are in STATUS_NAMES.
SC_SUCCESS = 0x000
SC_INVALID_OPCODE = 0x001
SC_INVALID_FIELD = 0x002
SC_DATA_TRANSFER_ERROR = 0x004
SC_INTERNAL = 0x006
SC_ABORT_REQ = 0x007
SC_INVALID_NS = 0x00B
SC_LBA_RANGE = 0x080
SC_CQ_INVALID = 0x100
SC_QID_INVALID = 0x101
SC_QUEUE_SIZE = 0x102
SC_INVALID_QUEUE_DELETION = 0x10C
SC_WRITE_FAULT = 0x280
SC_READ_ERROR = 0x281
SC_COMPARE_FAILED = 0x285
SC_UNWRITTEN_BLOCK = 0x287

# The seed driver's six "specific" statuses, compared on SCT/SC.
SEED_MEDIA_STATUSES: frozenset[int] = frozenset({0x280, 0x281, 0x287, 0x286, 0x182, 0x285})

# Opcode names: the kernel's nvme_ops[] and nvme_admin_ops[] strings.
IO_OPCODE_NAMES: dict[int, str] = {
    0x00: "Flush",
    0x01: "Write",
    0x02: "Read",
    0x04: "Write Uncorrectable",
    0x05: "Compare",
    0x08: "Write Zeroes",
    0x09: "Dataset Management",
    0x0C: "Verify",
    0x0D: "Reservation Register",
    0x0E: "Reservation Report",
    0x11: "Reservation Acquire",
    0x15: "Reservation Release",
    0x19: "Copy Offload",
    0x79: "Zone Management Send",
    0x7A: "Zone Management Receive",
    0x7D: "Zone Append",
}

ADMIN_OPCODE_NAMES: dict[int, str] = {
    0x00: "Delete SQ",
    0x01: "Create SQ",
    0x02: "Get Log Page",
    0x04: "Delete CQ",
    0x05: "Create CQ",
    0x06: "Identify",
    0x08: "Abort Command",
    0x09: "Set Features",
    0x0A: "Get Features",
    0x0C: "Async Event",
    0x0D: "Namespace Management",
    0x10: "Activate Firmware",
    0x11: "Download Firmware",
    0x14: "Device Self Test",
    0x15: "Namespace Attach",
    0x18: "Keep Alive",
    0x19: "Directive Send",
    0x1A: "Directive Receive",
    0x1C: "Virtual Management",
    0x1D: "NVMe Send MI",
    0x1E: "NVMe Receive MI",
    0x7C: "Doorbell Buffer Config",
    0x80: "Format NVM",
    0x81: "Security Send",
    0x82: "Security Receive",
    0x84: "Sanitize NVM",
    0x86: "Get LBA Status",
}


def opcode_name(opcode: int, admin: bool, unknown: str = "Unknown") -> str:
    """The kernel's name of an opcode (nvme_admin_ops[] or nvme_ops[])."""
    return (ADMIN_OPCODE_NAMES if admin else IO_OPCODE_NAMES).get(opcode, unknown)


# Short names for fault plans and options (read|write|...): the NVM opcode they stand for.
IO_OPCODE_ALIASES: dict[str, int] = {
    "flush": 0x00,
    "write": 0x01,
    "read": 0x02,
    "write_uncor": 0x04,
    "compare": 0x05,
    "write_zeroes": 0x08,
    "dsm": 0x09,
    "verify": 0x0C,
}
