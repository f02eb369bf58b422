"""Every layer's forward and backward (dx and every parameter gradient) against PyTorch, float64.

Relative error = max|ours - torch| / max|torch|, required <= 1e-10. Weights are drawn by
refimpl and copied into the torch module by state_dict name (the layers use PyTorch's names).
"""

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl.layers import BatchNorm, Conv2d, Flatten, LeakyReLU, Linear, Reshape, Sequential, Sigmoid, Upsample
from refimpl.layers.im2col import conv_output_size
from refimpl.rng import generator

torch = pytest.importorskip("torch")

F64 = np.float64
TOL = 1e-10
seeds = st.integers(0, 2**32 - 1)


def rel_err(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = np.abs(ref).max() if ref.size else 0.0
    diff = np.abs(ours - ref).max() if ref.size else 0.0
    return diff / scale if scale > 0 else diff


def assert_close(ours, ref, what):
    err = rel_err(ours, ref)
    assert err <= TOL, f"{what}: relative error {err:.3e} > {TOL}"


def t(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


def load_into_torch(layer, module):
    """Copy our parameters and buffers into the torch module, by (shared) state_dict name."""
    ours = layer.state_dict()
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if name in ours:
                value.copy_(t(ours[name]))
            else:
                assert name == "num_batches_tracked" or name.endswith(".num_batches_tracked"), name


def compare(layer, module, x, dy):
    """Forward and backward of ``layer`` vs ``module`` on input x with upstream gradient dy."""
    load_into_torch(layer, module)
    layer.zero_grad()
    y = layer.forward(x)
    dx = layer.backward(dy)
    xt = t(x, grad=True)
    yt = module(xt)
    yt.backward(t(dy))
    assert_close(y, yt.detach().numpy(), "forward")
    assert_close(dx, xt.grad.numpy(), "dx")
    torch_params = dict(module.named_parameters())
    assert set(torch_params) == set(layer.parameters())
    for name, g in layer.gradients().items():
        assert_close(g, torch_params[name].grad.numpy(), f"grad {name}")
    return y


# ---------------------------------------------------------------- Conv2d


@st.composite
def conv_cases(draw):
    kh = draw(st.integers(1, 5))
    kw = kh if draw(st.booleans()) else draw(st.integers(1, 5))
    case = dict(n=draw(st.integers(1, 4)), cin=draw(st.integers(1, 3)), cout=draw(st.integers(1, 4)),
                h=draw(st.integers(1, 9)), w=draw(st.integers(1, 9)), kernel=(kh, kw),
                stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))), seed=draw(seeds))
    ho = conv_output_size(case["h"], kh, case["stride"][0], case["padding"][0])
    wo = conv_output_size(case["w"], kw, case["stride"][1], case["padding"][1])
    assume(ho >= 1 and wo >= 1)
    case["out"] = (case["n"], case["cout"], ho, wo)
    return case


@given(conv_cases())
def test_conv2d_matches_torch(case):
    rng = np.random.default_rng(case["seed"])
    layer = Conv2d(case["cin"], case["cout"], case["kernel"], case["stride"], case["padding"],
                   rng=generator(case["seed"]), dtype=F64)
    module = torch.nn.Conv2d(case["cin"], case["cout"], case["kernel"], case["stride"], case["padding"]).double()
    x = rng.standard_normal((case["n"], case["cin"], case["h"], case["w"]))
    y = compare(layer, module, x, rng.standard_normal(case["out"]))
    assert y.shape == case["out"]


# ---------------------------------------------------------------- Upsample


@given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6), factor=st.integers(1, 4),
       seed=seeds)
