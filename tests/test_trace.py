"""Golden traces (refimpl/trace.py) and their comparison (refimpl/compare.py).

Round trip and manifest of a refimpl trace; atomic writing and one-line errors naming
the file and the key; refimpl's trace against the PyTorch replay of the same inputs
(bench/torch_algorithm1.py) agreeing to 1e-8 in float64; and a planted bug (the ARM
term's sign in the replay) found at the right tensor: the ARM term of the first step
that samples gates, not anything earlier. The tolerances are tested at their boundary
(2 x rtol diverges, 0.5 x rtol agrees; the same for param_rtol). Every other planted
porting bug of the catalogue: tests/test_porting_bugs.py.
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from refimpl.algorithm1 import Hyper, init_state, train_step
from refimpl.backend import to_host
from refimpl.cli import main as cli_main
from refimpl.compare import compare_traces, order_key, sort_keys
from refimpl.model import GatedVAE
from refimpl.rng import generator
from refimpl.trace import FORMAT, VALUE_NAMES, VERSION, TraceError, TraceKeyError, read_trace, save_trace, write_trace
from refimpl.config import RunConfig
from refimpl.model import build_architecture
from refimpl.runlog import read_log
from refimpl.training import Run

BENCH = Path(__file__).resolve().parents[1] / "bench"
ARCH = build_architecture((1, 16, 16), channels=(4, 8), hidden=16)
N, BATCH, STEPS = 4, 6, 3
# tau well above E2 (~25): the constraint is met at step 0, so gates are sampled from step 1
HYPER = Hyper(tau=40.0, gamma_init=0.1)


def make_state(hyper=HYPER, seed=0):
    model = GatedVAE(ARCH, N, rng=generator(seed), dtype=np.float64, gamma_init=hyper.gamma_init)
    return init_state(model, hyper)


def batches(seed=7, steps=STEPS):
    g = generator(seed)
    return [g.uniform(size=(BATCH, *ARCH.image_shape)) for _ in range(steps)]


@pytest.fixture(scope="module")
def ref_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "ref.npz"
    write_trace(path, make_state(), batches(), generator(1), STEPS, seed=0)
    return path


def test_round_trip_matches_the_steps_it_records(ref_trace):
    """Every recorded tensor equals what an identical run of train_step computes."""
    trace = read_trace(ref_trace)
    state, rng = make_state(), generator(1)
    for k, x in enumerate(batches()):
        step = trace.step(k)
        before = {name: np.array(p) for name, p in state.parameters().items()}
        buffers_before = {name: np.array(b) for name, b in state.model.named_buffers()}
        rec = {}
        log = train_step(state, x, rng, record=rec)
        for name, p in before.items():
            np.testing.assert_array_equal(step[f"param/{name}"], p)
            np.testing.assert_array_equal(step[f"param_after/{name}"], state.parameters()[name])
            np.testing.assert_array_equal(step[f"grad/{name}"], rec["grads"][name])
        for name, b in buffers_before.items():
            np.testing.assert_array_equal(step[f"buffer/{name}"], b)
            np.testing.assert_array_equal(step[f"buffer_after/{name}"], dict(state.model.named_buffers())[name])
        np.testing.assert_array_equal(step["input/x"], x)
        np.testing.assert_array_equal(step["input/eps"], rec["eps"])
        for name in ("nu1", "nu2", "mu", "s", "z", "x1", "x2", "e1", "e2", "kl_elem"):
            np.testing.assert_array_equal(step[f"value/{name}"], rec[name])
        for name, logged in (("E1", "E1"), ("E2", "E2"), ("C", "C"), ("C_ma", "C_ma"), ("C_prime", "C_ma"),
                             ("lambda_eff", "lambda_eff"), ("kl", "kl"), ("gates_l1", "gates_l1"), ("L", "loss")):
            assert step[f"value/{name}"] == log[logged] and step[f"value/{name}"].dtype == np.float64
        assert bool(step["value/hit"]) == log["hit"] and bool(step["value/l0_added"]) == log["l0_added"]
        sampled = rec["u"] is not None
        assert bool(step["value/sampling"]) == sampled == (k > 0)
        assert ("input/u" in step) == sampled and ("arm/gamma" in step) == sampled
        if sampled:
            np.testing.assert_array_equal(step["input/u"], rec["u"])
            np.testing.assert_array_equal(step["arm/gamma"], rec["arm"])
            assert np.abs(step["arm/gamma"]).max() > 0
    # GECO state carried from step to step
    assert math.isnan(trace["step0000/state/c_ma"]) and not trace["step0000/state/hit"]
    assert trace["step0001/state/c_ma"] == trace["step0000/value/C_ma"] and trace["step0001/state/hit"]
    for k in range(STEPS - 1):
        for name in trace.manifest["parameters"]:
            np.testing.assert_array_equal(trace[f"step{k:04d}/param_after/{name}"], trace[f"step{k + 1:04d}/param/{name}"])
    assert all(not v.any() for v in trace.initial("adam_m").values())


def test_manifest(ref_trace):
    trace = read_trace(ref_trace)
    m = trace.manifest
    state = make_state()
    assert (m["format"], m["version"], m["steps"]) == (FORMAT, VERSION, STEPS)
    assert m["writer"].startswith("refimpl ")
    assert (m["dtype"], m["batch_size"], m["n_latent"], m["seed"]) == ("float64", BATCH, N, 0)
    assert m["architecture"] == json.loads(json.dumps(dataclasses.asdict(ARCH)))
    assert m["hyper"] == json.loads(json.dumps(HYPER.as_dict()))
    assert m["parameters"] == list(state.parameters()) and m["parameters"][-1] == "lambda"
    assert m["buffers"] == [name for name, _ in state.model.named_buffers()]
    initial = dict(m["initial_state"])
    if "adam_steps" in initial:  # Adam's per-parameter step counts (interpretation (n)), where recorded
        assert initial.pop("adam_steps") == {name: 0 for name in m["parameters"]}
    assert initial == {"step": 0, "hit": False, "c_ma": None, "last_constraint_met": False, "adam_t": 0}
    assert [v["name"] for v in m["values"]] == list(VALUE_NAMES)
    assert set(m["keys"]) == set(trace.keys())
    for key, spec in m["keys"].items():
        assert spec == {"shape": list(trace[key].shape), "dtype": str(trace[key].dtype)}
    # one key per parameter per group per step, exactly
    params = m["parameters"]
    for group in ("param", "grad", "param_after"):
        assert sorted(k for k in trace if k.startswith(f"step0001/{group}/")) == sorted(
            f"step0001/{group}/{p}" for p in params)
    assert trace["step0001/grad/encoder.conv1.weight"].shape == (4, 1, 4, 4)
    assert trace["step0000/input/x"].shape == (BATCH, 1, 16, 16) and trace["step0001/input/u"].shape == (1, N)


def test_write_is_atomic(tmp_path):
    """A write that fails part-way leaves the old file untouched and no temporary file behind."""
    path = tmp_path / "t.npz"
    write_trace(path, make_state(), batches(steps=1), generator(1), 1)
    old = path.read_bytes()
    with pytest.raises(ValueError, match="batches: ran out after 2 batches, expected steps=3"):
        write_trace(path, make_state(), iter(batches(steps=2)), generator(1), 3)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]
    manifest = write_trace(path, make_state(), batches()[0], generator(1), 2)  # one array, used at every step
    assert manifest["steps"] == 2 and path.read_bytes() != old
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]


def test_read_errors_name_the_file_and_key(ref_trace, tmp_path):
    trace = read_trace(ref_trace)
    with pytest.raises(TraceKeyError, match=r"ref\.npz: trace has no key 'step0000/input/u'.*sample gates"):
        trace["step0000/input/u"]
    with pytest.raises(KeyError, match=r"'step0009/grad/gamma' \(the trace has steps 0\.\.2\)"):
        trace["step0009/grad/gamma"]
    with pytest.raises(TraceError, match="nowhere.npz: no such trace file"):
        read_trace(tmp_path / "nowhere.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match=r"junk.npz: not a .npz file \(a zip archive of arrays\): it holds text"):
        read_trace(tmp_path / "junk.npz")

    arrays, manifest = dict(trace.arrays), dict(trace.manifest)
    del arrays["step0001/grad/decoder.fc1.weight"]
    save_trace(tmp_path / "cut.npz", arrays, manifest)
    with pytest.raises(TraceKeyError, match=r"cut\.npz: trace has no key 'step0001/grad/decoder\.fc1\.weight'"):
        read_trace(tmp_path / "cut.npz")
    save_trace(tmp_path / "v2.npz", dict(trace.arrays), {**manifest, "version": VERSION + 1})
    with pytest.raises(TraceError, match=f"v2.npz: {FORMAT} version {VERSION + 1}"):
        read_trace(tmp_path / "v2.npz")
    save_trace(tmp_path / "other.npz", dict(trace.arrays), {**manifest, "format": "something-else"})
    with pytest.raises(TraceError, match="other.npz: format 'something-else'"):
        read_trace(tmp_path / "other.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(TraceKeyError, match="plain.npz: trace has no key 'manifest'"):
        read_trace(tmp_path / "plain.npz")


def test_compare_ordering_follows_algorithm1():
    params = ["gamma", "encoder.conv1.weight", "encoder.fc2.bias", "decoder.fc1.weight", "decoder.conv2.bias", "lambda"]
    expected = ["state/hit", "param/gamma", "param/encoder.conv1.weight", "param/lambda", "buffer/encoder.bn1.running_mean",
                "input/x", "value/sampling", "input/u", "input/u1", "value/nu1", "value/nu2", "value/mu", "value/s",
                "input/eps",
                "value/z", "value/x1", "value/E1", "value/x2", "value/E2", "buffer_after/encoder.bn1.running_mean",
                "value/C", "value/C_ma", "value/C_prime", "value/lambda_eff", "value/kl_elem", "value/l0_added",
                "value/L", "value/hit", "grad/lambda", "grad/decoder.conv2.bias", "grad/decoder.fc1.weight",
                "grad/encoder.fc2.bias", "grad/encoder.conv1.weight", "arm/gamma", "grad/gamma",
                "param_after/gamma", "param_after/encoder.conv1.weight", "param_after/lambda"]
    shuffled = list(np.random.default_rng(0).permutation(expected))
    assert sorted(shuffled, key=lambda k: order_key(k, params)) == expected
    keys = ["step0001/input/x", "step0000/param_after/gamma", "init/adam_m/gamma", "step0000/input/x"]
    assert sort_keys(keys, params) == ["init/adam_m/gamma", "step0000/input/x", "step0000/param_after/gamma",
                                       "step0001/input/x"]


def test_estimators_share_the_arm_key_and_loo_records_u1(tmp_path):
    """(o): every estimator writes l. 29's term to arm/gamma; reinforce_loo records its second draw as input/u1
    (only on steps that sample gates), and the manifest's hyper.estimator says which formula it is."""
    traces = {}
    for estimator in ("disarm", "reinforce_loo"):
        path = tmp_path / f"{estimator}.npz"
        write_trace(path, make_state(dataclasses.replace(HYPER, estimator=estimator)), batches(), generator(1), STEPS)
        traces[estimator] = t = read_trace(path)
        assert t.estimator == estimator == t.manifest["hyper"]["estimator"]
        for k in range(STEPS):
            sampled = bool(t[f"step{k:04d}/value/sampling"])
            assert (f"step{k:04d}/arm/gamma" in t) == sampled
            assert (f"step{k:04d}/input/u1" in t) == (sampled and estimator == "reinforce_loo")
    with pytest.raises(TraceKeyError, match=r"input/u1'.*only with estimator=reinforce_loo.*estimator: disarm"):
        traces["disarm"]["step0001/input/u1"]
    # the two draw the same u (l. 4) and differ in nu1: antithetic (disarm) or the independent u1 (reinforce_loo)
    np.testing.assert_array_equal(traces["disarm"]["step0001/input/u"], traces["reinforce_loo"]["step0001/input/u"])
    result = compare_traces(traces["disarm"].path, traces["reinforce_loo"].path)
    assert "hyper.estimator: 'disarm' vs 'reinforce_loo'" in result.manifest_differences
    assert (result.first_divergence.step, result.first_divergence.name) == (1, "input/u1")
    assert result.first_divergence.note == "missing in A"


