"""Layer error messages: bad shapes name the expected and received dimensions; misuse of the cache is caught."""

import re

import numpy as np
import pytest

from refimpl.layers import BatchNorm, Conv2d, Flatten, LeakyReLU, Linear, Reshape, Sequential, Sigmoid, Upsample
from refimpl.rng import generator

F64 = np.float64


def conv(cin=3, cout=2, kernel=3, **kwargs):
    return Conv2d(cin, cout, kernel, rng=generator(0), dtype=F64, **kwargs)


# ---------------------------------------------------------------- shapes


def test_conv2d_wrong_channel_count():
    with pytest.raises(ValueError) as info:
        conv(cin=3).forward(np.zeros((2, 4, 8, 8)))
    message = str(info.value)
    assert "C=3" in message and "(2, 4, 8, 8)" in message


def test_conv2d_wrong_rank():
    with pytest.raises(ValueError, match=re.escape("got (4, 8, 8)")):
        conv(cin=4).forward(np.zeros((4, 8, 8)))


@pytest.mark.parametrize("shape, kernel, padding", [
    ((1, 3, 3, 3), 5, 0),
    ((2, 3, 4, 9), (5, 2), 0),
    ((2, 3, 9, 2), (3, 5), (0, 1)),
])
def test_conv2d_input_smaller_than_kernel(shape, kernel, padding):
    layer = conv(kernel=kernel, padding=padding)
    with pytest.raises(ValueError) as info:
        layer.forward(np.zeros(shape))
    message = str(info.value)
    n, c, h, w = shape
    assert f"H={h}" in message and f"W={w}" in message and f"N={n}" in message
    assert f"kernel {layer.kernel}" in message and f"padding {layer.padding}" in message
    assert "smaller than the kernel" in message


def test_conv2d_padding_makes_a_small_input_fit():
    y = conv(kernel=5, padding=1).forward(np.zeros((1, 3, 3, 3)))
    assert y.shape == (1, 2, 1, 1)


@pytest.mark.parametrize("kwargs, words", [
    ({"kernel": 0}, "kernel_size"),
    ({"kernel": (3, 0)}, "kernel_size=(3, 0)"),
    ({"kernel": (3, 3, 3)}, "kernel_size=(3, 3, 3)"),
    ({"kernel": (2.5, 3)}, "kernel_size=(2.5, 3)"),
    ({"kernel": 3, "stride": 0}, "stride=(0, 0)"),
    ({"kernel": 3, "padding": -1}, "padding=(-1, -1)"),
    ({"cin": 0}, "in_channels=0"),
    ({"cout": 0}, "out_channels=0"),
])
def test_conv2d_bad_construction(kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        conv(**kwargs)


def test_conv2d_scalar_float_kernel_is_a_value_error():
    with pytest.raises(ValueError, match=re.escape("kernel_size=2.5")):
        conv(kernel=2.5)


def test_linear_wrong_features():
    layer = Linear(3, 2, rng=generator(0), dtype=F64)
    with pytest.raises(ValueError) as info:
        layer.forward(np.zeros((5, 4)))
    message = str(info.value)
    assert "in_features=3" in message and "(5, 4)" in message
    with pytest.raises(ValueError, match=re.escape("got (5, 3, 1)")):
        layer.forward(np.zeros((5, 3, 1)))


@pytest.mark.parametrize("fin, fout", [(0, 2), (3, 0)])
def test_linear_bad_construction(fin, fout):
    with pytest.raises(ValueError, match=rf"in_features={fin}, out_features={fout}"):
        Linear(fin, fout, rng=generator(0))


@pytest.mark.parametrize("shape", [(4, 2), (4, 5, 2, 2), (4, 3, 2), (3,)])
def test_batchnorm_wrong_channels_or_rank(shape):
    with pytest.raises(ValueError) as info:
        BatchNorm(3, dtype=F64).forward(np.zeros(shape))
    message = str(info.value)
    assert "C=3" in message and str(tuple(shape)) in message


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)])
def test_batchnorm_train_mode_needs_two_values_per_channel(shape):
    layer = BatchNorm(3, dtype=F64)
    with pytest.raises(ValueError) as info:
        layer.forward(np.ones(shape))
    message = str(info.value)
    assert ">= 2 values per channel" in message and str(shape) in message
    # the running statistics were not touched by the failed call
    np.testing.assert_array_equal(layer.buffers["running_mean"], np.zeros(3))
    np.testing.assert_array_equal(layer.buffers["running_var"], np.ones(3))
    # one value per channel is fine in eval mode, and (1, C, H, W) with H*W >= 2 in training mode
    assert layer.eval().forward(np.ones(shape)).shape == shape
    assert layer.train().forward(np.ones((1, 3, 1, 2))).shape == (1, 3, 1, 2)


@pytest.mark.parametrize("kwargs, words", [
    ({"num_features": 0}, "num_features=0"),
    ({"momentum": 1.5}, "momentum=1.5"),
    ({"momentum": -0.1}, "momentum=-0.1"),
    ({"eps": 0.0}, "eps=0.0"),
    ({"running_var": "sample"}, "running_var='sample'"),
])
def test_batchnorm_bad_construction(kwargs, words):
    kwargs = {"num_features": 3, **kwargs}
    with pytest.raises(ValueError, match=re.escape(words)):
        BatchNorm(**kwargs)


def test_reshape_wrong_size():
    with pytest.raises(ValueError) as info:
        Reshape((2, 3, 4)).forward(np.zeros((5, 23)))
    message = str(info.value)
    assert "(N, 24)" in message and "(5, 23)" in message and "(2, 3, 4)" in message


