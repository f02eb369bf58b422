"""Loaders for dSprites, Shapes3D, MNIST and CIFAR-100 on tiny files in each real format."""

import gzip
import os
import pickle
import struct

import h5py
import numpy
import pytest

from refimpl.data import DATASET_NAMES, DatasetError, DatasetNotFoundError, open_dataset
from refimpl.data.cifar100 import load_cifar100, read_cifar100_pickle
from refimpl.data.dsprites import FILENAME as DSPRITES_FILE
from refimpl.data.dsprites import load_dsprites
from refimpl.data.mnist import load_mnist, read_idx_images, read_idx_labels
from refimpl.data.npz import FileRows
from refimpl.data.shapes3d import load_shapes3d
from refimpl.data.synthetic_dsprites import render_classes


def rng(seed=0):
    return numpy.random.default_rng(seed)


# ---------------------------------------------------------------- dSprites

def dsprites_arrays(n=40):
    classes = numpy.stack([numpy.zeros(n, int), rng(1).integers(0, 3, n), rng(2).integers(0, 6, n),
                           rng(3).integers(0, 40, n), rng(4).integers(0, 32, n), rng(5).integers(0, 32, n)], axis=1)
    imgs = render_classes(classes)
    values = rng(6).random((n, 6))
    metadata = numpy.array({"latents_sizes": numpy.array([1, 3, 6, 40, 32, 32])}, dtype=object)  # pickled
    return {"imgs": imgs, "latents_classes": classes.astype(numpy.int64), "latents_values": values,
            "metadata": metadata}


@pytest.mark.parametrize("save", [numpy.savez_compressed, numpy.savez])
def test_dsprites_good_file(tmp_path, save):
    arrays = dsprites_arrays()
    path = tmp_path / DSPRITES_FILE
    save(path, **arrays)
    ds = load_dsprites(path)
    assert ds.name == "dsprites" and ds.shape == (1, 64, 64) and len(ds) == 40
    assert ds.images.dtype == numpy.uint8
    assert isinstance(ds.images, FileRows) == (save is numpy.savez)  # stored members are read lazily
    idx = numpy.array([39, 0, 5, 5, 17])
    x = ds.get(idx)
    assert x.shape == (5, 1, 64, 64) and x.dtype == numpy.float32
    numpy.testing.assert_array_equal(x[:, 0], arrays["imgs"][idx].astype(numpy.float32))
    assert set(numpy.unique(x)) <= {0.0, 1.0}
    numpy.testing.assert_array_equal(ds.latents_classes(idx), arrays["latents_classes"][idx])
    numpy.testing.assert_array_equal(ds.latents_values(idx), arrays["latents_values"][idx])
    # a folder holding the file, through the registry
    ds2 = open_dataset("dsprites", tmp_path)
    numpy.testing.assert_array_equal(ds2.get(idx, numpy.float64), x)


