"""The readings (p) and (q) of refimpl/INTERPRETATIONS.md in Algorithm 1, with exact values.

(p) ``constraint="per_image"``: l. 23-24 weight the L0 term by the fraction of the batch's
images with e_b <= tau, l. 25 sets hit when any image meets it, GECO's lambda stays on the
batch mean. (q) ``lambda_lr`` and ``lambda_optimizer="sgd"``: lambda at its own rate, by Adam
or by plain gradient ascent. Checkpoints written before the switches existed load with their
defaults, and a run can go on from one under "sgd". (r), Eqs. 3 and 15 literally, is checked
by finite differences in tests/test_algorithm1_gradients.py; all three against torch and
JAX in tests/test_crosscheck.py and against DeviceStep in tests/test_device_step.py.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from refimpl.algorithm1 import Hyper, init_state, train_step
from refimpl.layers.activations import sigmoid
from refimpl.model import GatedVAE
from refimpl.rng import generator
from test_geco import tiny_arch

F64 = np.float64
BATCH = 4
GAMMA = [0.4, -0.3, 0.05, 0.2]
OLD_CHECKPOINT = (Path(__file__).resolve().parents[1] / "bench" / "results" / "experiments" / "full"
                  / "dsprites64-n10-tau20" / "checkpoint.npz")


def hand_made_batch():
    """Four 8x8 images far apart: black, white, mid grey and a checkerboard. (4, 1, 8, 8)"""
    board = (np.indices((8, 8)).sum(axis=0) % 2).astype(F64)
    return np.stack([np.zeros((8, 8)), np.ones((8, 8)), np.full((8, 8), 0.5), board])[:, None]


def state_for(hyper, hit=False):
    model = GatedVAE(tiny_arch(), 4, rng=generator(0), dtype=F64)
    state = init_state(model, hyper)
    model.params["gamma"][...] = GAMMA
    state.hit = hit
    return state


def step(state, x, seed=1):
    record = {}
    log = train_step(state, x, generator(seed), record)
    return log, record


def per_image_errors(hit=False):
    """e_b of the first step on the hand-made batch (tau does not change them), sorted."""
    return np.sort(step(state_for(Hyper(tau=0.0), hit), hand_made_batch())[1]["e2"])


@pytest.mark.parametrize("met", [1, 2, 3])
def test_per_image_l0_weight_on_a_hand_made_batch(met):
    """(p): with tau between the met-th and the next smallest of four per-image errors, l. 24 adds met/4 of
    sum_j sigmoid(k gamma_j) to L and met/4 of its gradient to gamma's (no gates sampled: nothing else moves
    gamma), exactly; the batch reading adds the whole term or none, by the batch-mean C."""
    e2 = per_image_errors()
    tau = 0.5 * (e2[met - 1] + e2[met])
    weight = met / BATCH
    hyper = Hyper(tau=tau, constraint="per_image")
    state = state_for(hyper)
    log, record = step(state, hand_made_batch())
    gate_prob = sigmoid(hyper.k * np.asarray(GAMMA))
    assert log["hit_fraction"] == weight and log["l0_added"] and state.hit and state.last_constraint_met
    assert log["loss"] == log["lambda_eff"] * log["C_ma"] + log["kl"] + weight * log["gates_l1"]
    np.testing.assert_array_equal(record["grads"]["gamma"], weight * (hyper.k * gate_prob * (1 - gate_prob)))

    batch_state = state_for(dataclasses.replace(hyper, constraint="batch"))
    batch_log, batch_record = step(batch_state, hand_made_batch())
    assert batch_log["hit_fraction"] == weight and batch_log["C"] == log["C"]  # l. 14-22 unchanged
    assert batch_log["l0_added"] == (log["C"] <= 0) == batch_state.hit
    l0_batch = 1.0 if log["C"] <= 0 else 0.0
    assert batch_log["loss"] == log["lambda_eff"] * log["C_ma"] + log["kl"] + l0_batch * log["gates_l1"]
    np.testing.assert_array_equal(batch_record["grads"]["gamma"],
                                  l0_batch * (hyper.k * gate_prob * (1 - gate_prob)))
    for name in ("lambda", "decoder.fc1.weight", "encoder.fc2.bias"):  # the rest of the step is the batch reading's
        np.testing.assert_array_equal(record["grads"][name], batch_record["grads"][name])


def test_per_image_with_no_image_within_tau_adds_nothing():
    e2 = per_image_errors()
    state = state_for(Hyper(tau=0.5 * e2[0], constraint="per_image"))
    log, record = step(state, hand_made_batch())
    assert log["hit_fraction"] == 0.0 and not log["l0_added"] and not state.hit and not state.last_constraint_met
    assert log["loss"] == log["lambda_eff"] * log["C_ma"] + log["kl"]
    np.testing.assert_array_equal(record["grads"]["gamma"], 0.0)


@pytest.mark.parametrize("constraint", ["batch", "per_image"])
def test_per_step_hit_follows_any_image_under_per_image(constraint):
    """(p) with hit="per_step": gates are sampled after a step where any image met tau (the batch mean did not);
    under "batch" they are not."""
    e2 = per_image_errors()
    state = state_for(Hyper(tau=0.5 * (e2[0] + e2[1]), constraint=constraint, hit="per_step"))
    first, _ = step(state, hand_made_batch())
    assert first["C"] > 0
    _, second = step(state, hand_made_batch(), seed=2)
    assert (second["u"] is not None) == (constraint == "per_image")


def lambda_after_one_step(tau, **hyper):
    state = state_for(Hyper(tau=tau, **hyper))
    before = float(state.lam)
    log, record = step(state, hand_made_batch())
    return float(state.lam) - before, log, record, state


def test_lambda_sgd_moves_by_the_rate_times_the_gradient():
    """(q) "sgd": lambda += lambda_lr dL/dlambda exactly (descent: -=); Adam's moments and count for lambda stay as
    they are; every other parameter takes the same Adam step as under "adam"."""
    for update, sign in (("ascent", 1.0), ("descent", -1.0)):
        moved, _, record, state = lambda_after_one_step(0.0, lambda_optimizer="sgd", lambda_lr=0.02,
                                                        lambda_update=update)
        assert moved == pytest.approx(sign * 0.02 * float(record["grads"]["lambda"]), rel=1e-12) and moved != 0.0
        assert state.optimizer.steps["lambda"] == 0 and state.optimizer.steps["gamma"] == 1
        assert float(state.optimizer.m["lambda"]) == float(state.optimizer.v["lambda"]) == 0.0
        _, _, _, adam_state = lambda_after_one_step(0.0, lambda_update=update)
        for name, p in state.model.parameters().items():
            np.testing.assert_array_equal(p, adam_state.model.parameters()[name], err_msg=name)


def test_lambda_moves_with_the_size_of_the_violation_only_under_sgd():
    """The issue's point: under Adam lambda's first step is lr whatever C' is; plain gradient ascent moves it in
    proportion to C' (the same lambda, so the same d lambda'/d lambda)."""
    e2 = per_image_errors()
    mean = float(e2.mean())
    taus = (mean - 1.0, 0.0)  # C = 1 and C = E2 (about 20 times larger)
    adam = [lambda_after_one_step(tau)[0] for tau in taus]
    assert adam == pytest.approx([1e-3, 1e-3], rel=1e-6)
    moves = [lambda_after_one_step(tau, lambda_optimizer="sgd") for tau in taus]
    ratio = moves[1][0] / moves[0][0]
    assert ratio == pytest.approx(moves[1][1]["C"] / moves[0][1]["C"], rel=1e-9) and ratio > 10


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_lambda_lr_sets_lambda_s_rate_only(optimizer):
    """(q) lambda_lr: Adam's first step moves lambda by lambda_lr (sign(g), up to eps) and the rest as before; None
    is Adam's lr, bit for bit."""
    default = lambda_after_one_step(0.0, lambda_optimizer=optimizer)
    explicit = lambda_after_one_step(0.0, lambda_optimizer=optimizer, lambda_lr=1e-3)
    own = lambda_after_one_step(0.0, lambda_optimizer=optimizer, lambda_lr=0.05)
    assert explicit[0] == default[0]
    assert own[0] == pytest.approx(50 * default[0], rel=1e-6)
    for name, p in own[3].model.parameters().items():
        np.testing.assert_array_equal(p, default[3].model.parameters()[name], err_msg=name)


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf")])
def test_bad_lambda_lr_is_refused(bad):
    from refimpl.optionspec import OptionError

    with pytest.raises(OptionError, match=r"lambda_lr=.*expected a finite number > 0 \(or None: lr\)"):
        Hyper(tau=1.0, lambda_lr=bad)


