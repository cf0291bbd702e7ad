"""`nvmefs report --svg` opened in a real browser (Debian's chromium, headless): the document
loads as SVG, both charts of every namespace are laid out with their bars, and the screenshot
shows the bars in their colours where the charts are. The screenshot is kept (its path is
printed; NVMEFS_TEST_ARTIFACTS names a directory to keep it in, else tests/artifacts, which
git ignores)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Any

import pytest

from nvmefs.store import charts
from tests.mounts import run_nvmefs

SVG = "{http://www.w3.org/2000/svg}"
FLAGS = [
    "--headless",
    "--no-sandbox",  # as root, chromium runs only without its sandbox
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
DAY = 86_400 * 10**9
T0 = 1_796_000_000 * 10**9


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run chromium headless with a profile of its own; fails (never skips) if it is missing."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail(
            "chromium is missing: contrib/bootstrap installs it (apt-get install -y chromium)",
            pytrace=False,
        )
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    p = subprocess.run(
        [exe, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, timeout=180
    )
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-2000:]
    return p


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB or RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        prev = line
        rows.append(bytes(line[k] for i in range(0, stride, bpp) for k in range(i, i + 3)))
    return width, height, rows


def colour_pixels(rows: list[bytes], box: tuple[int, int, int, int], colour: str) -> int:
    """Pixels within 4 of `colour` (#rrggbb) per channel inside box (x, y, w, h)."""
    want = bytes.fromhex(colour[1:])
    x, y, w, h = box
    n = 0
    for row in rows[y : y + h]:
        for i in range(x, min(x + w, len(row) // 3)):
            if all(abs(row[3 * i + k] - want[k]) <= 4 for k in range(3)):
                n += 1
    return n


def journal(path: Path) -> None:
    """Two drives' errors over a week: one bad region growing, one deallocated block."""
    recs: list[dict[str, Any]] = []
    for k in range(60):
        recs.append(
            {
                "seq": len(recs) + 1,
                "kind": "nvme",
                "wall_ns": T0 + k * k * DAY // 500,
                "status": "0x281",
                "name": "Unrecovered Read Error",
                "ctrl": "nvme0",
                "nsid": 1,
                "disk": "nvme0n1",
                "slba": 1_000_000 + 64 * (k % 7),
                "nlb": 8,
            }
        )
    for k in range(12):
        recs.append(
            {
                "seq": len(recs) + 1,
                "kind": "nvme",
                "wall_ns": T0 + k * DAY // 2,
                "status": "0x4287",
                "name": "Deallocated or Unwritten Logical Block",
                "ctrl": "nvme1",
                "nsid": 2,
                "disk": "nvme1n2",
                "slba": 7_000_000 * (k % 3),
                "nlb": 8,
            }
        )
    recs.append({"seq": len(recs) + 1, "kind": "notice", "message": "x", "wall_ns": T0})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def boxes(root: ET.Element) -> dict[str, tuple[int, int, int, int]]:
    """Each chart's plot frame (x, y, w, h), by the chart's id."""
    out = {}
    for g in root.iter(f"{SVG}g"):
        if "chart" in (g.get("class") or "").split():
            frame = next(r for r in g.iter(f"{SVG}rect") if r.get("class") == "frame")
            x, y, w, h = (round(float(frame.get(k) or 0)) for k in ("x", "y", "width", "height"))
            out[g.get("id") or ""] = (x, y, w, h)
    return out


def test_the_svg_opens_in_chromium_with_both_charts_drawn(tmp_path: Path) -> None:
    j = tmp_path / "nvmefs.jsonl"
    journal(j)
    svg = tmp_path / "nvme_errors.svg"
    p = run_nvmefs("report", str(j), "--svg", str(svg))
    assert p.returncode == 0, p.stderr
    root = ET.fromstring(svg.read_text())  # well-formed
    width, height = int(root.get("width") or 0), int(root.get("height") or 0)
    charts_of = boxes(root)
    assert set(charts_of) == {"lba-map-1", "errors-over-time-1", "lba-map-2", "errors-over-time-2"}

    # The DOM the browser built from the file: an SVG document with both charts and bars.
    dom = chromium(tmp_path, "--dump-dom", svg.as_uri()).stdout.decode()
    droot = ET.fromstring(dom)
    assert droot.tag == f"{SVG}svg"
    found = {g.get("id"): g.get("class") for g in droot.iter(f"{SVG}g")}
    for k in (1, 2):
        assert found[f"lba-map-{k}"] == "chart lba-map"
        assert found[f"errors-over-time-{k}"] == "chart errors-over-time"

    # Laid out: each chart has a size and its bars, as the browser measures them.
    page = tmp_path / "measure.html"
    page.write_text(
        f"""<!DOCTYPE html><html><body>
<object id="o" data="{svg.name}" type="image/svg+xml"></object><pre id="result">none</pre>
<script>
window.addEventListener("load", () => {{
  const doc = document.getElementById("o").contentDocument, out = {{}};
  for (const g of doc.querySelectorAll("g.chart")) {{
    const b = g.getBBox(), bars = [...g.querySelectorAll("rect.bar")];
    out[g.id] = {{w: b.width, h: b.height, bars: bars.length,
                 drawn: bars.filter(r => r.getBBox().width > 0 && r.getBBox().height > 0).length}};
  }}
  document.getElementById("result").textContent = JSON.stringify(out);
}});
</script></body></html>"""
    )
    html = chromium(tmp_path, "--allow-file-access-from-files", "--dump-dom", page.as_uri())
    m = re.search(r'<pre id="result">(.*?)</pre>', html.stdout.decode())
    assert m is not None and m.group(1) != "none", html.stdout[-2000:]
    measured = json.loads(m.group(1))
    assert set(measured) == set(charts_of)
    for ident, size in measured.items():
        assert size["w"] > 800 and size["h"] > 100, (ident, size)
        assert size["bars"] > 0 and size["drawn"] == size["bars"], (ident, size)

    # The screenshot: the bars' colours are where the charts are.
    artifacts = Path(os.environ.get("NVMEFS_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "nvme_errors.png"
    chromium(tmp_path, f"--window-size={width},{height}", f"--screenshot={shot}", svg.as_uri())
    print(f"screenshot: {shot}")
    pw, ph, rows = png_pixels(shot.read_bytes())
    assert (pw, ph) == (width, height)
    red = charts.SVG_COLOURS[0]  # each namespace's first status
    for ident, box in charts_of.items():
        assert colour_pixels(rows, box, red) > 50, f"{ident}: no bars drawn in {shot}"
    # Between the charts (the gap above a chart's frame, holding only its title) no bar.
    for ident, (x, y, w, _) in charts_of.items():
        assert colour_pixels(rows, (x, y - 24, w, 20), red) == 0, f"{ident}: {shot}"