def test_manifest_without_a_newer_switch_counts_as_its_default(ref_trace, tmp_path):
    """A trace written before Hyper.estimator (or adam_steps) existed ran the default: compare lists no difference,
    and Trace.estimator says "arm"."""
    trace = read_trace(ref_trace)
    old_hyper = {k: v for k, v in trace.manifest["hyper"].items() if k not in ("estimator", "adam_steps")}
    save_trace(tmp_path / "old.npz", dict(trace.arrays), {**trace.manifest, "hyper": old_hyper})
    old = read_trace(tmp_path / "old.npz")
    assert old.estimator == "arm"
    result = compare_traces(old, trace)
    assert result.ok and result.manifest_differences == []
    other = {**trace.manifest, "hyper": {**old_hyper, "estimator": "disarm"}}
    save_trace(tmp_path / "disarm.npz", dict(trace.arrays), other)
    assert compare_traces(old, tmp_path / "disarm.npz").manifest_differences == ["hyper.estimator: 'arm' vs 'disarm'"]


def test_compare_identical_and_perturbed(ref_trace, tmp_path):
    same = compare_traces(ref_trace, ref_trace)
    assert same.ok and same.first_divergence is None
    assert all(r.max_abs == 0 and r.max_rel == 0 for r in same.rows)
    assert len(same.rows) == len(read_trace(ref_trace).keys())
    table = same.to_table()
    assert table.endswith(f"all {len(same.rows)} tensors agree, bit for bit")
    assert "max abs err" not in table and "(shown:" not in table  # no empty table to read
    assert "max abs err" in same.to_table(all_rows=True)
    assert json.loads(same.to_json())["ok"] is True

    trace = read_trace(ref_trace)
    arrays = dict(trace.arrays)
    key = "step0001/value/z"
    arrays[key] = arrays[key] * (1 + 1e-6)
    arrays["step0002/grad/encoder.fc1.bias"] = arrays["step0002/grad/encoder.fc1.bias"] * (1 + 1e-12)
    del arrays["step0002/value/kl_elem"]
    manifest = {**trace.manifest, "keys": {k: v for k, v in trace.manifest["keys"].items() if k in arrays}}
    save_trace(tmp_path / "b.npz", arrays, manifest)
    result = compare_traces(ref_trace, tmp_path / "b.npz", rtol=1e-8)
    assert not result.ok
    first = result.first_divergence
    assert (first.key, first.step, first.name) == (key, 1, "value/z")
    assert 0.9e-6 < first.max_rel < 1.1e-6
    rows = {r.key: r for r in result.rows}
    assert rows["step0002/grad/encoder.fc1.bias"].ok  # 1e-12 is within 1e-8
    assert not rows["step0002/value/kl_elem"].ok and rows["step0002/value/kl_elem"].note == "missing in B"
    assert [r.key for r in result.rows if not r.ok] == [key, "step0002/value/kl_elem"]
    assert compare_traces(ref_trace, tmp_path / "b.npz", rtol=1e-5).first_divergence.key == "step0002/value/kl_elem"
    table = result.to_table()
    assert "DIVERGES" in table and "first: step 1 value/z" in table
    doc = json.loads(result.to_json())
    assert doc["first_divergence"]["key"] == key and doc["diverging"] == 2


