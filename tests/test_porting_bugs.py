"""The catalogue of porting bugs (refimpl/porting_bugs.py): every bug, planted in the PyTorch
transcription (bench/torch_algorithm1.py --plant NAME) and in the JAX one
(bench/jax_algorithm1.py --plant NAME), is pinpointed by ``refimpl compare``.

Each test replays a golden trace of refimpl with one bug planted and requires the first
diverging tensor to be the catalogue's ``first_tensor`` (the tensor of the line where the
bug lives, or the first tensor that line feeds, in Algorithm 1's order), at the step
where the bug can first show, with nothing diverging before it; and ``compare`` to name
the bug among its likely causes. The golden traces are built to show every bug within
three steps of a 16x16 model (channels 4, 8, hidden 16, n = 4, batch 6, float64):

- ``late``: step 0 violates the constraint (a batch of uniform noise: E2 ~ 25 > tau = 10),
  so hit stays False and gamma has no gradient; step 1 meets it (a batch of grey images):
  the first hit, gamma's first gradient on the second Adam step; step 2 samples gates with
  nu1 != nu2 everywhere and closed gates in nu2, so the ARM term, the KL normaliser and the
  E1 pass all matter. A guard test asserts all of this.
- ``clamp``: the same with lambda_max = 1 < softplus(1)^2, so lambda' is clamped from step 0.
- ``disarm``, ``loo``: the same with estimator="disarm" and "reinforce_loo" (interpretation (o)),
  for the bugs of those estimators.

Every test runs on both transcriptions (skipped cleanly where torch or jax is missing).

The inference gate rule (gamma >= 0 instead of gamma > 0) is not in the catalogue: a
training trace does not record inference gates.
"""

import json
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import pytest

import transcription_ports

from refimpl.algorithm1 import Hyper, init_state, train_step
from refimpl.compare import compare_traces
from refimpl.model import GatedVAE, build_architecture
from refimpl.porting_bugs import BY_NAME, CATALOGUE, NAMES, likely_causes, render_markdown
from refimpl.rng import generator
from refimpl.trace import STEP_KEYS, read_trace, save_trace, write_trace

ROOT = Path(__file__).resolve().parents[1]
ARCH = build_architecture((1, 16, 16), channels=(4, 8), hidden=16)
N, BATCH, STEPS = 4, 6, 3
HYPER = {"tau": 10.0, "gamma_init": 0.1}
TRACES = {"late": HYPER, "clamp": {**HYPER, "lambda_max": 1.0}, "disarm": {**HYPER, "estimator": "disarm"},
          "loo": {**HYPER, "estimator": "reinforce_loo"}}
TRACE_OF = {"no-lambda-clamp": "clamp", "disarm-sign": "disarm", "loo-antithetic": "loo"}  # the others: "late"
# The step at which each bug first shows in its trace (default 0).
FIRST_STEP = {
    "u-per-image": 2, "nu-swapped": 2, "e1-eval-mode": 2, "e1-updates-bn": 2, "kl-over-n": 2, "kl-on-nu1": 2,
    "arm-sign": 2, "arm-without-k": 2, "arm-without-lambda": 2, "disarm-sign": 2, "loo-antithetic": 2,  # need gates
    "loss-uses-c": 1, "no-stop-gradient": 1,  # need C_ma != C (or C_ma depending on an earlier C)
    "adam-steps": 1,  # needs gamma's first gradient after the first Adam step
}


def batches():
    """Uniform noise (E2 ~ 25: constraint violated), then two batches of grey images (E2 ~ 4: met)."""
    g = generator(7)
    return [g.uniform(size=(BATCH, *ARCH.image_shape))] + [
        0.5 + 0.02 * g.standard_normal((BATCH, *ARCH.image_shape)) for _ in range(STEPS - 1)]


def make_state(**hyper):
    model = GatedVAE(ARCH, N, rng=generator(0), dtype=np.float64)
    return init_state(model, Hyper(**hyper))


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("porting")
    paths = {}
    for name, hyper in TRACES.items():
        paths[name] = folder / f"{name}.npz"
        write_trace(paths[name], make_state(**hyper), batches(), generator(1), STEPS, seed=0)
    return paths


@pytest.fixture(scope="module", params=transcription_ports.NAMES)
def port(request):
    """The transcription the bugs are planted in: torch, then JAX."""
    with transcription_ports.load(request.param) as port:
        yield port


