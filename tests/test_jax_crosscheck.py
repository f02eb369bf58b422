"""refimpl's Algorithm 1 (hand-written gradients, NumPy) against an independent JAX
transcription (bench/jax_algorithm1.py: jax.lax convolutions, jax.grad, optax.adam),
through golden traces.

Each case records three full training steps of refimpl in float64 (refimpl.trace.
write_trace), replays the trace in JAX from the same initial weights, Adam and GECO
state, on the same images with the same eps and u, and compares the two traces with
refimpl.compare.compare_traces at rtol 1e-8: every intermediate (nu1, nu2, mu, s, z,
x1, x2, e1, e2, KL_elem, E1, E2, C, C_ma, C', lambda', L, ...), every gradient, the ARM
term on its own, every parameter after Adam and every BatchNorm statistic, per step,
relative to the tensor's largest magnitude. The cases mirror tests/test_torch_crosscheck.py:
the defaults and every interpretation switch of refimpl.algorithm1.Hyper, hit forced at
the start, the 28x28 network with refimpl's fused decoder blocks, torch's unbiased
running variance, and the clamp of l. 21 under both gradient rules. tau is chosen so
that the constraint is met at step 1: gates are then sampled and the ARM term is active
in steps 2-3 (a guard asserts it). A planted bug (the ARM term's sign; l. 20 without
StopGradient) must be found at the right tensor, and nothing earlier.

Skipped when jax or optax is not installed (``pip install -e '.[crosscheck]'``).
"""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from refimpl.algorithm1 import Hyper, init_state, train_step
from refimpl.cli import main as cli_main
from refimpl.compare import compare_traces
from refimpl.model import GatedVAE
from refimpl.rng import generator
from refimpl.trace import read_trace, save_trace, write_trace
from refimpl.training import build_architecture