def go_on_from(checkpoint, **hyper):
    """The run of ``checkpoint`` one step on, with Hyper fields replaced (a branch); (run, log, record)."""
    from refimpl.training import Run

    run = Run.load(checkpoint, for_training=False)
    run.state.hyper = dataclasses.replace(run.state.hyper, **hyper)
    record = {}
    log = train_step(run.state, run.next_batch(), run.train_rng, record)
    return run, log, record


def check_old_checkpoint(checkpoint):
    """A checkpoint from before (p)-(r) loads with their defaults (its Adam state round-trips unchanged), and goes
    on under lambda_optimizer="sgd" with everything but lambda's update as under Adam: lambda moves by lr times
    its gradient and Adam's moments for it stay as loaded."""
    from refimpl.checkpoint import load

    arrays, meta = load(checkpoint)
    adam, adam_log, adam_record = go_on_from(checkpoint)
    hyper = adam.state.hyper
    assert (hyper.constraint, hyper.lambda_optimizer, hyper.lambda_lr, hyper.encoder_output) == (
        "batch", "adam", None, "logvar")
    sgd, sgd_log, sgd_record = go_on_from(checkpoint, lambda_optimizer="sgd")
    for name in adam_record["grads"]:
        np.testing.assert_array_equal(sgd_record["grads"][name], adam_record["grads"][name], err_msg=name)
    for name, p in sgd.model.parameters().items():
        np.testing.assert_array_equal(p, adam.model.parameters()[name], err_msg=name)
    lam = arrays["lambda"]
    assert sgd.state.lam == lam + lam.dtype.type(hyper.lr) * sgd.state.lam_grad
    state = sgd.state.optimizer.state_dict()
    np.testing.assert_array_equal(state["m"]["lambda"], arrays["adam/m/lambda"])
    np.testing.assert_array_equal(state["v"]["lambda"], arrays["adam/v/lambda"])
    assert state["steps"]["lambda"] == meta["adam_steps"]["lambda"] and state["t"] == meta["adam_t"] + 1
    assert adam_log["loss"] == sgd_log["loss"]


