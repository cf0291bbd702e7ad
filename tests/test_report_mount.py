"""`nvme_errors.svg` in a real mount: the picture of `nvmefs report`, live, bounded."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.mounts import mounted, stats, wait_for

pytestmark = pytest.mark.fuse

SVG_NS = "{http://www.w3.org/2000/svg}"
# Every read of LBAs 0..4095 fails (0x281), every other read (0x4281) too: two statuses, in a
# storm as fast as the engine goes.
STORM = (
    '[[fault]]\nopcode = "read"\nlba = [0, 4095]\nstatus = 0x281\n'
    '[[fault]]\nopcode = "read"\nlba = [4096, 1000000]\nstatus = 0x4281\n'
)
# fold=0: every failed read an entry of its own (a storm that folded would not turn the
# ring over).
STORM_OPTS = "log=all,workload=randread,bs=4K,qd=32,retries=0,sim_size=16M,fold=0"


def test_cat_of_nvme_errors_svg_during_a_storm_ends_and_is_valid_svg(tmp_path: Path) -> None:
    with mounted(tmp_path, STORM_OPTS, STORM) as mnt:
        wait_for(lambda: int(stats(mnt)["ring_appended"]) > 5000, 30, "a storm")
        for _ in range(3):  # while entries keep coming
            p = subprocess.run(["cat", str(mnt / "nvme_errors.svg")], capture_output=True,
                               timeout=30)  # fmt: skip
            assert p.returncode == 0, p.stderr
            root = ET.fromstring(p.stdout)
            assert root.tag == f"{SVG_NS}svg"
            groups = {g.get("id", ""): g for g in root.iter(f"{SVG_NS}g")}
            lba_maps = [g for name, g in groups.items() if name.startswith("lba-map-")]
            over_time = [g for name, g in groups.items() if name.startswith("errors-over-time-")]
            assert len(lba_maps) == 1 and len(over_time) == 1, sorted(groups)
            assert list(lba_maps[0].iter(f"{SVG_NS}rect")), "no bars in the LBA map"
            text = p.stdout.decode()
            assert "0x281" in text and "0x4281" in text
            assert "NVMEFS-SIM" in text  # the controller's serial, from the engine
