"""``--parallel-grads``: the convolutions' two backward GEMMs side by side, bit for bit the in-order ones.

Conv2d's and UpsampleConv2d's (both methods) backward with ``FastPaths.parallel_grads`` on (the
weight gradient's GEMM in a worker thread, refimpl/threads.py's :func:`side_by_side`) against
the same layer with it off: dx, dW and db equal bit for bit (``np.array_equal``) on
Hypothesis-drawn shapes, kernels, strides, paddings, seeds and upstream gradients, float32 and
float64, over two steps (gradients accumulate, the scratch arrays are reused), with 1 and 2 BLAS
threads. Then :func:`side_by_side` itself (exceptions, the caller's context, a call from the
worker), whole training steps, and the memory estimate's extra column matrices. The traces of
``--reference`` with and without it are compared in tests/test_execution.py.
"""

import dataclasses
import threading
import time

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from refimpl import memory
from refimpl.algorithm1 import train_step
from refimpl.config import RunConfig
from refimpl.execution import Execution, cores
from refimpl.layers import Conv2d
from refimpl.layers.im2col import conv_output_size
from refimpl.layers.upsample_conv2d import UpsampleConv2d
from refimpl.optionspec import OptionError
from refimpl.rng import generator
from refimpl.threads import GRADS_THREAD, blas_limit, side_by_side
from refimpl.training import Run
from test_threads import assert_bit_equal, run

ON = Execution(parallel_grads=True).resolve("numpy")
OFF = dataclasses.replace(ON, parallel_grads=False)
seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([np.float32, np.float64])
blas = st.sampled_from([1, 2])


def two_steps(make, x_shape, dtype, seed, blas_threads):
    """(dx, dW, db) after two forward/backward steps of the layer ``make(paths)`` for ``paths`` = ON and OFF, and
    whether each kept a second column matrix ("dcols": only the side-by-side twin needs one)."""
    results = {}
    for name, paths in (("on", ON), ("off", OFF)):
        layer, rng = make(paths), np.random.default_rng(seed)
        dxs = []
        with blas_limit(blas_threads):
            for _ in range(2):  # gradients accumulate; reused scratch arrays hold no stale values
                y = layer.forward(rng.standard_normal(x_shape).astype(dtype))
                dxs.append(layer.backward(rng.standard_normal(y.shape).astype(dtype)))
        results[name] = (dxs, layer.grads["weight"], layer.grads["bias"], "dcols" in layer._scratch)
    return results["on"], results["off"]


def assert_bit_for_bit(on, off, input_grad=True):
    (dx_on, dw_on, db_on, scratch_on), (dx_off, dw_off, db_off, scratch_off) = on, off
    for a, b in zip(dx_on, dx_off):
        assert (a is None and b is None) if not input_grad else (a.dtype == b.dtype and np.array_equal(a, b))
    assert dw_on.dtype == dw_off.dtype and np.array_equal(dw_on, dw_off)
    assert np.array_equal(db_on, db_off)
    assert scratch_on == input_grad and not scratch_off  # the twin ran where there is a dx, the plain code else


@given(n=st.integers(1, 6), c=st.integers(1, 12), o=st.integers(1, 12), h=st.integers(1, 14), w=st.integers(1, 14),
       kernel=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 2), input_grad=st.booleans(),
       dtype=dtypes, blas_threads=blas, seed=seeds)
@example(n=16, c=32, o=32, h=16, w=16, kernel=4, stride=2, padding=1, input_grad=True, dtype=np.float32,
         blas_threads=2, seed=0)  # the paper's encoder conv at 32x32 (GEMMs OpenBLAS splits over 2 threads)
def test_conv2d_side_by_side_equals_in_order(n, c, o, h, w, kernel, stride, padding, input_grad, dtype, blas_threads,
                                            seed):
    assume(min(conv_output_size(s, kernel, stride, padding) for s in (h, w)) >= 1)
    on, off = two_steps(lambda paths: Conv2d(c, o, kernel, stride, padding, rng=generator(seed), dtype=dtype,
                                             input_grad=input_grad, paths=paths), (n, c, h, w), dtype, seed,
                        blas_threads)
    assert_bit_for_bit(on, off, input_grad)


