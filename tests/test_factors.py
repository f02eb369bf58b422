"""Factor scores (refimpl/factors.py): the MI estimator, normalisation, MIG, and a tiny real run end to end."""

import argparse
import json
import math
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import factors
from refimpl.data.base import ArrayImages
from refimpl.data.dsprites import FACTOR_NAMES, FACTOR_SIZES
from refimpl.data.shapes3d import Shapes3DArray
from refimpl.factors import (discretize, entropy, factor_classes, factor_scores, joint_scores, knn_predict, mig,
                             mig_gaps, mutual_information, run_factors, sample_indices)
from refimpl.config import RunConfig
from refimpl.training import Run

N = 20000
SIZES = FACTOR_SIZES[1:]  # shape, scale, orientation, posX, posY


def dsprites_factors(n=N, seed=0):
    """Uniform classes (n, 5) of dSprites' varying factors."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, s, n) for s in SIZES], axis=1)


def copy_code(classes, k, rng, noise=0.05):
    """A latent code holding factor k: its class plus small noise."""
    return classes[:, k] + noise * rng.standard_normal(classes.shape[0])


# ----------------------------------------------------------------------------------------
# Estimators


def test_entropy_and_mi_of_identical_variables_is_the_entropy():
    a = np.random.default_rng(1).integers(0, 7, 5000)
    p = np.bincount(a) / a.size
    assert entropy(a) == pytest.approx(-(p * np.log(p)).sum(), abs=1e-12)
    assert abs(mutual_information(a, a) - entropy(a)) < 1e-12
    assert abs(mutual_information(a, 10 * a + 3) - entropy(a)) < 1e-12  # relabelling changes nothing
    assert entropy(np.zeros(10, int)) == 0.0
    assert entropy(np.arange(4)) == pytest.approx(math.log(4), abs=1e-15)


def test_mi_of_independent_variables_is_near_zero_and_symmetric():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 10, N), rng.integers(0, 10, N)
    mi = mutual_information(a, b)
    assert 0.0 <= mi < 0.01  # plug-in bias ~ 81 / (2 N) = 0.002
    assert abs(mutual_information(b, a) - mi) < 1e-12
    # a known dependent pair: b = a with probability 1/2, else uniform and independent
    c = np.where(rng.random(N) < 0.5, a, b)
    assert mutual_information(a, c) == pytest.approx(mutual_information(c, a), abs=1e-12)
    assert 0.2 < mutual_information(a, c) < entropy(a)
    with pytest.raises(ValueError, match="sizes 3 and 2"):
        mutual_information([0, 1, 2], [0, 1])


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=60))
def test_mi_bounds(pairs):
    a, b = np.array(pairs).T
    mi = mutual_information(a, b)
    assert 0.0 <= mi <= min(entropy(a), entropy(b)) + 1e-12
    assert abs(mi - mutual_information(b, a)) < 1e-12


@given(st.integers(1, 6), st.integers(2, 30), st.integers(0, 2**32 - 1))
def test_normalised_scores_are_in_unit_interval(n, bins, seed):
    rng = np.random.default_rng(seed)
    f = dsprites_factors(200, seed)
    codes = rng.standard_normal((200, n))
    codes[:, 0] = copy_code(f, seed % 5, rng)
    s = factor_scores(codes, f, bins)
    assert s["normalized"].shape == (n, 5) and s["mutual_information"].shape == (n, 5)
    assert (s["normalized"] >= 0).all() and (s["normalized"] <= 1).all()
    assert (s["mutual_information"] <= np.log(bins) + 1e-12).all()  # a code in `bins` bins holds at most log(bins)
    assert 0.0 <= s["mig"] <= 1.0


def test_discretize_uses_equal_width_bins_over_the_range():
    codes = np.array([[0.0, 5.0], [0.49, 5.0], [0.5, 5.0], [1.0, 5.0]])
    binned = discretize(codes, 2)
    np.testing.assert_array_equal(binned[:, 0], [0, 0, 1, 1])
    assert np.unique(binned[:, 1]).size == 1  # a constant code: one bin, MI 0
    assert discretize(np.linspace(-3, 3, 1000)[:, None], 20).max() == 19
    np.testing.assert_array_equal(np.bincount(discretize(np.linspace(0, 1, 1000)[:, None], 20)[:, 0]), [50] * 20)
    with pytest.raises(ValueError, match="bins=1"):
        discretize(codes, 1)
    with pytest.raises(ValueError, match=r"non-finite values in dimensions \[1\]"):
        discretize(np.array([[0.0, np.nan], [1.0, 2.0]]), 4)


# ----------------------------------------------------------------------------------------
# A latent built to hold one factor


def test_a_code_copying_one_factor_scores_near_one_for_it_and_near_zero_for_the_others():
    rng = np.random.default_rng(3)
    f = dsprites_factors()
    codes = rng.standard_normal((N, 4))
    codes[:, 2] = copy_code(f, 1, rng)  # dim 2 holds scale (6 values)
    s = factor_scores(codes, f)
    norm = s["normalized"]
    assert norm[2, 1] > 0.9
    assert (np.delete(norm[2], 1) < 0.05).all()  # the other factors
    assert (np.delete(norm, 2, axis=0) < 0.05).all()  # the pure-noise dims
    # the noise dims score about the estimator's bias ("chance")
    np.testing.assert_allclose(np.delete(norm, 2, axis=0).mean(axis=0), s["chance"], rtol=0.3)
    # MIG: scale's gap is ~1 - chance, every other factor's ~0: about 1/5
    assert s["gaps"][1] == pytest.approx(1.0 - norm[[0, 1, 3], 1].max(), abs=1e-12)
    assert s["mig"] == pytest.approx(1 / 5, abs=0.02)
    assert s["top"][1, 0] == 2


def test_independent_codes_score_inside_the_chance_band():
    """For a code independent of the factor, the plug-in MI averages plugin_bias and stays under chance_band
    (chance + 3 standard deviations) on all but rare draws; a code that holds a little of it gets above."""
    rng = np.random.default_rng(7)
    n, bins, values = 4000, 10, 6
    scores = np.array([mutual_information(discretize(rng.standard_normal((n, 1)), bins)[:, 0],
                                          rng.integers(0, values, n)) for _ in range(300)])
    assert scores.mean() == pytest.approx(factors.plugin_bias(bins, values, n), rel=0.15)
    assert (scores > factors.chance_band(bins, values, n)).mean() < 0.03
    v = rng.integers(0, values, n)
    weak = discretize((v + 8.0 * rng.standard_normal(n))[:, None], bins)[:, 0]  # a faint trace of the factor
    assert mutual_information(weak, v) > factors.chance_band(bins, values, n)


def scored(norm, open_dims, joint, band=0.1, factor_names=("posX", "posY")):
    """A run_factors-shaped result for format_table, from a normalised MI table and joint scores."""
    norm = np.asarray(norm, dtype=float)
    k = len(factor_names)
    return {"run": "runs/r", "dataset": "synthetic-dsprites", "step": 100, "sample_size": 1000, "pool_size": 1000,
            "sample": "heldout", "bins": 20, "factors": list(factor_names), "constant_factors": [],
            "bound": [1.0] * k, "chance": [band / 2] * k, "chance_band": [band] * k, "open_dims": open_dims,
            "normalized_mi": norm.tolist(), "mig_gap": dict.fromkeys(factor_names, 0.0), "mig": 0.0,
            "best_factor": [{"dim": j, "open": j in open_dims, "factor": factor_names[int(row.argmax())],
                             "normalized_mi": float(row.max())} for j, row in enumerate(norm)],
            "joint": None if joint is None else {
                "k": 10, "normalized_mi": dict(zip(factor_names, joint)), "chance": dict.fromkeys(factor_names, 0.05),
                "chance_band": dict.fromkeys(factor_names, 0.1), "accuracy": dict.fromkeys(factor_names, 0.5),
                "majority": dict.fromkeys(factor_names, 0.03)}}


def test_the_printout_says_what_to_read_marks_chance_and_closed_dimensions():
    # dims 0 and 2 open, 1 closed; alone, every open score is within chance; together they hold both factors
    table = factors.format_table(scored([[0.08, 0.09], [0.15, 0.12], [0.07, 0.10]], [0, 2], [0.45, 0.40]))
    lines = table.splitlines()
    assert lines[1].startswith("How to read: the decoder gets only the open dimensions")
    rows = [line.split()[:2] for line in lines if line[:4].strip().isdigit()]
    assert rows == [["0", "open"], ["2", "open"], ["1", "closed"]]  # the open ones first
    assert "closed: the encoder's mu_j, which the decoder never gets" in table
    assert "0.080~" in table and "0.150 " in table  # within chance marked, above not
    assert "every open dimension alone scores within chance on every factor" in table
    assert "posX, posY: held by the open dimensions together at least 1.5 times better" in table
    reading = lines[lines.index("reading (the 2 open dimensions; ~: within chance)") + 2]
    assert reading.split() == ["posX", "0.450", "0.080~", "(z0)"]
    # one dimension per factor, well above chance: no warning, nothing spread
    table = factors.format_table(scored([[0.9, 0.05], [0.05, 0.05], [0.05, 0.8]], [0, 2], [0.95, 0.9]))
    assert "within chance on every factor" not in table and "spread" not in table
    assert factors.format_table(scored([[0.2, 0.2]], [], None)).endswith(
        "no dimension is open: the decoder gets nothing from the code")


def test_a_code_holding_every_factor_has_mig_near_one_given_enough_bins():
    rng = np.random.default_rng(4)
    f = dsprites_factors()
    perm = [3, 0, 4, 1, 2]  # dim j holds factor perm[j]
    codes = np.stack([copy_code(f, k, rng, noise=0.02) for k in perm], axis=1)
    s = factor_scores(codes, f, bins=64)
    assert s["mig"] > 0.95
    np.testing.assert_array_equal(s["normalized"].argmax(axis=1), perm)


def test_twenty_bins_cap_factors_with_more_values():
    """posX has 32 values: a perfect posX code in 20 bins reaches only ~log 20 / log 32."""
    rng = np.random.default_rng(5)
    f = dsprites_factors()
    s = factor_scores(copy_code(f, 3, rng)[:, None], f, bins=20)
    assert s["bound"][3] == pytest.approx(math.log(20) / math.log(32), rel=1e-3)  # ~0.864
    assert 0.8 < s["normalized"][0, 3] <= s["bound"][3]
    assert factor_scores(copy_code(f, 3, rng)[:, None], f, bins=64)["normalized"][0, 3] > 0.99


def test_mig_only_over_open_dims_and_with_one_open_dim():
    norm = np.array([[0.9, 0.1], [0.8, 0.7], [0.2, 0.3]])
    gaps, top = mig_gaps(norm)
    np.testing.assert_allclose(gaps, [0.1, 0.4])
    np.testing.assert_array_equal(top, [[0, 1], [1, 2]])
    assert mig(norm, [True, False, True]) == pytest.approx(((0.9 - 0.2) + (0.3 - 0.1)) / 2)
    # one open dim: the second largest is 0
    gaps, top = mig_gaps(norm, [False, True, False])
    np.testing.assert_allclose(gaps, [0.8, 0.7])
    np.testing.assert_array_equal(top, [[1, -1], [1, -1]])
    assert mig(norm, [False, True, False]) == pytest.approx(0.75)
    assert mig(norm, [False, False, False]) == 0.0  # nothing open: nothing encoded
    with pytest.raises(ValueError, match="expected 3"):
        mig(norm, [True, False])


# ----------------------------------------------------------------------------------------
# The open dimensions together (k-NN)


def test_knn_predict_votes_the_nearest_labels_and_breaks_ties_by_distance():
    train_x = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    train_y = np.array([7, 7, 7, 2, 2, 2])
    np.testing.assert_array_equal(knn_predict(train_x, train_y, [[0.05], [4.9], [2.0], [3.0]], k=3), [7, 2, 7, 2])
    # k = 2 with one neighbour of each label: the nearer one wins
    x, y = np.array([[0.0], [1.0]]), np.array([3, 9])
    np.testing.assert_array_equal(knn_predict(x, y, [[0.4], [0.6]], k=2), [3, 9])
    # chunks change nothing; k larger than the training set is capped
    rng = np.random.default_rng(0)
    a, b, t = rng.standard_normal((300, 3)), rng.integers(0, 5, 300), rng.standard_normal((101, 3))
    np.testing.assert_array_equal(knn_predict(a, b, t, k=7, chunk=10), knn_predict(a, b, t, k=7))
    assert set(knn_predict(x, y, [[0.5]], k=50)) <= {3, 9}


def test_two_rotated_dimensions_hold_two_factors_jointly_which_single_dims_miss():
    """z0 = x + y, z1 = x - y: each dimension alone says little about x or y, the two together say all."""
    rng = np.random.default_rng(6)
    f = np.stack([rng.integers(0, 8, 4000), rng.integers(0, 8, 4000), rng.integers(0, 3, 4000)], axis=1)
    codes = np.stack([f[:, 0] + f[:, 1], f[:, 0] - f[:, 1]], axis=1) + 0.01 * rng.standard_normal((4000, 2))
    single = factor_scores(codes, f, bins=64)["normalized"]
    assert single[:, :2].max() < 0.45  # one dimension: at most about a third of x or y
    j = joint_scores(codes, f)
    assert (j["normalized"][:2] > 0.97).all() and (j["accuracy"][:2] > 0.99).all()
    assert j["normalized"][2] < j["chance"][2] + 0.01  # the third factor is in neither
    assert abs(j["accuracy"][2] - 1 / 3) < 0.05 and j["majority"][2] == pytest.approx(
        np.bincount(f[:, 2]).max() / 4000)
    np.testing.assert_allclose(j["chance"], [49 / (8000 * entropy(f[:, k])) for k in range(2)] + [
        4 / (8000 * entropy(f[:, 2]))])
    # unit-variance scaling: a dimension multiplied by 1000 changes nothing
    scaled = joint_scores(codes * [1000.0, 1.0], f)
    np.testing.assert_allclose(scaled["normalized"], j["normalized"], atol=0.01)


def test_joint_scores_rejects_bad_input():
    f = dsprites_factors(100)
    with pytest.raises(ValueError, match=r"codes of shape \(100, 0\)"):
        joint_scores(np.zeros((100, 0)), f)
    with pytest.raises(ValueError, match=r"factors of shape \(99, 5\)"):
        joint_scores(np.zeros((100, 2)), f[:99])
    with pytest.raises(ValueError, match=r"codes of shape \(1, 2\)"):
        joint_scores(np.zeros((1, 2)), f[:1])
    tiny = joint_scores(np.arange(16.0)[:, None], f[:16])  # a sample smaller than 2k: k is N // 2
    assert tiny["k"] == 8 and ((tiny["normalized"] >= 0) & (tiny["normalized"] <= 1)).all()
    with pytest.raises(ValueError, match="non-finite"):
        joint_scores(np.full((100, 2), np.nan), f)
    with pytest.raises(ValueError, match=r"constant"):
        joint_scores(np.random.default_rng(0).standard_normal((100, 2)), np.zeros((100, 1), int))


def test_factor_scores_rejects_constant_factors_and_bad_shapes():
    f = dsprites_factors(100)
    with pytest.raises(ValueError, match=r"factor columns \[1\] are constant"):
        factor_scores(np.zeros((100, 2)), np.stack([f[:, 0], np.zeros(100, int)], axis=1))
    with pytest.raises(ValueError, match="expected \\(100, K\\)"):
        factor_scores(np.zeros((100, 2)), f[:50])
    with pytest.raises(ValueError, match="integer classes"):
        factor_scores(np.zeros((100, 2)), f.astype(float))


# ----------------------------------------------------------------------------------------
# Datasets


def test_factor_classes_of_datasets():
    from refimpl.data.synthetic_dsprites import SyntheticDSprites

    classes, names = factor_classes(SyntheticDSprites(), [0, 1, 32, 737279])
    assert names == FACTOR_NAMES
    np.testing.assert_array_equal(classes[:, 5], [0, 1, 0, 31])
    # Shapes3D: factor values (labels) become classes
    labels = np.array([[0.0, 0.5, 0.1, 0.75, 1.0, -30.0], [0.1, 0.5, 0.1, 1.25, 0.0, 30.0]] * 2)
    ds = Shapes3DArray(np.zeros((4, 64, 64, 3), np.uint8), labels)
    classes, names = factor_classes(ds, [3, 0, 1])
    assert names[0] == "floor_hue" and classes.shape == (3, 6)
    np.testing.assert_array_equal(classes[:, 0], [1, 0, 1])
    np.testing.assert_array_equal(classes[:, 1], [0, 0, 0])
    with pytest.raises(ValueError, match="dataset 'mnist' has no known generative factors"):
        factor_classes(ArrayImages("mnist", np.zeros((3, 28, 28), np.uint8), "NHW", 255, labels=np.arange(3)), [0])


# ----------------------------------------------------------------------------------------
# A tiny real run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("factors") / "r"
    run = Run.create(RunConfig(dataset="synthetic-dsprites", latent=3, image_size=16, holdout=300,
                               hyper={"tau": 1.0}), out)
    run.train(3, progress=False)
    run.model.params["gamma"][1] = -1.0  # close dimension 1 by hand
    run.save_checkpoint()
    return out


def parse(*argv):
    parser = argparse.ArgumentParser()
    factors.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_run_factors_on_a_tiny_run(tiny_run):
    run = Run.load(tiny_run, for_training=False)
    r = run_factors(run, count=5000, bins=10, batch_size=128)
    assert r["sample_size"] == r["pool_size"] == 300 and r["sample"] == "heldout"  # fewer than count: all of them
    assert r["factors"] == ["shape", "scale", "orientation", "posX", "posY"] and r["constant_factors"] == ["color"]
    assert r["gates"] == [1, 0, 1] and r["open_dims"] == [0, 2]
    norm = np.array(r["normalized_mi"])
    assert norm.shape == (3, 5) and np.array(r["mutual_information"]).shape == (3, 5)
    assert ((norm >= 0) & (norm <= 1)).all() and 0.0 <= r["mig"] <= 1.0
    # MIG over the open dims 0 and 2 only
    assert r["mig"] == pytest.approx(mig(norm, [True, False, True]), abs=1e-12)
    assert all(None not in dims and 1 not in dims for dims in r["mig_dims"].values())
    best = r["best_factor"]
    assert [b["open"] for b in best] == [True, False, True]
    assert [b["factor"] for b in best] == [r["factors"][int(i)] for i in norm.argmax(axis=1)]
    np.testing.assert_allclose(r["factor_entropy"], [entropy(c) for c in
                               run.dataset.latents_classes(run.split[1]).T[1:]], rtol=1e-12)
    joint = r["joint"]  # the open dims 0 and 2 together
    assert joint["k"] == factors.JOINT_K and set(joint) == {"k", "normalized_mi", "accuracy", "majority", "chance",
                                                            "chance_band"}
    assert all(list(joint[key]) == r["factors"] and all(0.0 <= v <= 1.0 for v in joint[key].values())
               for key in ("normalized_mi", "accuracy", "majority", "chance", "chance_band"))
    assert all(c < b for c, b in zip(r["chance"], r["chance_band"]))
    codes = factors.encode(run, run.split[1])
    expected = joint_scores(codes[:, [0, 2]], run.dataset.latents_classes(run.split[1])[:, 1:])
    assert list(joint["normalized_mi"].values()) == pytest.approx(expected["normalized"].tolist(), abs=1e-12)
    assert json.loads(json.dumps(r, allow_nan=False)) == r  # JSON-able
    assert run_factors(run, count=120, bins=10)["sample_size"] == 120  # the sample size follows count
    assert run.model.training  # inference mode was left again


def test_with_every_gate_closed_there_is_no_joint_score(tiny_run):
    run = Run.load(tiny_run, for_training=False)
    run.model.params["gamma"][...] = -1.0
    r = run_factors(run, count=100, bins=10)
    assert r["open_dims"] == [] and r["joint"] is None and r["mig"] == 0.0
    table = factors.format_table(r)
    assert "MIG over the 0 open dimensions" in table and "together" not in table
    assert table.endswith("no dimension is open: the decoder gets nothing from the code")


def test_a_smaller_count_is_a_seeded_random_subset_of_the_split(tiny_run):
    """The split's indices are sorted and dataset order follows the factors (shape first): the first
    count of them would leave out the later shapes. A subset of the held-out (or training) split is drawn instead,
    the same one every time."""
    run = Run.load(tiny_run, for_training=False)
    training, heldout = run.split
    sample = sample_indices(run, 100)
    assert sample.size == 100 and set(sample) <= set(heldout) and (np.diff(sample) > 0).all()
    np.testing.assert_array_equal(sample, sample_indices(run, 100))
    shapes = run.dataset.latents_classes(sample)[:, 1]
    assert len(set(shapes)) == 3 and run.dataset.latents_classes(heldout[:100])[:, 1].max() < 2  # no hearts
    from_training = sample_indices(run, 2000, "training")
    assert from_training.size == 2000 and set(from_training) <= set(training)
    np.testing.assert_array_equal(sample_indices(run, 10**9, "heldout"), heldout)
    r = run_factors(run, count=800, bins=10, sample="training")
    assert (r["sample"], r["sample_size"], r["pool_size"]) == ("training", 800, training.size)
    with pytest.raises(ValueError, match="sample='test'"):
        sample_indices(run, 10, "test")


def test_cli_writes_json_and_png(tiny_run, capsys):
    assert factors.run(parse(tiny_run, "--count", 200, "--bins", 8)) == 0
    out = capsys.readouterr().out
    assert "200 of 300 held-out images" in out and "closed" in out and "MIG over the 2 open dimensions" in out
    assert "the 2 open dimensions together (10-NN classifier" in out
    written = json.loads((tiny_run / "factors.json").read_text())
    assert written["sample_size"] == 200 and written["bins"] == 8 and written["gates"] == [1, 0, 1]
    assert (tiny_run / "factors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tiny_run.glob(".tmp-*"))


def test_cli_without_matplotlib_notes_the_png_and_does_not_list_it(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(factors, "pyplot", lambda: None)
    js, png = tmp_path / "f.json", tmp_path / "f.png"
    assert factors.run(parse(tiny_run, "--count", 50, "--out-json", js, "--out-png", png)) == 0
    captured = capsys.readouterr()
    assert "not drawn" in captured.err and str(png) in captured.err
    assert f"wrote {js}\n" in captured.out and str(png) not in captured.out
    assert js.is_file() and not png.exists()


@pytest.mark.parametrize("argv,match", [(["--count", "0"], "count=0"), (["--bins", "1"], "bins=1"),
                                        (["--batch-size", "0"], "batch_size=0")])
def test_cli_rejects_bad_values(tiny_run, argv, match):
    with pytest.raises(ValueError, match=match):
        factors.run(parse(tiny_run, *argv))


def test_cli_rejects_a_missing_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run folder"):  # a run-folder problem: exit status 1
        factors.run(parse(tmp_path / "nope"))


def _idx(magic, dims, data):
    return struct.pack(">I" + "I" * len(dims), magic, *dims) + bytes(data)


def test_a_run_on_a_dataset_without_factors_is_refused(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(2051, images.shape, images.tobytes()))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(2049, (20,), (np.arange(20) % 10).astype(np.uint8)))
    run = Run.create(RunConfig(dataset="mnist", data=str(tmp_path), latent=2, batch_size=4, holdout=4,
                               channels=(2, 2, 2), hidden=4, hyper={"tau": 1.0}), tmp_path / "r")
    with pytest.raises(ValueError, match="^dataset 'mnist' has no known generative factors"):
        run_factors(run)
