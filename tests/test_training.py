"""The run loop: architecture scaling, the log, checkpoints, resume bit for bit (also after a
real SIGKILL), non-finite losses, SIGINT, baseline runs."""

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
from refimpl import console, training
from refimpl.algorithm1 import Hyper
from refimpl.atomic import atomic_write
from refimpl.backend import to_host
from refimpl.config import RunConfig, config_differences
from refimpl.data.base import downsample
from refimpl.model import build_architecture
from refimpl.runlog import CsvLog, moving_average, read_log, verify_log
from refimpl.training import NonFiniteLoss, Run, TrainingInterrupted, stream

# A tiny run: 8x8 images (one conv), 2 channels, batch 8: a step takes a few milliseconds.
TINY = dict(image_size=8, channels=(2,), batch_size=8, latent=4, holdout=16)
TINY_ARGS = ["--image-size", "8", "--channels", "2", "--batch-size", "8", "--latent", "4", "--holdout", "16"]


def tiny_config(tau=40.0, hyper=None, **kw):
    return RunConfig(**{**TINY, **kw}, hyper={"tau": tau, **(hyper or {})})


def checkpoint_state(path):
    """Every array and the meta (without wall-clock timing) of a checkpoint."""
    arrays, meta = ckpt.load(path)
    meta.pop("timing")
    return arrays, meta