def perturbed(ref_trace, tmp_path, changes: dict):
    """A copy of the trace with ``changes`` (key -> relative perturbation factor f: a -> a * (1 + f))."""
    trace = read_trace(ref_trace)
    arrays = dict(trace.arrays)
    for key, f in changes.items():
        arrays[key] = arrays[key] * (1 + f)
    path = tmp_path / "p.npz"
    save_trace(path, arrays, trace.manifest)
    return path


@pytest.mark.parametrize("rtol", [1e-8, 1e-5])
def test_compare_rtol_boundary(ref_trace, tmp_path, rtol):
    """A tensor perturbed by 2 rtol (relative to its largest magnitude) diverges; by 0.5 rtol it agrees. So a
    tolerance loosened (or tightened) by a factor 2 or more fails this test."""
    key = "step0001/value/z"
    for factor, ok in ((2.0, False), (0.5, True)):
        result = compare_traces(ref_trace, perturbed(ref_trace, tmp_path, {key: factor * rtol}), rtol=rtol)
        assert result.ok == ok, (factor, result.to_table())
        row = next(r for r in result.rows if r.key == key)
        assert row.ok == ok and row.max_rel == pytest.approx(factor * rtol, rel=1e-3)
        if not ok:
            assert result.first_divergence.key == key


