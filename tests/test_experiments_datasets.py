"""Every experiment on every kind of dataset, as a user would run it: the preset follows --dataset, a few
batches run end to end, and the files printed are exactly the files written, with and without matplotlib."""

import gzip
import pickle
import struct

import h5py
import numpy
import pytest

from refimpl import figures
from refimpl.experiments import common, figure1, figure2, figure3, table1
from refimpl.optionspec import OptionError


def write_mnist(folder):
    images = numpy.random.default_rng(0).integers(0, 256, (48, 28, 28)).astype(numpy.uint8)
    folder.mkdir(parents=True)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">iiii", 2051, 48, 28, 28) + images.tobytes()))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">ii", 2049, 48) + bytes(range(48))))


def write_shapes3d(folder):
    folder.mkdir(parents=True)
    rng = numpy.random.default_rng(1)
    with h5py.File(folder / "3dshapes.h5", "w") as f:
        f.create_dataset("images", data=rng.integers(0, 256, (48, 64, 64, 3)).astype(numpy.uint8))
        f.create_dataset("labels", data=rng.random((48, 6)))


def write_cifar100(folder):
    data = numpy.random.default_rng(2).integers(0, 256, (48, 3072)).astype(numpy.uint8)
    (folder / "cifar-100-python").mkdir(parents=True)
    with open(folder / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": data, "fine_labels": list(range(48)), "coarse_labels": [0] * 48}, f, protocol=2)


# dataset kind -> (options that point at it, widths that fit the image size its preset picks)
KINDS = {
    "synthetic-dsprites": ([], "2,2"),  # 1x64x64, the presets' own dataset: 16x16
    "mnist": (["--dataset", "mnist"], "2,2,2"),  # 1x28x28: no pooling divides it, native size
    "shapes3d": (["--dataset", "shapes3d"], "2,2"),  # 3x64x64: 16x16
    "cifar100": (["--dataset", "cifar100"], "2,2"),  # 3x32x32 upscaled to 64x64: 16x16
}
WRITERS = {"mnist": write_mnist, "shapes3d": write_shapes3d, "cifar100": write_cifar100}
EXPERIMENTS = {
    "figure1": (figure1, ["--latent", "2", "--tau", "50"]),
    "figure2": (figure2, ["--latent", "2", "--taus", "5,50", "--eval-images", "4"]),
    "figure3": (figure3, ["--latent", "2", "--low-tau", "5", "--high-tau", "50", "--eval-images", "4",
                          "--count", "2"]),
    "table1": (table1, ["--latents", "1"]),
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name, write in WRITERS.items():
        write(root / name)
    return root


@pytest.mark.parametrize("with_matplotlib", [True, False])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_on_each_dataset_lists_exactly_what_it_wrote(name, kind, with_matplotlib, data_root, tmp_path,
                                                                  monkeypatch, capsys):
    if with_matplotlib:
        pytest.importorskip("matplotlib")
    else:
        monkeypatch.setattr(figures, "pyplot", lambda: None)
    monkeypatch.setenv("REFIMPL_DATA", str(data_root))
    module, own = EXPERIMENTS[name]
    dataset_opts, widths = KINDS[kind]
    out = tmp_path / "out"
    module.run([*dataset_opts, *own, "--channels", widths, "--batch-size", "4", "--holdout", "8", "--batches", "2",
                "--checkpoint-every", "2", "--blas-threads", "0", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    assert last.startswith(f"{name}: wrote ")
    listed = sorted(last.split(" wrote ", 1)[1].split(", "))
    on_disk = sorted(str(p) for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    assert listed == on_disk
    assert any(p.endswith(".csv") for p in listed)
    if kind != "synthetic-dsprites":  # one line says what the preset became for this dataset
        chosen = [line for line in captured.err.splitlines() if f": {kind}: " in line]
        size = 28 if kind == "mnist" else 16
        assert len(chosen) == 1 and f"x{size}x{size} images" in chosen[0] and "preset taus x" in chosen[0]


def test_preset_follows_the_dataset_and_explicit_options_win(data_root, monkeypatch, capsys):
    monkeypatch.setenv("REFIMPL_DATA", str(data_root))
    args = figure2.build_parser().parse_args(["--dataset", "mnist"])
    s = common.settings(args, figure2.SMALL, figure2.FULL, "figure2")
    assert s["image_size"] is None and s["channels"] is None and s["dataset"] == "mnist"
    assert s["tau_scale"] == pytest.approx(10.0 / 1.875)  # MNIST's default tau at 28x28 over dSprites' at 16x16
    args = figure2.build_parser().parse_args(["--dataset", "shapes3d", "--image-size", "32", "--channels", "8,8,8"])
    s = common.settings(args, figure2.SMALL, figure2.FULL, "figure2")
    assert (s["image_size"], s["channels"]) == (32, (8, 8, 8))
    assert s["tau_scale"] == pytest.approx(40.0 * (32 / 64) ** 2 / 1.875)
    capsys.readouterr()
    with pytest.raises(OptionError, match="image_size=16"):  # names the option to change
        figure1.run(["--dataset", "mnist", "--image-size", "16", "--batches", "1", "--blas-threads", "0"])
