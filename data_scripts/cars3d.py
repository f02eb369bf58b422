"""Download Cars3D (Reed et al. 2015) and convert its .mat files into one npz.

    python data_scripts/cars3d.py [--out data/cars3d]
    python data_scripts/cars3d.py --from-folder path/to/data/cars [--out data/cars3d]

Fetches ``nips2015-analogy-data.tar.gz`` (also holds other data), unpacks its
``data/cars/`` (183 ``car_*_mesh.mat`` files and ``list.txt``) into a temporary folder
inside ``<out>``, downsamples every image to 64x64 (Pillow LANCZOS) and writes
``<out>/cars3d.npz`` (17,568 x 64 x 64 x 3 uint8, uncompressed so it is
read lazily on load), atomically. The unpacked files and the archive are then
deleted unless ``--keep-archive``. The archive MD5 is the one two independent
loaders publish (disent, latte); its size is not known to us.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refimpl.data.cars3d import FILENAME, N_CARS, convert_cars3d, load_cars3d  # noqa: E402
from refimpl.data.download import download, extract_tar, run_script, script_parser  # noqa: E402

URL = "http://www.scottreed.info/files/nips2015-analogy-data.tar.gz"
MD5 = "4e866a7919c1beedf53964e6f7a23686"


def build_parser():
    parser = script_parser(__doc__, "cars3d", "folder to write cars3d.npz into", url=URL, archive=True)
    parser.add_argument("--from-folder", help="convert this folder of car_*_mesh.mat files; download nothing")
    return parser


def outputs(out) -> list[Path]:
    """The files this script leaves for ``--out out`` (the archive is deleted unless --keep-archive)."""
    return [Path(out) / FILENAME]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)

    def fetch_and_check():
        if args.from_folder:
            path = convert_cars3d(args.from_folder, outputs(out)[0])
        else:
            archive = download(args.url, out / "nips2015-analogy-data.tar.gz", md5=MD5, force=args.force)
            with tempfile.TemporaryDirectory(prefix="cars3d-", dir=out) as tmp:
                extract_tar(archive, tmp, prefix="data/cars/")
                path = convert_cars3d(Path(tmp) / "data" / "cars", outputs(out)[0])
            if not args.keep_archive:
                archive.unlink()
        ds = load_cars3d(path)
        n_cars = ds.factor_sizes[0]
        note = "" if n_cars == N_CARS else f" (the official set has {N_CARS} cars)"
        print(f"{path}: {len(ds)} images of {n_cars} cars{note}, OK")

    return run_script(fetch_and_check)


if __name__ == "__main__":
    sys.exit(main())
