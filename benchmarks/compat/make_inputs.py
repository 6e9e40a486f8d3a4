"""The 8 images and texts that the model comparisons of docs/compat.md run on.

Images of varied size and mode (landscape, portrait, square, very wide and very tall; one
grayscale JPEG, one RGBA PNG), smooth colour fields with a few shapes, seeded; the first 8 CIRR
val captions and FashionIQ dress val caption pairs from the real annotation files.

    python benchmarks/compat/make_inputs.py --data ../shared/data --out /tmp/compat/inputs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZES = [(640, 480, "RGB", "jpg"), (480, 640, "RGB", "png"), (800, 800, "RGB", "jpg"), (1024, 300, "RGB", "png"),
         (333, 500, "L", "jpg"), (500, 375, "RGBA", "png"), (300, 1024, "RGB", "jpg"), (384, 384, "RGB", "png")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the folder with cirr/ and fashioniq/ annotations")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i, (w, h, mode, ext) in enumerate(SIZES):
        base = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            x1, y1 = x0 + int(rng.integers(10, max(11, w // 3))), y0 + int(rng.integers(10, max(11, h // 3)))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < .5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
        img = img.convert(mode)
        name = f"img{i}.{ext}"
        img.save(args.out / name, **({"quality": 92} if ext == "jpg" else {}))
        names.append(name)
    cirr = json.loads((args.data / "cirr" / "captions" / "cap.rc2.val.json").read_text())
    fiq = json.loads((args.data / "fashioniq" / "captions" / "cap.dress.val.json").read_text())
    inputs = {"images": names, "cirr_captions": [r["caption"] for r in cirr[:8]],
              "fiq_captions": [r["captions"] for r in fiq[:8]]}
    (args.out / "inputs.json").write_text(json.dumps(inputs, indent=1))
    print(args.out)


if __name__ == "__main__":
    main()
