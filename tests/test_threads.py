"""The threaded step (refimpl/threads.py) against the reference, bit for bit."""

import numpy as np
import pytest

from refimpl.algorithm1 import Hyper, init_state, train_step
from refimpl.backend import to_host
from refimpl.device_step import DeviceStep
from refimpl.execution import Execution
from refimpl.model import GatedVAE, build_architecture
from refimpl.optionspec import OptionError
from refimpl.rng import generator
from refimpl.threads import SEQUENTIAL, Threads, blas_thread_count, cores, decoder_work, resolve
from refimpl.training import Run
from test_training import assert_same_checkpoint, log_without_time, tiny_config

PARALLEL = Execution(blas_threads="1", decoder_passes="parallel")
IN_ORDER = Execution(blas_threads="1", decoder_passes="sequential")
needs_two_cores = pytest.mark.skipif(cores() < 2, reason="the passes run side by side only with 2 cores or more")


def model_of(dtype, size=16, n=4, execution=None):
    paths = (execution or Execution()).resolve("numpy")
    return GatedVAE(build_architecture((1, size, size)), n, rng=generator(0), dtype=dtype, paths=paths)


def run(execution, dtype, hyper_kw, steps=4, batch=6, device_step=False):
    """Every parameter, buffer, Adam moment and logged scalar after ``steps`` steps (the first hits at once)."""
    model = model_of(dtype, execution=execution)
    state = init_state(model, Hyper(tau=1e3, **hyper_kw))
    assert state.passes.threads.parallel_passes == (execution.decoder_passes == "parallel")
    rng, images = generator(1), generator(2)
    logs, fast = [], None
    for _ in range(steps):
        x = images.uniform(0, 1, (batch, 1, 16, 16)).astype(dtype)
        if device_step and state.hit:
            fast = fast or DeviceStep(state)
            logs.append({k: float(v) for k, v in fast.host_log(fast(x, rng)).items() if k != "step"})
        else:
            logs.append(train_step(state, x, rng))
    arrays = {**model.state_dict(), **{f"m/{k}": v for k, v in state.optimizer.m.items()},
              **{f"v/{k}": v for k, v in state.optimizer.v.items()}, "lambda": state.lam,
              "rng": rng.uniform(size=3)}  # the random stream continues at the same place
    return logs, {k: np.array(to_host(v), copy=True) for k, v in arrays.items()}


def assert_bit_equal(a, b):
    logs_a, arrays_a = a
    logs_b, arrays_b = b
    assert logs_a == logs_b
    assert arrays_a.keys() == arrays_b.keys()
    for k in arrays_a:
        assert arrays_a[k].tobytes() == arrays_b[k].tobytes(), k