def test_dsprites_missing_file_names_the_script(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dsprites(tmp_path / "x" / "y.npz")
    msg = str(e.value)
    assert f"dSprites file not found: {tmp_path / 'x' / 'y.npz'}" in msg
    assert f"python data_scripts/dsprites.py --out {tmp_path / 'x'}" in msg


@pytest.mark.parametrize("change, expected", [
    (lambda a: a.update(images=a.pop("imgs")), "has no array 'imgs'"),
    (lambda a: a.pop("latents_classes"), "has no array 'latents_classes'"),
    (lambda a: a.update(imgs=a["imgs"][:, :32, :32]), "imgs has shape (40, 32, 32), expected (N, 64, 64)"),
    (lambda a: a.update(imgs=a["imgs"][:, None]), "expected (N, 64, 64)"),
    (lambda a: a.update(imgs=a["imgs"].astype(numpy.float32)), "imgs has dtype float32, expected uint8"),
    (lambda a: a.update(imgs=a["imgs"] * 255), "values above 1, expected binary"),
    (lambda a: a.update(latents_classes=a["latents_classes"][:10]), "latents_classes is int64 (10, 6)"),
    (lambda a: a.update(latents_values=a["latents_values"][:, :5]), "latents_values is float64 (40, 5)"),
    (lambda a: a["latents_classes"].__setitem__((0, 1), 3), "outside the factor sizes"),
])
def test_dsprites_wrong_content(tmp_path, change, expected):
    arrays = dsprites_arrays()
    change(arrays)
    path = tmp_path / "d.npz"
    numpy.savez_compressed(path, **arrays)
    with pytest.raises(DatasetError) as e:
        load_dsprites(path)
    assert str(path) in str(e.value) and expected in str(e.value)


@pytest.mark.parametrize("save", [numpy.savez_compressed, numpy.savez])
def test_dsprites_truncated_or_corrupt(tmp_path, save):
    path = tmp_path / "d.npz"
    save(path, **dsprites_arrays(200))
    raw = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="cut.npz: not a readable .npz"):
        load_dsprites(tmp_path / "cut.npz")
    (tmp_path / "text.npz").write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(DatasetError, match="text.npz: not a readable .npz"):
        load_dsprites(tmp_path / "text.npz")
    if save is numpy.savez_compressed:  # flip bytes inside the compressed image data: CRC or zlib error
        bad = bytearray(raw)
        mid = len(bad) // 3
        bad[mid:mid + 64] = bytes(255 - b for b in bad[mid:mid + 64])
        (tmp_path / "flip.npz").write_bytes(bytes(bad))
        with pytest.raises(DatasetError, match="flip.npz: .*(truncated or corrupt|not a readable)"):
            load_dsprites(tmp_path / "flip.npz")


# ---------------------------------------------------------------- Shapes3D

def write_h5(path, n=30, images_key="images", labels_key="labels", shape=(64, 64, 3), dtype=numpy.uint8,
             labels_shape=None, compression="gzip"):
    images = rng(0).integers(0, 256, (n,) + shape).astype(dtype)
    labels = rng(1).random(labels_shape or (n, 6))
    with h5py.File(path, "w") as f:
        f.create_dataset(images_key, data=images, chunks=(4,) + shape, compression=compression)
        f.create_dataset(labels_key, data=labels)
    return images, labels


def test_shapes3d_good_file(tmp_path):
    path = tmp_path / "3dshapes.h5"
    images, labels = write_h5(path)
    ds = load_shapes3d(path)
    assert ds.name == "shapes3d" and ds.shape == (3, 64, 64) and len(ds) == 30
    idx = numpy.array([29, 3, 3, 0, 17, 4])  # unsorted, with a duplicate
    x = ds.get(idx)
    assert x.shape == (6, 3, 64, 64) and x.dtype == numpy.float32
    expected = images[idx].transpose(0, 3, 1, 2).astype(numpy.float32) / 255
    numpy.testing.assert_array_equal(x, expected)
    assert x.min() >= 0 and x.max() <= 1
    numpy.testing.assert_array_equal(x[0, 0], images[29, :, :, 0] / numpy.float32(255))  # channel 0 is R
    numpy.testing.assert_array_equal(ds.get(numpy.arange(5, 12)), images[5:12].transpose(0, 3, 1, 2) / numpy.float32(255))
    numpy.testing.assert_array_equal(ds.labels[idx], labels[idx])
    assert ds.get([]).shape == (0, 3, 64, 64)
    ds2 = pickle.loads(pickle.dumps(ds))  # reopens the file
    numpy.testing.assert_array_equal(ds2.get(idx), x)
    ds.close()
    ds2.close()
    ds3 = open_dataset("shapes3d", tmp_path, chunk_cache_mb=1)
    numpy.testing.assert_array_equal(ds3.get(idx, numpy.float64), images[idx].transpose(0, 3, 1, 2) / 255.0)


def test_shapes3d_missing_file_names_the_script(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"Shapes3D file not found: .*; download it with: "
                       r"python data_scripts/shapes3d.py --out "):
        load_shapes3d(tmp_path / "3dshapes.h5")


