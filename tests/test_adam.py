"""Adam against torch.optim.Adam (float64), maximize, checkpoint round trip, argument errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.adam import Adam

SHAPES = {"conv.weight": (3, 2, 3, 3), "conv.bias": (3,), "fc.weight": (4, 5), "lam": ()}
TOL = 1e-10


def rel_err(ours, ref):
    scale = np.abs(ref).max()
    return np.abs(ours - ref).max() / scale if scale > 0 else np.abs(ours - ref).max()


def make_params(seed):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


def grad_stream(seed, steps):
    """Gradients that change every step (and in scale, so the second moment matters)."""
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape) * rng.uniform(0.01, 10.0) for name, shape in SHAPES.items()}
            for _ in range(steps)]


def run_ours(params, grads, **kwargs):
    params = {k: v.copy() for k, v in params.items()}
    opt = Adam(params, **kwargs)
    history = []
    for g in grads:
        opt.step(g)
        history.append({k: v.copy() for k, v in params.items()})
    return history, opt


def run_torch(params, grads, maximize=(), skips=None, lrs=None, **kwargs):
    """torch.optim.Adam on ``grads``; a parameter's .grad is None on the steps ``skips`` names (step -> names);
    ``lrs``: name -> learning rate, as a parameter group of its own."""
    torch = pytest.importorskip("torch")
    tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    lrs = lrs or {}
    groups = [{"params": [tensors[k] for k in tensors if k not in maximize and k not in lrs], "maximize": False}]
    if set(maximize) - set(lrs):
        groups.append({"params": [tensors[k] for k in maximize if k not in lrs], "maximize": True})
    groups += [{"params": [tensors[k]], "maximize": k in maximize, "lr": rate} for k, rate in lrs.items()]
    opt = torch.optim.Adam(groups, **kwargs)
    history = []
    for step, g in enumerate(grads):
        for k, p in tensors.items():
            p.grad = None if k in (skips or {}).get(step, ()) else torch.tensor(g[k], dtype=torch.float64)
        opt.step()
        history.append({k: p.detach().numpy().copy() for k, p in tensors.items()})
    return history


@pytest.mark.parametrize("kwargs", [
    {},
    {"lr": 3e-2, "betas": (0.5, 0.9), "eps": 1e-3},
    {"lr": 1e-4, "betas": (0.0, 0.99), "eps": 1e-6},
    {"lr": 5e-3, "betas": (0.9, 0.999), "eps": 1e-8, "maximize": ("lam",)},
    {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-7, "maximize": ("lam", "conv.bias")},
    {"lr": 1e-3, "maximize": ("lam",), "lrs": {"lam": 0.1}},  # lambda's own rate (interpretation (q))
    {"lr": 5e-3, "betas": (0.8, 0.95), "lrs": {"lam": 1e-5, "conv.bias": 0.2}},
])
def test_adam_matches_torch(kwargs):
    params, grads = make_params(0), grad_stream(1, 12)
    ours, _ = run_ours(params, grads, **kwargs)
    theirs = run_torch(params, grads, **kwargs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for name in SHAPES:
            err = rel_err(a[name], b[name])
            assert err <= TOL, f"step {step + 1}, {name}: relative error {err:.3e}"
    # the parameters did move, and a maximized one moves up its gradient on the first step
    assert all(np.abs(ours[-1][k] - params[k]).max() > 1e-6 for k in SHAPES)


def test_a_parameter_s_own_rate_scales_only_its_steps():
    """``lrs``: the named parameter moves rate / lr times as far as under ``lr`` (Adam's step is linear in its rate),
    the others exactly as without; a rate equal to lr is bit for bit no rate at all; rates are not state."""
    params, grads = make_params(4), grad_stream(5, 6)
    plain, opt = run_ours(params, grads, lr=1e-3, maximize=("lam",))
    own, own_opt = run_ours(params, grads, lr=1e-3, maximize=("lam",), lrs={"lam": 0.25})
    same, _ = run_ours(params, grads, lr=1e-3, maximize=("lam",), lrs={"lam": 1e-3})
    for a, b, c in zip(plain, own, same):
        for k in SHAPES:
            np.testing.assert_array_equal(c[k], a[k])
            if k != "lam":
                np.testing.assert_array_equal(b[k], a[k])
    assert own[0]["lam"] - params["lam"] == pytest.approx(250 * (plain[0]["lam"] - params["lam"]), rel=1e-12)
    assert own_opt.lrs == {**{k: 1e-3 for k in SHAPES}, "lam": 0.25}
    assert set(own_opt.state_dict()) == set(opt.state_dict()) == {"t", "steps", "m", "v"}


@pytest.mark.parametrize("lrs, message", [({"lam": 0.0}, r"lrs\['lam'\]=0.0: expected > 0"),
                                          ({"lam": float("nan")}, "expected > 0"),
                                          ({"nope": 0.1}, r"lrs=\['nope'\]: not among the parameters")])
def test_bad_own_rates_are_refused(lrs, message):
    with pytest.raises(ValueError, match=message):
        Adam(make_params(0), lrs=lrs)


def test_maximize_ascends_and_mirrors_minimize():
    """Maximizing with gradient g is exactly minimizing with gradient -g."""
    params, grads = make_params(2), grad_stream(3, 10)
    up, _ = run_ours(params, grads, lr=1e-2, maximize=tuple(SHAPES))
    down, _ = run_ours(params, [{k: -g for k, g in step.items()} for step in grads], lr=1e-2)
    for a, b in zip(up, down):
        for k in SHAPES:
            np.testing.assert_array_equal(a[k], b[k])
    first = up[0]["lam"] - params["lam"]
    assert np.sign(first) == np.sign(grads[0]["lam"])  # first Adam step is lr * sign(g) (up to eps)
    assert abs(first) == pytest.approx(1e-2, rel=1e-6)


@given(split=st.integers(1, 11), seed=st.integers(0, 2**32 - 1))
def test_state_dict_round_trip_continues_bit_for_bit(split, seed):
    params, grads = make_params(seed), grad_stream(seed + 1, 12)
    kwargs = {"lr": 2e-2, "betas": (0.7, 0.95), "eps": 1e-6, "maximize": ("lam",)}
    straight, _ = run_ours(params, grads, **kwargs)

    first = {k: v.copy() for k, v in params.items()}
    opt = Adam(first, **kwargs)
    for g in grads[:split]:
        opt.step(g)
    state = opt.state_dict()
    # the checkpoint is a copy: further steps of the old optimiser do not change it
    saved_m = {k: v.copy() for k, v in state["m"].items()}
    opt.step(grads[split])
    for k in SHAPES:
        np.testing.assert_array_equal(state["m"][k], saved_m[k])

    resumed_params = {k: straight[split - 1][k].copy() for k in SHAPES}
    resumed = Adam(resumed_params, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.t == split
    for g in grads[split:]:
        resumed.step(g)
    for k in SHAPES:
        np.testing.assert_array_equal(resumed_params[k], straight[-1][k])


def test_load_state_dict_rejects_other_names():
    params = make_params(0)
    opt = Adam(params)
    state = opt.state_dict()
    state["m"] = {k: v for k, v in state["m"].items() if k != "fc.weight"}
    with pytest.raises(ValueError, match="fc.weight"):
        Adam(make_params(0)).load_state_dict(state)


def test_step_without_a_gradient_names_it():
    params = make_params(0)
    grads = grad_stream(0, 1)[0]
    del grads["conv.bias"]
    with pytest.raises(ValueError, match=r"no gradient for \['conv.bias'\]"):
        Adam(params).step(grads)


@pytest.mark.parametrize("kwargs, name", [
    ({"lr": 0.0}, "lr"),
    ({"lr": -1e-3}, "lr"),
    ({"betas": (1.0, 0.999)}, "betas"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"betas": (-0.1, 0.999)}, "betas"),
    ({"betas": (0.9, float("nan"))}, "betas"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -1e-8}, "eps"),
    ({"maximize": ("lam", "nope")}, "maximize"),
])
def test_bad_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}=") as info:
        Adam(make_params(0), **kwargs)
    value = kwargs[name]
    shown = "nope" if name == "maximize" else str(value)
    assert shown in str(info.value)


@pytest.mark.parametrize("kwargs, name", [({"lr": float("nan")}, "lr"), ({"eps": float("nan")}, "eps")])
def test_nan_arguments_rejected(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}="):
        Adam(make_params(0), **kwargs)


# ---------------------------------------------------------------- per-parameter step counts (interpretation (n))

SKIPS = {  # step -> parameters without a gradient at that step
    0: ("conv.bias",), 1: ("conv.bias",), 2: ("conv.bias", "lam"), 3: ("conv.bias",), 6: ("conv.bias",), 9: ("lam",),
}


def run_ours_skipping(params, grads, skips, **kwargs):
    params = {k: v.copy() for k, v in params.items()}
    opt = Adam(params, **kwargs)
    history = []
    for step, g in enumerate(grads):
        opt.step(g, skip=skips.get(step, ()))
        history.append({k: v.copy() for k, v in params.items()})
    return history, opt


@pytest.mark.parametrize("maximize", [(), ("lam",)])
def test_skipped_parameters_match_torch_with_grad_none(maximize):
    """skip= is torch's .grad = None: the parameter, its moments and its step count stay as they are,
    so its bias corrections count from its first gradient."""
    params, grads = make_params(4), grad_stream(5, 12)
    kwargs = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-7, "maximize": maximize}
    ours, opt = run_ours_skipping(params, grads, SKIPS, **kwargs)
    theirs = run_torch(params, grads, skips=SKIPS, **kwargs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for name in SHAPES:
            err = rel_err(a[name], b[name])
            assert err <= TOL, f"step {step + 1}, {name}: relative error {err:.3e}"
    # untouched while skipped, including before its first gradient
    for step in (0, 1, 2, 3):
        np.testing.assert_array_equal(ours[step]["conv.bias"], params["conv.bias"])
    np.testing.assert_array_equal(ours[6]["conv.bias"], ours[5]["conv.bias"])
    assert opt.t == 12 and opt.steps == {"conv.weight": 12, "conv.bias": 7, "fc.weight": 12, "lam": 10}
    # the first update of a parameter whose count starts late is lr * sign(g) (up to eps), as at t = 1
    first = ours[4]["conv.bias"] - params["conv.bias"]
    np.testing.assert_allclose(np.abs(first), 1e-2, rtol=1e-4)


def test_global_count_differs_from_per_parameter_count():
    """A parameter given zero gradients for 4 steps (the global count) vs skipped for them: the first
    real update is lr (1 - b1)/(1 - b1^5) sqrt((1 - b2^5)/(1 - b2)) = 0.5455 lr against lr."""
    params = make_params(6)
    grads = grad_stream(7, 5)
    zero = [{**g, "conv.bias": np.zeros(3)} if step < 4 else g for step, g in enumerate(grads)]
    glob, _ = run_ours(params, zero, lr=1e-3)
    per, _ = run_ours_skipping(params, grads, {s: ("conv.bias",) for s in range(4)}, lr=1e-3)
    np.testing.assert_array_equal(glob[3]["conv.bias"], params["conv.bias"])  # zero gradient, zero moments: no move
    factor = 0.1 / (1 - 0.9**5) * np.sqrt((1 - 0.999**5) / 0.001)
    assert factor == pytest.approx(0.5455, abs=1e-4)
    np.testing.assert_allclose(np.abs(glob[4]["conv.bias"] - params["conv.bias"]), factor * 1e-3, rtol=1e-4)
    np.testing.assert_allclose(np.abs(per[4]["conv.bias"] - params["conv.bias"]), 1e-3, rtol=1e-4)


@given(split=st.integers(1, 11), seed=st.integers(0, 2**32 - 1))
def test_state_dict_carries_per_parameter_counts(split, seed):
    """Resuming from state_dict() continues bit for bit, skipped steps and all."""
    params, grads = make_params(seed), grad_stream(seed + 1, 12)
    kwargs = {"lr": 2e-2, "betas": (0.7, 0.95), "eps": 1e-6, "maximize": ("lam",)}
    straight, _ = run_ours_skipping(params, grads, SKIPS, **kwargs)
    first = {k: v.copy() for k, v in params.items()}
    opt = Adam(first, **kwargs)
    for step in range(split):
        opt.step(grads[step], skip=SKIPS.get(step, ()))
    state = opt.state_dict()
    assert state["steps"] == opt.steps and state["t"] == split
    resumed_params = {k: straight[split - 1][k].copy() for k in SHAPES}
    resumed = Adam(resumed_params, **kwargs)
    resumed.load_state_dict(state)
    for step in range(split, 12):
        resumed.step(grads[step], skip=SKIPS.get(step, ()))
    for k in SHAPES:
        np.testing.assert_array_equal(resumed_params[k], straight[-1][k])


def test_old_state_without_steps_gives_every_parameter_the_global_count():
    """Checkpoints from before per-parameter counts hold only t: every parameter stepped every time."""
    params, grads = make_params(8), grad_stream(9, 6)
    straight, _ = run_ours(params, grads, lr=1e-2)
    opt = Adam({k: v.copy() for k, v in params.items()}, lr=1e-2)
    for g in grads[:3]:
        opt.step(g)
    old = opt.state_dict()
    del old["steps"]
    resumed_params = {k: straight[2][k].copy() for k in SHAPES}
    resumed = Adam(resumed_params, lr=1e-2)
    resumed.load_state_dict(old)
    assert resumed.t == 3 and resumed.steps == {k: 3 for k in SHAPES}
    for g in grads[3:]:
        resumed.step(g)
    for k in SHAPES:
        np.testing.assert_array_equal(resumed_params[k], straight[-1][k])


def test_step_count_errors_name_the_parameter():
    opt = Adam(make_params(0))
    with pytest.raises(ValueError, match=r"skip names \['nope'\]"):
        opt.step(grad_stream(0, 1)[0], skip=("nope",))
    grads = grad_stream(0, 1)[0]
    del grads["conv.bias"]
    opt.step(grads, skip=("conv.bias",))  # a skipped parameter needs no gradient
    state = opt.state_dict()
    bad = {**state, "steps": {**state["steps"], "lam": 5}}
    with pytest.raises(ValueError, match=r"'steps' of \['lam'\] outside \[0, t=1\]"):
        Adam(make_params(0)).load_state_dict(bad)
    bad = {**state, "steps": {k: v for k, v in state["steps"].items() if k != "lam"}}
    with pytest.raises(ValueError, match="'steps' names"):
        Adam(make_params(0)).load_state_dict(bad)
