"""What decoding one image allocates at its peak, against what the worker's ledger claims for it.

Run: ``python bench/bench_decode_peak.py [--width 3000 --height 2000]``

For each case (a Pillow mode in a format, some turned by EXIF), a child
process writes a noise image of that kind, and a fresh child reads the file,
resets its peak RSS (``/proc/self/clear_refs``) and runs
``decode.decode_image`` once. The rise of its peak RSS, per pixel, is set
beside ``decode.decode_peak_bytes`` (what ``pipeline.InFlightBytes`` claims
for the decode, the file's bytes aside): the table there must stay above
every measured figure. Linux only (VmHWM).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402,F401  (puts the checkout first on sys.path)

CASES = [
    ("RGB", "JPEG", 1),
    ("RGB", "JPEG", 6),
    ("RGB", "PNG", 1),
    ("RGB", "PNG", 6),
    ("RGB", "TIFF", 6),
    ("RGB", "BMP", 1),
    ("L", "PNG", 1),
    ("L", "JPEG", 1),
    ("1", "PNG", 1),
    ("P", "PNG", 1),
    ("P", "GIF", 1),
    ("LA", "PNG", 1),
    ("RGBA", "PNG", 6),
    ("CMYK", "JPEG", 1),
    ("CMYK", "TIFF", 1),
    ("I;16", "PNG", 6),
    ("I;16", "TIFF", 1),
    ("I", "TIFF", 1),
    ("F", "TIFF", 6),
    ("RGB", "WEBP", 6),
    ("RGBA", "WEBP", 1),
]

WRITE = """
import sys, numpy as np
from PIL import Image
mode, fmt, out = sys.argv[1], sys.argv[2], sys.argv[6]
orientation, w, h = (int(v) for v in sys.argv[3:6])
rng = np.random.default_rng(0)
rgb = lambda c: Image.fromarray(rng.integers(0, 255, (h, w, c), dtype=np.uint8))
make = {
    "RGB": lambda: rgb(3), "RGBA": lambda: rgb(4), "L": lambda: rgb(3).convert("L"), "1": lambda: rgb(3).convert("1"),
    "P": lambda: rgb(3).quantize(64), "LA": lambda: rgb(4).convert("LA"), "CMYK": lambda: rgb(3).convert("CMYK"),
    "I;16": lambda: Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16)),
    "I": lambda: Image.fromarray(rng.integers(0, 1 << 30, (h, w), dtype=np.int32)),
    "F": lambda: Image.fromarray(rng.random((h, w), dtype=np.float32) * 255),
}
exif = Image.Exif()
exif[0x0112] = orientation
make[mode]().save(out, format=fmt, **({"exif": exif} if orientation != 1 else {}))
"""

MEASURE = """
import sys
from PIL import Image
from segbatch.decode import decode_image, decode_peak_bytes
data = open(sys.argv[1], "rb").read()
with Image.open(sys.argv[1]) as im:
    claim = decode_peak_bytes(*im.size, im.mode, im.format)
status = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := RSS
base = status("VmRSS")
out = decode_image(data, max_pixels=10**9)
px = out.shape[0] * out.shape[1]
print((status("VmHWM") - base) / px, claim / px, len(data) / px)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=3000)
    ap.add_argument("--height", type=int, default=2000)
    args = ap.parse_args()
    env = {"PYTHONPATH": str(common.ROOT)}
    print(f"{args.width} x {args.height} px noise; bytes a pixel (the file's aside)")
    print("| mode | format | EXIF orientation | file | decode peak (measured) | claimed | margin |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    worst = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for mode, fmt, orientation in CASES:
            path = str(Path(tmp) / "image")
            subprocess.run(
                [sys.executable, "-c", WRITE, mode, fmt, str(orientation), str(args.width), str(args.height), path],
                check=True,
                env=env,
            )
            out = subprocess.run(
                [sys.executable, "-c", MEASURE, path], check=True, env=env, capture_output=True, text=True
            )
            peak, claim, file = (float(v) for v in out.stdout.split())
            worst = min(worst, claim / peak)
            print(f"| {mode} | {fmt} | {orientation} | {file:.2f} | {peak:.2f} | {claim:.0f} | {claim / peak:.2f}x |")
    print(f"smallest margin: {worst:.2f}x" + ("" if worst >= 1 else "  <-- the table in decode.py is too low"))


if __name__ == "__main__":
    main()
