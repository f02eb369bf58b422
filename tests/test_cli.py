"""The refimpl command line end to end on a tiny model: train, evaluate, export, reconstruct,
one-line errors with the right exit codes, Ctrl-C, resume checks."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

from refimpl import checkpoint as ckpt
from refimpl.algorithm1 import OPTIONS, Hyper
from refimpl.backend import to_host
from refimpl.cli import build_parser, main
from refimpl.evaluate import load_export, spread_indices
from refimpl.runlog import read_log
from refimpl.training import Run

TINY = ["--image-size", "8", "--channels", "2", "--batch-size", "8", "--latent", "4", "--holdout", "16", "--quiet"]


def refimpl(*args, cwd=None, env=None):
    """``python -m refimpl ARGS`` in a subprocess: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "refimpl", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of 20 batches made through the CLI (in-process)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--tau", "40", "--batches", "20", "--checkpoint-every", "8", "--out", str(out)]) == 0
    return out


def test_train_writes_the_run_folder(trained):
    from refimpl.figures import pyplot

    plotted = ["plot.png"] if pyplot() is not None else []
    assert sorted(p.name for p in trained.iterdir()) == sorted(["checkpoint.npz", "config.json", "log.csv",
                                                                "sessions.jsonl", "summary.json", *plotted])  # the lock is gone
    cols = read_log(trained / "log.csv")
    assert cols["step"] == list(range(1, 21))
    for key in ("E2", "tau", "gates_l1", "lambda_eff", "hit_fraction", "open_gates", "E1", "C", "C_ma", "loss",
                "kl", "lambda_raw", "hit", "l0_added", "seconds"):
        assert key in cols
    meta = ckpt.load(trained / "checkpoint.npz")[1]
    assert meta["step"] == 20 and meta["config"]["hyper"]["tau"] == 40.0
    assert meta["config"]["image_size"] == 8 and meta["config"]["channels"] == [2]


def test_python_m_refimpl_and_default_out(tmp_path):
    code, out, err = refimpl("train", *TINY, "--batches", "3", cwd=tmp_path)
    assert code == 0, err
    run = tmp_path / "runs" / "synthetic-dsprites-s8-n4-tau0.46875-seed0"  # tau 30 scaled by (8/64)^2
    assert (run / "checkpoint.npz").is_file() and str(run.relative_to(tmp_path)) in out
    assert read_log(run / "log.csv")["tau"] == [0.46875] * 3


def test_every_hyper_field_is_an_option():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    options = {s for a in train._actions for s in a.option_strings}
    for f in dataclasses.fields(Hyper):
        assert f"--{f.name.replace('_', '-')}" in options
        assert f"--{f.name}" in options
    for name, choices in OPTIONS.items():
        action = next(a for a in train._actions if a.dest == name)
        assert tuple(action.choices) == choices


def test_hyper_options_reach_the_run(tmp_path):
    out = tmp_path / "r"
    code = main(["train", *TINY, "--tau", "12", "--batches", "2", "--out", str(out), "--lambda-max", "3",
                 "--lambda_min", "0.001", "--error", "l2", "--betas", "0.8,0.99", "--gate-samples", "per_example"])
    assert code == 0
    run = Run.load(out, for_training=False)
    h = run.hyper
    assert (h.tau, h.lambda_max, h.lambda_min, h.error, h.betas, h.gate_samples) == (
        12.0, 3.0, 0.001, "l2", (0.8, 0.99), "per_example")
    assert run.state.optimizer.betas == (0.8, 0.99)


def test_evaluate_prints_and_writes_json(trained, capsys):
    assert main(["evaluate", str(trained), "--limit", "10", "--batch-size", "4"]) == 0
    result = json.loads((trained / "eval.json").read_text())
    printed = capsys.readouterr().out
    run = Run.load(trained, for_training=False)
    assert result["heldout_images"] == 10 and result["step"] == 20
    assert result["open_gates"] == run.model.open_gates() == sum(result["gates"])
    assert result["heldout_sse"] > 0 and result["heldout_sse_all_gates_open"] > 0
    assert f"{result['open_gates']}/4" in printed and "held-out error" in printed
    # the error is the mean summed squared error of the held-out images' inference reconstructions
    x = run.images(run.split[1][:10])
    expected = ((run.model.reconstruct(x) - x) ** 2).reshape(10, -1).sum(axis=1).mean()
    assert result["heldout_sse"] == pytest.approx(float(expected), rel=1e-5)


