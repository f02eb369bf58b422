"""Download the official dSprites npz and check it.

    python data_scripts/dsprites.py [--out data/dsprites]

Writes ``<out>/dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` (about 26 MB,
compressed; 3.0 GB of uint8 images once loaded). The MD5 below is the one published
by several independent loaders (torchvision-style dataset classes in disent, vaetc,
latte and others); the file's exact size is not known to us, so only the MD5 and the
array headers are checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refimpl.data.download import download  # noqa: E402
from refimpl.data.dsprites import FILENAME, N_IMAGES, check_dsprites_file  # noqa: E402
from refimpl.data.errors import DatasetError  # noqa: E402

URL = "https://github.com/deepmind/dsprites-dataset/raw/master/" + FILENAME
MD5 = "7da33b31b13a06f4b04a70402ce90c2e"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/dsprites", help="folder to write the npz into")
    parser.add_argument("--url", default=URL)
    parser.add_argument("--force", action="store_true", help="download again even if the file is there")
    return parser


def outputs(out) -> list[Path]:
    """The files this script writes for ``--out out``."""
    return [Path(out) / FILENAME]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = download(args.url, outputs(args.out)[0], md5=MD5, force=args.force)
        members = check_dsprites_file(path)
    except (DatasetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    n = members["imgs"].shape[0]
    if n != N_IMAGES:
        print(f"error: {path} holds {n} images, expected {N_IMAGES}", file=sys.stderr)
        return 1
    print(f"{path}: {n} images of 64x64, OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
