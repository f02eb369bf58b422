"""Save a grid of built-in synthetic dSprites to ``bench/results/synthetic_dsprites_grid.png``.

    python data_scripts/render_synthetic_grid.py [--out PATH] [--seed 0] [--zoom 2]

Rows 1-3: square, ellipse and heart at scale 1 in the middle of the canvas, turning
through orientations 0, 4, ..., 36 (of 40; counter-clockwise on screen).
Row 4: the heart at the six scales. Rows 5-7: random images drawn with the seed.
Images are white on black, separated by grey lines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refimpl.data.dsprites import classes_to_index  # noqa: E402
from refimpl.data.synthetic_dsprites import SyntheticDSprites  # noqa: E402
from refimpl.rng import generator  # noqa: E402

COLUMNS = 10


def grid_indices(seed: int) -> numpy.ndarray:
    """Flat indices of the grid, row by row: (7 * COLUMNS,)."""
    rows = []
    for shape in range(3):
        rows.append([classes_to_index([0, shape, 5, o, 16, 16]) for o in range(0, 40, 4)])
    scales = [classes_to_index([0, 2, s, 0, 16, 16]) for s in range(6)]
    rows.append(scales + [classes_to_index([0, 2, 5, o, 16, 16]) for o in (1, 2, 3, 39)])
    rng = generator(seed)
    rows.extend(rng.integers(0, 737280, size=(3, COLUMNS)).tolist())
    return numpy.asarray(rows, dtype=numpy.int64).reshape(-1)


def grid_image(images: numpy.ndarray, columns: int, zoom: int) -> numpy.ndarray:
    """images (N, 64, 64) in {0, 1} -> one uint8 picture with 2-pixel grey separators."""
    n, h, w = images.shape
    rows = -(-n // columns)
    sep = 2
    out = numpy.full((rows * (h + sep) + sep, columns * (w + sep) + sep), 96, dtype=numpy.uint8)
    for k in range(n):
        r, c = divmod(k, columns)
        out[sep + r * (h + sep):sep + r * (h + sep) + h, sep + c * (w + sep):sep + c * (w + sep) + w] = images[k] * 255
    return out.repeat(zoom, axis=0).repeat(zoom, axis=1)


def main(argv=None) -> int:
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "synthetic_dsprites_grid.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoom", type=int, default=2)
    args = parser.parse_args(argv)
    images = SyntheticDSprites().get_uint8(grid_indices(args.seed))[:, 0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_image(images, COLUMNS, args.zoom)).save(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
