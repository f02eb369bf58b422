"""The device-resident step (refimpl/device_step.py) against the reference train_step, step for step."""

import dataclasses

import numpy as np
import pytest

from refimpl.algorithm1 import OPTIONS, Hyper, effective_lambda, init_state, lambda_gradient, train_step
from refimpl.backend import get_xp, to_host
from refimpl.device_step import LOG_KEYS, DeviceStep, applies
from refimpl.model import Architecture, ConvSpec, GatedVAE
from refimpl.rng import generator

# every switch's non-default choices that apply after the first hit (hit="per_step" never takes the fast path)
VARIANTS = [{}] + [{name: choice} for name, choices in OPTIONS.items() if name != "hit" for choice in choices[1:]]
VARIANTS += [{"lambda_max": 0.5}, {"lambda_max": 0.5, "lambda_clamp_grad": "zero"},  # lambda' clamped at the top
             {"lambda_min": 2.0, "lambda_max": 3.0},  # and at the bottom
             {"lambda_lr": 0.01}, {"lambda_optimizer": "sgd", "lambda_lr": 0.01, "lambda_update": "descent"},  # (q)
             {"constraint": "per_image", "lambda_optimizer": "sgd"}]


def tiny_arch():
    """(1, 8, 8) images, 2 encoder convs, 2 decoder blocks: the architecture of the gradient checks."""
    return Architecture((1, 8, 8), encoder_convs=(ConvSpec(3, 4, 2, 1), ConvSpec(4, 3, 2, 1)),
                        decoder_convs=(ConvSpec(3, 3, 1, 1), ConvSpec(1, 3, 1, 1)), hidden=8).validate()


def hit_state(dtype, hyper_kw, n=4, batch=5, xp=np):
    """A state two steps after its first hit (tau large enough that l. 23 is true at once)."""
    model = GatedVAE(tiny_arch(), n, rng=generator(0), dtype=dtype, xp=xp)
    state = init_state(model, Hyper(tau=1e3, **hyper_kw))
    rng, images = generator(1), generator(2)
    for _ in range(2):
        train_step(state, xp.asarray(images.uniform(0, 1, (batch, 1, 8, 8)).astype(dtype)), rng)
    assert applies(state)
    return state


def snapshot(state):
    model = state.model
    arrays = {**{f"param/{k}": v for k, v in model.state_dict().items()},
              **{f"grad/{k}": v for k, v in state.gradients().items()},
              **{f"m/{k}": v for k, v in state.optimizer.m.items()},
              **{f"v/{k}": v for k, v in state.optimizer.v.items()}, "lambda": state.lam}
    return {k: np.array(to_host(v), copy=True) for k, v in arrays.items()}


def taus_around():
    """Tolerances that put C on both sides of 0 (l. 23's mask both ways) and, at 6.0 and 5.5, among the per-image
    errors (E2 ~ 5-7 here): some images within tau, some not (at 5.5 with the batch mean C > 0), the weight of
    l. 24 under constraint="per_image" (p)."""
    return [1e3, 1e-3, 6.0, 1e-3, 5.5, 1e3, 1e-3, 5.5]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("hyper_kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_device_step_equals_train_step(dtype, hyper_kw):
    reference = hit_state(dtype, hyper_kw)
    fast_state = hit_state(dtype, hyper_kw)  # the same state, built twice
    fast = DeviceStep(fast_state)
    rng_ref, rng_fast, images = generator(7), generator(7), generator(8)
    rtol, atol = (1e-12, 1e-14) if dtype == np.float64 else (1e-6, 1e-7)
    l0_seen, fractional = set(), []
    for tau in taus_around():
        for s in (reference, fast_state):
            s.hyper = dataclasses.replace(s.hyper, tau=tau)
        x = images.uniform(0, 1, (5, 1, 8, 8)).astype(dtype)
        want = train_step(reference, x, rng_ref)
        got = fast.host_log(fast(x, rng_fast))
        assert set(got) == set(want) and got["step"] == want["step"] and got["hit"] is want["hit"] is True
        for key in LOG_KEYS:
            assert got[key] == pytest.approx(want[key], rel=rtol, abs=atol), key
        assert (got["open_gates"], got["l0_added"]) == (want["open_gates"], want["l0_added"])
        l0_seen.add(want["l0_added"])
        if 0 < want["hit_fraction"] < 1:
            fractional.append(want["C"] > 0 and want["l0_added"])
        assert (fast_state.c_ma, fast_state.last_constraint_met) == pytest.approx(
            (reference.c_ma, reference.last_constraint_met), rel=rtol)
        a, b = snapshot(reference), snapshot(fast_state)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=rtol, atol=atol, err_msg=key)
    assert l0_seen == {True, False}  # both sides of l. 23
    assert any(fractional) == (hyper_kw.get("constraint") == "per_image")  # (p): added at C > 0
    assert rng_ref.bit_generator.state == rng_fast.bit_generator.state  # the same draws, in the same order
    assert fast_state.optimizer.t == reference.optimizer.t and fast_state.optimizer.steps == reference.optimizer.steps


