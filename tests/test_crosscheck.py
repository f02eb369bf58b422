"""refimpl's Algorithm 1 (hand-written gradients, NumPy) against both independent transcriptions,
bench/torch_algorithm1.py (torch.nn, autograd, torch.optim.Adam) and bench/jax_algorithm1.py
(jax.lax, jax.grad, optax), through golden traces.

Each case records three full training steps of refimpl in float64 (refimpl.trace.write_trace),
replays the trace in each transcription from the same initial weights, Adam and GECO state, on
the same images with the same eps, u and (REINFORCE-LOO) u1, and compares the two traces with
refimpl.compare.compare_traces at rtol 1e-8: every intermediate (nu1, nu2, mu, s, z, x1, x2,
e1, e2, KL_elem, E1, E2, C, C_ma, C', lambda', L, ...), every gradient, the estimator's term on
its own, every parameter after Adam and every BatchNorm statistic, per step, relative to the
tensor's largest magnitude. The cases: Hyper's defaults and every interpretation switch, the
three gradient estimators of l. 29 (o), hit forced at the start, the 28x28 network with
refimpl's fused decoder blocks, torch's unbiased running variance, the clamp of l. 21 under
both gradient rules, Adam's step count for gamma both ways (n) with the first hit on the second
step and with gamma dropping out again under hit="per_step", a trace started mid-training and a
float32 trace (rtol 1e-4), and the readings (p)-(r): the L0 term weighted per image (with a step
where the batch-mean C is violated and some images meet it), lambda at its own Adam rate and by
plain gradient ascent (also from a state whose Adam count for lambda lags), Eqs. 3 and 15 literally. Unless a case says otherwise, tau is chosen so that the constraint is
met at step 1: gates are then sampled and the estimator is active in steps 2-3; a guard test per
case asserts what the case needs of refimpl's trace.

What the two transcriptions share (bench/transcription.py: defaults, architecture helpers) is
tested once here; each transcription's own API in tests/test_torch_crosscheck.py and
tests/test_jax_crosscheck.py; the planted porting bugs in tests/test_porting_bugs.py. A
transcription whose framework is not installed is skipped.
"""

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest

import transcription_ports
from refimpl.algorithm1 import ESTIMATORS, Hyper, init_state, train_step
from refimpl.compare import compare_traces
from refimpl.execution import Execution
from refimpl.model import Architecture, GatedVAE
from refimpl.rng import generator
from refimpl.trace import read_trace, save_trace, write_trace
from transcription_ports import ARCH16, ARCH28, BATCH

TOL = 1e-8
STEPS = 3
LR = 1e-3


@pytest.fixture(scope="module", params=transcription_ports.NAMES)
def port(request):
    with transcription_ports.load(request.param) as p:
        yield p


def _none(ref):
    pass


@dataclass(frozen=True)
class Case:
    """A refimpl trace to replay: its Hyper, model and batches, and what its guard checks of it."""

    name: str
    hyper: Hyper
    arch: Architecture = ARCH16
    n: int = 4
    fused: bool = False
    force_hit: bool = False
    # per step: "noise" (uniform images, E2 ~ 25) or "grey" (0.5 + small noise, E2 ~ 4)
    batches: tuple = ("noise",) * STEPS
    dtype: type = np.float64
    pre_steps: int = 0  # untraced refimpl steps before the trace starts (a trace started mid-training)
    rtol: float = TOL
    active: tuple = (1, 2)  # steps where gates are sampled and the estimator's term is non-zero
    compile: bool = False  # JAX: compile the whole step (shapes or dtype no other case has), else op by op
    guard: object = field(default=_none, compare=False)  # more checks of refimpl's trace


def make_trace(path, case: Case):
    """Three refimpl steps of ``case`` recorded to ``path``."""
    model = GatedVAE(case.arch, case.n, rng=generator(0), dtype=case.dtype, gamma_init=case.hyper.gamma_init,
                     paths=Execution(fused=case.fused).resolve("numpy"))
    state = init_state(model, case.hyper)
    if case.force_hit:
        state.hit = True
    rng, images = generator(1000), generator(2000)

    def batch(kind):
        shape = (BATCH, *case.arch.image_shape)
        x = images.uniform(size=shape) if kind == "noise" else 0.5 + 0.02 * images.standard_normal(shape)
        return x.astype(case.dtype)

    for _ in range(case.pre_steps):
        train_step(state, batch("noise"), rng)
    write_trace(path, state, [batch(kind) for kind in case.batches], rng, STEPS, seed=0)
    return read_trace(path)