@pytest.mark.parametrize("kwargs, expected", [
    ({"images_key": "imgs"}, "has no dataset 'images'"),
    ({"labels_key": "factors"}, "has no dataset 'labels'"),
    ({"shape": (64, 64)}, "images has shape (30, 64, 64), expected (N, 64, 64, 3)"),
    ({"shape": (3, 64, 64)}, "expected (N, 64, 64, 3)"),
    ({"dtype": numpy.float32}, "images has dtype float32, expected uint8"),
    ({"labels_shape": (30, 5)}, "labels has shape (30, 5), expected (30, 6)"),
])
def test_shapes3d_wrong_content(tmp_path, kwargs, expected):
    path = tmp_path / "bad.h5"
    write_h5(path, **kwargs)
    with pytest.raises(DatasetError) as e:
        load_shapes3d(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_shapes3d_corrupt_or_truncated(tmp_path):
    (tmp_path / "text.h5").write_bytes(b"no hdf5 here" * 100)
    with pytest.raises(DatasetError, match="text.h5: not a readable HDF5 file"):
        load_shapes3d(tmp_path / "text.h5")
    path = tmp_path / "full.h5"
    write_h5(path, n=200, compression=None)
    raw = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(raw[: int(len(raw) * 0.6)])
    with pytest.raises(DatasetError, match="cut.h5"):
        load_shapes3d(cut).get(numpy.arange(200))


def test_shapes3d_uncompressed_copy(tmp_path, monkeypatch):
    import refimpl.data.shapes3d as shapes3d

    path = tmp_path / "3dshapes.h5"
    images, labels = write_h5(path, n=30)
    out = shapes3d.convert_shapes3d(path, tmp_path / "3dshapes.npz", rows=10)  # 8 rows a read: 2 whole chunks
    assert sorted(os.listdir(tmp_path)) == ["3dshapes.h5", "3dshapes.npz"] and out == tmp_path / "3dshapes.npz"
    fast = load_shapes3d(tmp_path)  # the folder: the npz is preferred
    assert isinstance(fast, shapes3d.Shapes3DArray) and isinstance(fast.images, FileRows)
    assert fast.name == "shapes3d" and fast.shape == (3, 64, 64) and len(fast) == 30
    idx = numpy.array([29, 3, 3, 0, 17])
    numpy.testing.assert_array_equal(fast.get(idx), load_shapes3d(path).get(idx))
    numpy.testing.assert_array_equal(fast.labels[idx], labels[idx])
    numpy.savez(tmp_path / "bad.npz", images=numpy.zeros((3, 64, 64, 3), numpy.uint8))
    with pytest.raises(DatasetError, match="bad.npz: has no array 'labels'"):
        load_shapes3d(tmp_path / "bad.npz")
    with pytest.raises(DatasetNotFoundError, match="shapes3d.py"):
        load_shapes3d(tmp_path / "none.npz")
    monkeypatch.setattr(shapes3d, "LARGE_CHUNK", 1000)  # the test file's 48 KiB chunks count as large
    with pytest.warns(UserWarning, match="random batches are slow.*--uncompressed"):
        load_shapes3d(path)


# ---------------------------------------------------------------- MNIST

def idx_images(images):
    n, r, c = images.shape
    return struct.pack(">iiii", 2051, n, r, c) + images.astype(numpy.uint8).tobytes()


def idx_labels(labels):
    return struct.pack(">ii", 2049, len(labels)) + numpy.asarray(labels, numpy.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_good_files(tmp_path, gz):
    images = rng(0).integers(0, 256, (7, 28, 28)).astype(numpy.uint8)
    labels = numpy.array([3, 1, 4, 1, 5, 9, 2])
    test_images = rng(1).integers(0, 256, (3, 28, 28)).astype(numpy.uint8)
    files = {"train-images-idx3-ubyte": idx_images(images), "train-labels-idx1-ubyte": idx_labels(labels),
             "t10k-images-idx3-ubyte": idx_images(test_images), "t10k-labels-idx1-ubyte": idx_labels([0, 1, 2])}
    for name, data in files.items():
        if gz:
            (tmp_path / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (tmp_path / name).write_bytes(data)
    ds = load_mnist(tmp_path)
    assert ds.name == "mnist" and ds.shape == (1, 28, 28) and len(ds) == 7
    idx = [6, 0, 2]
    x = ds.get(idx)
    assert x.shape == (3, 1, 28, 28) and x.dtype == numpy.float32
    numpy.testing.assert_array_equal(x[:, 0], images[idx] / numpy.float32(255))
    numpy.testing.assert_array_equal(ds.labels, labels)
    test = open_dataset("mnist", tmp_path, split="test")
    assert len(test) == 3
    numpy.testing.assert_array_equal(test.get([1])[0, 0], test_images[1] / numpy.float32(255))
    single = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    numpy.testing.assert_array_equal(load_mnist(single).get(idx), x)


def test_mnist_bad_files(tmp_path):
    images = rng(0).integers(0, 256, (5, 28, 28)).astype(numpy.uint8)
    good = idx_images(images)
    cases = {
        "labels-as-images": (idx_labels([1, 2, 3]), read_idx_images, "magic number 2049 (that is a label file), "
                             "expected 2051"),
        "images-as-labels": (good, read_idx_labels, "magic number 2051 (that is an image file), expected 2049"),
        "little-endian": (struct.pack("<iiii", 2051, 5, 28, 28) + images.tobytes(), read_idx_images,
                          "expected 2051"),
        "truncated": (good[:-100], read_idx_images, f"is {len(good) - 100} bytes, expected {len(good)}"),
        "too-long": (good + b"\0", read_idx_images, "truncated or corrupt"),
        "short": (good[:10], read_idx_images, "too short for an idx image header"),
        "labels-truncated": (idx_labels([1, 2, 3])[:-1], read_idx_labels, "expected 11 for 3 labels"),
        "gz-truncated": (gzip.compress(good)[:-30], read_idx_images, "cannot be read or gunzipped"),
    }
    for name, (data, reader, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DatasetError) as e:
            reader(path)
        assert str(path) in str(e.value) and expected in str(e.value), name
    with pytest.raises(DatasetNotFoundError, match=r"python data_scripts/mnist.py --out "):
        load_mnist(tmp_path / "nowhere")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train-images-idx3-ubyte").write_bytes(good)
    (tmp_path / "d" / "train-labels-idx1-ubyte").write_bytes(idx_labels([1, 2]))
    with pytest.raises(DatasetError, match="has 2 labels but .* has 5 images"):
        load_mnist(tmp_path / "d")
    assert len(load_mnist(tmp_path / "d", labels=False)) == 5


# ---------------------------------------------------------------- CIFAR-100

def cifar_dict(n=6, bytes_keys=False):
    data = rng(0).integers(0, 256, (n, 3072)).astype(numpy.uint8)
    data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30  # R, G, B planes of image 0
    d = {"data": data, "fine_labels": list(range(n)), "coarse_labels": [k % 20 for k in range(n)],
         "filenames": [f"img_{k}.png" for k in range(n)], "batch_label": "training batch 1 of 1"}
    if bytes_keys:
        d = {k.encode(): v for k, v in d.items()}
    return d


def write_cifar(folder, d, name="train", protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "wb") as f:
        pickle.dump(d, f, protocol=protocol)
    return folder / name


@pytest.mark.parametrize("protocol, bytes_keys", [(2, False), (4, False), (2, True)])
def test_cifar100_good_file(tmp_path, protocol, bytes_keys):
    d = cifar_dict(bytes_keys=bytes_keys)
    data = d[b"data" if bytes_keys else "data"]
    write_cifar(tmp_path / "cifar-100-python", d, protocol=protocol)
    ds = load_cifar100(tmp_path)
    assert ds.name == "cifar100" and ds.shape == (3, 64, 64) and len(ds) == 6
    numpy.testing.assert_array_equal(ds.labels, numpy.arange(6))
    x = ds.get([0, 5, 2])
    assert x.shape == (3, 3, 64, 64) and x.dtype == numpy.float32 and 0 <= x.min() and x.max() <= 1
    numpy.testing.assert_allclose(x[0, :, 0, 0], numpy.array([10, 20, 30]) / 255, rtol=1e-6)  # R, G, B order
    small = data.reshape(6, 3, 32, 32)[[0, 5, 2]] / numpy.float32(255)
    numpy.testing.assert_array_equal(x[:, :, ::2, ::2], small)  # nearest: invertible by subsampling
    for dr in (0, 1):
        for dc in (0, 1):
            numpy.testing.assert_array_equal(x[:, :, dr::2, dc::2], small)  # every 2x2 block is one pixel
    assert data.reshape(6, 3, 32, 32)[5, 1, 7, 9] == round(float(x[1, 1, 14, 18]) * 255)


def test_cifar100_bilinear_and_splits(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar(folder, cifar_dict(6))
    write_cifar(folder, cifar_dict(4), name="test")
    near = open_dataset("cifar100", tmp_path, upscale="nearest")
    bil = open_dataset("cifar100", tmp_path, upscale="bilinear")
    xb, xn = bil.get([0, 1]), near.get([0, 1])
    assert xb.shape == (2, 3, 64, 64)
    numpy.testing.assert_allclose(xb[0], xn[0])  # a constant image stays constant
    assert not numpy.array_equal(xb[1], xn[1])  # bilinear invents in-between values
    assert abs(float(xb[1].mean()) - float(xn[1].mean())) < 0.02
    assert len(load_cifar100(folder, split="test")) == 4
    assert len(load_cifar100(folder / "test", split="test")) == 4
    with pytest.raises(ValueError, match="upscale='bicubic'"):
        load_cifar100(tmp_path, upscale="bicubic")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.pop("fine_labels"), "has no key 'fine_labels'"),
    (lambda d: d.pop("data"), "has no key 'data'"),
    (lambda d: d.update(data=d["data"][:, :1024]), "data has shape (6, 1024), expected (N, 3072)"),
    (lambda d: d.update(data=d["data"].astype(numpy.float32)), "data has dtype float32, expected uint8"),
    (lambda d: d.update(fine_labels=[1, 2]), "fine_labels has shape (2,), expected (6,)"),
    (lambda d: d.update(data=Evil()), "refusing to load"),
])
def test_cifar100_wrong_content(tmp_path, change, expected):
    d = cifar_dict()
    change(d)
    path = write_cifar(tmp_path, d)
    with pytest.raises(DatasetError) as e:
        read_cifar100_pickle(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_cifar100_truncated_or_missing(tmp_path):
    path = write_cifar(tmp_path, cifar_dict())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="is not a readable CIFAR python pickle"):
        read_cifar100_pickle(path)
    (tmp_path / "list").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DatasetError, match="holds a list, expected a dict"):
        read_cifar100_pickle(tmp_path / "list")
    with pytest.raises(DatasetNotFoundError, match=r"CIFAR-100 file not found: .*python data_scripts/cifar100.py"):
        load_cifar100(tmp_path / "nowhere")


# ---------------------------------------------------------------- registry

def test_registry(tmp_path, monkeypatch):
    assert set(DATASET_NAMES) == {"synthetic-dsprites", "dsprites", "shapes3d", "cars3d", "mnist", "cifar100"}
    ds = open_dataset()
    assert ds.name == "synthetic-dsprites" and len(ds) == 737280 and ds.shape == (1, 64, 64)
    with pytest.raises(ValueError, match="unknown dataset 'celeba'"):
        open_dataset("celeba")
    with pytest.raises(ValueError, match="takes no path"):
        open_dataset("synthetic-dsprites", tmp_path)
    monkeypatch.setenv("REFIMPL_DATA", str(tmp_path))
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte").write_bytes(idx_images(numpy.zeros((2, 28, 28), numpy.uint8)))
    assert len(open_dataset("mnist")) == 2
    with pytest.raises(DatasetNotFoundError, match=f"--out {tmp_path / 'shapes3d'}"):
        open_dataset("shapes3d")
    with pytest.raises(TypeError):
        open_dataset("mnist", upscale="nearest")