def test_golden_traces_show_every_kind_of_bug(traces, port, tmp_path):
    """Guard: the traces have what the catalogue's bugs need to show, and the unplanted replay agrees."""
    t = read_trace(traces["late"])
    assert [bool(t[f"step{k:04d}/value/l0_added"]) for k in range(3)] == [False, True, True]
    assert [bool(t[f"step{k:04d}/value/sampling"]) for k in range(3)] == [False, False, True]
    nu1, nu2 = t["step0002/value/nu1"], t["step0002/value/nu2"]
    assert (nu1 != nu2).all() and 0 < nu2.sum() < N  # nu1 != nu2, and closed gates in nu2
    assert np.abs(t["step0002/arm/gamma"]).min() > 0
    assert t["step0001/value/C_ma"] != t["step0001/value/C"]
    for name in ("disarm", "loo"):  # the estimators' traces sample gates at step 2, with a non-zero term
        e = read_trace(traces[name])
        assert [bool(e[f"step{k:04d}/value/sampling"]) for k in range(3)] == [False, False, True]
        assert (e["step0002/value/nu1"] != e["step0002/value/nu2"]).any() and np.abs(e["step0002/arm/gamma"]).max() > 0
    loo = read_trace(traces["loo"])  # l. 5's antithetic twin of u is not the independent sample
    antithetic = loo["step0002/input/u"] > 1 / (1 + np.exp(7 * loo["step0002/param/gamma"]))
    assert (antithetic != loo["step0002/value/nu1"]).any()
    c = read_trace(traces["clamp"])
    assert float(c["step0000/value/lambda_eff"]) == 1.0
    for name, path in traces.items():
        out = tmp_path / f"{name}-port.npz"
        port.replay(path, out)
        result = compare_traces(path, out)
        assert result.ok, result.to_table()
        assert result.likely_causes == [] and "likely causes" not in result.to_table()


@pytest.mark.parametrize("bug", CATALOGUE, ids=NAMES)
def test_compare_pinpoints_the_planted_bug(bug, traces, port, tmp_path):
    ref, out = traces[TRACE_OF.get(bug.name, "late")], tmp_path / "bug.npz"
    manifest = port.replay(ref, out, plant=bug.name)
    assert manifest["extra"]["plant"] == bug.name
    result = compare_traces(ref, out)
    first = result.first_divergence
    assert first is not None, f"{bug.name}: nothing diverges"
    assert fnmatchcase(first.name, bug.first_tensor), (bug.name, first.step, first.name, bug.first_tensor)
    assert first.step == FIRST_STEP.get(bug.name, 0), (bug.name, first.step, first.name)
    assert bug in result.likely_causes
    table = result.to_table()
    assert f"first: step {first.step} {first.name}" in table and f"\n  {bug.name} ({bug.line}): " in table
    doc = json.loads(result.to_json())
    assert bug.name in [c["name"] for c in doc["likely_causes"]]


def test_adam_steps_mismatch_is_named_by_compare(traces, port, tmp_path):
    """(n): the replay with the other step-count convention for gamma diverges first at param_after/gamma of
    the first hit, with its gradient agreeing, and compare's note names the adam_steps switch."""
    out = tmp_path / "bug.npz"
    port.replay(traces["late"], out, plant="adam-steps")
    result = compare_traces(traces["late"], out)
    first = result.first_divergence
    assert (first.step, first.name) == (1, "param_after/gamma")
    rows = {r.key: r for r in result.rows}
    assert rows["step0001/grad/gamma"].ok
    assert "gamma's first gradient (first hit / first gate sample) comes on Adam step 2" in first.note
    assert "interpretation (n), --adam-steps" in first.note
    summary = next(line for line in result.to_table().splitlines() if "tensors diverge; first:" in line)
    assert "step 1 param_after/gamma" in summary and "interpretation (n)" in summary


def test_adam_steps_mismatch_where_gamma_drops_out_again(port, tmp_path):
    """(n) with hit="per_step": first hit at step 0 (both counts 1), gates at step 1, then a step with neither
    (C > 0, no gates): torch leaves gamma alone, a global count moves it; compare names (n) there."""
    grey, noise = batches()[1], batches()[0]
    path = tmp_path / "per-step.npz"
    write_trace(path, make_state(**HYPER, hit="per_step"), [grey, noise, noise], generator(1), 3)
    t = read_trace(path)
    assert [bool(t[f"step{k:04d}/value/l0_added"]) for k in range(3)] == [True, False, False]
    assert [bool(t[f"step{k:04d}/value/sampling"]) for k in range(3)] == [False, True, False]
    port.replay(path, tmp_path / "port.npz")
    assert compare_traces(path, tmp_path / "port.npz").ok
    port.replay(path, tmp_path / "bug.npz", plant="adam-steps")
    first = compare_traces(path, tmp_path / "bug.npz").first_divergence
    assert (first.step, first.name) == (2, "param_after/gamma")
    assert first.note.startswith("gradient agrees; gamma has no gradient at this step") and "(n)" in first.note


def test_per_parameter_traces_replay(traces, port, tmp_path):
    """A refimpl trace with adam_steps="per_parameter" replays to 1e-8 (in torch its own Adam behaviour, in JAX
    gamma's optax state held still); the global replay of it is pinpointed at param_after/gamma of the first hit."""
    path = tmp_path / "per.npz"
    write_trace(path, make_state(**HYPER, adam_steps="per_parameter"), batches(), generator(1), STEPS)
    port.replay(path, tmp_path / "port.npz")
    result = compare_traces(path, tmp_path / "port.npz")
    assert result.ok, result.to_table()
    different = compare_traces(traces["late"], path)  # the two conventions really differ
    assert (different.first_divergence.step, different.first_divergence.name) == (1, "param_after/gamma")
    assert "interpretation (n)" in different.first_divergence.note
    port.replay(path, tmp_path / "bug.npz", plant="adam-steps")
    first = compare_traces(path, tmp_path / "bug.npz").first_divergence
    assert (first.step, first.name) == (1, "param_after/gamma") and "interpretation (n)" in first.note