def step_flags(ref, name):
    return [bool(ref[f"step{k:04d}/value/{name}"]) for k in range(STEPS)]


def met_at_step0(ref):
    assert step_flags(ref, "l0_added")[0]


def defaults_guard(ref):
    """gamma_init 0.42: the draws give u outside (0.05, 0.95) at steps 2 and 3."""
    assert "step0000/input/u" not in ref and step_flags(ref, "l0_added")[0]


def mid_training_guard(ref):
    init = ref.manifest["initial_state"]
    assert init["adam_t"] == 2 and init["hit"] and init["c_ma"] is not None


def loo_guard(ref):
    for k in (1, 2):
        assert f"step{k:04d}/input/u1" in ref


def adam_steps_guard(adam_steps):
    """The first hit on the second step: gamma has no gradient at step 0 and its first one at step 1, the second
    Adam step; its first move is lr sign(g) with its own count (1) and 0.744 lr with the global count (2)."""
    def guard(ref):
        assert step_flags(ref, "sampling") == [False, False, True]
        assert step_flags(ref, "l0_added") == [False, True, True] and step_flags(ref, "hit") == [False, True, True]
        gamma0 = ref["step0000/param/gamma"]
        np.testing.assert_array_equal(ref["step0000/param_after/gamma"], gamma0)  # no gradient: no move either way
        factor = 1.0 if adam_steps == "per_parameter" else 0.1 / (1 - 0.9**2) * np.sqrt((1 - 0.999**2) / 0.001)
        np.testing.assert_allclose(np.abs(ref["step0001/param_after/gamma"] - gamma0), factor * LR, rtol=1e-4)
    return guard


def dropout_guard(adam_steps):
    """hit="per_step": gamma has a gradient at steps 0 (the L0 term) and 1 (sampled gates), none at step 2; torch's
    count leaves it alone there, a global count moves it on its moments."""
    def guard(ref):
        assert step_flags(ref, "l0_added") == [True, False, False]
        assert step_flags(ref, "sampling") == [False, True, False]
        moved = np.abs(ref["step0002/param_after/gamma"] - ref["step0002/param/gamma"]).max()
        assert moved == 0.0 if adam_steps == "per_parameter" else moved > 1e-5
    return guard


def per_image_guard(weights=None, violated_step=None):
    """(p): l. 24 adds the L0 term times the fraction of images with e_b <= tau (``weights`` per step where given;
    some strictly between 0 and 1), also at a step where the batch mean violates the constraint (C > 0), where the
    batch reading adds nothing."""
    def guard(ref):
        tau, seen = ref.manifest["hyper"]["tau"], []
        for k in range(STEPS):
            p = f"step{k:04d}/value/"
            weight = float((ref[p + "e2"] <= tau).mean())
            seen.append(weight)
            assert bool(ref[p + "l0_added"]) == (weight > 0)
            assert float(ref[p + "L"]) == pytest.approx(float(ref[p + "lambda_eff"] * ref[p + "C_ma"] + ref[p + "kl"])
                                                        + weight * float(ref[p + "gates_l1"]), rel=1e-12)
        assert any(0 < w < 1 for w in seen)
        if weights is not None:
            assert seen == pytest.approx(weights, abs=1e-12)
        if violated_step is not None:
            assert float(ref[f"step{violated_step:04d}/value/C"]) > 0
    return guard


def per_image_per_step_guard(ref):
    """(p) with hit="per_step": step 0 violates the batch-mean constraint but some images meet it, so step 1
    samples gates (under constraint="batch" it would not)."""
    assert float(ref["step0000/value/C"]) > 0 and step_flags(ref, "l0_added")[0]
    assert step_flags(ref, "sampling")[:2] == [False, True]