@given(n=st.integers(1, 6), c=st.integers(1, 12), o=st.integers(1, 12), h=st.integers(1, 10), w=st.integers(1, 10),
       method=st.sampled_from(["im2col", "col2im", "difference"]), dtype=dtypes, blas_threads=blas, seed=seeds)
@example(n=16, c=64, o=32, h=8, w=8, method="col2im", dtype=np.float32, blas_threads=2, seed=0)  # the paper's
@example(n=16, c=8, o=32, h=8, w=8, method="im2col", dtype=np.float32, blas_threads=2, seed=0)  # decoder blocks
@example(n=16, c=32, o=32, h=16, w=16, method="difference", dtype=np.float32, blas_threads=2, seed=0)
def test_upsample_conv2d_side_by_side_equals_in_order(n, c, o, h, w, method, dtype, blas_threads, seed):
    on, off = two_steps(lambda paths: UpsampleConv2d(c, o, rng=generator(seed), dtype=dtype, method=method,
                                                     paths=paths), (n, c, h, w), dtype, seed, blas_threads)
    assert_bit_for_bit(on, off)


def test_side_by_side_runs_the_first_in_the_worker_and_returns_both():
    names = side_by_side(lambda: threading.current_thread().name, lambda: threading.current_thread().name)
    assert names[0].startswith(GRADS_THREAD) and names[1] == threading.current_thread().name
    with np.errstate(divide="raise"):  # the caller's NumPy settings travel with the worker's task
        with pytest.raises(FloatingPointError):
            side_by_side(lambda: np.float64(1) / np.float64(0), lambda: None)
    # a call from the worker itself runs in order there, instead of waiting on itself
    inner = side_by_side(lambda: side_by_side(lambda: threading.current_thread().name, lambda: 2), lambda: 1)
    assert inner[0][0].startswith(GRADS_THREAD) and inner[0][1] == 2 and inner[1] == 1


def in_child(queue):
    queue.put(side_by_side(lambda: 3, lambda: 4))


def test_side_by_side_works_in_a_forked_child():
    """A process forked after the worker started (multiprocessing's fork) gets a worker of its own."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork here")
    side_by_side(lambda: 1, lambda: 2)  # the parent's worker exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=in_child, args=(queue,))
    child.start()
    child.join(30)
    if child.is_alive():  # waiting on a worker thread the child does not have
        child.kill()
        child.join()
    assert child.exitcode == 0 and queue.get(timeout=5) == (3, 4)


class Planted(Exception):
    pass


def fail():
    raise Planted


def test_side_by_side_propagates_either_exception_after_both_finish():
    with pytest.raises(Planted):
        side_by_side(fail, lambda: 1)
    finished = []

    def slow():
        time.sleep(0.05)
        finished.append(True)

    with pytest.raises(Planted):
        side_by_side(slow, fail)
    assert finished == [True]  # the worker's GEMM was done before the caller saw the exception
    assert side_by_side(lambda: 1, lambda: 2) == (1, 2)  # and the worker goes on serving


class PlantedColumns(np.ndarray):
    """Columns whose transpose raises: the weight gradient's GEMM (dz @ cols.T, in the worker) fails."""

    @property
    def T(self):
        raise Planted


@pytest.mark.parametrize("make", [lambda: Conv2d(2, 3, 3, 1, 1, rng=generator(0), dtype=np.float64, paths=ON),
                                  lambda: UpsampleConv2d(2, 3, rng=generator(0), dtype=np.float64, method="col2im",
                                                         paths=ON),
                                  lambda: UpsampleConv2d(2, 3, rng=generator(0), dtype=np.float64, method="im2col",
                                                         paths=ON),
                                  lambda: UpsampleConv2d(2, 3, rng=generator(0), dtype=np.float64, method="difference",
                                                         paths=ON)],
                         ids=["Conv2d", "UpsampleConv2d-col2im", "UpsampleConv2d-im2col", "UpsampleConv2d-difference"])