def test_mid_training_per_parameter_trace_needs_the_step_counts(port, tmp_path):
    """A trace that starts after two steps without a hit: gamma's own count is 0 while Adam's global count is 2.
    The replay takes per-parameter counts from the manifest's ``initial_state.adam_steps`` (refimpl's Adam
    ``state_dict()["steps"]``); without them it assumes the global count and compare names (n)."""
    state, rng = make_state(tau=0.0, gamma_init=0.1, adam_steps="per_parameter"), generator(3)
    for x in batches()[:1] * 2:
        train_step(state, x, rng)  # tau = 0: violated, gamma skipped
    assert state.optimizer.steps["gamma"] == 0 and state.optimizer.t == 2
    state.hyper = Hyper(**HYPER, adam_steps="per_parameter")
    counts = state.optimizer.state_dict()["steps"]  # before the traced steps
    write_trace(tmp_path / "mid.npz", state, batches()[1:], rng, 2)
    trace = read_trace(tmp_path / "mid.npz")
    initial = {k: v for k, v in trace.manifest["initial_state"].items() if k != "adam_steps"}
    assert initial["adam_t"] == 2 and not initial["hit"]
    for name, extra in (("without", {}), ("with", {"adam_steps": counts})):
        manifest = {**trace.manifest, "initial_state": {**initial, **extra}}
        save_trace(tmp_path / f"{name}.npz", dict(trace.arrays), manifest)
        port.replay(tmp_path / f"{name}.npz", tmp_path / f"{name}-port.npz")
    result = compare_traces(tmp_path / "with.npz", tmp_path / "with-port.npz")
    assert result.ok, result.to_table()
    first = compare_traces(tmp_path / "without.npz", tmp_path / "without-port.npz").first_divergence
    assert (first.step, first.name) == (0, "param_after/gamma")
    assert "comes on Adam step 3: likely Adam's step count for gamma, interpretation (n)" in first.note


def test_catalogue_is_well_formed():
    assert len(CATALOGUE) >= 20 and len(set(NAMES)) == len(NAMES) and set(BY_NAME) == set(NAMES)
    groups = {group for group, *_ in STEP_KEYS}
    for bug in CATALOGUE:
        assert bug.name == bug.name.lower() and " " not in bug.name
        assert bug.first_tensor.partition("/")[0] in groups, bug.first_tensor
        assert bug.line and bug.description and bug.shows_when
        assert bug in likely_causes(bug.first_tensor.replace("*", "x"))  # the lookup finds it by its own tensor
    arm_bugs = [BY_NAME[n] for n in ("arm-sign", "arm-without-k", "arm-without-lambda")]
    assert likely_causes("step0002/arm/gamma", "arm") == arm_bugs
    assert likely_causes("step0002/arm/gamma", "disarm") == arm_bugs + [BY_NAME["disarm-sign"]]
    assert likely_causes("step0002/arm/gamma") == arm_bugs + [BY_NAME["disarm-sign"]]  # estimator not known
    assert likely_causes("value/nu1", "arm") == [BY_NAME["nu-swapped"]]
    assert likely_causes("value/E2") == []


def test_plant_list_and_errors(port, traces, tmp_path, capsys):
    assert port.main(["--plant", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == list(NAMES)
    assert all(bug.first_tensor in line and bug.line in line for bug, line in zip(CATALOGUE, lines))
    with pytest.raises(SystemExit):
        port.main([str(traces["late"]), "--plant", "no-such-bug"])
    assert "--plant no-such-bug: expected one of" in capsys.readouterr().err
    with pytest.raises(ValueError, match="plant='nope'"):
        port.replay(traces["late"], tmp_path / "x.npz", plant="nope")
    with pytest.raises(ValueError, match="plant='nope'"):
        port.module.replay(traces["late"], tmp_path / "x.npz", plant="nope")
    no_jit = ["--no-jit"] if port.name == "jax" else []
    assert port.main([str(traces["late"]), "--out", str(tmp_path / "a.npz"), "--plant", "kl-without-mu2", *no_jit]) == 0
    assert "with the bug 'kl-without-mu2' planted" in capsys.readouterr().out
    assert read_trace(tmp_path / "a.npz").manifest["extra"]["plant"] == "kl-without-mu2"


def test_docs_table_equals_the_catalogue():
    porting = (ROOT / "docs" / "porting.md").read_text()
    begin, end = "<!-- porting-bugs:begin -->\n", "\n<!-- porting-bugs:end -->"
    assert begin in porting and end in porting, "docs/porting.md has no <!-- porting-bugs:begin/end --> block"
    block = porting.split(begin, 1)[1].split(end, 1)[0]
    assert block == render_markdown(), "docs/porting.md's porting-bug table is stale: python -m refimpl.porting_bugs prints it"