def lambda_sgd_guard(rate, sign=1.0):
    """(q) "sgd": lambda moves by exactly sign * rate * dL/dlambda (no Adam), the others by Adam."""
    def guard(ref):
        met_at_step0(ref)
        for k in range(STEPS):
            p = f"step{k:04d}/"
            moved = float(ref[p + "param_after/lambda"] - ref[p + "param/lambda"])
            assert moved == pytest.approx(sign * rate * float(ref[p + "grad/lambda"]), rel=1e-12) and moved != 0
    return guard


def lambda_lr_guard(rate):
    """(q) Adam at lambda's own rate: Adam's first step moves lambda by rate (sign(g) up to eps), gamma by lr."""
    def guard(ref):
        met_at_step0(ref)
        moved = abs(float(ref["step0000/param_after/lambda"] - ref["step0000/param/lambda"]))
        assert moved == pytest.approx(rate, rel=1e-6)
    return guard


def clamp_guard(rule, met, side, bounds):
    """Under ascent lambda moves up iff C' > 0 (constraint violated). "outward" keeps the gradient when that moves
    lambda back into range and zeroes it otherwise; "zero" always zeroes it."""
    def guard(ref):
        inward = (not met) if side == "min" else met
        assert (ref["step0000/grad/lambda"] != 0) == (rule == "outward" and inward)
        assert ref["step0000/value/lambda_eff"] == (bounds["lambda_max"] if side == "max" else bounds["lambda_min"])
    return guard


