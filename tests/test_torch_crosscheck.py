"""refimpl's Algorithm 1 (hand-written gradients, NumPy) against an independent PyTorch
transcription (bench/torch_algorithm1.py: torch.nn modules, autograd, torch.optim.Adam).

Each case runs three full training steps of both in float64 from the same initial
weights, on the same images, with the same eps and u (refimpl draws them; the torch side
is fed refimpl's recorded draws), and requires every intermediate (nu1, nu2, mu, s, z,
x1, x2, e1, e2, KL_elem, E1, E2, C, C_ma, lambda', L, ...), every gradient (the ARM
term on its own too), every parameter and every BatchNorm statistic after each step to
agree to 1e-8, relative to the tensor's largest magnitude. tau is chosen so that the
constraint is met at step 1: gates are then sampled and the ARM term is active in steps
2-3 (a guard asserts it), unless a case starts with hit = True or violates the
constraint on purpose.

BatchNorm's running variance: refimpl stores the biased batch variance by default; the
torch BatchNorm fixes torch's unbiased update up to it (bench/torch_algorithm1.py,
class BatchNorm). The "unbiased" case runs both in torch's own convention.
"""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from refimpl.algorithm1 import Hyper, init_state, train_step
from refimpl.model import GatedVAE
from refimpl.rng import generator
from refimpl.compare import relative_error, tensor_errors
from refimpl.model import build_architecture

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import torch_algorithm1 as ta

TOL = 1e-8
STEPS = 3
BATCH = 6
ARCH16 = build_architecture((1, 16, 16), channels=(4, 8), hidden=16)
ARCH28 = build_architecture((1, 28, 28), channels=(4, 8, 8), hidden=16)
VALUES = ("nu1", "nu2", "mu", "s", "z", "x1", "x2", "e1", "e2", "kl_elem", "eps", "x")
SCALARS = ("E1", "E2", "C", "C_ma", "lambda_eff", "kl", "gates_l1", "loss")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: torch's thread pool only adds overhead (and contention on a 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(ours, ref) -> float:
    """The max_rel of refimpl compare: max |ours - ref| over the larger magnitude of the two."""
    assert np.shape(ours) == np.shape(ref), (np.shape(ours), np.shape(ref))
    return relative_error(*tensor_errors(ours, ref)[:2])


def assert_close(ours, ref, what, errors):
    err = rel_err(ours, ref)
    errors.append(err)
    assert err <= TOL, f"{what}: relative error {err:.3e} > {TOL}"


def run_both(arch, hyper, *, n=4, seed=0, fused=False, force_hit=False):
    """Three steps of refimpl and of the torch transcription; yields (k, refimpl record, torch record, state, algo)."""
    model = GatedVAE(arch, n, rng=generator(seed), dtype=np.float64, gamma_init=hyper.gamma_init, fused=fused)
    state = init_state(model, hyper)
    algo = ta.Algorithm1(ta.GatedVAE(arch, n, dtype=torch.float64), hyper)
    # lambda's initial value (interpretation (d)) is computed by each side on its own
    assert algo.lam.item() == pytest.approx(float(state.lam), rel=1e-15, abs=0)
    algo.model.load_arrays(model.state_dict())
    if force_hit:
        state.hit = algo.hit = True
    rng, images = generator(seed + 1000), generator(seed + 2000)
    torch_rng = torch.Generator().manual_seed(0)  # only used if the torch side samples when refimpl does not
    for k in range(STEPS):
        x = images.uniform(size=(BATCH, *arch.image_shape))
        rec = {}
        train_step(state, x, rng, record=rec)
        trec = algo.step(x, eps=rec["eps"], u=rec["u"], generator=torch_rng)
        yield k, rec, trec, state, algo