def test_export_is_the_pruned_model(trained, tmp_path):
    run = Run.load(trained, for_training=False)
    gamma = run.model.params["gamma"]
    gamma[[1, 3]] = -0.5  # close two gates, as training would
    run.out = tmp_path / "closed"
    run.out.mkdir()
    run.save_checkpoint()
    assert main(["export", str(run.out)]) == 0
    model, meta = load_export(run.out / "export")
    assert meta["n_latent"] == 2 and meta["kept_dimensions"] == [0, 2] and meta["original_n_latent"] == 4
    assert "gamma" not in model.params and model.n_latent == 2
    x = run.images(run.split[1][:6])
    numpy.testing.assert_allclose(to_host(model.reconstruct(x)), to_host(run.model.reconstruct(x)), rtol=1e-5, atol=1e-6)
    # model.safetensors: the same state dict, for PyTorch, JAX and others
    from safetensors import safe_open
    from safetensors.numpy import load_file

    tensors = load_file(run.out / "export" / "model.safetensors")
    with numpy.load(run.out / "export" / "model.npz") as npz:
        assert sorted(tensors) == sorted(npz.files) == sorted(model.state_dict())
        for name in npz.files:
            assert tensors[name].dtype == npz[name].dtype and numpy.array_equal(tensors[name], npz[name]), name
    with safe_open(run.out / "export" / "model.safetensors", "np") as f:
        assert f.metadata()["kept_dimensions"] == "0,2" and f.metadata()["n_latent"] == "2"