def test_a_run_can_go_back_to_train_step_after_device_steps():
    """host_log leaves the TrainState as train_step would: the reference carries on from it."""
    reference = hit_state(np.float64, {})
    mixed = hit_state(np.float64, {})
    rng_ref, rng_mixed, images = generator(3), generator(3), generator(4)
    fast = DeviceStep(mixed)
    for i in range(4):
        x = images.uniform(0, 1, (5, 1, 8, 8))
        want = train_step(reference, x, rng_ref)
        got = fast.host_log(fast(x, rng_mixed)) if i < 2 else train_step(mixed, x, rng_mixed)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-12)
    a, b = snapshot(reference), snapshot(mixed)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-12, atol=1e-14, err_msg=key)


def test_geco_scalars_equal_the_host_formulas():
    """l. 21 and the clamp's gradient on 0-d float64 arrays (NumPy's exp and log1p, as on the device) against the
    same functions on floats (the math module's, the reference's)."""
    lams = [-40.0, -3.0, -0.5, 0.0, 1e-9, 0.3, 1.0, 2.5, 40.0]
    for hyper_kw in ({}, {"lambda_max": 0.5}, {"lambda_min": 2.0, "lambda_max": 3.0},
                     {"lambda_max": 0.5, "lambda_clamp_grad": "zero"}, {"lambda_update": "descent"}):
        hyper = Hyper(tau=1.0, **hyper_kw)
        for lam in lams:
            assert float(effective_lambda(np.asarray(lam), hyper)) == pytest.approx(effective_lambda(lam, hyper),
                                                                                   rel=1e-15, abs=1e-300)
            for c_prime in (-2.0, 0.0, 3.0):
                got = float(lambda_gradient(np.asarray(lam), np.asarray(c_prime), hyper))
                assert got == pytest.approx(lambda_gradient(lam, c_prime, hyper), rel=1e-15, abs=1e-300), (
                    hyper_kw, lam, c_prime)


def test_one_geco_for_both_paths():
    """Issue 24: DeviceStep calls train_step's own functions of refimpl/algorithm1.py (public ones), and defines none
    of them again; GECO's scalars stay Python floats on the host (the reference) and 0-d arrays on arrays."""
    import inspect

    from refimpl import algorithm1, device_step
    from refimpl.algorithm1 import geco

    own = {name for name, f in vars(device_step).items()
           if inspect.isfunction(f) and f.__module__ == device_step.__name__}
    assert own and not own & set(vars(algorithm1))
    imported = {name for name, f in vars(device_step).items() if getattr(f, "__module__", None) == algorithm1.__name__}
    assert {"geco", "lagrangian", "backpropagate"} <= imported and not [n for n in imported if n.startswith("_")]
    hyper = Hyper(tau=5.0, lambda_max=0.5)
    host = geco(4.0, 1.5, 1.0, 0.4, hyper)
    assert all(type(v) is float for v in host[:-1]) and host.l0_added is True and host.lam_grad == 0.0  # clamped
    device = geco(*(np.asarray(v) for v in (4.0, 1.5, 1.0, 0.4)), hyper)
    assert all(isinstance(v, (np.ndarray, np.generic)) for v in device)
    assert [float(v) for v in device] == pytest.approx([float(v) for v in host], rel=1e-15)


def test_device_step_refuses_states_where_l3_can_be_false():
    model = GatedVAE(tiny_arch(), 3, rng=generator(0), dtype=np.float64)
    state = init_state(model, Hyper(tau=1e3))
    assert not applies(state)  # before the first hit
    with pytest.raises(ValueError, match="hit='sticky' and hit set"):
        DeviceStep(state)
    train_step(state, generator(1).uniform(0, 1, (2, 1, 8, 8)), generator(2))
    assert applies(state)
    per_step = init_state(GatedVAE(tiny_arch(), 3, rng=generator(0), dtype=np.float64), Hyper(tau=1e3, hit="per_step"))
    train_step(per_step, generator(1).uniform(0, 1, (2, 1, 8, 8)), generator(2))
    assert per_step.hit and not applies(per_step)  # per_step: l. 3 follows the last C, which only the device knows


