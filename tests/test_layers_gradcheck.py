"""Every layer's input and parameter gradients against central finite differences (float64).

The loss is sum(forward(x) * dy) with a random upstream gradient dy (never all-ones:
BatchNorm's gradient of a plain sum is exactly zero in training mode, which would hide
bugs). Shapes, kernels, strides, paddings and seeds are drawn by Hypothesis; arrays stay
small because every element costs two forward passes.
"""

import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl.execution import Execution
from refimpl.gradcheck import check_layer_gradients, layer_loss, numerical_gradient
from refimpl.layers import BatchNorm, Conv2d, Flatten, LeakyReLU, Linear, Reshape, Sequential, Sigmoid, Upsample
from refimpl.layers.im2col import conv_output_size
from refimpl.rng import generator

F64 = np.float64
EPS, ATOL, RTOL = 1e-6, 1e-8, 1e-6
seeds = st.integers(0, 2**32 - 1)


def check(layer, x, dy):
    """Run the finite-difference check and make sure every parameter was actually compared."""
    results = check_layer_gradients(layer, x, dy, eps=EPS, atol=ATOL, rtol=RTOL)
    assert set(results) == {"x", *layer.parameters()}
    return results


def upstream(rng, shape):
    """A random upstream gradient dy of ``shape``."""
    return rng.standard_normal(shape)


def away_from_kink(x, margin=1e-3):
    """Push every |x| above ``margin`` so finite differences never straddle x = 0."""
    return x + np.copysign(margin, x)


# ---------------------------------------------------------------- Conv2d


@st.composite
def conv_cases(draw):
    square = draw(st.booleans())
    kh = draw(st.integers(1, 5))
    kw = kh if square else draw(st.integers(1, 5))
    case = dict(
        n=draw(st.integers(1, 4)), cin=draw(st.integers(1, 3)), cout=draw(st.integers(1, 3)),
        h=draw(st.integers(1, 7)), w=draw(st.integers(1, 7)), kernel=(kh, kw),
        stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))), seed=draw(seeds),
    )
    ho = conv_output_size(case["h"], kh, case["stride"][0], case["padding"][0])
    wo = conv_output_size(case["w"], kw, case["stride"][1], case["padding"][1])
    assume(ho >= 1 and wo >= 1)
    case["out_hw"] = (ho, wo)
    # exercise the int form of kernel_size when it is square
    case["kernel_arg"] = kh if square else (kh, kw)
    return case


@given(conv_cases())
def test_conv2d_gradients(case):
    rng = np.random.default_rng(case["seed"])
    layer = Conv2d(case["cin"], case["cout"], case["kernel_arg"], case["stride"], case["padding"],
                   rng=generator(case["seed"]), dtype=F64)
    x = rng.standard_normal((case["n"], case["cin"], case["h"], case["w"]))
    dy = upstream(rng, (case["n"], case["cout"], *case["out_hw"]))
    assert layer.forward(x, cache=False).shape == dy.shape
    check(layer, x, dy)


# ---------------------------------------------------------------- Upsample


@given(n=st.integers(1, 4), c=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4),
       factor=st.integers(1, 3), seed=seeds)
def test_upsample_gradients(n, c, h, w, factor, seed):
    rng = np.random.default_rng(seed)
    layer = Upsample(factor)
    x = rng.standard_normal((n, c, h, w))
    dy = upstream(rng, (n, c, h * factor, w * factor))
    check(layer, x, dy)


# ---------------------------------------------------------------- BatchNorm


def random_batchnorm(rng, c, training, eps=1e-3, momentum=0.8, running_var="biased"):
    """A float64 BatchNorm with random affine parameters and (positive) running statistics."""
    layer = BatchNorm(c, momentum=momentum, eps=eps, running_var=running_var, dtype=F64)
    layer.load_state_dict({"weight": rng.uniform(0.5, 2.0, c) * rng.choice([-1, 1], c),
                           "bias": rng.standard_normal(c),
                           "running_mean": rng.standard_normal(c),
                           "running_var": rng.uniform(0.5, 2.0, c)})
    return layer.train(training)


@st.composite
def batchnorm_cases(draw, training, spatial):
    n = draw(st.integers(2 if training else 1, 4))
    c = draw(st.integers(1, 3))
    shape = (n, c, draw(st.integers(1, 3)), draw(st.integers(1, 3))) if spatial else (n, c)
    return dict(training=training, shape=shape, eps=draw(st.sampled_from([1e-3, 1e-5])), seed=draw(seeds))