# every case below meets the constraint at step 1 (tau well above E2 ~ 25), unless it says otherwise
MET = {"tau": 40.0, "gamma_init": 0.1}
LATE = {"tau": 10.0, "gamma_init": 0.1}  # a noise batch violates it, grey ones meet it
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
    ("encoder_output=literal", {**MET, "encoder_output": "literal"}),
    ("encoder_output=literal+lambda_update=descent", {**MET, "encoder_output": "literal", "lambda_update": "descent"}),
]
ESTIMATOR_CASES = [
    (f"estimator={e}{suffix}", {**MET, "estimator": e, **extra})
    for e in ESTIMATORS[1:]
    for suffix, extra in (("", {}), ("+per_example", {"gate_samples": "per_example"}),
                          ("+arm_objective=loss", {"arm_objective": "loss"}))
]
CLAMP_BOUNDS = {"max": {"lambda_max": 1.0}, "min": {"lambda_min": 2.0, "lambda_max": 5.0}}
CASES = [
    Case("defaults", Hyper(tau=40.0), n=6, guard=defaults_guard, compile=True),
    *[Case(name, Hyper(**over), guard=met_at_step0) for name, over in INTERPRETATIONS],
    *[Case(name, Hyper(**over), guard=loo_guard if "loo" in name else met_at_step0) for name, over in ESTIMATOR_CASES],
    Case("estimator=reinforce_loo+force_hit", Hyper(**MET, estimator="reinforce_loo"), force_hit=True,
         active=(0, 1)),  # at step 2 the two independent samples happen to agree
    Case("force_hit", Hyper(**MET), force_hit=True, active=(0, 1, 2)),
    Case("mnist_fused", Hyper(tau=80.0, gamma_init=0.1), arch=ARCH28, fused=True, compile=True),
    Case("bn_running_var=unbiased", Hyper(**MET, e1_batchnorm="running"),
         arch=dataclasses.replace(ARCH16, bn_running_var="unbiased")),
    *[Case(f"adam_steps={a}+late_hit", Hyper(**LATE, adam_steps=a), batches=("noise", "grey", "grey"), active=(2,),
           guard=adam_steps_guard(a)) for a in ("global", "per_parameter")],
    *[Case(f"adam_steps={a}+hit=per_step", Hyper(**LATE, adam_steps=a, hit="per_step"),
           batches=("grey", "noise", "noise"), active=(1,), guard=dropout_guard(a))
      for a in ("global", "per_parameter")],
    Case("mid_training", Hyper(**MET), pre_steps=2, active=(0, 1, 2), guard=mid_training_guard),
    Case("float32", Hyper(**MET), dtype=np.float32, rtol=1e-4, compile=True),
    # (p): tau 25 sits among the per-image errors (E2 ~ 24-26): fractions 1/2, 1/2, 1/6, the last at C > 0
    *[Case(f"constraint=per_image{suffix}", Hyper(tau=25.0, gamma_init=0.1, constraint="per_image", **extra),
           dtype=dtype, rtol=rtol, guard=guard)
      for suffix, extra, dtype, rtol, guard in (
          ("", {}, np.float64, TOL, per_image_guard((0.5, 0.5, 1 / 6), violated_step=2)),
          ("+per_example+loss", {"gate_samples": "per_example", "arm_objective": "loss"}, np.float64, TOL,
           per_image_guard()),
          ("+float32", {}, np.float32, 1e-4, per_image_guard((0.5, 0.5, 1 / 6), violated_step=2)))],
    Case("constraint=per_image+hit=per_step", Hyper(tau=24.5, gamma_init=0.1, constraint="per_image",
                                                    hit="per_step"), active=(1,), guard=per_image_per_step_guard),
    # (q)
    Case("lambda_lr=0.01", Hyper(**MET, lambda_lr=1e-2), guard=lambda_lr_guard(1e-2)),
    Case("lambda_optimizer=sgd", Hyper(**MET, lambda_optimizer="sgd"), guard=lambda_sgd_guard(LR)),
    Case("lambda_optimizer=sgd+lambda_lr=0.01+descent", Hyper(**MET, lambda_optimizer="sgd", lambda_lr=1e-2,
                                                               lambda_update="descent"),
         guard=lambda_sgd_guard(1e-2, sign=-1.0)),
    Case("lambda_optimizer=sgd+mid_training", Hyper(**MET, lambda_optimizer="sgd", lambda_lr=1e-2), pre_steps=2,
         active=(0, 1, 2), guard=lambda_sgd_guard(1e-2)),
    *[Case(f"lambda_clamp={rule}+{'met' if met else 'violated'}+{side}",
           Hyper(tau=40.0 if met else 5.0, gamma_init=0.1, lambda_clamp_grad=rule, **CLAMP_BOUNDS[side]),
           active=(1, 2) if met else (), guard=clamp_guard(rule, met, side, CLAMP_BOUNDS[side]))
      for rule in ("outward", "zero") for met in (True, False) for side in ("max", "min")],
]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """refimpl's trace of each case, made once and shared by the two transcriptions."""
    folder, made = tmp_path_factory.mktemp("crosscheck"), {}

    def get(case):
        if case.name not in made:
            made[case.name] = make_trace(folder / f"{case.name}.npz", case)
        return made[case.name]
    return get


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reference_trace_has_what_the_case_needs(case, references):
    """Guard: refimpl's trace samples gates with a non-zero estimator term where the case needs it, and whatever
    else the case is about holds (the first hit, lambda' clamped, gamma's Adam steps, ...)."""
    ref = references(case)
    for k in case.active:
        p = f"step{k:04d}/"
        assert p + "input/u" in ref, f"step {k}: gates not sampled"
        assert (p + "input/u1" in ref) == (case.hyper.estimator == "reinforce_loo")
        assert ref[p + "value/E1"] != ref[p + "value/E2"], f"step {k}: E1 == E2, the estimator's term is zero"
        assert np.abs(ref[p + "arm/gamma"]).max() > 0
    case.guard(ref)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_replay_agrees_with_refimpl(case, references, port, tmp_path):
    """Every tensor of every step of the transcription's replay agrees with refimpl's trace (1e-8; float32 1e-4)."""
    ref = references(case)
    out = tmp_path / f"{port.name}.npz"
    manifest = port.replay(ref.path, out, compile=case.compile)
    assert manifest["writer"].startswith(port.writer)
    result = compare_traces(ref.path, out, rtol=case.rtol)
    assert result.ok, result.to_table()
    assert result.manifest_differences == []
    replayed = read_trace(out)
    assert set(replayed.keys()) == set(ref.keys())
    # the replay computed these itself: they are not copies of the inputs
    assert any(r.max_abs > 0 for r in result.rows if r.name.startswith(("grad/", "value/")))
    assert replayed["step0002/grad/encoder.conv1.weight"].dtype == case.dtype  # no silent promotion
    print(f"\n{case.name} ({port.name}): {len(result.rows)} tensors, largest relative error "
          f"{max(r.max_rel for r in result.rows):.2e}")