@pytest.mark.parametrize("param_rtol", [1e-6, 1e-4])
def test_compare_param_rtol_boundary(ref_trace, tmp_path, param_rtol):
    """param_rtol governs parameters and BatchNorm statistics only: 2 param_rtol diverges, 0.5 param_rtol agrees;
    a non-state tensor perturbed by 0.5 param_rtol still diverges under rtol."""
    state_keys = ["step0002/param_after/encoder.fc1.weight", "step0002/buffer_after/decoder.bn1.running_var"]
    for key in state_keys:
        for factor, ok in ((2.0, False), (0.5, True)):
            path = perturbed(ref_trace, tmp_path, {key: factor * param_rtol})
            result = compare_traces(ref_trace, path, rtol=1e-8, param_rtol=param_rtol)
            assert result.ok == ok, (key, factor, result.to_table())
            assert not compare_traces(ref_trace, path, rtol=1e-8).ok  # without param_rtol: rtol applies
    path = perturbed(ref_trace, tmp_path, {"step0001/grad/encoder.fc1.weight": 0.5 * param_rtol})
    first = compare_traces(ref_trace, path, rtol=1e-8, param_rtol=param_rtol).first_divergence
    assert first.key == "step0001/grad/encoder.fc1.weight"


def test_cli_compare_exit_status(ref_trace, tmp_path, capsys):
    assert cli_main(["compare", str(ref_trace), str(ref_trace)]) == 0
    assert "tensors agree" in capsys.readouterr().out
    trace = read_trace(ref_trace)
    arrays = dict(trace.arrays)
    arrays["step0000/value/E2"] = arrays["step0000/value/E2"] + 1.0
    save_trace(tmp_path / "b.npz", arrays, trace.manifest)
    out_json = tmp_path / "cmp.json"
    assert cli_main(["compare", str(ref_trace), str(tmp_path / "b.npz"), "--json", str(out_json)]) == 1
    assert "first: step 0 value/E2" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["first_divergence"]["key"] == "step0000/value/E2"
    assert cli_main(["compare", str(ref_trace), str(tmp_path / "missing.npz")]) != 0
    assert "missing.npz: no such trace file" in capsys.readouterr().err


