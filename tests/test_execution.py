"""The execution setting (refimpl/execution.py): the reference and each fast twin give the same run.

Each fast path is switched on alone on top of the reference (``--reference --PATH``) and the
two traces (refimpl/trace.py) are compared tensor by tensor: bit for bit where the twin
claims it (im2col's stride phases, the flat shifts, the decoder passes side by side, the
convolutions' backward GEMMs side by side, the elementwise lines over two halves), to a
stated tolerance where it does not (the fused decoder block, BatchNorm's fast twin, and the
default setting with every fast path). ``--reference`` reaches every plain twin: with the
fast twins patched to raise, a run trains, resumes, traces and evaluates under it. Runs made
before the setting left the run's identity (config.json with ``"fused"``) still open,
resume bit for bit, branch and are read; a run continues under another setting or backend.
"""

import dataclasses
import json

import numpy as np
import pytest

from refimpl import checkpoint as ckpt
from refimpl import kernels
from refimpl.adam import Adam
from refimpl.cli import main
from refimpl.compare import compare_traces
from refimpl.config import new_config
from refimpl.device_step import DeviceStep
from refimpl.execution import REFERENCE, Execution, FastPaths, cores
from refimpl import threads as threads_module
from refimpl.layers import BatchNorm, Conv2d, LeakyReLU
from refimpl.layers import grad_gemms as grad_gemms_module
from refimpl.layers import im2col as im2col_module
from refimpl.layers import shift as shift_module
from refimpl.layers.layer import Layer
from refimpl.layers.upsample_conv2d import UpsampleConv2d
from refimpl.trace import read_trace, write_trace
from refimpl.training import Run
from test_training import TINY_ARGS, assert_same_checkpoint

BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.cuda)]
# float64 traces of 3 steps, reference against a fast twin: measured (2026-12-06, 16x16 and 32x32 models)
# at most 3.6e-11 relative for values and gradients, 6.1e-9 for the state Adam carries (its division
# by sqrt(v) + eps amplifies rounding where a gradient is ~0: refimpl/compare.py's param_rtol)
RTOL, PARAM_RTOL = 1e-9, 1e-7
# path: (the fast path alone on top of the reference, the fast path off alone in the default setting)
BIT_FOR_BIT = {"im2col_phases": ({"im2col_phases": True}, {"im2col_phases": False}),
               "shift_flat": ({"im2col_phases": True, "shift_flat": True}, {"shift_flat": False}),
               "decoder_passes": ({"decoder_passes": "parallel"}, {"decoder_passes": "sequential"}),
               "parallel_grads": ({"parallel_grads": True}, {"parallel_grads": False}),
               "parallel_elementwise": ({"parallel_elementwise": True}, {"parallel_elementwise": False})}
# the fast path alone on top of the reference; None: every fast path (the default setting)
TO_ROUNDING = {"fused": {"fused": True}, "fused_im2col": {"fused": True, "upsample_method": "im2col"},
               "fused_col2im": {"fused": True, "upsample_method": "col2im"},
               "fused_difference": {"fused": True, "upsample_method": "difference"}, "fast_batchnorm": {"fast_batchnorm": True},
               "cuda_kernels": {"cuda_kernels": True}, "default": None}
CUPY_ONLY = ("cuda_kernels",)


class FastTwinCalled(Exception):
    pass


@pytest.fixture(autouse=True)
def split_every_map(monkeypatch):
    """parallel_elementwise splits maps of any size here (the tiny runs' maps are all below its threshold)."""
    monkeypatch.setattr(threads_module, "ELEMENTWISE_MIN_BYTES", 0)


def trace(tmp_path, name, execution, backend="numpy", dtype="float64", size=16, steps=3):
    """``steps`` traced steps of a run of ``size``x``size`` images under ``execution``, gates sampled from the
    first (both decoder passes run)."""
    config = new_config({"image_size": size, "dtype": dtype, "batch_size": 16, "hyper": {"tau": 1e3}})
    run = Run.build(config, backend, execution=execution)
    run.state.hit = True
    path = tmp_path / f"{name}.npz"
    write_trace(path, run.state, [run.next_batch() for _ in range(steps)], run.train_rng, steps)
    return read_trace(path)


def test_the_reference_and_the_default_setting():
    fast, cupy = Execution().resolve("numpy"), Execution().resolve("cupy")
    assert Execution(reference=True).resolve("numpy") == Execution(reference=True).resolve("cupy") == REFERENCE
    assert REFERENCE == FastPaths(fused=False, fast_batchnorm=False, cuda_kernels=False, im2col_phases=False,
                                  shift_flat=False, device_step=False, decoder_passes="sequential",
                                  parallel_grads=False, parallel_elementwise=False)
    assert fast == dataclasses.replace(REFERENCE, fused=True, fast_batchnorm=True, im2col_phases=True, shift_flat=True,
                                       decoder_passes="parallel", parallel_grads=cores() >= 2,
                                       parallel_elementwise=cores() >= 2)
    # the faster twins on a GPU; no threads there
    assert cupy == dataclasses.replace(fast, fused=False, cuda_kernels=True, parallel_grads=False,
                                       parallel_elementwise=False)


