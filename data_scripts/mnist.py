"""Download the four MNIST idx files (gzipped) and check them.

    python data_scripts/mnist.py [--out data/mnist]

Writes ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` into ``<out>``; the
loader reads them gzipped. MD5s are torchvision's; the first mirror is torchvision's,
the second the one TensorFlow's tutorials use (yann.lecun.com itself now refuses
most downloads). Sizes are not checked (not known to us); the idx headers are.
"""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refimpl.data.download import download, run_script, script_parser  # noqa: E402
from refimpl.data.errors import DatasetError  # noqa: E402
from refimpl.data.mnist import load_mnist  # noqa: E402

MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/")
FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
COUNTS = {"train": 60000, "test": 10000}


def build_parser():
    return script_parser(__doc__, "mnist", "folder to write the idx files into")


def outputs(out) -> list[Path]:
    """The files this script writes for ``--out out``."""
    return [Path(out) / name for name in FILES]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)

    def fetch_and_check():
        for name, md5 in FILES.items():
            for i, mirror in enumerate(MIRRORS):
                try:
                    download(mirror + name, out / name, md5=md5, force=args.force)
                    break
                except (urllib.error.URLError, DatasetError) as exc:
                    if i == len(MIRRORS) - 1:
                        raise
                    print(f"{mirror + name}: {exc}; trying the next mirror", file=sys.stderr)
        for split, count in COUNTS.items():
            ds = load_mnist(out, split)
            if len(ds) != count or ds.shape != (1, 28, 28) or ds.labels is None:
                raise DatasetError(f"MNIST {split} in {out}: {len(ds)} images of {ds.shape}, expected {count} of "
                                   "(1, 28, 28) with labels")
            print(f"{out}: MNIST {split}, {count} images, OK")

    return run_script(fetch_and_check)


if __name__ == "__main__":
    sys.exit(main())
