"""``--parallel-elementwise``: elementwise lines over two halves in two threads, bit for bit the whole lines.

BatchNorm's fast twin (its centring, affine line and backward lines; never its per-channel sums),
LeakyReLU (both ways) and UpsampleConv2d's col2im backward (its four phases' shifted copies, two
and two) with ``FastPaths.parallel_elementwise`` on against the same layer with it off: outputs,
input gradients, parameter gradients and running statistics equal bit for bit (``np.array_equal``)
on Hypothesis-drawn shapes, seeds and upstream gradients, float32 and float64, over two steps. The
size threshold is set to 0 so the tiny maps split (a spy checks that they did). Then where the
split runs (:func:`refimpl.threads.elementwise_runner`), whole training steps and the switch. The
traces with and without it are compared in tests/test_execution.py.
"""

import dataclasses
import threading

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl import threads
from refimpl.execution import Execution, cores
from refimpl.layers import BatchNorm, LeakyReLU
from refimpl.layers.im2col import _col2im_phases, _im2col_phases, _phase_offsets
from refimpl.layers.upsample_conv2d import UpsampleConv2d
from refimpl.optionspec import OptionError
from refimpl.rng import generator
from refimpl.threads import cores_taken, elementwise_runner, in_halves, side_by_side, whole
from test_threads import assert_bit_equal, run

ON = Execution(parallel_elementwise=True).resolve("numpy")
OFF = dataclasses.replace(ON, parallel_elementwise=False)
seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([np.float32, np.float64])


@pytest.fixture(autouse=True)
def split_every_map(monkeypatch):
    """The threshold at 0, and a count of the splits made."""
    monkeypatch.setattr(threads, "ELEMENTWISE_MIN_BYTES", 0)


def count_splits(monkeypatch):
    calls = []
    original = threads.side_by_side

    def spy(f, g):
        calls.append(1)
        return original(f, g)

    monkeypatch.setattr(threads, "side_by_side", spy)
    return calls


def two_steps(make, x_shape, dtype, seed, modes=(True, True)):
    """Every output, input gradient, gradient and buffer after two forward/backward steps of ``make(paths)``."""
    results = {}
    for name, paths in (("on", ON), ("off", OFF)):
        layer, rng = make(paths), np.random.default_rng(seed)
        out = []
        for training in modes:  # gradients accumulate; the second step may be in eval mode
            layer.train(training) if hasattr(layer, "train") else None
            y = layer.forward(rng.standard_normal(x_shape).astype(dtype))
            out += [y.copy(), layer.backward(rng.standard_normal(y.shape).astype(dtype))]
        out += [*layer.grads.values(), *layer.buffers.values()]
        results[name] = out
    return results["on"], results["off"]


def assert_bit_for_bit(on, off):
    assert len(on) == len(off)
    for a, b in zip(on, off):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


shapes4 = st.tuples(st.integers(1, 7), st.integers(1, 6), st.integers(1, 6), st.integers(1, 6))


@given(shape=st.one_of(shapes4, st.tuples(st.integers(2, 9), st.integers(1, 6))), eval_second=st.booleans(),
       dtype=dtypes, seed=seeds)
def test_batchnorm_in_halves_equals_whole(shape, eval_second, dtype, seed):
    assume(np.prod(shape) // shape[1] >= 2)  # training mode: two values per channel
    on, off = two_steps(lambda paths: BatchNorm(shape[1], dtype=dtype, paths=paths), shape, dtype, seed,
                        (True, not eval_second))
    assert_bit_for_bit(on, off)


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple), slope=st.sampled_from([0.02, 0.0, 0.5]),
       dtype=dtypes, seed=seeds)
def test_leaky_relu_in_halves_equals_whole(shape, slope, dtype, seed):
    on, off = two_steps(lambda paths: LeakyReLU(slope, paths=paths), shape, dtype, seed)
    assert_bit_for_bit(on, off)


@given(n=st.integers(1, 6), c=st.integers(1, 8), o=st.integers(1, 8), h=st.integers(1, 8), w=st.integers(1, 8),
       dtype=dtypes, seed=seeds)
def test_upsample_conv2d_col2im_phases_in_halves_equal_in_order(n, c, o, h, w, dtype, seed):
    on, off = two_steps(lambda paths: UpsampleConv2d(c, o, rng=generator(seed), dtype=dtype, method="col2im",
                                                     paths=paths), (n, c, h, w), dtype, seed)
    assert_bit_for_bit(on, off)


