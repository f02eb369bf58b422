"""Download checks and safe unpacking, on local file:// URLs and tiny archives (no network)."""

import hashlib
import io
import os
import tarfile

import pytest

from refimpl.data import DatasetError
from refimpl.data.download import check_file, download, extract_tar, file_digest


def test_download_checks_md5_and_size(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest = download(src.as_uri(), tmp_path / "out" / "file.bin", md5=md5, size=3000, quiet=True)
    assert dest.read_bytes() == src.read_bytes() and file_digest(dest) == md5
    assert download(src.as_uri(), dest, md5=md5, quiet=True) == dest  # already there: kept
    with pytest.raises(DatasetError, match=r"MD5 [0-9a-f]{32}, expected 0{32}"):
        download(src.as_uri(), tmp_path / "out" / "other.bin", md5="0" * 32, quiet=True)
    with pytest.raises(DatasetError, match="3000 bytes, expected 3001"):
        download(src.as_uri(), tmp_path / "out" / "other.bin", size=3001, quiet=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["file.bin"]  # a failed download leaves nothing
    dest.write_bytes(b"changed")
    with pytest.raises(DatasetError, match="7 bytes, expected 3000"):
        check_file(dest, md5, 3000)


def make_tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_extract_tar_keeps_the_prefix_and_refuses_escapes(tmp_path):
    make_tar(tmp_path / "a.tar.gz", {"data/cars/car_000_mesh.mat": b"x" * 10, "data/cars/list.txt": b"car_000_mesh\n",
                                     "data/sprites/s.mat": b"y"})
    written = extract_tar(tmp_path / "a.tar.gz", tmp_path / "out", prefix="data/cars/")
    assert sorted(p.name for p in written) == ["car_000_mesh.mat", "list.txt"]
    assert (tmp_path / "out" / "data" / "cars" / "list.txt").read_bytes() == b"car_000_mesh\n"
    assert not (tmp_path / "out" / "data" / "sprites").exists()
    make_tar(tmp_path / "evil.tar.gz", {"data/cars/../../../escaped.txt": b"z"})
    with pytest.raises(DatasetError, match="would land outside"):
        extract_tar(tmp_path / "evil.tar.gz", tmp_path / "out2", prefix="data/cars/")
    assert not (tmp_path / "escaped.txt").exists()
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(DatasetError, match="junk.tar.gz: unpacking failed"):
        extract_tar(tmp_path / "junk.tar.gz", tmp_path / "out3")
