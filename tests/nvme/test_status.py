"""The translator against the kernel's nvme_error_status() and nvme_statuses[], every word."""

from __future__ import annotations

import errno

import pytest

from nvmefs.nvme.status import StatusError, Translator, parse_status

# nvme_error_status() as drivers/nvme/host/core.c switches on status & 0x7ff (5.14 and 7.1),
# written out independently of nvmefs.nvme.tables so that a slip in one is caught by the other.
KERNEL_BLK = {
    "linux-5.14": {
        "OK": [0x000],
        "NOSPC": [0x081],
        "TARGET": [0x080, 0x021, 0x082],
        "NOTSUPP": [0x180, 0x001, 0x002, 0x00B, 0x183],
        "MEDIUM": [0x280, 0x281, 0x287, 0x286, 0x182, 0x285],
        "PROTECTION": [0x282, 0x283, 0x284, 0x181],
        "NEXUS": [0x083],
        "TRANSPORT": [0x370],
        "ZONE_ACTIVE_RESOURCE": [0x1BD],
        "ZONE_OPEN_RESOURCE": [0x1BE],
    },
    "linux-7.1": {
        "OK": [0x000],
        "NOSPC": [0x081],
        "TARGET": [0x080, 0x021, 0x082],
        "NOTSUPP": [0x180, 0x001, 0x002, 0x00B],
        "MEDIUM": [0x280, 0x281, 0x287, 0x286, 0x182, 0x285],
        "PROTECTION": [0x282, 0x283, 0x284, 0x181],
        "RESV_CONFLICT": [0x083],
        "TRANSPORT": [0x370],
        "ZONE_ACTIVE_RESOURCE": [0x1BD],
        "ZONE_OPEN_RESOURCE": [0x1BE],
    },
}

BLK_ERRNO = {
    "OK": 0,
    "MEDIUM": errno.ENODATA,
    "PROTECTION": errno.EILSEQ,
    "TARGET": errno.EREMOTEIO,
    "NOTSUPP": errno.EOPNOTSUPP,
    "NOSPC": errno.ENOSPC,
    "IOERR": errno.EIO,
    "TRANSPORT": errno.ENOLINK,
    "NEXUS": errno.EBADE,
    "RESV_CONFLICT": errno.EBADE,
    "ZONE_OPEN_RESOURCE": errno.ETOOMANYREFS,
    "ZONE_ACTIVE_RESOURCE": errno.EOVERFLOW,
}

# A sample of the kernel's nvme_statuses[] strings (constants.c) across every SCT.
KERNEL_NAMES = {
    0x000: "Success",
    0x002: "Invalid Field in Command",
    0x006: "Internal Error",
    0x080: "LBA Out of Range",
    0x083: "Reservation Conflict",
    0x104: "Reserved",
    0x181: "Invalid Protection Information",
    0x183: "Command Size Limits Exceeded",
    0x1BC: "Zone Invalid Write",
    0x280: "Write Fault",
    0x281: "Unrecovered Read Error",
    0x282: "End-to-end Guard Check Error",
    0x285: "Compare Failure",
    0x287: "Deallocated or Unwritten Logical Block",
    0x370: "Host Pathing Error",
    0x371: "Host Aborted Command",
    # Codes the kernel has no string for.
    0x023: "Unknown",
    0x117: "Unknown",
    0x288: "Unknown",
    0x7FF: "Unknown",
    0x700: "Unknown",
}


def expected_blk(profile: str, code: int) -> str:
    for blk, codes in KERNEL_BLK[profile].items():
        if code in codes:
            return blk
    return "IOERR"