@pytest.mark.parametrize("spatial", [False, True], ids=["NC", "NCHW"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@given(data=st.data())
def test_batchnorm_gradients(training, spatial, data):
    case = data.draw(batchnorm_cases(training, spatial))
    rng = np.random.default_rng(case["seed"])
    layer = random_batchnorm(rng, case["shape"][1], case["training"], eps=case["eps"])
    x = rng.standard_normal(case["shape"])
    dy = upstream(rng, case["shape"])
    before = {k: v.copy() for k, v in layer.named_buffers()}
    results = check(layer, x, dy)
    # the check restores the running statistics its numeric passes moved
    for k, v in layer.named_buffers():
        np.testing.assert_array_equal(v, before[k])
    if case["training"] and np.prod(case["shape"]) // case["shape"][1] >= 3:
        # with batch statistics the gradient of a plain sum vanishes: why dy must be random
        # (with 2 values per channel dx itself is ~0, as both normalise to about -1 and +1)
        ones_dx = BatchNorm(case["shape"][1], dtype=F64)
        ones_dx.forward(x)
        assert np.abs(ones_dx.backward(np.ones_like(x))).max() < 1e-12
        assert np.abs(results["x"][0]).max() > 1e-6


def expected_running(x, old_mean, old_var, momentum, running_var):
    """Keras convention, computed directly: running = momentum * running + (1 - momentum) * batch."""
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    mean = x.mean(axis=axes)
    var = x.var(axis=axes, ddof=0 if running_var == "biased" else 1)
    return momentum * old_mean + (1 - momentum) * mean, momentum * old_var + (1 - momentum) * var


@given(spatial=st.booleans(), n=st.integers(2, 4), c=st.integers(1, 3),
       momentum=st.sampled_from([0.8, 0.0, 0.5, 0.99]), running_var=st.sampled_from(["biased", "unbiased"]),
       steps=st.integers(1, 3), seed=seeds)
def test_batchnorm_running_statistics(spatial, n, c, momentum, running_var, steps, seed):
    rng = np.random.default_rng(seed)
    layer = random_batchnorm(rng, c, training=True, momentum=momentum, running_var=running_var)
    mean, var = layer.buffers["running_mean"].copy(), layer.buffers["running_var"].copy()
    shape = (n, c, 2, 3) if spatial else (n, c)
    for _ in range(steps):
        x = 3.0 * rng.standard_normal(shape) + 1.5
        layer.forward(x)
        mean, var = expected_running(x, mean, var, momentum, running_var)
        np.testing.assert_allclose(layer.buffers["running_mean"], mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(layer.buffers["running_var"], var, rtol=1e-12, atol=1e-14)
    # eval mode and update_running=False leave the statistics alone
    frozen = {k: v.copy() for k, v in layer.named_buffers()}
    x = rng.standard_normal(shape)
    layer.eval().forward(x)
    layer.train()
    layer.update_running = False
    layer.forward(x)
    for k, v in layer.named_buffers():
        np.testing.assert_array_equal(v, frozen[k])


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@given(spatial=st.booleans(), training=st.booleans(), n=st.integers(2, 5), c=st.integers(1, 4),
       hw=st.integers(1, 6), x_dtype=st.sampled_from(["same", "float64"]), dy_dtype=st.sampled_from(["same", "float64"]),
       seed=seeds)
def test_batchnorm_fast_path_equals_plain_formulas(dtype, tol, spatial, training, n, c, hw, x_dtype, dy_dtype, seed):
    """The fast path (default) gives y, dx, the parameter gradients and the running statistics of the
    plain formulas to rounding (tol relative to each array's largest value or the inputs' O(1) scale:
    its sums are associated differently), and leaves x and dy alone. A float64 x or dy with float32 parameters takes the plain
    path for that pass, exactly: no fast-path write may narrow it."""
    rng = np.random.default_rng(seed)
    shape = (n, c, hw, hw + 1) if spatial else (n, c)
    x = (2.0 * rng.standard_normal(shape) + 0.5).astype(dtype if x_dtype == "same" else np.float64)
    dy = rng.standard_normal(shape).astype(dtype if dy_dtype == "same" else np.float64)
    x_before, dy_before = x.copy(), dy.copy()
    state = {"weight": rng.uniform(0.5, 2.0, c).astype(dtype), "bias": rng.standard_normal(c).astype(dtype),
             "running_mean": rng.standard_normal(c).astype(dtype), "running_var": rng.uniform(0.5, 2, c).astype(dtype)}
    results = []
    for fast in (True, False):
        layer = BatchNorm(c, dtype=dtype, paths=Execution(fast_batchnorm=fast).resolve("numpy"))
        layer.load_state_dict(state)
        layer.train(training)
        y = layer.forward(x)
        dx = layer.backward(dy)
        results.append((y, dx, *layer.grads.values(), *layer.buffers.values()))
    for fast, plain in zip(*results):
        assert fast.dtype == plain.dtype
        if x.dtype != dtype:  # the plain path on both sides: bit for bit
            np.testing.assert_array_equal(fast, plain)
        else:  # a float64 dy alone: the fast forward, then the plain backward from x_hat = centred inv_std
            # atol on the scale of the O(1) inputs too: an output can be a cancelling sum (n = 2: dx ~ 1e-5)
            np.testing.assert_allclose(fast, plain, rtol=tol, atol=tol * max(1.0, np.abs(plain).max()))
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(dy, dy_before)


def test_batchnorm_defaults_are_keras():
    """Defaults: momentum 0.8 (running = 0.8 running + 0.2 batch), biased stored variance, eps 1e-3."""
    rng = np.random.default_rng(0)
    layer = BatchNorm(3, dtype=F64)
    assert (layer.momentum, layer.eps, layer.running_var) == (0.8, 1e-3, "biased")
    np.testing.assert_array_equal(layer.buffers["running_mean"], np.zeros(3))
    np.testing.assert_array_equal(layer.buffers["running_var"], np.ones(3))
    x = rng.standard_normal((5, 3, 2, 2))
    y = layer.forward(x)
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.2 * x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(layer.buffers["running_var"], 0.8 + 0.2 * x.var(axis=(0, 2, 3)), rtol=1e-12)
    mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- activations


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), slope=st.sampled_from([0.02, 0.0, 0.3, 1.0]),
       seed=seeds)
def test_leaky_relu_gradients(shape, slope, seed):
    rng = np.random.default_rng(seed)
    x = away_from_kink(rng.standard_normal(shape))
    assert np.abs(x).min() > 1e-3 - 1e-15
    check(LeakyReLU(slope), x, upstream(rng, shape))


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), scale=st.sampled_from([0.5, 3.0]), seed=seeds)
def test_sigmoid_gradients(shape, scale, seed):
    rng = np.random.default_rng(seed)
    check(Sigmoid(), scale * rng.standard_normal(shape), upstream(rng, shape))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_stable_for_large_inputs(dtype):
    from scipy.special import expit

    x = np.array([-1e4, -5e3, -800.0, -710.0, -100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, 710.0, 800.0, 5e3, 1e4],
                 dtype=dtype)
    layer = Sigmoid()
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        y = layer.forward(x)
        dx = layer.backward(np.ones_like(x))
    assert y.dtype == dtype and dx.dtype == dtype
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert ((y >= 0) & (y <= 1)).all() and (np.diff(y) >= 0).all()
    assert y[0] == 0.0 and y[-1] == 1.0 and y[7] == 0.5  # the exact limits, no NaN
    tol = 1e-15 if dtype == np.float64 else 1e-7
    # atol: scipy flushes e^-710 (a float64 subnormal) to zero, the layer does not
    np.testing.assert_allclose(y, expit(x.astype(np.float64)), rtol=tol, atol=np.finfo(dtype).tiny)
    assert dx[0] == 0.0 and dx[-1] == 0.0 and dx[7] == 0.25