def test_upsample_matches_torch(n, c, h, w, factor, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    module = torch.nn.Upsample(scale_factor=factor, mode="nearest")
    compare(Upsample(factor), module, x, rng.standard_normal((n, c, h * factor, w * factor)))


# ---------------------------------------------------------------- BatchNorm


@st.composite
def batchnorm_cases(draw, training, spatial):
    n = draw(st.integers(2 if training else 1, 5))
    c = draw(st.integers(1, 4))
    shape = (n, c, draw(st.integers(1, 4)), draw(st.integers(1, 4))) if spatial else (n, c)
    # Two values per channel normalise to about -1 and +1 whatever they are, so dx is ~0 up to
    # eps / var terms and the relative error measures only rounding: ask for >= 3 in training mode.
    assume(not training or math.prod(shape) // c >= 3)
    return dict(training=training, shape=shape, eps=draw(st.sampled_from([1e-3, 1e-5])), seed=draw(seeds))


@pytest.mark.parametrize("spatial", [False, True], ids=["NC", "NCHW"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@given(data=st.data())
def test_batchnorm_matches_torch(training, spatial, data):
    case = data.draw(batchnorm_cases(training, spatial))
    rng = np.random.default_rng(case["seed"])
    shape, c = case["shape"], case["shape"][1]
    layer = BatchNorm(c, momentum=0.8, eps=case["eps"], running_var="unbiased", dtype=F64)
    layer.load_state_dict({"weight": rng.uniform(-2, 2, c), "bias": rng.standard_normal(c),
                           "running_mean": rng.standard_normal(c), "running_var": rng.uniform(0.5, 2.0, c)})
    torch_cls = torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d
    module = torch_cls(c, eps=case["eps"], momentum=1 - 0.8).double()
    layer.train(case["training"])
    module.train(case["training"])
    x = 2.0 * rng.standard_normal(shape) + 0.5
    compare(layer, module, x, rng.standard_normal(shape))
    # running statistics after the forward: updated in training mode, untouched in eval mode
    assert_close(layer.buffers["running_mean"], module.running_mean.numpy(), "running_mean")
    assert_close(layer.buffers["running_var"], module.running_var.numpy(), "running_var")


def test_batchnorm_running_stats_track_torch_over_steps():
    """Several training steps from the default initial statistics, then an eval pass on the result."""
    rng = np.random.default_rng(7)
    layer = BatchNorm(3, momentum=0.8, eps=1e-5, running_var="unbiased", dtype=F64)
    module = torch.nn.BatchNorm2d(3, eps=1e-5, momentum=1 - 0.8).double()
    for _ in range(5):
        x = 3.0 * rng.standard_normal((4, 3, 2, 3)) - 1.0
        layer.forward(x, cache=False)
        module(t(x))
        assert_close(layer.buffers["running_mean"], module.running_mean.numpy(), "running_mean")
        assert_close(layer.buffers["running_var"], module.running_var.numpy(), "running_var")
    layer.eval()
    module.eval()
    x = rng.standard_normal((2, 3, 2, 2))
    assert_close(layer.forward(x, cache=False), module(t(x)).detach().numpy(), "eval forward")


# ---------------------------------------------------------------- activations, Linear, Flatten, Reshape


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), zeros=st.booleans(), seed=seeds)
def test_leaky_relu_matches_torch(shape, zeros, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if zeros:  # the kink itself: both take the slope branch at exactly 0
        x[rng.random(shape) < 0.3] = 0.0
    compare(LeakyReLU(0.02), torch.nn.LeakyReLU(0.02), x, rng.standard_normal(shape))


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), scale=st.sampled_from([1.0, 10.0, 50.0]), seed=seeds)
def test_sigmoid_matches_torch(shape, scale, seed):
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal(shape)
    compare(Sigmoid(), torch.nn.Sigmoid(), x, rng.standard_normal(shape))


@given(n=st.integers(1, 5), fin=st.integers(1, 8), fout=st.integers(1, 8), seed=seeds)
def test_linear_matches_torch(n, fin, fout, seed):
    rng = np.random.default_rng(seed)
    layer = Linear(fin, fout, rng=generator(seed), dtype=F64)
    compare(layer, torch.nn.Linear(fin, fout).double(), rng.standard_normal((n, fin)), rng.standard_normal((n, fout)))


@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4), seed=seeds)
def test_flatten_matches_torch(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    compare(Flatten(), torch.nn.Flatten(), x, rng.standard_normal((shape[0], math.prod(shape[1:]))))


@given(n=st.integers(1, 4), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=seeds)
def test_reshape_matches_torch(n, shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, math.prod(shape)))
    compare(Reshape(shape), torch.nn.Unflatten(1, tuple(shape)), x, rng.standard_normal((n, *shape)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@given(seed=seeds)
def test_sequential_matches_torch(training, seed):
    """A small encoder-decoder stack; child names "0", "1", ... line up with torch.nn.Sequential."""
    rng = np.random.default_rng(seed)
    g = generator(seed)
    # (BatchNorm after the activation: directly after a conv, the conv bias gradient is exactly 0 in training mode)
    ours = Sequential(Conv2d(2, 3, 3, stride=2, padding=1, rng=g, dtype=F64), LeakyReLU(0.02), BatchNorm(3, dtype=F64),
                      Flatten(), Linear(12, 8, rng=g, dtype=F64), Reshape((2, 2, 2)), Upsample(2),
                      Conv2d(2, 1, (3, 2), padding=(1, 0), rng=g, dtype=F64), Sigmoid())
    nn = torch.nn
    theirs = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.LeakyReLU(0.02),
                           nn.BatchNorm2d(3, eps=1e-3, momentum=1 - 0.8), nn.Flatten(), nn.Linear(12, 8),
                           nn.Unflatten(1, (2, 2, 2)), nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(2, 1, (3, 2), padding=(1, 0)), nn.Sigmoid()).double()
    ours.layers[2].buffers["running_var"][...] = rng.uniform(0.5, 2.0, 3)
    ours.train(training)
    theirs.train(training)
    x = rng.standard_normal((3, 2, 4, 4))
    compare(ours, theirs, x, rng.standard_normal((3, 1, 4, 3)))


# ---------------------------------------------------------------- initialisation


def torch_bound(weight_shape):
    """PyTorch's default bound for Conv2d/Linear: kaiming_uniform(a=sqrt(5)) == 1/sqrt(fan_in); bias the same."""
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(weight_shape))
    gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    weight_bound = gain * math.sqrt(3.0 / fan_in)
    assert weight_bound == pytest.approx(1.0 / math.sqrt(fan_in), rel=1e-12)
    return weight_bound, 1.0 / math.sqrt(fan_in)