def test_cli_trace_records_the_steps_refimpl_train_takes(tmp_path, capsys):
    """`refimpl trace` with train's options traces exactly the first K steps of that training run."""
    opts = ["--image-size", "16", "--latent", "3", "--batch-size", "4", "--channels", "4,8", "--hidden", "8",
            "--tau", "2.5", "--seed", "3", "--dtype", "float64"]
    out = tmp_path / "t.npz"
    assert cli_main(["trace", *opts, "--steps", "2", "--out", str(out)]) == 0
    assert "traced 2 steps" in capsys.readouterr().out
    trace = read_trace(out)
    assert trace.manifest["seed"] == 3 and trace.manifest["extra"]["config"]["image_size"] == 16
    config = RunConfig(latent=3, batch_size=4, dtype="float64", seed=3, image_size=16, channels=(4, 8), hidden=8,
                       hyper={"tau": 2.5})
    run = Run.create(config, tmp_path / "run")
    run.train(2, checkpoint_every=None, progress=False)
    for name, p in run.state.parameters().items():
        np.testing.assert_array_equal(trace[f"step0001/param_after/{name}"], to_host(p))
    for name, b in run.model.named_buffers():
        np.testing.assert_array_equal(trace[f"step0001/buffer_after/{name}"], to_host(b))
    log = read_log(run.out / "log.csv")  # every step's scalars, as training logged them
    for column in ("E1", "E2", "C_ma", "lambda_eff", "kl", "gates_l1"):
        assert log[column] == [float(trace[f"step{k:04d}/value/{column}"]) for k in range(2)], column
    fresh = Run.build(config)  # the batches both took: Run.next_batch of the run the config builds
    for k in range(2):
        np.testing.assert_array_equal(trace[f"step{k:04d}/input/x"], to_host(fresh.next_batch()))


# ----------------------------------------------------------------------------------------
# The PyTorch replay (bench/torch_algorithm1.py)


@pytest.fixture
def ta():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(BENCH))
    import torch_algorithm1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch_algorithm1
    torch.set_num_threads(threads)