# ---------------------------------------------------------------- Linear, Flatten, Reshape


@given(n=st.integers(1, 4), fin=st.integers(1, 5), fout=st.integers(1, 5), init=st.sampled_from(["torch", "keras"]),
       seed=seeds)
def test_linear_gradients(n, fin, fout, init, seed):
    rng = np.random.default_rng(seed)
    layer = Linear(fin, fout, rng=generator(seed), dtype=F64, init=init)
    layer.params["bias"][...] = rng.standard_normal(fout)  # keras init starts at zero bias
    check(layer, rng.standard_normal((n, fin)), upstream(rng, (n, fout)))


@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4), seed=seeds)
def test_flatten_gradients(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    y = Flatten().forward(x, cache=False)
    assert y.shape == (shape[0], int(np.prod(shape[1:])))
    check(Flatten(), x, upstream(rng, y.shape))


@given(n=st.integers(1, 4), shape=st.lists(st.integers(1, 3), min_size=1, max_size=3), seed=seeds)
def test_reshape_gradients(n, shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, int(np.prod(shape))))
    check(Reshape(shape), x, upstream(rng, (n, *shape)))


# ---------------------------------------------------------------- Sequential


def decoder_like(rng_seed, c, h, training):
    """Linear -> Reshape -> Upsample -> Conv2d -> BatchNorm -> LeakyReLU -> Flatten -> Linear -> Sigmoid."""
    g = generator(rng_seed)
    rng = np.random.default_rng(rng_seed + 1)
    net = Sequential(
        Linear(3, c * h * h, rng=g, dtype=F64),
        Reshape((c, h, h)),
        Upsample(2),
        Conv2d(c, 2, (3, 2), stride=(1, 2), padding=1, rng=g, dtype=F64),
        random_batchnorm(rng, 2, training),
        LeakyReLU(0.02),
        Flatten(),
        Linear(2 * (2 * h) * (h + 1), 2, rng=g, dtype=F64),
        Sigmoid(),
    )
    return net.train(training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@given(n=st.integers(2, 3), c=st.integers(1, 2), h=st.integers(1, 2), seed=seeds)
def test_sequential_gradients(training, n, c, h, seed):
    rng = np.random.default_rng(seed)
    net = decoder_like(seed % 2**31, c, h, training)
    assert all(layer.training == training for _, layer in net.children())
    x = rng.standard_normal((n, 3))
    # keep the LeakyReLU input away from its kink (running a prefix must not move the statistics)
    saved = {k: v.copy() for k, v in net.named_buffers()}
    pre = Sequential(*net.layers[:5]).forward(x, cache=False)
    net.load_state_dict({**net.parameters(), **saved})
    assume(np.abs(pre).min() > 1e-3)
    dy = upstream(rng, (n, 2))
    results = check(net, x, dy)
    expected = {f"{i}.{p}" for i in (0, 3, 4, 7) for p in ("weight", "bias")}  # Linear, Conv2d, BatchNorm, Linear
    assert set(results) - {"x"} == expected


# ---------------------------------------------------------------- protocol: gradients accumulate


@pytest.mark.parametrize("make, shape", [
    (lambda: Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), rng=generator(1), dtype=F64), (2, 2, 5, 4)),
    (lambda: Linear(4, 3, rng=generator(2), dtype=F64), (3, 4)),
    (lambda: BatchNorm(3, dtype=F64), (4, 3, 2, 2)),
])
def test_parameter_gradients_accumulate(make, shape):
    """backward adds into grads; zero_grad clears them."""
    rng = np.random.default_rng(0)
    layer = make()
    x1, x2 = rng.standard_normal(shape), rng.standard_normal(shape)
    dy1 = upstream(rng, layer.forward(x1, cache=False).shape)
    dy2 = upstream(rng, dy1.shape)
    single = {}
    for x, dy in ((x1, dy1), (x2, dy2)):
        layer.zero_grad()
        layer.forward(x)
        layer.backward(dy)
        single[id(dy)] = {k: g.copy() for k, g in layer.gradients().items()}
    layer.zero_grad()
    for x, dy in ((x1, dy1), (x2, dy2)):
        layer.forward(x)
        layer.backward(dy)
    for name, g in layer.gradients().items():
        np.testing.assert_allclose(g, single[id(dy1)][name] + single[id(dy2)][name], rtol=1e-13, atol=1e-13)
        assert np.abs(g).max() > 0
    layer.zero_grad()
    assert all(np.all(g == 0) for g in layer.gradients().values())


def test_numerical_gradient_helper_on_known_function():
    """The finite-difference helper itself, on f(x) = sum(sin(x) * w), whose gradient is cos(x) * w."""
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    grad = numerical_gradient(lambda: np.sum(np.sin(x) * w), x, eps=EPS)
    np.testing.assert_allclose(grad, np.cos(x) * w, rtol=RTOL, atol=ATOL)
    layer = Linear(4, 2, rng=generator(0), dtype=F64)
    dy = upstream(rng, (3, 2))
    y = x @ layer.params["weight"].T + layer.params["bias"]
    assert layer_loss(layer, x, dy) == pytest.approx(float((y * dy).sum()), rel=1e-14)


def test_gradcheck_catches_a_wrong_backward():
    """A deliberately broken backward must fail the check (the check is not vacuous)."""

    class BrokenSigmoid(Sigmoid):
        def backward(self, dy):
            return 1.01 * super().backward(dy)

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3))
    with pytest.raises(AssertionError, match="gradient 'x'"):
        check_layer_gradients(BrokenSigmoid(), x, upstream(rng, x.shape), eps=EPS, atol=ATOL, rtol=RTOL)