def test_a_layer_passes_the_workers_exception_on(make):
    layer = make()
    y = layer.forward(np.ones((2, 2, 5, 5)))
    saved, x_shape = layer._cache
    cols = saved if isinstance(layer, Conv2d) else saved[0]
    planted = cols.view(PlantedColumns)
    layer._cache = (planted if isinstance(layer, Conv2d) else (planted, saved[1]), x_shape)
    with pytest.raises(Planted):
        layer.backward(np.ones(y.shape))
    assert side_by_side(lambda: 1, lambda: 2) == (1, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("blas_threads", ["1", "2"])
def test_training_steps_are_the_same_bit_for_bit(dtype, blas_threads):
    """4 steps of the 16x16 model (the decoder passes side by side): parameters, Adam's moments, logs, random stream."""
    side, order = (Execution(blas_threads=blas_threads, decoder_passes="parallel", parallel_grads=on)
                   for on in (True, False))
    assert_bit_equal(run(side, dtype, {}), run(order, dtype, {}))


def test_the_default_and_the_switch():
    assert Execution().resolve("numpy").parallel_grads == (cores() >= 2)
    assert Execution(blas_threads="1").resolve("numpy").parallel_grads == (cores() >= 2)
    assert not Execution().resolve("cupy").parallel_grads  # never threads on CuPy
    assert not Execution(parallel_grads=True).resolve("cupy").parallel_grads
    assert not Execution(reference=True).resolve("numpy").parallel_grads
    assert Execution(reference=True, parallel_grads=True).resolve("numpy").parallel_grads
    # two GEMMs at once, each on the step's N BLAS threads: on by default only where both fit the cores
    assert not Execution(blas_threads=str(cores())).resolve("numpy").parallel_grads
    assert Execution(blas_threads=str(cores()), parallel_grads=True).resolve("numpy").parallel_grads
    with pytest.raises(OptionError, match="parallel_grads"):
        Execution(parallel_grads="yes")


def test_the_cli_refuses_a_value_for_the_switch(capsys):
    from refimpl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--parallel-grads=yes"])
    assert exit_.value.code == 2 and "--parallel-grads" in capsys.readouterr().err


def test_the_memory_estimate_counts_the_second_column_matrices(monkeypatch):
    """With parallel_grads every convolution that computes dx keeps a second column matrix: the estimate grows
    by exactly those (the plain decoder's, times the estimate's factor), and a run that fits only without them
    is refused with them."""
    config = RunConfig(image_size=16, hyper={"tau": 1.0})
    built = Run.build(config, execution=Execution(fused=False, parallel_grads=True))
    built.state.hit = True
    train_step(built.state, built.next_batch(), built.train_rng)
    scratch = sum(layer._scratch["dcols"].size for layer in all_layers(built.model) if "dcols" in layer._scratch)
    assert scratch > 0
    arch, batch = built.arch, config.batch_size
    grown = (memory.activation_count(arch, config.latent, batch, parallel_grads=True)
             - memory.activation_count(arch, config.latent, batch, parallel_grads=False))
    assert abs(grown - memory.ACTIVATION_FACTOR * scratch) <= 1
    without = memory.training_bytes(arch, config.latent, batch, 4, parallel_grads=False)
    with_ = memory.training_bytes(arch, config.latent, batch, 4, parallel_grads=True)
    assert with_ - without == pytest.approx(4 * memory.ACTIVATION_FACTOR * scratch, abs=8)
    monkeypatch.setattr(memory, "available_bytes", lambda xp=None: ((without + with_) // 2, "MemAvailable"))
    memory.check_training(arch, config, paths=OFF)
    with pytest.raises(memory.NotEnoughMemory):
        memory.check_training(arch, config, paths=ON)


def all_layers(layer):
    yield layer
    for _, child in layer.children():
        yield from all_layers(child)