def test_a_checkpoint_from_before_the_switches_goes_on_under_sgd(tmp_path):
    """A small run written without the new fields in its config (as every checkpoint before them)."""
    from refimpl.cli import main

    out = tmp_path / "run"
    assert main(["train", "--image-size", "8", "--channels", "2", "--batch-size", "8", "--latent", "4",
                 "--holdout", "16", "--tau", "40", "--dtype", "float64", "--quiet", "--batches", "6",
                 "--out", str(out)]) == 0
    check_old_checkpoint(out / "checkpoint.npz")


@pytest.mark.slow
@pytest.mark.skipif(not OLD_CHECKPOINT.exists(), reason="bench/results/experiments/full not in this checkout")
def test_the_full_experiment_checkpoints_go_on_under_sgd():
    """bench/results/experiments/full: 50000 steps of the 64x64 network, written before (p)-(r)."""
    check_old_checkpoint(OLD_CHECKPOINT)


def test_train_command_line_takes_the_new_readings_with_the_same_log_columns(tmp_path):
    """``refimpl train --constraint per_image --lambda-optimizer sgd --lambda-lr R --encoder-output literal``: the
    run's checkpoint records them, and log.csv has the default run's columns (the weight of (p) is hit_fraction)."""
    from refimpl.checkpoint import load
    from refimpl.cli import main
    from refimpl.runlog import read_log

    args = ["train", "--image-size", "8", "--channels", "2", "--batch-size", "8", "--latent", "4", "--holdout", "16",
            "--tau", "40", "--dtype", "float64", "--quiet", "--batches", "4"]
    readings = ["--constraint", "per_image", "--lambda-optimizer", "sgd", "--lambda-lr", "0.01",
                "--encoder-output", "literal"]
    assert main(args + ["--out", str(tmp_path / "default")]) == 0
    assert main(args + readings + ["--out", str(tmp_path / "readings")]) == 0
    _, meta = load(tmp_path / "readings" / "checkpoint.npz")
    assert {k: meta["config"]["hyper"][k] for k in ("constraint", "lambda_optimizer", "lambda_lr", "encoder_output")} \
        == {"constraint": "per_image", "lambda_optimizer": "sgd", "lambda_lr": 0.01, "encoder_output": "literal"}
    assert meta["adam_steps"]["lambda"] == 0 and meta["adam_steps"]["gamma"] == 4  # lambda: plain ascent, no Adam
    default, readings_log = (read_log(tmp_path / r / "log.csv") for r in ("default", "readings"))
    assert list(readings_log) == list(default) and len(readings_log["loss"]) == 4
