"""Download the official dSprites npz and check it.

    python data_scripts/dsprites.py [--out data/dsprites]

Writes ``<out>/dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` (about 26 MB,
compressed; 3.0 GB of uint8 images once loaded). The MD5 below is the one published
by several independent loaders (torchvision-style dataset classes in disent, vaetc,
latte and others); the file's exact size is not known to us, so only the MD5 and the
array headers are checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refimpl.data.download import download, run_script, script_parser  # noqa: E402
from refimpl.data.dsprites import FILENAME, N_IMAGES, check_dsprites_file  # noqa: E402
from refimpl.data.errors import DatasetError  # noqa: E402

URL = "https://github.com/deepmind/dsprites-dataset/raw/master/" + FILENAME
MD5 = "7da33b31b13a06f4b04a70402ce90c2e"


def build_parser():
    return script_parser(__doc__, "dsprites", "folder to write the npz into", url=URL)


def outputs(out) -> list[Path]:
    """The files this script writes for ``--out out``."""
    return [Path(out) / FILENAME]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def fetch_and_check():
        path = download(args.url, outputs(args.out)[0], md5=MD5, force=args.force)
        n = check_dsprites_file(path)["imgs"].shape[0]
        if n != N_IMAGES:
            raise DatasetError(f"{path} holds {n} images, expected {N_IMAGES}")
        print(f"{path}: {n} images of 64x64, OK")

    return run_script(fetch_and_check)


if __name__ == "__main__":
    sys.exit(main())
