"""nvmefs installs wherever pip runs: without liburing's headers the compiled loop is left out of
the build, said so in one line, and nvmefs runs on its Python data path (issue 22)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADER = "/usr/include/liburing.h"

pytestmark = pytest.mark.root  # a private mount namespace hides the header from the build


def run(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]
    assert p.returncode == 0, f"{cmd}: {p.stdout[-2000:]} {p.stderr[-2000:]}"
    return p


def test_an_sdist_and_a_wheel_build_and_run_without_liburing_headers() -> None:
    assert Path(HEADER).exists(), "the test hides liburing.h: bootstrap installs it"
    with tempfile.TemporaryDirectory(prefix="nvmefs-pkg-") as tmp:
        work = Path(tmp)
        run("/usr/bin/python3", "-m", "venv", str(work / "tools"))
        run(str(work / "tools/bin/pip"), "install", "-q", "build")
        # `build` makes the sdist, then the wheel from the sdist: the sdist must hold all a
        # build needs. The header is an empty file in the build's mount namespace.
        build = run(
            "unshare", "-m", "sh", "-c",
            f"mount --bind /dev/null {HEADER} && "
            f"{work / 'tools/bin/python'} -m build --outdir {work / 'dist'} {REPO}",
        )  # fmt: skip
        said = [ln for ln in (build.stdout + build.stderr).splitlines() if "nvmefs: building" in ln]
        assert len(said) == 1 and "without the compiled passthrough loop" in said[0], said
        assert "liburing-dev" in said[0] and "liburing-devel" in said[0]
        (wheel,) = (work / "dist").glob("nvmefs-*.whl")
        (sdist,) = (work / "dist").glob("nvmefs-*.tar.gz")
        assert sdist.stat().st_size > 0
        run("/usr/bin/python3", "-m", "venv", str(work / "use"))
        run(str(work / "use/bin/pip"), "install", "-q", str(wheel))
        python = str(work / "use/bin/python")
        probe = run(
            python, "-c",
            "import importlib, pathlib, nvmefs\n"
            "root = pathlib.Path(nvmefs.__file__).parent\n"
            "assert 'site-packages' in str(root), root\n"
            "for p in sorted(root.rglob('*.py')):\n"
            "    name = '.'.join(p.relative_to(root.parent).with_suffix('').parts)\n"
            "    name = name.removesuffix('.__init__')\n"
            "    if name != 'nvmefs.__main__': importlib.import_module(name)\n"
            "from nvmefs.linux import bulk\n"
            "print(bulk.unavailable())\n"
            "try:\n"
            "    bulk.Loop(4, 4096, 0)\n"
            "except OSError as e:\n"
            "    print('refused:', e)\n",
            cwd=tmp,
        )  # fmt: skip
        why, refused = probe.stdout.splitlines()
        assert why.startswith("nvmefs was installed without its compiled loop"), why
        assert refused.startswith("refused:") and "without its compiled loop" in refused
        scrub = subprocess.run(
            [str(work / "use/bin/nvmefs"), "scrub", "sim", "-o", "faults=demo,retries=0"],
            capture_output=True, text=True, timeout=120, cwd=tmp,
        )  # fmt: skip
        assert scrub.returncode == 1 and "slba=2048 " in scrub.stdout, scrub.stderr