jax = pytest.importorskip("jax")
pytest.importorskip("optax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import jax_algorithm1 as ja  # noqa: E402

TOL = 1e-8
STEPS = 3
BATCH = 6
ARCH16 = build_architecture((1, 16, 16), channels=(4, 8), hidden=16)
ARCH28 = build_architecture((1, 28, 28), channels=(4, 8, 8), hidden=16)


def make_trace(path, arch, hyper, *, n=4, seed=0, fused=False, force_hit=False, dtype=np.float64):
    """Three refimpl steps recorded to ``path`` (the draws of tests/test_torch_crosscheck.py's run_both)."""
    model = GatedVAE(arch, n, rng=generator(seed), dtype=dtype, gamma_init=hyper.gamma_init, fused=fused)
    state = init_state(model, hyper)
    if force_hit:
        state.hit = True
    images = generator(seed + 2000)
    batches = [images.uniform(size=(BATCH, *arch.image_shape)).astype(dtype) for _ in range(STEPS)]
    write_trace(path, state, batches, generator(seed + 1000), STEPS, seed=seed)
    return read_trace(path)


def replay_and_compare(ref, out, rtol=TOL, **kw):
    manifest = ja.replay(ref.path, out, **kw)
    assert manifest["writer"].startswith("bench/jax_algorithm1.py (jax ")
    return compare_traces(ref.path, out, rtol=rtol)


def run_case(tmp_path, arch, hyper, rtol=TOL, **kw):
    """Trace refimpl, replay in JAX, require every tensor of every step to agree; returns (trace, worst error)."""
    ref = make_trace(tmp_path / "ref.npz", arch, hyper, **kw)
    result = replay_and_compare(ref, tmp_path / "jax.npz", rtol=rtol)
    assert result.ok, result.to_table()
    assert result.manifest_differences == []
    assert set(read_trace(tmp_path / "jax.npz").keys()) == set(ref.keys())
    # the replay computed these itself: they are not copies of the inputs
    assert any(r.max_abs > 0 for r in result.rows if r.name.startswith(("grad/", "value/")))
    worst = max(r.max_rel for r in result.rows)
    print(f"\n{tmp_path.name}: {len(result.rows)} tensors, largest relative error {worst:.2e}")
    return ref, worst


def assert_arm_active(ref, steps):
    for k in steps:
        p = f"step{k:04d}/"
        assert p + "input/u" in ref, f"step {k}: gates not sampled"
        assert ref[p + "value/E1"] != ref[p + "value/E2"], f"step {k}: E1 == E2, ARM term is zero"
        assert np.abs(ref[p + "arm/gamma"]).max() > 0


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


def test_default_interpretation_three_steps(tmp_path):
    """Hyper's defaults throughout (gamma_init 0.42: seed 0 draws u outside (0.05, 0.95) at steps 2 and 3)."""
    ref, worst = run_case(tmp_path, ARCH16, Hyper(tau=40.0), n=6)
    assert "step0000/input/u" not in ref and ref["step0000/value/l0_added"]
    assert_arm_active(ref, (1, 2))
    assert worst < TOL


@pytest.mark.parametrize("name,overrides", INTERPRETATIONS, ids=[c[0] for c in INTERPRETATIONS])
def test_interpretation_three_steps(tmp_path, name, overrides):
    ref, worst = run_case(tmp_path, ARCH16, Hyper(**overrides))
    assert ref["step0000/value/l0_added"]
    assert_arm_active(ref, (1, 2))
    assert worst < TOL


def test_force_hit_arm_from_the_first_step(tmp_path):
    """hit = True up front: gates sampled and the ARM term active at step 1 already."""
    ref, _ = run_case(tmp_path, ARCH16, Hyper(**MET), force_hit=True)
    assert_arm_active(ref, (0, 1, 2))


def test_mnist_architecture_fused_decoder(tmp_path):
    """The 28x28 network (2x2 kernels, padding 0 and 1), refimpl with its fused upsample+conv decoder blocks."""
    ref, _ = run_case(tmp_path, ARCH28, Hyper(tau=80.0, gamma_init=0.1), fused=True)
    assert_arm_active(ref, (1, 2))


def test_unbiased_running_variance(tmp_path):
    """Architecture.bn_running_var="unbiased" (torch's convention); E1 in eval mode reads the statistics."""
    arch = dataclasses.replace(ARCH16, bn_running_var="unbiased")
    ref, _ = run_case(tmp_path, arch, Hyper(**MET, e1_batchnorm="running"))
    assert_arm_active(ref, (1, 2))


@pytest.mark.parametrize("rule", ["outward", "zero"])
@pytest.mark.parametrize("met", [True, False], ids=["constraint_met", "constraint_violated"])
@pytest.mark.parametrize("side", ["max", "min"])
def test_lambda_clamp_gradient(tmp_path, rule, met, side):
    """Interpretation (c) with lambda' clamped from step 1 (softplus(1)^2 = 1.72 outside the range).

    Under ascent, lambda moves up iff C' > 0 (constraint violated). "outward" keeps the
    gradient when that moves lambda back into range and zeroes it otherwise; "zero"
    always zeroes it.
    """
    bounds = {"lambda_max": 1.0} if side == "max" else {"lambda_min": 2.0, "lambda_max": 5.0}
    tau = 40.0 if met else 5.0
    ref, _ = run_case(tmp_path, ARCH16, Hyper(tau=tau, gamma_init=0.1, lambda_clamp_grad=rule, **bounds))
    lam_grad = ref["step0000/grad/lambda"]
    inward = (not met) if side == "min" else met
    if rule == "outward" and inward:
        assert lam_grad != 0
    else:
        assert lam_grad == 0
    assert ref["step0000/value/lambda_eff"] == (bounds["lambda_max"] if side == "max" else bounds["lambda_min"])


def test_trace_started_mid_training(tmp_path):
    """A trace whose first step is not the run's first: Adam's moments and step count, C_ma and hit carried in."""
    hyper = Hyper(**MET)
    model = GatedVAE(ARCH16, 4, rng=generator(0), dtype=np.float64, gamma_init=hyper.gamma_init)
    state, rng, images = init_state(model, hyper), generator(1), generator(11)
    for _ in range(2):
        train_step(state, images.uniform(size=(BATCH, 1, 16, 16)), rng)
    path = tmp_path / "mid.npz"
    write_trace(path, state, [images.uniform(size=(BATCH, 1, 16, 16)) for _ in range(2)], rng, 2)
    init = read_trace(path).manifest["initial_state"]
    assert init["adam_t"] == 2 and init["hit"] and init["c_ma"] is not None
    result = replay_and_compare(read_trace(path), tmp_path / "jax.npz")
    assert result.ok, result.to_table()


def test_float32_trace(tmp_path):
    """A float32 trace replays in float32 (no silent promotion), agreeing to the README's float32 tolerance."""
    ref = make_trace(tmp_path / "ref.npz", ARCH16, Hyper(**MET), dtype=np.float32)
    result = replay_and_compare(ref, tmp_path / "jax.npz", rtol=1e-4)
    assert result.ok, result.to_table()
    out = read_trace(tmp_path / "jax.npz")
    assert out["step0002/grad/encoder.conv1.weight"].dtype == np.float32
    assert out["step0002/param_after/gamma"].dtype == np.float32


# ----------------------------------------------------------------------------------------
# Planted bugs: compare must name the first tensor the bug touches, and nothing earlier


@pytest.mark.parametrize("force_hit,first_step", [(False, 1), (True, 0)], ids=["hit_at_step1", "force_hit"])
def test_planted_arm_sign_is_found_at_the_arm_term(tmp_path, force_hit, first_step):
    """Negated ARM term (l. 29): the first divergence is arm/gamma of the first step that samples gates,
    then gamma's gradient; everything before it (step 0 without force_hit, and that step up to l. 27) agrees."""
    ref = make_trace(tmp_path / "ref.npz", ARCH16, Hyper(**MET), force_hit=force_hit)
    out = tmp_path / "bug.npz"
    result = replay_and_compare(ref, out, plant="arm-sign")
    first = result.first_divergence
    assert (first.step, first.name) == (first_step, "arm/gamma")
    assert first.max_rel == pytest.approx(2.0)  # a - (-a) relative to |a|
    rows = [r for r in result.rows if r.step is not None and r.step <= first_step]
    at = rows.index(first)
    assert all(r.ok for r in rows[:at])
    assert [r.name for r in rows[at:] if not r.ok][:2] == ["arm/gamma", "grad/gamma"]
    assert cli_main(["compare", str(ref.path), str(out)]) == 1


def test_planted_missing_stop_gradient_is_found_at_the_first_gradient(tmp_path):
    """l. 20 without StopGradient: at step 0 C_ma = C, so dC'/dC = 1 and step 0 agrees; from step 1
    dC'/dC = 1 - alpha, so the first divergence is step 1's first gradient in backpropagation order
    (lambda's gradient depends only on C' and agrees), off by the factor alpha."""
    ref = make_trace(tmp_path / "ref.npz", ARCH16, Hyper(**MET))
    result = replay_and_compare(ref, tmp_path / "bug.npz", plant="no-stop-gradient")
    first = result.first_divergence
    last_param = ref.manifest["parameters"][-2]  # the decoder's last bias (lambda is last)
    assert (first.step, first.name) == (1, f"grad/{last_param}")
    assert first.max_rel == pytest.approx(0.99, rel=1e-6)
    assert all(r.ok for r in result.rows if r.step is not None and r.step == 0)
    assert next(r for r in result.rows if r.key == "step0001/grad/lambda").ok


def test_cli(tmp_path, capsys):
    ref = make_trace(tmp_path / "ref.npz", ARCH16, Hyper(**MET))
    out = tmp_path / "r.npz"
    assert ja.main([str(ref.path), "--out", str(out), "--steps", "1"]) == 0
    assert "replayed 1 steps" in capsys.readouterr().out
    assert read_trace(out).steps == 1
    assert compare_traces(ref.path, out).manifest_differences == ["steps: 3 vs 1"]
    with pytest.raises(SystemExit):
        ja.main([str(ref.path), "--plant", "no-such-bug"])


def test_replay_refuses_a_trace_without_u_where_it_samples(tmp_path):
    """The replay decides l. 3 from the GECO state; a trace that disagrees is an error naming the step."""
    ref = make_trace(tmp_path / "ref.npz", ARCH16, Hyper(**MET))
    manifest = dict(ref.manifest, initial_state={**ref.manifest["initial_state"], "hit": True})
    save_trace(tmp_path / "bad.npz", dict(ref.arrays), manifest)
    with pytest.raises(ValueError, match="samples gates at step 0.*step0000/input/u"):
        ja.replay(tmp_path / "bad.npz", tmp_path / "out.npz")


# ----------------------------------------------------------------------------------------
# The transcription on its own


def test_defaults_match_refimpl_hyper():
    """DEFAULTS are refimpl's Hyper defaults (Section 4 values and interpretations)."""
    fields = {f.name: f.default for f in dataclasses.fields(Hyper) if f.name != "tau"}
    assert ja.DEFAULTS == fields


def test_parameter_names_and_shapes_match_refimpl():
    for arch in (ARCH16, ARCH28):
        model = GatedVAE(arch, 4, rng=generator(0), dtype=np.float64)
        shapes = ja.parameter_shapes(arch, 4)
        assert list(shapes) == list(model.parameters())
        assert shapes == {k: v.shape for k, v in model.parameters().items()}
        params, buffers = ja.init_model(arch, 4, jax.random.key(0))
        assert list(params) == [*model.parameters(), "lambda"]
        assert sorted(buffers) == sorted(dict(model.named_buffers()))


def test_paper_architecture_matches_refimpl():
    from refimpl.model import paper_architecture

    for c in (1, 3):
        ours = ja.as_config(ja.paper_architecture(c))
        ref = ja.as_config(paper_architecture((c, 64, 64)))
        for name in ("hidden", "leaky_slope", "bn_momentum", "bn_eps", "bn_running_var"):
            assert getattr(ours, name) == getattr(ref, name), name
        assert tuple(ours.image_shape) == tuple(ref.image_shape)
        assert list(ours.encoder_convs) == list(ref.encoder_convs)
        assert list(ours.decoder_convs) == list(ref.decoder_convs)
    assert ja.feature_shape(ja.as_config(ja.paper_architecture(1))) == (64, 4, 4)


def test_standalone_training_draws_from_its_key():
    """Without a trace: weights and the draws u, eps from JAX keys; same keys, same run; the step is pure."""
    hyper = {"tau": 40.0, "gamma_init": 0.1}
    step = ja.make_step(ARCH16, hyper, 4, compiler_options=ja.FAST_COMPILE)
    images = generator(5)
    xs = [images.uniform(size=(BATCH, 1, 16, 16)) for _ in range(3)]

    def train(seed):
        params, buffers = ja.init_model(ARCH16, 4, jax.random.key(123), hyper)
        opt_state, geco = ja.init_state(params, hyper)
        start = (params, buffers, opt_state, geco)
        key, logs = jax.random.key(seed), []
        for x in xs:
            key, sub = jax.random.split(key)
            u, eps = ja.draw(sub, geco, hyper, BATCH, 4)
            params, buffers, opt_state, geco, log = step(params, buffers, opt_state, geco, x, u, eps)
            logs.append(log)
        return logs, params, start

    logs, params, start = train(0)
    logs2, params2, start2 = train(0)
    logs3, _, _ = train(1)
    assert all(np.array_equal(params[k], params2[k]) for k in params)
    assert all(np.array_equal(start[0][k], start2[0][k]) for k in params)  # inputs untouched: the step is pure
    assert float(start[0]["lambda"]) == 1.0 and np.all(np.asarray(start[0]["gamma"]) == 0.1)
    assert logs[0]["u"] is None and logs[1]["u"].shape == (1, 4) and logs[1]["eps"].shape == (BATCH, 4)
    assert bool(logs[0]["scalars"]["l0_added"]) and bool(logs[1]["scalars"]["hit"])
    assert logs[1]["arm"] is not None and logs[0]["arm"] is None
    assert not np.array_equal(logs[1]["eps"], logs3[1]["eps"])
    assert float(params["lambda"]) < 1.0  # constraint met (C' < 0): lambda is maximised, so it decreases