def assert_same_checkpoint(a, b):
    arrays_a, meta_a = checkpoint_state(a)
    arrays_b, meta_b = checkpoint_state(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        assert arrays_a[name].dtype == arrays_b[name].dtype, name
        assert arrays_a[name].tobytes() == arrays_b[name].tobytes(), name
    assert meta_a == meta_b


def log_without_time(path):
    lines = Path(path).read_text().splitlines()
    header = lines[0].split(",")
    i = header.index("seconds")
    return [",".join(c for j, c in enumerate(line.split(",")) if j != i) for line in lines]


# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,convs", [(8, 1), (16, 2), (32, 3), (128, 5)])
def test_build_architecture_scales_to_smaller_and_larger_images(size, convs):
    arch = build_architecture((3, size, size))
    assert len(arch.encoder_convs) == convs and len(arch.decoder_convs) == convs
    assert arch.encoder_feature_shape()[1:] == (4, 4)
    assert arch.decoder_output_shape() == (3, size, size)
    widths = tuple(s.channels for s in arch.encoder_convs)
    assert tuple(s.channels for s in arch.decoder_convs) == tuple(reversed(widths))[1:] + (3,)


def test_build_architecture_rejects_bad_sizes_and_widths():
    with pytest.raises(ValueError, match="image size 24"):
        build_architecture((1, 24, 24))
    with pytest.raises(ValueError, match="expected 2 positive widths"):
        build_architecture((1, 16, 16), channels=(4, 4, 4))
    with pytest.raises(ValueError, match="square"):
        build_architecture((1, 16, 32))


def test_downsample_is_the_block_mean():
    x = numpy.arange(2 * 3 * 8 * 8, dtype=numpy.float64).reshape(2, 3, 8, 8) ** 1.5
    y = downsample(x, 4)
    assert y.shape == (2, 3, 2, 2)
    for i in range(2):
        for j in range(2):
            numpy.testing.assert_allclose(y[:, :, i, j], x[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean(axis=(2, 3)))
    assert downsample(x, 1) is x


def test_streams_are_reproducible_and_distinct():
    draws = {name: stream(7, name).random(4) for name in training.STREAMS}
    for name in training.STREAMS:
        assert numpy.array_equal(draws[name], stream(7, name).random(4))
    values = [tuple(v) for v in draws.values()]
    assert len(set(values)) == len(values)
    assert not numpy.array_equal(stream(8, "train").random(4), draws["train"])
    with pytest.raises(ValueError, match="stream"):
        stream(0, "weights")


def test_moving_average_matches_the_recurrence():
    v = [3.0, 1.0, 4.0, 1.0, 5.0]
    m = v[0]
    for x in v[1:]:
        m = 0.95 * m + 0.05 * x
    assert moving_average(v, 0.95) == pytest.approx(m, rel=1e-15)
    assert numpy.isnan(moving_average([]))


def test_verify_log_drops_later_and_torn_rows(tmp_path):
    path = tmp_path / "log.csv"
    log = CsvLog(path)
    for step in range(1, 11):
        log.write({"step": step, "E2": step / 3, "hit": step % 2 == 0})
    log.close()
    with open(path, "a") as f:
        f.write("11,3.6")  # a row cut short by a kill
    assert verify_log(path, 6) == []
    cols = read_log(path)
    assert cols["step"] == [1, 2, 3, 4, 5, 6]
    assert cols["E2"] == [s / 3 for s in range(1, 7)]  # repr round-trips floats exactly
    assert cols["hit"] == [0, 1, 0, 1, 0, 1]
    assert CsvLog(path).columns == ["step", "E2", "hit"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_checkpoint_load_rejects_non_checkpoints(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ckpt.CheckpointError, match=r"junk.npz: not a .npz file \(a zip archive of arrays\): it holds text"):
        ckpt.load(tmp_path / "junk.npz")
    numpy.savez(tmp_path / "plain.npz", a=numpy.zeros(2))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "plain.npz").read_bytes()[:60])
    with pytest.raises(ckpt.CheckpointError, match="cut.npz: not a .npz file .*: a zip archive cut short or damaged"):
        ckpt.load(tmp_path / "cut.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="it is empty"):
        ckpt.load(tmp_path / "empty.npz")
    with pytest.raises(ckpt.CheckpointError, match="no 'meta'"):
        ckpt.load(tmp_path / "plain.npz")


def test_run_writes_log_checkpoint_summary(tmp_path):
    run = Run.create(tiny_config(), tmp_path / "r")
    summary = run.train(12, checkpoint_every=5, progress=False)
    cols = read_log(tmp_path / "r" / "log.csv")
    assert cols["step"] == list(range(1, 13))
    for key in ("E1", "E2", "C", "C_ma", "lambda_eff", "lambda_raw", "loss", "kl", "gates_l1", "open_gates",
                "hit_fraction", "hit", "l0_added", "tau", "seconds"):
        assert key in cols, key
    assert set(cols["tau"]) == {40.0}
    arrays, meta = ckpt.load(tmp_path / "r" / "checkpoint.npz")
    assert meta["step"] == 12 and meta["adam_t"] == 12 and meta["target_batches"] == 12
    assert meta["c_ma"] == run.state.c_ma and meta["hit"] == run.state.hit
    numpy.testing.assert_array_equal(arrays["model/gamma"], to_host(run.model.params["gamma"]))
    assert set(k[len("adam/m/"):] for k in arrays if k.startswith("adam/m/")) == set(run.state.optimizer.params)
    assert summary["step"] == 12 and summary["E2_last"] == cols["E2"][-1]
    assert summary["E2_ma95"] == pytest.approx(moving_average(cols["E2"]), rel=1e-12)
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["open_gates"] == summary["open_gates"]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["latent"] == 4


def test_create_refuses_an_existing_run_unless_overwrite(tmp_path):
    Run.create(tiny_config(), tmp_path / "r").train(2, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        Run.create(tiny_config(), tmp_path / "r")
    run = Run.create(tiny_config(), tmp_path / "r", overwrite=True)
    assert run.state.step == 0 and not (tmp_path / "r" / "log.csv").exists()


def test_resume_in_process_is_bit_identical(tmp_path):
    Run.create(tiny_config(), tmp_path / "a").train(30, checkpoint_every=7, progress=False)
    first = Run.create(tiny_config(), tmp_path / "b")
    first.train(13, checkpoint_every=7, progress=False)
    resumed = Run.load(tmp_path / "b")
    assert resumed.state.step == 13
    resumed.train(30, checkpoint_every=7, progress=False)
    assert_same_checkpoint(tmp_path / "a" / "checkpoint.npz", tmp_path / "b" / "checkpoint.npz")
    assert log_without_time(tmp_path / "a" / "log.csv") == log_without_time(tmp_path / "b" / "log.csv")
    # gates were sampled in this run, so the u draws were part of what had to continue
    assert read_log(tmp_path / "a" / "log.csv")["hit"][-1] == 1


def test_resume_keeps_adams_per_parameter_step_counts(tmp_path):
    """With adam_steps="per_parameter" gamma's count lags the global one until the first hit;
    the checkpoint keeps every count, so a resumed run still ends bit for bit the same."""
    if "adam_steps" not in {f.name for f in dataclasses.fields(Hyper)}:
        pytest.skip("Hyper has no adam_steps")
    config = lambda: tiny_config(tau=11.35, hyper={"adam_steps": "per_parameter"})  # first hit at step 28  # noqa: E731
    Run.create(config(), tmp_path / "a").train(40, progress=False)
    Run.create(config(), tmp_path / "b").train(20, progress=False)
    meta = ckpt.load(tmp_path / "b" / "checkpoint.npz")[1]
    assert meta["adam_steps"]["gamma"] < meta["adam_t"]  # gamma had no gradient on the first steps
    Run.load(tmp_path / "b").train(40, progress=False)
    assert_same_checkpoint(tmp_path / "a" / "checkpoint.npz", tmp_path / "b" / "checkpoint.npz")


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """A real kill: the training process gets SIGKILL after its second checkpoint and a few
    more logged steps; the resumed run ends bit-identical to an uninterrupted one."""
    args = [sys.executable, "-m", "refimpl", "train", *TINY_ARGS, "--tau", "40", "--checkpoint-every", "10",
            "--quiet"]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    proc = subprocess.Popen(args + ["--out", str(killed), "--batches", "100000"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    log = killed / "log.csv"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            meta_step = 0
            if (killed / "checkpoint.npz").exists():
                try:
                    meta_step = ckpt.load(killed / "checkpoint.npz")[1]["step"]
                except ckpt.CheckpointError:
                    meta_step = 0
            rows = len(log.read_text().splitlines()) - 1 if log.exists() else 0
            if meta_step >= 20 and rows >= meta_step + 3:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = ckpt.load(killed / "checkpoint.npz")[1]["step"]
    rows_at_kill = len(log.read_text().splitlines()) - 1
    assert rows_at_kill > killed_at  # rows after the checkpoint must be dropped on resume
    total = max(60, rows_at_kill + 20)
    subprocess.run(args + ["--out", str(killed), "--batches", str(total), "--resume"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(args + ["--out", str(reference), "--batches", str(total)], check=True, stdout=subprocess.DEVNULL)
    assert_same_checkpoint(killed / "checkpoint.npz", reference / "checkpoint.npz")
    assert log_without_time(log) == log_without_time(reference / "log.csv")
    assert read_log(log)["step"] == list(range(1, total + 1))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = Run.create(tiny_config(), tmp_path / "r")
    run.train(10, checkpoint_every=5, progress=False)
    good = (tmp_path / "r" / "checkpoint.npz").read_bytes()
    images = run.images
    calls = {"n": 0}

    def poisoned(indices):  # the 3rd batch after resuming holds an infinite pixel
        calls["n"] += 1
        x = images(indices)
        if calls["n"] == 3:
            x[0, 0, 0, 0] = numpy.inf
        return x

    monkeypatch.setattr(run, "images", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 13 .*last good checkpoint \(step 12\)"):
        run.train(20, checkpoint_every=1, progress=False)
    arrays, meta = ckpt.load(tmp_path / "r" / "checkpoint.npz")
    assert meta["step"] == 12 and (tmp_path / "r" / "checkpoint.npz").read_bytes() != good
    assert all(numpy.isfinite(a).all() for a in arrays.values())
    assert not all(numpy.isfinite(p).all() for p in run.model.parameters().values())  # the state in memory is bad
    assert read_log(tmp_path / "r" / "log.csv")["step"][-1] == 13  # the bad row is logged for diagnosis
    resumed = Run.load(tmp_path / "r")  # and resuming starts from the good state, dropping the bad row
    assert resumed.state.step == 12 and read_log(tmp_path / "r" / "log.csv")["step"][-1] == 12


def test_sigint_saves_a_checkpoint_between_steps_and_resume_continues(tmp_path, monkeypatch):
    Run.create(tiny_config(), tmp_path / "a").train(10, progress=False)
    run = Run.create(tiny_config(), tmp_path / "b")
    images, calls = run.images, {"n": 0}

    def interrupting(indices):  # Ctrl-C arrives while batch 4 is being loaded
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return images(indices)

    monkeypatch.setattr(run, "images", interrupting)
    with pytest.raises(TrainingInterrupted) as info:
        run.train(10, checkpoint_every=100, progress=False)
    assert info.value.step == 4 and info.value.signum == signal.SIGINT
    assert ckpt.load(tmp_path / "b" / "checkpoint.npz")[1]["step"] == 4  # step 4 finished, then saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    Run.load(tmp_path / "b").train(10, progress=False)
    assert_same_checkpoint(tmp_path / "a" / "checkpoint.npz", tmp_path / "b" / "checkpoint.npz")


def test_baseline_never_samples_gates(tmp_path):
    config = RunConfig(**TINY, baseline=True)
    run = Run.create(config, tmp_path / "base")
    assert run.hyper.tau == 0.0
    run.train(15, progress=False)
    cols = read_log(tmp_path / "base" / "log.csv")
    assert set(cols["hit"]) == {0} and set(cols["l0_added"]) == {0}
    assert cols["E1"] == cols["E2"]  # nu1 = nu2 = 1 on every step
    assert set(cols["open_gates"]) == {4}
    numpy.testing.assert_array_equal(to_host(run.model.params["gamma"]), numpy.full(4, Hyper(tau=0).gamma_init, numpy.float32))
    with pytest.raises(ValueError, match="baseline"):
        RunConfig(**TINY, baseline=True, hyper={"tau": 3.0})


def test_config_differences_names_changed_fields():
    stored = tiny_config(tau=40.0)
    assert config_differences(stored, {"latent": 4, "hyper": {"tau": 40.0, "alpha": 0.99}}) == []
    diffs = config_differences(stored, {"latent": 5, "hyper": {"tau": 30.0, "k": 7.0, "error": "l2"}})
    assert diffs == ["latent=5 (the run has 4)", "tau=30.0 (the run has 40.0)", "error='l2' (the run has 'sse')"]


def test_train_rejects_a_smaller_target_than_done(tmp_path):
    run = Run.create(tiny_config(), tmp_path / "r")
    run.train(5, progress=False)
    with pytest.raises(ValueError, match="already done 5"):
        run.train(3, progress=False)


def test_progress_fallback_prints_eta_and_the_live_quantities(monkeypatch):
    import io

    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    out = io.StringIO()
    bar = console.Progress(total=4, initial=2, n_latent=10, interval=0.0, stream=out)
    assert bar.bar is None
    log = {"step": 3, "E2": 12.345, "open_gates": 7, "lambda_eff": 0.0123, "hit_fraction": 0.75}
    bar.update(log, tau=20.0)
    bar.close()
    line = out.getvalue().strip()
    assert line.startswith("step 3/4 (75%)") and "ETA 0:00:0" in line
    assert line.endswith("E2=12.35 tau=20 open=7/10 lambda'=0.0123 hit=0.75")
    quiet = io.StringIO()
    console.Progress(total=4, initial=0, n_latent=10, enabled=False, stream=quiet).update(log, tau=20.0)
    assert quiet.getvalue() == ""


def test_a_checkpoint_saved_by_a_loaded_but_not_training_run_still_resumes_exactly(tmp_path):
    Run.create(tiny_config(), tmp_path / "a").train(12, progress=False)
    Run.create(tiny_config(), tmp_path / "b").train(6, progress=False)
    viewer = Run.load(tmp_path / "b", for_training=False)  # as evaluate/export load it
    assert viewer._batch_order is None and viewer._dataset is None  # the dataset was not even opened
    viewer.save_checkpoint()
    Run.load(tmp_path / "b").train(12, progress=False)
    assert_same_checkpoint(tmp_path / "a" / "checkpoint.npz", tmp_path / "b" / "checkpoint.npz")


def test_training_interrupted_survives_pickling():
    import pickle

    exc = pickle.loads(pickle.dumps(TrainingInterrupted(7, signal.SIGTERM, Path("runs/x/checkpoint.npz"))))
    assert (exc.step, exc.signum, exc.path) == (7, signal.SIGTERM, Path("runs/x/checkpoint.npz"))
    assert str(exc) == "SIGTERM at step 7; checkpoint saved to runs/x/checkpoint.npz"