@given(kind=st.sampled_from(["conv", "linear"]), cin=st.integers(1, 8), cout=st.integers(1, 8),
       kh=st.integers(1, 5), kw=st.integers(1, 5), seed=seeds)
def test_torch_init_within_torch_bounds(kind, cin, cout, kh, kw, seed):
    if kind == "conv":
        layer = Conv2d(cin, cout, (kh, kw), rng=generator(seed), dtype=F64)
        module = torch.nn.Conv2d(cin, cout, (kh, kw))
    else:
        layer, module = Linear(cin, cout, rng=generator(seed), dtype=F64), torch.nn.Linear(cin, cout)
    w, b = layer.params["weight"], layer.params["bias"]
    assert w.shape == tuple(module.weight.shape) and b.shape == tuple(module.bias.shape)
    assert w.dtype == F64 and b.dtype == F64
    weight_bound, bias_bound = torch_bound(tuple(module.weight.shape))
    assert np.abs(w).max() <= weight_bound and np.abs(b).max() <= bias_bound
    # torch's own draws obey the same bounds (sanity of the reference)
    assert module.weight.abs().max().item() <= weight_bound + 1e-7
    # the draws fill the interval rather than collapsing (a wrong, much smaller bound would fail this)
    if w.size >= 50:
        assert np.abs(w).max() > 0.8 * weight_bound
    # same seed, same weights; another seed, other weights
    again = (Conv2d(cin, cout, (kh, kw), rng=generator(seed), dtype=F64) if kind == "conv"
             else Linear(cin, cout, rng=generator(seed), dtype=F64))
    np.testing.assert_array_equal(again.params["weight"], w)
    np.testing.assert_array_equal(again.params["bias"], b)


def test_keras_init_is_glorot_with_zero_bias():
    layer = Conv2d(3, 5, (3, 2), rng=generator(0), dtype=F64, init="keras")
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(5, 3, 3, 2))
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    w = layer.params["weight"]
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.8 * limit
    np.testing.assert_array_equal(layer.params["bias"], np.zeros(5))


def test_float32_init_is_float64_init_rounded():
    w64 = Conv2d(2, 3, 3, rng=generator(11), dtype=np.float64).params["weight"]
    w32 = Conv2d(2, 3, 3, rng=generator(11), dtype=np.float32).params["weight"]
    assert w32.dtype == np.float32
    np.testing.assert_array_equal(w32, w64.astype(np.float32))
