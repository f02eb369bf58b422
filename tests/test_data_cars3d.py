"""Cars3D: reading Reed et al.'s .mat files, the npz conversion, and the data script (no network)."""

import importlib.util
import os
from pathlib import Path

import numpy
import pytest
import scipy.io
from PIL import Image

from refimpl.data import DatasetError, DatasetNotFoundError, open_dataset
from refimpl.data.cars3d import convert_cars3d, load_cars3d, read_cars3d_mat
from refimpl.data.npz import FileRows

ROOT = Path(__file__).resolve().parents[1]


def car_im(car: int) -> numpy.ndarray:
    """im (128, 128, 3, 24, 4) uint8: frame (azimuth a, elevation e) is the constant colour
    (10 a, 60 e, 40 car), except frame (a=1, e=2) which holds a gradient."""
    im = numpy.empty((128, 128, 3, 24, 4), dtype=numpy.uint8)
    for a in range(24):
        for e in range(4):
            im[:, :, :, a, e] = (10 * a, 60 * e, 40 * car)
    grad = numpy.add.outer(numpy.arange(128), numpy.arange(128)) % 256
    im[:, :, 0, 1, 2] = grad
    return im


def write_mats(folder: Path, cars=(0, 1, 2), listing=None, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    for car in cars:
        scipy.io.savemat(folder / f"car_{car:03d}_mesh.mat", {"im": overrides.get("im", car_im(car)),
                                                               "mask": numpy.zeros((128, 128, 24, 4), numpy.uint8)})
    if listing is not None:
        (folder / "list.txt").write_text("".join(f"car_{c:03d}_mesh\n" for c in listing))
    return folder


def test_read_mat_order_and_lanczos(tmp_path):
    write_mats(tmp_path, cars=(2,))
    out = read_cars3d_mat(tmp_path / "car_002_mesh.mat")
    assert out.shape == (96, 64, 64, 3) and out.dtype == numpy.uint8
    for a in (0, 5, 23):
        for e in range(4):
            if (a, e) != (1, 2):
                assert (out[a * 4 + e] == numpy.array([10 * a, 60 * e, 80], numpy.uint8)).all()
    frame = car_im(2)[:, :, :, 1, 2]
    lanczos = numpy.asarray(Image.fromarray(frame).resize((64, 64), Image.Resampling.LANCZOS))
    numpy.testing.assert_array_equal(out[1 * 4 + 2], lanczos)


def test_convert_and_load(tmp_path):
    mats = write_mats(tmp_path / "cars", listing=(2, 0, 1))  # list.txt order is the car order
    out = convert_cars3d(mats, tmp_path / "out" / "cars3d.npz")
    assert sorted(os.listdir(tmp_path / "out")) == ["cars3d.npz"]  # no temporary file left
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    ds = load_cars3d(out)
    assert isinstance(ds.images, FileRows)  # fast path: rows read on demand
    assert ds.name == "cars3d" and ds.shape == (3, 64, 64) and len(ds) == 3 * 96
    assert ds.factor_sizes == (3, 24, 4) and list(ds.names) == ["car_002_mesh", "car_000_mesh", "car_001_mesh"]
    idx = numpy.array([0 * 96 + 5 * 4 + 3, 2 * 96 + 23 * 4 + 0, 1 * 96 + 0])
    numpy.testing.assert_array_equal(ds.latents_classes(idx), [[0, 5, 3], [2, 23, 0], [1, 0, 0]])
    x = ds.get(idx)
    assert x.shape == (3, 3, 64, 64) and x.dtype == numpy.float32
    expected = numpy.array([[50, 180, 80], [230, 0, 40], [0, 0, 0]]) / numpy.float32(255)  # cars 2, 1, 0
    numpy.testing.assert_array_equal(x[:, :, 10, 20], expected.astype(numpy.float32))
    # the slow path (a folder of .mat files) and the registry give the same images
    slow = load_cars3d(mats)
    assert isinstance(slow.images, numpy.ndarray)
    numpy.testing.assert_array_equal(slow.get(idx), x)
    numpy.testing.assert_array_equal(open_dataset("cars3d", tmp_path / "out").get(idx), x)
    # without list.txt the files go in name order
    (mats / "list.txt").unlink()
    assert list(load_cars3d(mats).names) == ["car_000_mesh", "car_001_mesh", "car_002_mesh"]


def test_conversion_failure_leaves_nothing(tmp_path, monkeypatch):
    import refimpl.data.cars3d as cars3d

    (tmp_path / "out").mkdir()

    def chunks():
        yield numpy.zeros((96, 64, 64, 3), numpy.uint8)
        raise OSError("disk full")

    monkeypatch.setattr(cars3d, "cars3d_arrays", lambda folder: {"images": ((192, 64, 64, 3), numpy.uint8, chunks())})
    with pytest.raises(OSError, match="disk full"):
        convert_cars3d(tmp_path, tmp_path / "out" / "cars3d.npz")
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("content, expected", [
    ({"image": car_im(0)}, "has no variable 'im'"),
    ({"im": car_im(0).transpose(0, 1, 2, 4, 3)}, "im has shape (128, 128, 3, 4, 24), expected (128, 128, 3, 24, 4)"),
    ({"im": car_im(0)[::2, ::2]}, "expected (128, 128, 3, 24, 4)"),
    ({"im": car_im(0).astype(numpy.float32)}, "im has dtype float32, expected uint8"),
])
def test_bad_mat_files(tmp_path, content, expected):
    path = tmp_path / "car_000_mesh.mat"
    scipy.io.savemat(path, content)
    with pytest.raises(DatasetError) as e:
        read_cars3d_mat(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_corrupt_and_missing(tmp_path):
    (tmp_path / "junk.mat").write_bytes(b"MATLAB 5.0 MAT-file, but then nothing useful" * 3)
    with pytest.raises(DatasetError, match="junk.mat: not a readable MATLAB .mat file"):
        read_cars3d_mat(tmp_path / "junk.mat")
    write_mats(tmp_path / "cut", cars=(0,))
    path = tmp_path / "cut" / "car_000_mesh.mat"
    path.write_bytes(path.read_bytes()[:100000])
    with pytest.raises(DatasetError, match="car_000_mesh.mat: not a readable MATLAB"):
        read_cars3d_mat(path)
    with pytest.raises(DatasetNotFoundError, match="python data_scripts/cars3d.py --out"):
        load_cars3d(tmp_path / "nowhere" / "cars3d.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no car_\\*_mesh.mat files"):
        load_cars3d(tmp_path / "empty")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "list.txt").write_text("car_009_mesh\n")
    with pytest.raises(DatasetNotFoundError, match="car_009_mesh.mat"):
        load_cars3d(tmp_path / "listed")


@pytest.mark.parametrize("arrays, expected", [
    ({"imgs": numpy.zeros((96, 64, 64, 3), numpy.uint8)}, "has no array 'images'"),
    ({"images": numpy.zeros((95, 64, 64, 3), numpy.uint8)}, "images has shape (95, 64, 64, 3), expected (n_cars * 96"),
    ({"images": numpy.zeros((96, 3, 64, 64), numpy.uint8)}, "expected (n_cars * 96, 64, 64, 3)"),
    ({"images": numpy.zeros((96, 64, 64, 3), numpy.float64)}, "images has dtype float64, expected uint8"),
])
def test_bad_npz(tmp_path, arrays, expected):
    path = tmp_path / "cars3d.npz"
    numpy.savez(path, **arrays)
    with pytest.raises(DatasetError) as e:
        load_cars3d(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_data_script_converts_a_folder(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("cars3d_script", ROOT / "data_scripts" / "cars3d.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    mats = write_mats(tmp_path / "cars", cars=(0, 1))
    assert script.main(["--from-folder", str(mats), "--out", str(tmp_path / "out")]) == 0
    assert "192 images of 2 cars (the official set has 183 cars), OK" in capsys.readouterr().out
    assert len(load_cars3d(tmp_path / "out")) == 192
    assert script.main(["--from-folder", str(tmp_path / "none"), "--out", str(tmp_path / "out2")]) == 1
    assert "error: Cars3D file not found" in capsys.readouterr().err