def test_replay_refuses_a_trace_without_u_where_it_samples(references, port, tmp_path):
    """The replay decides l. 3 from the GECO state; a trace that disagrees is an error naming the step."""
    ref = references(CASES[1])
    manifest = dict(ref.manifest, initial_state={**ref.manifest["initial_state"], "hit": True})
    save_trace(tmp_path / "bad.npz", dict(ref.arrays), manifest)
    with pytest.raises(ValueError, match=f"the {'torch' if port.name == 'torch' else 'JAX'} replay samples gates at "
                                         "step 0.*step0000/input/u"):
        port.replay(tmp_path / "bad.npz", tmp_path / "out.npz")


def test_replay_command_line(references, port, tmp_path, capsys):
    ref = references(CASES[1])
    out = tmp_path / "r.npz"
    assert port.main([str(ref.path), "--out", str(out), "--steps", "1"] + (["--no-jit"] * (port.name == "jax"))) == 0
    assert "replayed 1 steps" in capsys.readouterr().out
    assert read_trace(out).steps == 1
    assert compare_traces(ref.path, out).manifest_differences == ["steps: 3 vs 1"]
    with pytest.raises(SystemExit):
        port.main([str(ref.path), "--plant", "no-such-bug"])
    assert "--plant no-such-bug: expected one of" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# What the transcriptions share (bench/transcription.py) and their model's names and shapes


def test_defaults_match_refimpl_hyper(port):
    """DEFAULTS (bench/transcription.py, re-exported by both scripts) are refimpl's Hyper defaults: Section 4's
    values and every interpretation switch."""
    import transcription

    fields = {f.name: f.default for f in dataclasses.fields(Hyper) if f.name != "tau"}
    assert transcription.DEFAULTS == fields
    assert port.module.DEFAULTS is transcription.DEFAULTS


def test_paper_architecture_matches_refimpl():
    """The transcriptions' Section 4 network (bench/transcription.py) is refimpl's."""
    import transcription as tr
    from refimpl.model import paper_architecture

    for c in (1, 3):
        ours = tr.as_config(tr.paper_architecture(c))
        ref = tr.as_config(paper_architecture((c, 64, 64)))
        for name in ("hidden", "leaky_slope", "bn_momentum", "bn_eps", "bn_running_var"):
            assert getattr(ours, name) == getattr(ref, name), name
        assert tuple(ours.image_shape) == tuple(ref.image_shape)
        assert list(ours.encoder_convs) == list(ref.encoder_convs)
        assert list(ours.decoder_convs) == list(ref.decoder_convs)
    assert tr.feature_shape(tr.as_config(tr.paper_architecture(1))) == (64, 4, 4)


def test_transcription_module_is_framework_free():
    """bench/transcription.py imports neither torch nor jax (a fresh interpreter, so nothing else imported them)."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, %r); import transcription; "
            "assert not {'torch', 'jax'} & set(sys.modules), sorted({'torch', 'jax'} & set(sys.modules))"
            % str(transcription_ports.BENCH))
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parameter_names_and_shapes_match_refimpl(port):
    """The transcription's parameters (state-dict names, order and shapes) and BatchNorm buffers are refimpl's."""
    for arch in (ARCH16, ARCH28):
        model = GatedVAE(arch, 4, rng=generator(0), dtype=np.float64)
        if port.name == "torch":
            import torch

            theirs = port.module.GatedVAE(arch, 4, dtype=torch.float64)
            shapes = {k: tuple(p.shape) for k, p in theirs.named_parameters()}
            buffers = [k for k, _ in theirs.named_buffers() if not k.endswith("num_batches_tracked")]
        else:
            import jax

            shapes = port.module.parameter_shapes(arch, 4)
            params, buffer_arrays = port.module.init_model(arch, 4, jax.random.key(0))
            assert list(params) == [*model.parameters(), "lambda"]
            buffers = list(buffer_arrays)
        assert list(shapes) == list(model.parameters())
        assert shapes == {k: v.shape for k, v in model.parameters().items()}
        assert sorted(buffers) == sorted(dict(model.named_buffers()))