def check_step(k, rec, trec, state, algo, errors):
    assert (rec["u"] is None) == (trec["u"] is None), f"step {k}: only one side sampled gates"
    for name in VALUES:
        assert_close(trec[name], rec[name], f"step {k} {name}", errors)
    if rec["arm"] is not None:
        assert_close(trec["arm"], rec["arm"], f"step {k} ARM term", errors)
    else:
        assert trec["arm"] is None
    for name in SCALARS:
        assert_close(trec["scalars"][name], rec["scalars"][name], f"step {k} {name}", errors)
    for name in ("l0_added", "hit"):
        assert trec["scalars"][name] == rec["scalars"][name], f"step {k} {name}"
    assert set(trec["grads"]) == set(rec["grads"])
    for name, g in rec["grads"].items():
        assert_close(trec["grads"][name], g, f"step {k} gradient of {name}", errors)
    params = algo.named_parameters()
    for name, p in state.parameters().items():
        assert_close(params[name].detach().numpy(), p, f"step {k} {name} after Adam", errors)
    torch_state = algo.model.state_dict()
    for name, b in state.model.named_buffers():
        assert_close(torch_state[name].numpy(), b, f"step {k} buffer {name}", errors)


def run_case(arch, hyper, **kw):
    """All checks of all steps; returns the refimpl records and the largest relative error seen."""
    records, errors = [], []
    for k, rec, trec, state, algo in run_both(arch, hyper, **kw):
        check_step(k, rec, trec, state, algo, errors)
        records.append(rec)
    return records, max(errors)


def assert_arm_active(records, steps):
    for k in steps:
        assert records[k]["u"] is not None, f"step {k}: gates not sampled"
        assert records[k]["scalars"]["E1"] != records[k]["scalars"]["E2"], f"step {k}: E1 == E2, ARM term is zero"
        assert np.abs(records[k]["arm"]).max() > 0


# (name, Hyper overrides); every case meets the constraint at step 1 (tau well above E2)
MET = {"tau": 40.0, "gamma_init": 0.1}
INTERPRETATIONS = [
    ("error=l2", {"tau": 8.0, "gamma_init": 0.1, "error": "l2"}),
    ("encoder_output=logstd", {**MET, "encoder_output": "logstd"}),
    ("e1_batchnorm=batch_update", {**MET, "e1_batchnorm": "batch_update"}),
    ("e1_batchnorm=running", {**MET, "e1_batchnorm": "running"}),
    ("lambda_update=descent", {**MET, "lambda_update": "descent"}),
    ("lambda_init_on=effective", {**MET, "lambda_init_on": "effective"}),
    ("kl_normalizer=all", {**MET, "kl_normalizer": "all"}),
    ("hit=per_step", {**MET, "hit": "per_step"}),
    ("gate_samples=per_example", {**MET, "gate_samples": "per_example"}),
    ("arm_objective=loss", {**MET, "arm_objective": "loss"}),
]


def test_default_interpretation_three_steps():
    """Hyper's defaults throughout (gamma_init 0.42: seed 0 draws u outside (0.05, 0.95) at steps 2 and 3)."""
    records, worst = run_case(ARCH16, Hyper(tau=40.0), n=6)
    assert records[0]["u"] is None and records[0]["scalars"]["l0_added"]
    assert_arm_active(records, (1, 2))
    assert worst < TOL


@pytest.mark.parametrize("name,overrides", INTERPRETATIONS, ids=[c[0] for c in INTERPRETATIONS])
def test_interpretation_three_steps(name, overrides):
    records, worst = run_case(ARCH16, Hyper(**overrides))
    assert records[0]["scalars"]["l0_added"]
    assert_arm_active(records, (1, 2))
    assert worst < TOL


def test_force_hit_arm_from_the_first_step():
    """hit = True up front: gates sampled and the ARM term active at step 1 already."""
    records, _ = run_case(ARCH16, Hyper(**MET), force_hit=True)
    assert_arm_active(records, (0, 1, 2))


def test_mnist_architecture_fused_decoder():
    """The 28x28 network (2x2 kernels, padding 0 and 1) with refimpl's fused upsample+conv decoder blocks."""
    records, _ = run_case(ARCH28, Hyper(tau=80.0, gamma_init=0.1), fused=True)
    assert_arm_active(records, (1, 2))


def test_unbiased_running_variance():
    """Architecture.bn_running_var="unbiased" (torch's own convention); E1 in eval mode reads the statistics."""
    arch = dataclasses.replace(ARCH16, bn_running_var="unbiased")
    records, _ = run_case(arch, Hyper(**MET, e1_batchnorm="running"))
    assert_arm_active(records, (1, 2))