@pytest.mark.parametrize("profile", ["linux-5.14", "linux-7.1"])
def test_every_status_word_decodes_like_the_kernel(profile: str) -> None:
    t = Translator(profile)
    names_seen = set()
    for word in range(0x8000):
        st = t.decode(word)
        code = word & 0x7FF
        assert st.status == word
        assert (st.sct, st.sc) == (code >> 8, code & 0xFF)
        assert st.crd == (word >> 11) & 3
        assert st.more == bool(word & 0x2000)
        assert st.dnr == bool(word & 0x4000)
        # The fields put back together give the word: no bit is lost or invented.
        assert st.dnr << 14 | st.more << 13 | st.crd << 11 | st.sct << 8 | st.sc == word
        blk = expected_blk(profile, code)
        assert st.blk_status == blk, hex(word)
        assert st.errno == BLK_ERRNO[blk]
        assert st.profile == profile
        if code in KERNEL_NAMES and not (profile == "linux-5.14" and code == 0x183):
            assert st.name == KERNEL_NAMES[code], hex(word)
        # CRD/MORE/DNR never change what the kernel says about the code.
        base = t.decode(code)
        assert (st.name, st.blk_status, st.blk_string) == (
            base.name,
            base.blk_status,
            base.blk_string,
        )
        if st.name != "Unknown":
            names_seen.add(code)
    assert len(names_seen) == 106  # the kernel's nvme_statuses[] has 106 entries


def test_mask_bits_are_removed_for_mapping_but_kept_in_the_word() -> None:
    st = Translator().decode(0x4281)
    assert st.status == 0x4281 and st.code == 0x281
    assert st.dnr and not st.more and st.crd == 0
    assert (st.name, st.blk_status, st.blk_string) == (
        "Unrecovered Read Error",
        "MEDIUM",
        "critical medium",
    )
    st = Translator().decode(0x7A85)  # DNR, MORE, CRD=3 on a compare failure
    assert (st.dnr, st.more, st.crd, st.code, st.blk_status) == (True, True, 3, 0x285, "MEDIUM")


def test_profiles_differ_exactly_on_0x183_and_0x083() -> None:
    old, new = Translator("linux-5.14"), Translator("linux-7.1")
    differing = {
        w & 0x7FF for w in range(0x8000) if old.decode(w).blk_status != new.decode(w).blk_status
    }
    assert differing == {0x183, 0x083}
    assert (old.decode(0x183).blk_status, new.decode(0x183).blk_status) == ("NOTSUPP", "IOERR")
    assert (old.decode(0x83).blk_string, new.decode(0x83).blk_string) == (
        "critical nexus",
        "reservation conflict",
    )


def test_cqe_field_drops_the_phase_tag() -> None:
    t = Translator()
    assert t.decode_cqe(0x0503) is t.decode(0x281)
    assert t.decode_cqe(0x0502) is t.decode(0x281)
    assert t.decode_cqe(0x8503) is t.decode(0x4281)
    with pytest.raises(StatusError):
        t.decode_cqe(0x10000)


def test_out_of_range_words_are_refused() -> None:
    t = Translator()
    for bad in (0x8000, -1, 1 << 40):
        with pytest.raises(StatusError):
            t.decode(bad)
    with pytest.raises(StatusError):
        Translator("linux-4.0")


def test_decoding_returns_shared_objects() -> None:
    # The hot path must not allocate: the same word gives the same object.
    t = Translator()
    assert t.decode(0x281) is Translator().decode(0x281)


@pytest.mark.parametrize(
    ("text", "cqe", "value"),
    [
        ("0x281", False, 0x281),
        ("641", False, 641),
        ("0X4287", False, 0x4287),
        ("0x7fff", False, 0x7FFF),
        ("0xffff", True, 0xFFFF),
    ],
)
def test_parse_status_accepts_hex_and_decimal(text: str, cqe: bool, value: int) -> None:
    assert parse_status(text, cqe=cqe) == value


@pytest.mark.parametrize("text", ["zz", "", "0x8000", "-1", "0x1.0", "32768"])
def test_parse_status_refuses_bad_input(text: str) -> None:
    with pytest.raises(StatusError):
        parse_status(text)