@pytest.mark.parametrize("switch", ["fused", "fast_batchnorm", "cuda_kernels", "im2col_phases", "shift_flat",
                                    "parallel_grads", "parallel_elementwise"])
@pytest.mark.parametrize("backend", ["numpy", "cupy"])
def test_each_fast_path_switches_off_and_on_alone(switch, backend):
    default = Execution().resolve(backend)
    assert Execution(**{switch: False}).resolve(backend) == dataclasses.replace(default, **{switch: False})
    alone = Execution(reference=True, **{switch: True}).resolve(backend)
    # the kernels exist on CuPy only; the threads on NumPy only
    on = {"cuda_kernels": backend == "cupy", "parallel_grads": backend == "numpy",
          "parallel_elementwise": backend == "numpy"}.get(switch, True)
    assert alone == dataclasses.replace(REFERENCE, **{switch: on})
    assert Execution(reference=True, decoder_passes="parallel").resolve(backend).decoder_passes == "parallel"
    assert Execution(reference=True, device_step=True).resolve(backend).device_step


@pytest.mark.parametrize("kw", [{"blas_threads": "0"}, {"decoder_passes": "both"}, {"upsample_method": "fft"},
                                {"parallel_grads": "on"}, {"fused": 2}])
def test_bad_values_are_refused(kw):
    from refimpl.optionspec import OptionError

    with pytest.raises(OptionError, match=next(iter(kw))):
        Execution(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("path", list(BIT_FOR_BIT))
def test_bit_for_bit_fast_paths_give_the_references_trace(tmp_path, path, dtype, backend):
    on, off = BIT_FOR_BIT[path]
    reference = trace(tmp_path, "reference", Execution(reference=True), backend, dtype)
    alone = trace(tmp_path, path, Execution(reference=True, **on), backend, dtype)
    assert (comparison := compare_traces(reference, alone, rtol=0, atol=0)).ok, comparison.to_table()
    # and switched off alone in the default setting (the other fast paths on)
    default, without = (trace(tmp_path, name, ex, backend, dtype)
                        for name, ex in (("default", Execution()), ("without", Execution(**off))))
    assert (comparison := compare_traces(default, without, rtol=0, atol=0)).ok, comparison.to_table()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", list(TO_ROUNDING))
def test_fast_paths_to_rounding_give_the_references_trace_within_the_tolerance(tmp_path, path, backend):
    if path in CUPY_ONLY and backend != "cupy":
        pytest.skip("a CuPy fast path")
    kw = TO_ROUNDING[path]
    execution = Execution() if kw is None else Execution(reference=True, **kw)
    reference = trace(tmp_path, "reference", Execution(reference=True), backend)
    fast = trace(tmp_path, path, execution, backend)
    assert (comparison := compare_traces(reference, fast, rtol=RTOL, param_rtol=PARAM_RTOL)).ok, comparison.to_table()
    assert not compare_traces(reference, fast, rtol=0, atol=0).ok  # the fast twin ran: other rounding


def fast_twins():
    """Every fast twin, and the places only a fast path reaches, as (owner, attribute)."""
    return [(im2col_module, "_im2col_phases"), (im2col_module, "_col2im_phases"), (shift_module, "shift_flat"),
            (BatchNorm, "_forward_fast"), (BatchNorm, "_backward_fast"), (BatchNorm, "_forward_cuda"),
            (BatchNorm, "_backward_cuda"), (Adam, "_update_cuda"), (UpsampleConv2d, "__init__"),
            (Layer, "twin"),  # the E1 decoder pass beside the E2 pass runs on a twin of the decoder
            (grad_gemms_module, "grad_gemms_side_by_side"), (grad_gemms_module, "grouped_grad_gemms_side_by_side"),
            (shift_module, "difference_flat"), (shift_module, "add_difference_transpose_flat"),
            (threads_module, "in_halves"), (LeakyReLU, "_forward_in_halves"), (LeakyReLU, "_backward_in_halves"),
            (DeviceStep, "__call__"),
            *((kernels, name) for name in ("adam_update", "im2col", "col2im", "batchnorm_running_update",
                                           "batchnorm_inv_std", "batchnorm_normalize", "batchnorm_backward"))]


@pytest.fixture
def fast_twins_raise(monkeypatch):
    def refuse(*args, **kwargs):
        raise FastTwinCalled

    for owner, name in fast_twins():
        monkeypatch.setattr(owner, name, refuse)


def test_reference_reaches_only_plain_twins(tmp_path, fast_twins_raise):
    """train, resume, trace and evaluate --reference with every fast twin raising: nothing is chosen outside
    the resolution (no layer, Adam or step takes a fast path the setting did not)."""
    run = ["train", *TINY_ARGS, "--tau", "40", "--dtype", "float64", "--quiet", "--out", str(tmp_path / "run")]
    assert main([*run, "--batches", "4", "--reference"]) == 0
    assert main([*run, "--batches", "6", "--resume", "--reference"]) == 0
    assert main(["trace", *TINY_ARGS, "--tau", "40", "--steps", "2", "--force-hit", "--reference",
                 "--out", str(tmp_path / "t.npz")]) == 0
    assert main(["evaluate", str(tmp_path / "run"), "--limit", "8", "--reference"]) == 0
    built = Run.load(tmp_path / "run", for_training=False, execution=Execution(reference=True))
    for name, layer in [("", built.model), *named_layers(built.model)]:
        assert getattr(layer, "paths", REFERENCE) == REFERENCE, name
    assert built.state.optimizer.update == built.state.optimizer._update
    with pytest.raises(FastTwinCalled):  # the same run under the default setting reaches the fast twins
        main([*run, "--batches", "8", "--resume"])


def named_layers(layer, prefix=""):
    for name, child in layer.children():
        yield prefix + name, child
        yield from named_layers(child, f"{prefix}{name}.")


def test_each_layer_holds_the_setting_it_was_built_with():
    run = Run.build(new_config({"image_size": 16, "hyper": {"tau": 4.0}}), execution=Execution(fast_batchnorm=False))
    layers = dict(named_layers(run.model))
    assert run.paths == dataclasses.replace(Execution().resolve("numpy"), fast_batchnorm=False)
    assert all(layer.paths is run.paths for layer in layers.values() if isinstance(layer, (BatchNorm, Conv2d,
                                                                                          UpsampleConv2d)))
    assert isinstance(layers["decoder.conv1"], UpsampleConv2d)
    assert layers["decoder.conv1"].shift is shift_module.shift_flat
    assert run.state.optimizer.update == run.state.optimizer._update  # NumPy: Adam's plain lines


def legacy(folder, fused: bool):
    """Make run folder ``folder`` look as one made before the fast paths left the run: ``"fused"`` in its
    config.json and in its checkpoint's configuration."""
    config = json.loads((folder / "config.json").read_text())
    config["config"]["fused"] = fused
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    arrays, meta = ckpt.load(folder / "checkpoint.npz")
    meta["config"]["fused"] = fused
    ckpt.save(folder / "checkpoint.npz", arrays, meta)


def test_a_legacy_run_folder_resumes_bit_for_bit_branches_and_is_read(tmp_path, capsys):
    args = ["train", *TINY_ARGS, "--tau", "40", "--quiet"]
    assert main([*args, "--batches", "6", "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--batches", "3", "--out", str(tmp_path / "old")]) == 0
    legacy(tmp_path / "old", True)
    assert main(["train", "--out", str(tmp_path / "old"), "--resume", "--batches", "6", "--quiet"]) == 0
    assert_same_checkpoint(tmp_path / "whole" / "checkpoint.npz", tmp_path / "old" / "checkpoint.npz")
    assert json.loads((tmp_path / "old" / "config.json").read_text())["config"]["fused"] is True  # left as it was
    assert main(["train", "--from", str(tmp_path / "old"), "--out", str(tmp_path / "branch"), "--batches", "8",
                 "--lr", "0.002", "--quiet"]) == 0
    assert main(["evaluate", str(tmp_path / "old"), "--limit", "8"]) == 0
    assert main(["milestones", str(tmp_path / "old")]) == 0
    assert main(["study", str(tmp_path / "old"), str(tmp_path / "branch")]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("setting", [["--reference"], ["--no-fused"], ["--fused"]])
def test_a_run_continues_under_another_setting(tmp_path, setting):
    """NumPy fused -> --reference (or the other decoder blocks): the run continues, to the twins' rounding."""
    args = ["train", *TINY_ARGS, "--tau", "40", "--dtype", "float64", "--quiet"]
    assert main([*args, "--batches", "6", "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--batches", "3", "--no-fused", "--out", str(tmp_path / "part")]) == 0
    legacy(tmp_path / "part", False)  # a run the plain pair made, resumed under another setting
    assert main(["train", "--out", str(tmp_path / "part"), "--resume", "--batches", "6", "--quiet", *setting]) == 0
    whole, part = (ckpt.load(tmp_path / r / "checkpoint.npz")[0] for r in ("whole", "part"))
    for key in whole:
        np.testing.assert_allclose(part[key], whole[key], rtol=PARAM_RTOL, atol=1e-12, err_msg=key)


@pytest.mark.cuda
@pytest.mark.parametrize("setting", [[], ["--reference"]])
def test_a_numpy_run_continues_on_cupy(tmp_path, setting):
    args = ["train", *TINY_ARGS, "--tau", "40", "--dtype", "float64", "--quiet"]
    assert main([*args, "--batches", "6", "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--batches", "3", "--out", str(tmp_path / "part")]) == 0
    legacy(tmp_path / "part", True)  # NumPy's fused layer; CuPy continues on its own default (the pair) or plain
    assert main(["train", "--out", str(tmp_path / "part"), "--resume", "--batches", "6", "--quiet", "--backend", "cupy",
                 *setting]) == 0
    whole, part = (ckpt.load(tmp_path / r / "checkpoint.npz")[0] for r in ("whole", "part"))
    for key in whole:
        np.testing.assert_allclose(part[key], whole[key], rtol=PARAM_RTOL, atol=1e-12, err_msg=key)