@pytest.mark.parametrize("factor", [0, 1.5, -2])
def test_upsample_bad_factor(factor):
    with pytest.raises(ValueError, match=re.escape(f"factor={factor!r}")):
        Upsample(factor)


def test_upsample_wrong_rank():
    with pytest.raises(ValueError, match=re.escape("got (2, 3, 4)")):
        Upsample(2).forward(np.zeros((2, 3, 4)))


def test_bad_init_name():
    with pytest.raises(ValueError) as info:
        Linear(3, 2, rng=generator(0), init="xavier")
    assert "init='xavier'" in str(info.value) and "torch, keras" in str(info.value)


# ---------------------------------------------------------------- the forward cache


def x4():
    return np.random.default_rng(0).standard_normal((2, 3, 4, 4))


# name -> () -> (fresh layer, input), covering every layer type plus a Sequential of several
LAYERS = {
    "Conv2d": lambda: (conv(), x4()),
    "Upsample": lambda: (Upsample(2), x4()),
    "BatchNorm_train": lambda: (BatchNorm(3, dtype=F64), x4()),
    "BatchNorm_eval": lambda: (BatchNorm(3, dtype=F64).eval(), x4()),
    "LeakyReLU": lambda: (LeakyReLU(0.02), x4()),
    "Sigmoid": lambda: (Sigmoid(), x4()),
    "Linear": lambda: (Linear(3, 2, rng=generator(0), dtype=F64), np.random.default_rng(1).standard_normal((2, 3))),
    "Flatten": lambda: (Flatten(), x4()),
    "Reshape": lambda: (Reshape((3, 2, 2)), np.random.default_rng(2).standard_normal((2, 12))),
    "Sequential": lambda: (Sequential(conv(), LeakyReLU(0.02), Flatten(), Linear(8, 2, rng=generator(1), dtype=F64),
                                      Sigmoid()), x4()),
}


def cached_name(layer):
    """The layer whose backward meets the missing cache first (the last child of a Sequential)."""
    return type(layer.layers[-1] if isinstance(layer, Sequential) else layer).__name__


@pytest.mark.parametrize("name", LAYERS)
def test_backward_without_forward(name):
    layer, x = LAYERS[name]()
    with pytest.raises(RuntimeError, match="cached forward"):
        layer.backward(np.ones_like(x))  # never forwarded at all


@pytest.mark.parametrize("name", LAYERS)
def test_backward_after_uncached_forward(name):
    layer, x = LAYERS[name]()
    y = layer.forward(x, cache=False)
    with pytest.raises(RuntimeError) as info:
        layer.backward(np.ones_like(y))
    message = str(info.value)
    assert f"{cached_name(layer)}.backward" in message and "cached forward" in message


@pytest.mark.parametrize("name", LAYERS)
def test_uncached_forward_clears_the_cache(name):
    """forward(cache=True), then forward(cache=False): backward must not use the stale cache."""
    layer, x = LAYERS[name]()
    y = layer.forward(x, cache=True)
    layer.forward(x, cache=False)
    with pytest.raises(RuntimeError, match="cached forward"):
        layer.backward(np.ones_like(y))


@pytest.mark.parametrize("name", LAYERS)
def test_backward_consumes_the_cache(name):
    """One forward, one backward: a second backward is an error, not a silent reuse."""
    layer, x = LAYERS[name]()
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(y))
    assert dx.shape == x.shape
    with pytest.raises(RuntimeError, match="cached forward"):
        layer.backward(np.ones_like(y))


# ---------------------------------------------------------------- load_state_dict


def test_load_state_dict_missing_key():
    layer = BatchNorm(3, dtype=F64)
    state = {k: v.copy() for k, v in layer.state_dict().items()}
    del state["running_var"]
    with pytest.raises(ValueError) as info:
        layer.load_state_dict(state)
    assert "missing ['running_var']" in str(info.value) and "unexpected []" in str(info.value)


def test_load_state_dict_unexpected_key():
    layer = Linear(3, 2, rng=generator(0), dtype=F64)
    state = {**{k: v.copy() for k, v in layer.state_dict().items()}, "scale": np.ones(2)}
    with pytest.raises(ValueError, match=re.escape("missing [], unexpected ['scale']")):
        layer.load_state_dict(state)


def test_load_state_dict_nested_names():
    net = Sequential(Linear(3, 2, rng=generator(0), dtype=F64), BatchNorm(2, dtype=F64))
    assert set(net.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"}
    state = {k: v.copy() for k, v in net.state_dict().items()}
    state["bias"] = state.pop("0.bias")  # a child's entry without its prefix
    with pytest.raises(ValueError, match=re.escape("missing ['0.bias'], unexpected ['bias']")):
        net.load_state_dict(state)


def test_load_state_dict_wrong_shape():
    layer = conv(cin=3, cout=2, kernel=3)
    state = {k: v.copy() for k, v in layer.state_dict().items()}
    state["weight"] = np.zeros((2, 3, 3, 2))
    with pytest.raises(ValueError) as info:
        layer.load_state_dict(state)
    message = str(info.value)
    assert "'weight'" in message and "(2, 3, 3, 3)" in message and "(2, 3, 3, 2)" in message


def test_load_state_dict_copies_in_place():
    """Loading writes into the existing arrays (optimisers hold references to them) and copies the values."""
    rng = np.random.default_rng(0)
    layer = Linear(3, 2, rng=generator(0), dtype=F64)
    weight = layer.params["weight"]
    state = {"weight": rng.standard_normal((2, 3)), "bias": rng.standard_normal(2)}
    layer.load_state_dict(state)
    assert layer.params["weight"] is weight
    np.testing.assert_array_equal(weight, state["weight"])
    state["weight"][...] = 0
    assert np.all(weight != 0)