@given(n=st.integers(1, 6), c=st.integers(1, 5), h=st.integers(1, 5), w=st.integers(1, 5),
       conv=st.sampled_from([(4, 2, 1), (3, 2, 1), (3, 1, 1), (2, 2, 0), (1, 1, 0)]), dtype=dtypes, seed=seeds)
def test_im2col_and_col2im_phases_in_halves_equal_whole(n, c, h, w, conv, dtype, seed):
    kernel, stride, padding = ((conv[0],) * 2, (conv[1],) * 2, (conv[2],) * 2)
    shape = (n, c, stride[0] * h, stride[1] * w)
    assume(_phase_offsets(shape, kernel, stride, padding) is not None)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    cols = _im2col_phases(x, kernel, stride, padding, paths=ON)
    assert np.array_equal(cols, _im2col_phases(x, kernel, stride, padding, paths=OFF))
    dcols = rng.standard_normal(cols.shape).astype(dtype)
    dx = _col2im_phases(dcols.copy(), shape, kernel, stride, padding, paths=ON)
    assert dx.dtype == dtype and np.array_equal(dx, _col2im_phases(dcols.copy(), shape, kernel, stride, padding,
                                                                   paths=OFF))


def test_the_twins_split(monkeypatch):
    calls = count_splits(monkeypatch)
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5))
    for layer in (BatchNorm(3, dtype=np.float64, paths=ON), LeakyReLU(0.02, paths=ON),
                  UpsampleConv2d(3, 2, rng=generator(0), dtype=np.float64, method="col2im", paths=ON)):
        layer.backward(np.ones_like(layer.forward(x)))
    assert len(calls) == 3 + 2 + 1  # BatchNorm: centring, affine, backward; LeakyReLU: both ways; col2im's phases
    calls.clear()
    for layer in (BatchNorm(3, dtype=np.float64, paths=OFF), LeakyReLU(0.02, paths=OFF)):
        layer.backward(np.ones_like(layer.forward(x)))
    assert not calls


def test_where_the_split_runs(monkeypatch):
    x = np.zeros((4, 3))
    assert elementwise_runner(ON, x) is in_halves
    assert elementwise_runner(OFF, x) is whole
    assert elementwise_runner(ON, x[:1]) is whole  # one image
    with cores_taken():  # the decoder passes side by side hold both cores
        assert elementwise_runner(ON, x) is whole
    assert elementwise_runner(ON, x) is in_halves
    assert side_by_side(lambda: elementwise_runner(ON, x), lambda: None)[0] is whole  # the worker itself
    assert elementwise_runner(ON, x.tolist()) is whole  # not a NumPy array (CuPy's arrays neither)
    monkeypatch.setattr(threads, "ELEMENTWISE_MIN_BYTES", 13 * 8)
    assert elementwise_runner(ON, x) is whole and elementwise_runner(ON, np.zeros((2, 7))) is in_halves
    assert elementwise_runner(ON, np.zeros((2, 7), np.float32)) is whole  # the threshold is in bytes
    seen = []
    in_halves(lambda s: seen.append((s, threading.current_thread().name)), 5)
    assert sorted(s.indices(5) for s, _ in seen) == [(0, 2, 1), (2, 5, 1)]
    assert any(name.startswith(threads.GRADS_THREAD) for _, name in seen)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_training_steps_are_the_same_bit_for_bit(dtype):
    """4 steps of the 16x16 model (default setting otherwise): parameters, Adam's moments, logs, random stream."""
    on, off = (Execution(decoder_passes="parallel", parallel_elementwise=switch) for switch in (True, False))
    assert_bit_equal(run(on, dtype, {}), run(off, dtype, {}))


def test_the_default_and_the_switch():
    assert Execution().resolve("numpy").parallel_elementwise == (cores() >= 2)
    assert not Execution().resolve("cupy").parallel_elementwise  # never threads on CuPy
    assert not Execution(parallel_elementwise=True).resolve("cupy").parallel_elementwise
    assert not Execution(reference=True).resolve("numpy").parallel_elementwise
    assert Execution(reference=True, parallel_elementwise=True).resolve("numpy").parallel_elementwise
    with pytest.raises(OptionError, match="parallel_elementwise"):
        Execution(parallel_elementwise="yes")