@pytest.mark.parametrize("rule", ["outward", "zero"])
@pytest.mark.parametrize("met", [True, False], ids=["constraint_met", "constraint_violated"])
@pytest.mark.parametrize("side", ["max", "min"])
def test_lambda_clamp_gradient(rule, met, side):
    """Interpretation (c) with lambda' clamped from step 1 (softplus(1)^2 = 1.72 outside the range).

    Under ascent, lambda moves up iff C' > 0 (constraint violated). "outward" keeps the
    gradient when that moves lambda back into range and zeroes it otherwise; "zero"
    always zeroes it.
    """
    bounds = {"lambda_max": 1.0} if side == "max" else {"lambda_min": 2.0, "lambda_max": 5.0}
    tau = 40.0 if met else 5.0
    records, _ = run_case(ARCH16, Hyper(tau=tau, gamma_init=0.1, lambda_clamp_grad=rule, **bounds))
    lam_grad = records[0]["grads"]["lambda"]
    moves_up = not met
    inward = moves_up if side == "min" else not moves_up
    if rule == "outward" and inward:
        assert lam_grad != 0
    else:
        assert lam_grad == 0
    clamp_value = bounds["lambda_max"] if side == "max" else bounds["lambda_min"]
    assert records[0]["scalars"]["lambda_eff"] == clamp_value


def test_torch_defaults_match_refimpl_hyper():
    """The torch example's DEFAULTS are refimpl's Hyper defaults (Section 4 values and interpretations)."""
    fields = {f.name: f.default for f in dataclasses.fields(Hyper) if f.name != "tau"}
    assert ta.DEFAULTS == fields


def test_torch_state_dict_names_match_refimpl():
    model = GatedVAE(ARCH16, 4, rng=generator(0), dtype=np.float64)
    tmodel = ta.GatedVAE(ARCH16, 4, dtype=torch.float64)
    names = [k for k in tmodel.state_dict() if not k.endswith("num_batches_tracked")]
    assert sorted(names) == sorted(model.state_dict())
    assert [k for k, _ in tmodel.named_parameters()] == list(model.parameters())


def test_paper_architecture_matches_refimpl():
    from refimpl.model import paper_architecture

    for c in (1, 3):
        ours = ta.as_config(ta.paper_architecture(c))
        ref = ta.as_config(paper_architecture((c, 64, 64)))
        for name in ("hidden", "leaky_slope", "bn_momentum", "bn_eps", "bn_running_var"):
            assert getattr(ours, name) == getattr(ref, name), name
        assert tuple(ours.image_shape) == tuple(ref.image_shape)
        assert list(ours.encoder_convs) == list(ref.encoder_convs)
        assert list(ours.decoder_convs) == list(ref.decoder_convs)
    assert ta.feature_shape(ta.as_config(ta.paper_architecture(1))) == (64, 4, 4)


def test_standalone_training_draws_from_its_generator():
    """Without a trace: u and eps come from the torch.Generator passed in; same seed, same run."""
    def train(seed):
        torch.manual_seed(123)  # weights from torch's default init; the draws of Algorithm 1 from the generator
        algo = ta.Algorithm1(ta.GatedVAE(ARCH16, 4, dtype=torch.float64), {"tau": 40.0, "gamma_init": 0.1})
        g, images = torch.Generator().manual_seed(seed), generator(5)
        logs = [algo.step(images.uniform(size=(BATCH, 1, 16, 16)), generator=g) for _ in range(3)]
        return logs, {k: p.detach().clone() for k, p in algo.named_parameters().items()}

    logs, params = train(0)
    _, params2 = train(0)
    logs3, _ = train(1)
    assert all(torch.equal(params[k], params2[k]) for k in params)
    assert logs[0]["u"] is None and logs[1]["u"].shape == (1, 4) and logs[1]["eps"].shape == (BATCH, 4)
    assert logs[0]["scalars"]["l0_added"] and logs[1]["scalars"]["hit"]
    assert not np.array_equal(logs[1]["eps"], logs3[1]["eps"])
    # constraint met (C' < 0): lambda is maximised, so it decreases
    assert params["lambda"].item() < 1.0