def test_train_with_device_step_takes_the_fast_path_after_the_first_hit(tmp_path, monkeypatch):
    """refimpl train --device-step: the same log and checkpoint as without, and DeviceStep runs every step after
    the first hit."""
    from refimpl import device_step
    from refimpl.checkpoint import load
    from refimpl.cli import main
    from refimpl.runlog import read_log

    calls = []
    original = device_step.DeviceStep.__call__
    monkeypatch.setattr(device_step.DeviceStep, "__call__", lambda self, x, rng: calls.append(1) or original(
        self, x, rng))
    args = ["train", "--image-size", "8", "--channels", "2", "--batch-size", "8", "--latent", "4", "--holdout", "16",
            "--tau", "40", "--dtype", "float64", "--quiet", "--batches", "30"]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    assert not calls
    assert main(args + ["--out", str(tmp_path / "fast"), "--device-step"]) == 0
    ref, fast = read_log(tmp_path / "ref" / "log.csv"), read_log(tmp_path / "fast" / "log.csv")
    first_hit = ref["hit"].index(1)
    assert len(calls) == 30 - (first_hit + 1) > 0  # every step after the one that set hit
    assert set(ref) == set(fast)
    for key in ref:
        if key != "seconds":
            np.testing.assert_allclose(fast[key], ref[key], rtol=1e-12, atol=1e-14, err_msg=key)
    (ref_arrays, ref_meta), (fast_arrays, fast_meta) = (load(tmp_path / r / "checkpoint.npz") for r in ("ref", "fast"))
    assert fast_meta["c_ma"] == pytest.approx(ref_meta["c_ma"], rel=1e-12) and fast_meta["step"] == ref_meta["step"]
    assert set(fast_arrays) == set(ref_arrays)
    for key in ref_arrays:  # parameters, BatchNorm buffers, Adam's moments, lambda
        np.testing.assert_allclose(fast_arrays[key], ref_arrays[key], rtol=1e-12, atol=1e-14, err_msg=key)
    # resuming a --device-step run with it continues as the reference does
    assert main(args[:-1] + ["60", "--out", str(tmp_path / "ref"), "--resume"]) == 0
    assert main(args[:-1] + ["60", "--out", str(tmp_path / "fast"), "--resume", "--device-step"]) == 0
    ref, fast = read_log(tmp_path / "ref" / "log.csv"), read_log(tmp_path / "fast" / "log.csv")
    np.testing.assert_allclose(fast["loss"], ref["loss"], rtol=1e-12)
    assert len(ref["loss"]) == 60


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("hyper_kw", [{}, {"estimator": "disarm"}, {"lambda_max": 0.5},
                                      {"constraint": "per_image", "lambda_optimizer": "sgd", "encoder_output": "literal"}],
                         ids=["defaults", "disarm", "clamped", "per_image+sgd+literal"])
def test_device_step_on_cupy_equals_train_step_on_cupy_and_numpy(dtype, hyper_kw):
    cp = get_xp("cupy")
    states = {"ref": hit_state(dtype, hyper_kw, xp=cp), "fast": hit_state(dtype, hyper_kw, xp=cp),
              "numpy": hit_state(dtype, hyper_kw)}
    fast = DeviceStep(states["fast"])
    rngs, images = {k: generator(7) for k in states}, generator(8)
    rtol, atol = (1e-12, 1e-13) if dtype == np.float64 else (1e-5, 1e-6)
    for tau in taus_around():
        for s in states.values():
            s.hyper = dataclasses.replace(s.hyper, tau=tau)
        x = images.uniform(0, 1, (5, 1, 8, 8)).astype(dtype)
        logs = {"ref": train_step(states["ref"], cp.asarray(x), rngs["ref"]),
                "fast": fast.host_log(fast(cp.asarray(x), rngs["fast"])),
                "numpy": train_step(states["numpy"], x, rngs["numpy"])}
        for key in LOG_KEYS:
            assert logs["fast"][key] == pytest.approx(logs["ref"][key], rel=rtol, abs=atol), key
            assert logs["fast"][key] == pytest.approx(logs["numpy"][key], rel=rtol * 10, abs=atol * 10), key
    snaps = {k: snapshot(s) for k, s in states.items()}
    for key in snaps["ref"]:
        np.testing.assert_allclose(snaps["fast"][key], snaps["ref"][key], rtol=rtol, atol=atol, err_msg=key)
        np.testing.assert_allclose(snaps["fast"][key], snaps["numpy"][key], rtol=10 * rtol, atol=10 * atol,
                                   err_msg=key)
