"""Memory estimates (refimpl/memory.py) and the commands that refuse sizes that cannot fit."""

import tracemalloc

import pytest

from refimpl import memory, threads
from refimpl.algorithm1 import train_step
from refimpl.cli import main
from refimpl.config import RunConfig
from refimpl.execution import Execution
from refimpl.model import build_architecture
from refimpl.training import Run

TINY = ["--image-size", "8", "--channels", "2", "--batch-size", "8", "--latent", "4", "--holdout", "16", "--tau", "40",
        "--quiet"]


@pytest.mark.parametrize("shape,channels,latent", [((1, 8, 8), (2,), 4), ((1, 28, 28), None, 32),
                                                   ((3, 64, 64), None, 10), ((3, 16, 16), (5, 7), 3)])
def test_parameter_count_is_exact(shape, channels, latent):
    from refimpl.model import GatedVAE
    from refimpl.rng import generator

    arch = build_architecture(shape, channels, hidden=20)
    model = GatedVAE(arch, latent, rng=generator(0), gated=True)
    assert memory.parameter_count(arch, latent) == sum(p.size for p in model.parameters().values())


@pytest.mark.parametrize("parallel_grads", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_the_training_estimate_covers_a_real_steps_peak(fused, parallel_grads):
    run = Run.build(RunConfig(image_size=16, hyper={"tau": 1.0}),
                    execution=Execution(fused=fused, parallel_grads=parallel_grads))
    x = run.next_batch()
    run.state.hit = True  # gates sampled: both decoder passes
    tracemalloc.start()  # from the first step: the arrays layers keep between steps count too
    train_step(run.state, x, run.train_rng)
    train_step(run.state, x, run.train_rng)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # two decoder passes side by side (the default); with parallel_grads, each conv's second column matrix
    estimate = memory.activation_count(run.arch, 10, 64, parallel_grads=parallel_grads) * 4
    assert run.state.passes.threads.parallel_passes or threads.cores() < 2
    assert peak <= estimate <= (1.5 if not fused else 15) * peak


def test_available_memory_is_read():
    have, source = memory.available_bytes()
    assert have > 0 and source in ("MemAvailable", "free memory")
    assert memory.human(6.1e12) == "6.1 TB" and memory.human(512) == "512 B"


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_model_that_cannot_fit_is_refused_before_allocating(tmp_path, capsys):
    assert main(["train", "--latent", "1000000000", "--out", str(tmp_path / "r")]) == 2
    line = one_error_line(capsys)
    assert line.startswith("refimpl train: error: a model of ") and "n=1000000000" in line
    assert "TB of memory" in line and "available (MemAvailable)" in line and "reduce --latent" in line
    assert not (tmp_path / "r").exists()


def test_a_trace_that_cannot_fit_is_refused(tmp_path, capsys, monkeypatch):
    assert main(["trace", "--steps", "100000", "--out", str(tmp_path / "t.npz")]) == 2
    line = one_error_line(capsys)
    assert "a trace of 100000 steps" in line and "trace fewer --steps" in line
    monkeypatch.setattr(memory, "available_bytes", lambda xp=None: (3 * 10**9, "MemAvailable"))  # a 3 GB limit
    assert main(["trace", "--steps", "3000", "--out", str(tmp_path / "t.npz")]) == 2
    assert "3.0 GB available" in one_error_line(capsys)
    assert not (tmp_path / "t.npz").exists()


def test_a_grid_that_cannot_fit_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--batches", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["reconstruct", str(out), "--scale", "100000"]) == 2
    line = one_error_line(capsys)
    assert "a 8200000x2200000 image needs about" in line and "smaller --scale" in line
    assert not (out / "reconstructions.png").exists()