def test_torch_replay_agrees(ref_trace, tmp_path, ta):
    out = tmp_path / "torch.npz"
    manifest = ta.replay(ref_trace, out)
    assert manifest["writer"].startswith("bench/torch_algorithm1.py")
    replayed = read_trace(out)
    assert set(replayed.keys()) == set(read_trace(ref_trace).keys())
    result = compare_traces(ref_trace, out, rtol=1e-8)
    assert result.ok, result.to_table()
    assert result.manifest_differences == []
    assert max(r.max_rel for r in result.rows) < 1e-8
    # the replay computed these itself: they are not copies of the inputs
    assert any(r.max_abs > 0 for r in result.rows if r.name.startswith("grad/"))


def test_torch_replay_of_a_trace_started_mid_training(tmp_path, ta):
    """A trace whose first step is not the run's first: GECO state and Adam moments are carried in."""
    state, rng = make_state(), generator(1)
    for x in batches(seed=11, steps=2):
        train_step(state, x, rng)
    path = tmp_path / "mid.npz"
    write_trace(path, state, batches(), rng, 2)
    m = read_trace(path).manifest
    assert m["initial_state"]["adam_t"] == 2 and m["initial_state"]["hit"]
    ta.replay(path, tmp_path / "torch.npz")
    result = compare_traces(path, tmp_path / "torch.npz", rtol=1e-8)
    assert result.ok, result.to_table()


def test_planted_arm_bug_is_found_at_the_arm_term(ref_trace, tmp_path, ta):
    """Negated ARM term in the replay: the first divergence is step 1's arm/gamma (step 0 samples no gates)."""
    out = tmp_path / "bug.npz"
    ta.replay(ref_trace, out, arm_sign=-1.0)
    result = compare_traces(ref_trace, out, rtol=1e-8)
    first = result.first_divergence
    assert (first.step, first.name) == (1, "arm/gamma")
    assert first.max_rel == pytest.approx(2.0)  # a - (-a) relative to |a|
    rows = [r for r in result.rows if r.step is not None and r.step <= 1]
    at = rows.index(first)
    assert all(r.ok for r in rows[:at])  # nothing earlier diverges: step 0, and step 1 up to l. 27
    assert [r.name for r in rows[at:] if not r.ok][:2] == ["arm/gamma", "grad/gamma"]
    assert cli_main(["compare", str(ref_trace), str(out)]) == 1


def test_torch_replay_cli(ref_trace, tmp_path, ta, capsys):
    out = tmp_path / "r.npz"
    assert ta.main([str(ref_trace), "--out", str(out), "--steps", "2"]) == 0
    assert "replayed 2 steps" in capsys.readouterr().out
    assert read_trace(out).steps == 2


def test_compare_explains_adam_amplified_noise(ref_trace, tmp_path):
    """A parameter that differs only where its gradient is ~0 (below 1e3 * Adam's eps) is diverging but explained;
    the next step's copy of it is marked as carried over; ``param_rtol`` accepts it."""
    trace = read_trace(ref_trace)
    a, b = dict(trace.arrays), dict(trace.arrays)
    grad, after, carried = ("step0000/grad/encoder.conv1.bias", "step0000/param_after/encoder.conv1.bias",
                            "step0001/param/encoder.conv1.bias")
    for arrays, g in ((a, 1e-14), (b, -3e-14)):  # both ~0: Adam's update lr * g / (|g| + eps) differs by ~4e-9
        arrays[grad] = arrays[grad].copy()
        arrays[grad][0] = g
    b[after] = b[after].copy()
    b[after][0] += 1e-6
    b[carried] = b[after]
    save_trace(tmp_path / "a.npz", a, trace.manifest)
    save_trace(tmp_path / "b.npz", b, trace.manifest)
    result = compare_traces(tmp_path / "a.npz", tmp_path / "b.npz")
    rows = {r.key: r for r in result.rows if not r.ok}
    assert list(rows) == [after, carried]
    assert rows[after].note.startswith("Adam-amplified rounding noise: gradient agrees; differs only where |grad| < 1e-05")
    assert rows[carried].note == "carried over from step 0"
    assert compare_traces(tmp_path / "a.npz", tmp_path / "b.npz", param_rtol=1e-4).ok
    b[grad][0] = 1e-3  # a real gradient difference: no excuse offered
    save_trace(tmp_path / "b.npz", b, trace.manifest)
    first = compare_traces(tmp_path / "a.npz", tmp_path / "b.npz").first_divergence
    assert (first.key, first.note) == (grad, "")
