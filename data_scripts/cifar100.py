"""Download CIFAR-100 (python version), unpack it and check it.

    python data_scripts/cifar100.py [--out data/cifar100]

Fetches ``cifar-100-python.tar.gz`` and unpacks ``cifar-100-python/{train,test,meta}``
into ``<out>``; the archive is then deleted unless ``--keep-archive``. MD5s (archive
and the three files) are torchvision's; sizes are not checked (not known to us).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refimpl.data.cifar100 import FOLDER, load_cifar100  # noqa: E402
from refimpl.data.download import check_file, download, extract_tar, run_script, script_parser  # noqa: E402
from refimpl.data.errors import DatasetError  # noqa: E402

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MEMBER_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
COUNTS = {"train": 50000, "test": 10000}


def build_parser():
    return script_parser(__doc__, "cifar100", "folder to unpack cifar-100-python/ into", url=URL, archive=True)


def outputs(out) -> list[Path]:
    """The files this script leaves for ``--out out`` (the archive is deleted unless --keep-archive)."""
    return [Path(out) / FOLDER / name for name in MEMBER_MD5]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)

    def fetch_and_check():
        archive = download(args.url, out / "cifar-100-python.tar.gz", md5=MD5, force=args.force)
        extract_tar(archive, out, prefix=FOLDER + "/")
        for path, md5 in zip(outputs(out), MEMBER_MD5.values()):
            check_file(path, md5=md5)
        for split, count in COUNTS.items():
            ds = load_cifar100(out, split)
            if len(ds) != count:
                raise DatasetError(f"CIFAR-100 {split} in {out}: {len(ds)} images, expected {count}")
            print(f"{out / FOLDER / split}: {count} images, OK")
        if not args.keep_archive:
            archive.unlink()

    return run_script(fetch_and_check)


if __name__ == "__main__":
    sys.exit(main())
