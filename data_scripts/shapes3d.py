"""Download the official Shapes3D file ``3dshapes.h5`` and check it.

    python data_scripts/shapes3d.py [--out data/shapes3d] [--uncompressed]

Writes ``<out>/3dshapes.h5`` (267,573,662 bytes: the images are stored compressed;
they are 5.9 GB as uint8, and the loader reads them lazily, batch by batch).
The file is compressed in large chunks, which makes random batches slow to read;
``--uncompressed`` also writes ``<out>/3dshapes.npz`` (5.9 GB on disk, copied chunk by
chunk), which the loader reads in place, row by row, and prefers when given the folder.
The MD5 is the one published by two independent loaders (disent, and a Shapes3D
audit loader that also gives the size and the SHA-256 below); we check size and MD5.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refimpl.data.download import download, run_script, script_parser  # noqa: E402
from refimpl.data.errors import DatasetError  # noqa: E402
from refimpl.data.shapes3d import FAST_FILENAME, FILENAME, N_IMAGES, convert_shapes3d, load_shapes3d  # noqa: E402

URL = "https://storage.googleapis.com/3d-shapes/3dshapes.h5"
MD5 = "099a2078d58cec4daad0702c55d06868"
SIZE = 267_573_662
SHA256 = "0a0f6ed98baff276a50f3a081a7434d788da63cb135a98189b2a5b5769be1785"  # reported by one loader; not checked


def build_parser():
    parser = script_parser(__doc__, "shapes3d", "folder to write 3dshapes.h5 into", url=URL)
    parser.add_argument("--uncompressed", action="store_true",
                        help="also write the uncompressed 3dshapes.npz (fast random reads)")
    return parser


def outputs(out, uncompressed: bool = False) -> list[Path]:
    """The files this script writes for ``--out out``."""
    return [Path(out) / FILENAME] + ([Path(out) / FAST_FILENAME] if uncompressed else [])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def fetch_and_check():
        path = download(args.url, outputs(args.out)[0], md5=MD5, size=SIZE, force=args.force)
        if args.uncompressed:
            print(f"writing {Path(args.out) / FAST_FILENAME} (5.9 GB) ...")
            path = convert_shapes3d(path, Path(args.out) / FAST_FILENAME)
        ds = load_shapes3d(path)
        n = len(ds)
        ds.get([0, n - 1])  # one read from each end of the file
        ds.close()
        if n != N_IMAGES:
            raise DatasetError(f"{path} holds {n} images, expected {N_IMAGES}")
        print(f"{path}: {n} images of 64x64x3, OK")

    return run_script(fetch_and_check)


if __name__ == "__main__":
    sys.exit(main())
