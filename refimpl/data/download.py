"""Fetching and unpacking the official dataset files (used by ``data_scripts/``).

Downloads go through ``urllib`` into a temporary file in the destination folder,
are checked against the known MD5 (and size, where known), and only then renamed
into place, so an interrupted or corrupt download never leaves a file that looks
finished. Archives are unpacked member by member, refusing any path that would land
outside the target folder.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from .errors import DatasetError

CHUNK = 1 << 20


def file_digest(path: str | os.PathLike, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def check_file(path: str | os.PathLike, md5: str | None = None, size: int | None = None) -> None:
    """Raise DatasetError unless ``path`` has the given size and MD5 (each checked only if given)."""
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        raise DatasetError(f"{path}: {actual} bytes, expected {size}; the download is incomplete or a different file")
    if md5 is not None:
        digest = file_digest(path, "md5")
        if digest != md5:
            raise DatasetError(f"{path}: MD5 {digest}, expected {md5}; the download is corrupt or a different file")


def download(url: str, dest: str | os.PathLike, md5: str | None = None, size: int | None = None,
             force: bool = False, quiet: bool = False) -> Path:
    """Fetch ``url`` to ``dest`` (checked against ``md5``/``size``); an existing good file is kept."""
    dest = Path(dest)
    if dest.is_file() and not force:
        check_file(dest, md5, size)
        if not quiet:
            print(f"{dest}: already there, checksum OK")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                done += len(block)
                if not quiet and sys.stderr.isatty():
                    share = f" ({100 * done / total:.0f}%)" if total else ""
                    print(f"\r{dest.name}: {done / 2**20:.1f} MiB{share}", end="", file=sys.stderr)
        if not quiet and sys.stderr.isatty():
            print(file=sys.stderr)
        check_file(tmp, md5, size)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if not quiet:
        print(f"{dest}: downloaded, checksum OK" if md5 else f"{dest}: downloaded (no known checksum)")
    return dest


def extract_tar(archive: str | os.PathLike, out_dir: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Unpack the regular files of ``archive`` whose names start with ``prefix`` into ``out_dir``.

    Links, devices and names that are absolute or contain ``..`` are refused.
    """
    out_dir = Path(out_dir).resolve()
    written = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not member.name.startswith(prefix) or member.isdir():
                    continue
                if not member.isfile():
                    raise DatasetError(f"{archive}: member {member.name!r} is not a regular file; refusing it")
                target = (out_dir / member.name).resolve()
                if Path(member.name).is_absolute() or ".." in Path(member.name).parts or out_dir not in target.parents:
                    raise DatasetError(f"{archive}: member {member.name!r} would land outside {out_dir}; refusing it")
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
                try:
                    with os.fdopen(fd, "wb") as f:
                        for block in iter(lambda: src.read(CHUNK), b""):
                            f.write(block)
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, target)
                except BaseException:
                    os.unlink(tmp)
                    raise
                written.append(target)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DatasetError(f"{archive}: unpacking failed ({type(exc).__name__}: {exc})") from None
    return written


# ----------------------------------------------------------------------------------------
# What the scripts in data_scripts/ share


def script_parser(doc: str, dataset: str, out_help: str, url: str | None = None, archive: bool = False):
    """The options of a ``data_scripts/<dataset>.py``: ``--out`` (default: the folder under $REFIMPL_DATA
    where the loader looks, from the registry), ``--url``, ``--force`` and, for archives, ``--keep-archive``."""
    import argparse

    from . import data_root, dataset_info

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    default = data_root() / Path(dataset_info(dataset).path).parts[0]
    parser.add_argument("--out", default=str(default), help=f"{out_help} (default: {default})")
    if url is not None:
        parser.add_argument("--url", default=url)
    parser.add_argument("--force", action="store_true", help="download again even if the file is there")
    if archive:
        parser.add_argument("--keep-archive", action="store_true", help="keep the downloaded archive after unpacking")
    return parser


def run_script(body) -> int:
    """``body()`` with a data script's one-line errors: 1 for a bad or missing file, 0 otherwise."""
    try:
        body()
    except (DatasetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