@needs_two_cores
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("hyper_kw", [{}, {"estimator": "reinforce_loo"}, {"e1_batchnorm": "batch_update"},
                                      {"e1_batchnorm": "running"}, {"gate_samples": "per_example"}],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_parallel_passes_equal_sequential_bit_for_bit(dtype, hyper_kw):
    assert_bit_equal(run(PARALLEL, dtype, hyper_kw), run(IN_ORDER, dtype, hyper_kw))


@needs_two_cores
def test_parallel_passes_equal_sequential_with_two_blas_threads():
    """2 BLAS threads for the step, 1 for each pass, in order or side by side: the same numbers."""
    two = {k: Execution(blas_threads="2", decoder_passes=v.decoder_passes)
           for k, v in (("par", PARALLEL), ("seq", IN_ORDER))}
    assert_bit_equal(run(two["par"], np.float32, {}), run(two["seq"], np.float32, {}))


@needs_two_cores
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_device_step_parallel_equals_sequential_bit_for_bit(dtype):
    assert_bit_equal(run(PARALLEL, dtype, {}, device_step=True), run(IN_ORDER, dtype, {}, device_step=True))


@needs_two_cores
def _two_steps(state, seed):
    rng, images = generator(seed), generator(seed + 1)
    return [train_step(state, images.uniform(0, 1, (6, 1, 16, 16)), rng) for _ in range(2)]


@needs_two_cores
def test_parallel_passes_work_in_a_forked_child():
    """A process forked after the E1 worker started (multiprocessing's fork) gets a worker of its own: the same
    state steps on in the child (the parent's thread does not exist there) as in the parent."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork here")
    state = init_state(model_of(np.float64, execution=PARALLEL), Hyper(tau=1e3))
    _two_steps(state, 1)  # the E1 worker exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=lambda: queue.put(_two_steps(state, 3)))
    child.start()
    child.join(60)
    if child.is_alive():  # waiting on a worker thread the child does not have
        child.kill()
        child.join()
    assert child.exitcode == 0 and queue.get(timeout=5) == _two_steps(state, 3)


def test_parallel_passes_run_in_two_threads_and_leave_the_running_statistics_to_e2():
    model = model_of(np.float64, execution=PARALLEL)
    state = init_state(model, Hyper(tau=1e3))
    assert state.passes.threads.parallel_passes
    rng, images = generator(1), generator(2)
    for _ in range(2):
        train_step(state, images.uniform(0, 1, (6, 1, 16, 16)), rng)
    twin = state.passes._twin
    assert twin is not None  # the second step sampled gates, so the E1 pass ran on the twin
    for (name, layer), (_, copy) in zip(model.decoder.children(), twin.children()):
        assert copy is not layer and copy._scratch is not layer._scratch, name
        for key in layer.params:
            assert copy.params[key] is layer.params[key], name  # the same parameter arrays
        for key in layer.buffers:
            assert copy.buffers[key] is layer.buffers[key], name
        if hasattr(layer, "update_running"):
            assert layer.update_running and not copy.update_running, name


def test_resolve_and_blas_thread_count():
    model = model_of(np.float32)
    assert resolve(IN_ORDER.resolve("numpy"), model) == Threads(1, 1, False)
    assert resolve(PARALLEL.resolve("numpy"), model) == Threads(1, 1, cores() >= 2)
    four = Execution(blas_threads="4").resolve("numpy")
    assert resolve(four, model) == Threads(4, 2, cores() >= 4)  # each pass half, if both fit the cores
    assert blas_thread_count("auto", model, environ={"OMP_NUM_THREADS": "2"}) is None  # the user's setting stands
    assert blas_thread_count("auto", model, environ={}) == 1  # the 16x16 model's GEMMs are small
    big = GatedVAE(build_architecture((1, 64, 64)), 10, rng=generator(0))
    assert decoder_work(big) > 6 * decoder_work(model)
    assert blas_thread_count("auto", big, environ={}) == max(1, cores() // 2)  # half each for the two passes
    assert SEQUENTIAL == Threads(None, None, False)


@pytest.mark.parametrize("kw", [{"blas_threads": "0"}, {"blas_threads": "two"}, {"decoder_passes": "both"}])
def test_execution_rejects_bad_values(kw):
    with pytest.raises(OptionError, match=next(iter(kw))):
        Execution(**kw)


def test_docs_execution_table_is_generated_from_the_fields():
    """One home for each option: docs/cli.md's table is `python -m refimpl.execution`."""
    from pathlib import Path

    from refimpl.options import markdown_table

    cli = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    block = cli.split("<!-- execution-options:begin -->\n", 1)[1].split("\n<!-- execution-options:end -->", 1)[0]
    assert block == markdown_table(Execution)


@needs_two_cores
def test_training_runs_with_either_setting_and_resume_give_the_same_run(tmp_path):
    """A run's execution: in order, side by side, and side by side resumed half-way: one run, bit for bit."""
    Run.create(tiny_config(), tmp_path / "seq", execution=IN_ORDER).train(30, checkpoint_every=7, progress=False)
    Run.create(tiny_config(), tmp_path / "par", execution=PARALLEL).train(13, checkpoint_every=7, progress=False)
    resumed = Run.load(tmp_path / "par", execution=PARALLEL)
    resumed.train(30, checkpoint_every=7, progress=False)
    assert resumed.state.passes.threads == Threads(1, 1, True)
    assert_same_checkpoint(tmp_path / "seq" / "checkpoint.npz", tmp_path / "par" / "checkpoint.npz")
    assert log_without_time(tmp_path / "seq" / "log.csv") == log_without_time(tmp_path / "par" / "log.csv")