def test_export_loads_into_the_torch_transcription(trained, tmp_path):
    """model.safetensors loaded with safetensors.torch into bench/torch_algorithm1.py's model gives refimpl's outputs."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import torch_algorithm1 as ta

    assert main(["export", str(trained), "--out", str(tmp_path / "e")]) == 0
    model, meta = load_export(tmp_path / "e")
    state = load_file(tmp_path / "e" / "model.safetensors")
    theirs = ta.GatedVAE(meta["architecture"], meta["n_latent"], dtype=torch.float32)
    theirs.load_arrays({**{k: v.numpy() for k, v in state.items()}, "gamma": numpy.ones(meta["n_latent"])})
    theirs.eval()
    run = Run.load(trained, for_training=False)
    x = run.images(run.split[1][:6])
    with torch.no_grad():
        mu = theirs.encoder(torch.from_numpy(to_host(x)))[:, : meta["n_latent"]]
        recon = theirs.decoder(mu).numpy()
    numpy.testing.assert_allclose(recon, to_host(model.reconstruct(x)), rtol=1e-4, atol=1e-5)


def grid_size(image):
    """(width, height) of the image grid in the bottom-right corner of a titled, labelled PNG: its
    gray padding (128) runs along the bottom row and the right column, the margins are white."""
    a = numpy.asarray(image)

    def trailing_gray(line):
        return len(line) - max((i + 1 for i, v in enumerate(line) if v != 128), default=0)

    return trailing_gray(a[-1]), trailing_gray(a[:, -1])


def ink(block) -> bool:
    return bool((numpy.asarray(block) < 100).any())


def test_reconstruct_writes_a_titled_labelled_grid(trained, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["reconstruct", str(trained), "--count", "5", "--scale", "3", "--out", str(out)]) == 0
    image = Image.open(out)
    w, h = grid_size(image)
    assert (w, h) == (3 * (5 * (8 + 2) + 2), 3 * (2 * (8 + 2) + 2)) and image.mode == "L"
    assert image.width > w and image.height > h  # a column of row labels, a title
    pixels = numpy.asarray(image)
    left, top = image.width - w, image.height - h
    assert ink(pixels[:top])  # the title
    for row in range(2):  # "original" beside the first row, "reconstruction" beside the second
        assert ink(pixels[top + 3 * (2 + row * 10):top + 3 * (10 + row * 10), :left])
    assert capsys.readouterr().out.startswith("5 originals over their reconstructions with 4/4 gates open, step 20: ")
    run = Run.load(trained, for_training=False)
    held, trained_on = [int(i) for i in run.split[1][:2]], [int(i) for i in run.split[0][:3]]
    capsys.readouterr()
    assert main(["reconstruct", str(trained), "--indices", ",".join(map(str, trained_on + held)),
                 "--out", str(out)]) == 0
    assert grid_size(Image.open(out)) == (16 * (5 * 10 + 2), 16 * 22)  # default scale 128 // 8
    printed = capsys.readouterr().out
    assert f"held out (never trained on): {', '.join(map(str, held))}" in printed
    assert f"trained on: {', '.join(map(str, trained_on))}" in printed


def test_reconstruct_wraps_rows_and_caps_the_count(trained, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["reconstruct", str(trained), "--count", "40", "--scale", "1", "--out", str(out)]) == 0
    # 16 held-out images (the run's --holdout): one row pair of 16
    assert grid_size(Image.open(out)) == (16 * 10 + 2, 2 * 10 + 2)
    assert main(["reconstruct", str(trained), "--indices", ",".join(map(str, range(40))), "--scale", "1",
                 "--out", str(out)]) == 0
    assert grid_size(Image.open(out)) == (16 * 10 + 2, 6 * 10 + 2)  # 16 + 16 + 8: three row pairs
    assert "40 originals over their reconstructions (rows of 16) with" in capsys.readouterr().out
    assert main(["reconstruct", str(trained), "--count", "5000", "--out", str(tmp_path / "big.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "refimpl reconstruct: error: --count: 5000 images; at most 256 fit one PNG (16 to a row): ask for fewer"
    assert not (tmp_path / "big.png").exists()


def test_reconstruct_several_runs_is_figure3s_grid(trained, tmp_path, capsys):
    """Originals, then one row per run, same images; the runs must share dataset and size; --out is required."""
    from PIL import Image

    second = tmp_path / "second"
    assert main(["train", *TINY, "--tau", "1", "--batches", "3", "--out", str(second)]) == 0
    one, two = Run.load(trained, for_training=False), Run.load(second, for_training=False)
    out = tmp_path / "fig3.png"
    capsys.readouterr()
    assert main(["reconstruct", str(trained), str(second), "--count", "6", "--scale", "1", "--out", str(out)]) == 0
    png = Image.open(out)
    assert grid_size(png) == (6 * 10 + 2, 3 * 10 + 2)  # three rows of 6
    image = numpy.asarray(png, dtype=float)[-(3 * 10 + 2):, -(6 * 10 + 2):] / 255
    assert ink(numpy.asarray(png)[:, :png.width - image.shape[1]])  # the rows' labels
    indices = spread_indices(one.split[1], 6)
    cells = [image[2 + 10 * r: 10 + 10 * r, 2:10] for r in range(3)]  # the first image of each row
    expected = [to_host(one.images(indices[:1]))[0, 0], to_host(one.model.reconstruct(one.images(indices[:1])))[0, 0],
                to_host(two.model.reconstruct(two.images(indices[:1])))[0, 0]]
    for cell, want in zip(cells, expected):
        numpy.testing.assert_allclose(cell, want, atol=1 / 255 + 1e-9)
    printed = capsys.readouterr().out
    assert f"row 2: {trained}: tau 40, " in printed and f"row 3: {second}: tau 1, " in printed

    assert main(["reconstruct", str(trained), str(second), "--count", "6"]) == 2
    assert "--out: several runs need an output file" in capsys.readouterr().err
    assert main(["reconstruct", str(trained), str(second), "--count", "17", "--out", str(out)]) == 2
    assert "at most 16" in capsys.readouterr().err
    other = tmp_path / "other"
    assert main(["train", "--image-size", "16", "--channels", "2,2", *TINY[4:], "--tau", "1", "--batches", "1",
                 "--out", str(other)]) == 0
    assert main(["reconstruct", str(trained), str(other), "--out", str(out)]) == 2
    assert "one dataset and size per grid" in capsys.readouterr().err


def test_image_grid_labels_each_column():
    import numpy

    from refimpl.evaluate import image_grid

    images = numpy.zeros((3, 1, 8, 8))
    plain = image_grid([images], scale=4)
    labelled = image_grid([images], scale=4, labels=["original", "tau 0.5\n10 open", "tau 8\n1 open"])
    assert labelled.width == plain.width and labelled.height > plain.height
    strip = numpy.asarray(labelled)[plain.height:]
    for j in range(3):  # every column's label has ink
        assert (strip[:, j * 40:(j + 1) * 40] < 128).any()


def test_progress_prints_plain_lines_when_not_on_a_terminal():
    import io

    pytest.importorskip("tqdm")
    from refimpl.console import Progress

    class File(io.StringIO):
        def isatty(self):
            return False

    out = File()
    bar = Progress(total=3, initial=0, n_latent=4, interval=0.0, stream=out)
    assert bar.bar is None
    for step in (1, 2, 3):
        bar.update({"step": step, "E2": 1.0, "open_gates": 4, "lambda_eff": 1.0, "hit_fraction": 0.5}, tau=2.0)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and [line.split()[1] for line in text.splitlines()] == ["1/3", "2/3", "3/3"]


@pytest.mark.parametrize("option,fragment", [
    (["--gamma-init", "1e308"], "gamma_init=1e+308: beyond float32's largest value 3.403e+38"),
    (["--tau", "1e308"], "tau=1e+308: beyond float32's largest value"),
    (["--k", "1e300"], "k=1e+300: beyond float32's largest value"),
    (["--k", "1e38", "--gamma-init", "10"], "k * gamma_init = 1e+39: beyond float32's largest value"),
    (["--lambda-init", "1e30"], "lambda' = softplus(lambda)^2 = 1e+30^2 is beyond float32's largest value"),
    (["--adam-eps", "1e-50"], "adam_eps=1e-50: rounds to 0 in float32"),
    (["--dtype", "float64", "--lambda-init", "1e200"], "softplus(lambda)^2 = 1e+200^2 is beyond float64's"),
    (["--lambda-init", "1e6", "--lambda-init-on", "effective"], "at most 490000"),
])
def test_floats_beyond_the_dtype_are_refused_without_warnings(option, fragment, tmp_path, capsys):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # -W error: any RuntimeWarning would end the command with a traceback
        code = main(["train", *TINY, "--batches", "2", "--out", str(tmp_path / "r"), *option])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "r").exists()


def test_errors_from_the_environment_and_files(tmp_path):
    code, _, err = refimpl("train", "--out", tmp_path / "r", env={"REFIMPL_BACKEND": "tpu"})
    assert code == 1 and err.strip() == "refimpl train: error: $REFIMPL_BACKEND='tpu': expected one of numpy, cupy"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.npz").write_bytes(b"garbage")
    code, _, err = refimpl("evaluate", tmp_path / "bad")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "not a .npz file (a zip archive of arrays): it holds text" in err
    assert "Traceback" not in err


def test_existing_run_and_resume_checks(trained, capsys):
    assert main(["train", "--out", str(trained), "--resume", "--tau", "30", "--latent", "4"]) == 2
    err = capsys.readouterr().err
    assert "tau=30.0 (the run has 40.0)" in err and "latent" not in err  # an unchanged option is fine
    assert main(["train", "--out", str(trained), "--resume", "--batches", "10"]) == 2
    assert "already done 20" in capsys.readouterr().err


def test_resume_without_batches_continues_to_the_runs_target(tmp_path):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--tau", "40", "--batches", "9", "--out", str(out)]) == 0
    # pretend the run was stopped at step 9 of a 14-batch target
    arrays, meta = ckpt.load(out / "checkpoint.npz")
    ckpt.save(out / "checkpoint.npz", arrays, {**meta, "target_batches": 14})
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert read_log(out / "log.csv")["step"] == list(range(1, 15))


def test_a_diverging_run_stops_with_one_line(tmp_path):
    out = tmp_path / "r"
    code, _, err = refimpl("train", *TINY, "--tau", "40", "--batches", "50", "--checkpoint-every", "1", "--lr", "1e10",
                           "--out", out, env={"PYTHONWARNINGS": "error::RuntimeWarning"})
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err  # no RuntimeWarning before it
    last = err.strip()
    assert last.startswith("refimpl train: error: non-finite loss at step ") and "last good checkpoint" in last
    step = int(last.split("at step ")[1].split()[0])
    meta = ckpt.load(out / "checkpoint.npz")[1]
    assert meta["step"] == step - 1
    assert "Traceback" not in err


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_ctrl_c_and_sigterm_save_and_exit(tmp_path, sig, code):
    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "refimpl", "train", *TINY, "--tau", "40", "--batches", "100000",
                             "--checkpoint-every", "100000", "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ((out / "log.csv").exists() and len((out / "log.csv").read_text().splitlines()) > 5):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    step = ckpt.load(out / "checkpoint.npz")[1]["step"]
    assert step > 5 and read_log(out / "log.csv")["step"] == list(range(1, step + 1))
    assert f"{sig.name} at step {step}; checkpoint saved" in err and "--resume" in err and "Traceback" not in err


@pytest.mark.cuda
def test_train_resume_evaluate_on_cupy(tmp_path):
    out = tmp_path / "gpu"
    assert main(["train", *TINY, "--tau", "40", "--batches", "6", "--backend", "cupy", "--out", str(out)]) == 0
    assert main(["train", "--out", str(out), "--resume", "--batches", "9", "--backend", "cupy", "--quiet"]) == 0
    arrays, meta = ckpt.load(out / "checkpoint.npz")
    assert meta["step"] == 9 and meta["timing"]["backend"] == "cupy"
    assert all(type(a) is numpy.ndarray for a in arrays.values())  # host arrays on disk
    assert main(["evaluate", str(out), "--limit", "8", "--backend", "cupy"]) == 0
    assert json.loads((out / "eval.json").read_text())["heldout_images"] == 8
    # the same checkpoint continues on NumPy, with NumPy's default decoder blocks (the fused layer; the pair on cupy)
    assert "fused" not in json.loads((out / "config.json").read_text())["config"]
    assert main(["train", "--out", str(out), "--resume", "--batches", "10", "--backend", "numpy", "--quiet"]) == 0


@pytest.mark.parametrize("flag, fused", [([], True), (["--fused"], True), (["--no-fused"], False)])
def test_the_decoder_blocks_are_not_part_of_the_run(tmp_path, flag, fused):
    """numpy defaults to the fused upsample+conv layer, --no-fused builds the plain pair; config.json holds
    neither, and the run resumes under either (the execution setting, refimpl/execution.py)."""
    from refimpl.execution import Execution
    from refimpl.layers.upsample_conv2d import UpsampleConv2d

    out = tmp_path / "run"
    assert main(["train", *TINY, "--tau", "40", "--batches", "2", "--backend", "numpy", *flag, "--out", str(out)]) == 0
    assert "fused" not in json.loads((out / "config.json").read_text())["config"]
    for setting in (True, False):
        model = Run.load(out, for_training=False, execution=Execution(fused=setting)).model
        assert any(isinstance(layer, UpsampleConv2d) for _, layer in model.decoder.children()) is setting
    flipped = "--fused" if not fused else "--no-fused"
    assert main(["train", "--out", str(out), "--resume", "--batches", "4", flipped, "--quiet"]) == 0
    assert ckpt.load(out / "checkpoint.npz")[1]["step"] == 4


def test_trace_and_compare_are_wired(tmp_path, capsys):
    pytest.importorskip("refimpl.trace")
    pytest.importorskip("refimpl.compare")
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    tiny = [o for o in TINY if o != "--quiet"]
    assert main(["trace", *tiny, "--tau", "40", "--steps", "2", "--dtype", "float64", "--out", str(a)]) == 0
    assert main(["trace", *tiny, "--tau", "40", "--steps", "2", "--dtype", "float64", "--out", str(b)]) == 0
    assert main(["compare", str(a), str(b)]) == 0  # the same run traced twice agrees bit for bit
    capsys.readouterr()
    assert main(["compare", str(a), str(tmp_path / "missing.npz")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refimpl compare: error:")


def test_baseline_and_float64_runs(tmp_path):
    assert main(["train", *TINY, "--baseline", "--batches", "3", "--dtype", "float64", "--out", str(tmp_path / "b")]) == 0
    arrays, meta = ckpt.load(tmp_path / "b" / "checkpoint.npz")
    assert meta["config"]["baseline"] and meta["config"]["hyper"]["tau"] == 0.0 and not meta["hit"]
    assert arrays["model/encoder.fc2.weight"].dtype == numpy.float64 and arrays["lambda"].dtype == numpy.float64
    cols = read_log(tmp_path / "b" / "log.csv")
    assert set(cols["tau"]) == {0.0} and set(cols["hit"]) == {0} and set(cols["open_gates"]) == {4}


def test_docs_option_table_is_generated_from_the_fields():
    """One home for each option: docs/cli.md's table is `python -m refimpl.options` of the dataclasses."""
    from pathlib import Path

    from refimpl.config import RunConfig, Schedule
    from refimpl.options import markdown_table

    cli = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    block = cli.split("<!-- options:begin -->\n", 1)[1].split("\n<!-- options:end -->", 1)[0]
    assert block == markdown_table(RunConfig, Schedule, Hyper)
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    for row in block.splitlines()[3:]:  # every option of the table exists in refimpl train
        flag = row.split("`")[1].split()[0]
        assert flag in flags, flag


def test_ci_runs_the_readmes_test_command():
    """.ci/run's first step is the README's second command, character for character."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    block = (root / "README.md").read_text().split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert ci[ci.index("# README test command (keep identical to the README's second command):") + 1] == commands[1]
