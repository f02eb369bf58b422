"""UpsampleConv2d against its definition, Sequential(Upsample(2), Conv2d(C, O, 3, 1, 1)).

The three evaluation methods ("im2col", "col2im", "difference") and "auto" are checked: forward, dx, weight and
bias gradients equal to the reference pair to 1e-12 relative in float64 (relative error =
max|ours - ref| / max|ref|); central finite differences; PyTorch's nn.Upsample + nn.Conv2d;
float32 against float64; the methods against each other; and the scratch-buffer reuse (repeated steps, a cache=False pass
between forward and backward).
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.backend import get_xp, to_device, to_host
from refimpl.gradcheck import check_layer_gradients
from refimpl.layers import Conv2d, Sequential, Upsample
from refimpl.execution import Execution
from refimpl.layers.upsample_conv2d import (DIFF_MAP, PRODUCTS, UpsampleConv2d, difference_kernels,
                                            difference_kernels_transpose, phase_kernels, phase_kernels_transpose)
from refimpl.rng import generator

F64 = np.float64
EVALUATIONS = ["im2col", "col2im", "difference"]
METHODS = [*EVALUATIONS, "auto"]
seeds = st.integers(0, 2**32 - 1)


def rel_err(ours, ref):
    ours, ref = to_host(ours).astype(F64), to_host(ref).astype(F64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = np.abs(ref).max()
    diff = np.abs(ours - ref).max()
    return diff / scale if scale > 0 else diff


def pair(c, o, seed, dtype=F64, method="auto", xp=np):
    """(fused layer, reference Sequential) with identical weights drawn from ``seed``."""
    fused = UpsampleConv2d(c, o, rng=generator(seed), xp=xp, dtype=dtype, method=method)
    ref = Sequential(Upsample(2), Conv2d(c, o, 3, stride=1, padding=1, rng=generator(seed), xp=xp, dtype=dtype))
    return fused, ref


def step(layer, x, dy):
    """One forward/backward: (y, dx); parameter gradients accumulate in the layer."""
    y = layer.forward(x)
    return y, layer.backward(dy)


def assert_same_step(fused, ref, x, dy, tol):
    y, dx = step(fused, x, dy)
    y_ref, dx_ref = step(ref, x, dy)
    conv = ref["1"]
    for what, ours, theirs in [("y", y, y_ref), ("dx", dx, dx_ref), ("dweight", fused.grads["weight"], conv.grads["weight"]),
                               ("dbias", fused.grads["bias"], conv.grads["bias"])]:
        err = rel_err(ours, theirs)
        assert err <= tol, f"{fused.method} {what}: relative error {err:.3e} > {tol}"


shapes = dict(n=st.integers(1, 4), c=st.integers(1, 4), o=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 6))


@given(**shapes, method=st.sampled_from(METHODS), seed=seeds)
def test_equals_upsample_then_conv(n, c, o, h, w, method, seed):
    rng = np.random.default_rng(seed)
    fused, ref = pair(c, o, seed, method=method)
    assert all(np.array_equal(fused.params[k], ref["1"].params[k]) for k in ("weight", "bias"))
    # two steps with different data: gradients accumulate, reused scratch buffers hold no stale values
    for _ in range(2):
        x = rng.standard_normal((n, c, h, w))
        dy = rng.standard_normal((n, o, 2 * h, 2 * w))
        assert_same_step(fused, ref, x, dy, 1e-12)


@given(n=st.integers(1, 2), c=st.integers(1, 3), o=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4),
       method=st.sampled_from(EVALUATIONS), seed=seeds)
def test_gradients_match_finite_differences(n, c, o, h, w, method, seed):
    rng = np.random.default_rng(seed)
    layer = UpsampleConv2d(c, o, rng=generator(seed), dtype=F64, method=method)
    x = rng.standard_normal((n, c, h, w))
    dy = rng.standard_normal((n, o, 2 * h, 2 * w))
    results = check_layer_gradients(layer, x, dy, eps=1e-6, atol=1e-8, rtol=1e-6)
    assert set(results) == {"x", "weight", "bias"}


@given(**shapes, method=st.sampled_from(EVALUATIONS), seed=seeds)
def test_matches_torch_upsample_conv(n, c, o, h, w, method, seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    layer = UpsampleConv2d(c, o, rng=generator(seed), dtype=F64, method=method)
    module = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="nearest"),
                                 torch.nn.Conv2d(c, o, 3, stride=1, padding=1)).double()
    with torch.no_grad():
        for name, value in layer.params.items():  # same state_dict names, under the conv's index
            module.state_dict()[f"1.{name}"].copy_(torch.from_numpy(value))
    x = rng.standard_normal((n, c, h, w))
    dy = rng.standard_normal((n, o, 2 * h, 2 * w))
    y, dx = step(layer, x, dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    yt.backward(torch.from_numpy(dy))
    conv = module[1]
    for what, ours, theirs in [("y", y, yt), ("dx", dx, xt.grad), ("dweight", layer.grads["weight"], conv.weight.grad),
                               ("dbias", layer.grads["bias"], conv.bias.grad)]:
        err = rel_err(ours, theirs.detach().numpy())
        assert err <= 1e-10, f"{method} {what}: relative error {err:.3e} vs torch"


@pytest.mark.parametrize("method", EVALUATIONS)
@pytest.mark.parametrize("n, c, o, h", [(3, 4, 2, 5), (2, 64, 32, 8), (2, 32, 3, 16)])
def test_float32_agrees_with_float64(method, n, c, o, h):
    rng = np.random.default_rng(c * 100 + o)
    fused32 = UpsampleConv2d(c, o, rng=generator(7), dtype=np.float32, method=method)
    _, ref64 = pair(c, o, 7)
    x = rng.standard_normal((n, c, h, h))
    dy = rng.standard_normal((n, o, 2 * h, 2 * h))
    y, dx = step(fused32, x.astype(np.float32), dy.astype(np.float32))
    y_ref, dx_ref = step(ref64, x, dy)
    assert y.dtype == dx.dtype == fused32.grads["weight"].dtype == np.float32
    conv = ref64["1"]
    for what, ours, theirs in [("y", y, y_ref), ("dx", dx, dx_ref), ("dweight", fused32.grads["weight"], conv.grads["weight"]),
                               ("dbias", fused32.grads["bias"], conv.grads["bias"])]:
        err = rel_err(ours, theirs)
        assert err <= 1e-5, f"{method} float32 {what}: relative error {err:.3e}"


@pytest.mark.parametrize("method", EVALUATIONS)
def test_scratch_reuse_across_passes(method):
    """Cached and uncached passes of different shapes share scratch buffers; results stay exact and
    the returned y and dx are never scratch (the next step leaves them alone)."""
    rng = np.random.default_rng(3)
    fused, ref = pair(3, 2, 11, method=method)
    x, other = rng.standard_normal((2, 2, 3, 4, 5))
    small = rng.standard_normal((1, 3, 2, 3))
    dy = rng.standard_normal((2, 2, 8, 10))
    assert rel_err(fused.forward(small, cache=False), ref.forward(small, cache=False)) <= 1e-12
    y_other = fused.forward(other, cache=False)
    y, dx = step(fused, x, dy)
    y_ref, dx_ref = step(ref, x, dy)
    assert rel_err(y_other, ref.forward(other, cache=False)) <= 1e-12
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(dx, dx_ref) <= 1e-12
    assert rel_err(fused.grads["weight"], ref["1"].grads["weight"]) <= 1e-12
    y_kept, dx_kept = y.copy(), dx.copy()
    step(fused, other, dy)
    assert np.array_equal(y, y_kept) and np.array_equal(dx, dx_kept)
    # as for every layer, an uncached pass drops the pending cache
    fused.forward(x)
    fused.forward(x, cache=False)
    with pytest.raises(RuntimeError, match="without a cached forward"):
        fused.backward(dy)


def test_loads_a_plain_conv_state_dict():
    rng = np.random.default_rng(5)
    conv = Conv2d(3, 4, 3, stride=1, padding=1, rng=generator(1), dtype=F64)
    fused = UpsampleConv2d(3, 4, rng=generator(2), dtype=F64)
    assert not np.array_equal(fused.params["weight"], conv.params["weight"])
    fused.load_state_dict(conv.state_dict())
    x = rng.standard_normal((2, 3, 4, 4))
    assert rel_err(fused.forward(x, cache=False), conv.forward(Upsample(2).forward(x, cache=False), cache=False)) <= 1e-12


@given(o=st.integers(1, 4), c=st.integers(1, 4), seed=seeds)
def test_phase_kernel_transpose_is_the_adjoint(o, c, seed):
    """<phase_kernels(w), dK> == <w, phase_kernels_transpose(dK)> for random w, dK."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((o, c, 3, 3))
    dk = rng.standard_normal((2, 2, o, c, 2, 2))
    lhs = float((phase_kernels(w) * dk).sum())
    rhs = float((w * phase_kernels_transpose(dk)).sum())
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


def test_phase_kernels_are_the_tap_sums():
    """The derivation, one axis: phase 0 taps (w0, w1 + w2), phase 1 taps (w0 + w1, w2)."""
    w = np.arange(9.0).reshape(1, 1, 3, 3)
    k = phase_kernels(w)[:, :, 0, 0]  # (p, q, t, u)
    rows = {0: [w[0, 0, 0], w[0, 0, 1] + w[0, 0, 2]], 1: [w[0, 0, 0] + w[0, 0, 1], w[0, 0, 2]]}
    for p in (0, 1):
        for q in (0, 1):
            for t in (0, 1):
                row = rows[p][t]
                cols = {0: [row[0], row[1] + row[2]], 1: [row[0] + row[1], row[2]]}[q]
                assert list(k[p, q, t]) == cols


def test_auto_method_rule():
    # im2col only where its 9C-row column matrix is under half of col2im's 16O rows; else difference from O >= 16 on
    assert UpsampleConv2d(32, 3, rng=generator(0)).method == "col2im"
    assert UpsampleConv2d(32, 1, rng=generator(0)).method == "col2im"
    assert UpsampleConv2d(64, 15, rng=generator(0)).method == "col2im"
    assert UpsampleConv2d(64, 16, rng=generator(0)).method == "difference"
    assert UpsampleConv2d(64, 32, rng=generator(0)).method == "difference"
    assert UpsampleConv2d(64, 64, rng=generator(0)).method == "difference"
    assert UpsampleConv2d(32, 32, rng=generator(0)).method == "difference"
    assert UpsampleConv2d(8, 9, rng=generator(0)).method == "col2im"
    assert UpsampleConv2d(16, 18, rng=generator(0)).method == "difference"
    assert UpsampleConv2d(16, 19, rng=generator(0)).method == "im2col"
    assert UpsampleConv2d(8, 10, rng=generator(0)).method == "im2col"
    assert UpsampleConv2d(1, 4, rng=generator(0)).method == "im2col"


@given(**shapes, dtype=st.sampled_from([np.float32, F64]), flat=st.booleans(), parallel_grads=st.booleans(),
       seed=seeds)
def test_difference_equals_col2im_to_rounding(n, c, o, h, w, dtype, flat, parallel_grads, seed):
    """The nine-product method against the sixteen-product one, both ways, two steps, with either twin of the shifts
    and differences and of the backward GEMMs."""
    paths = Execution(shift_flat=flat, parallel_grads=parallel_grads).resolve("numpy")
    rng = np.random.default_rng(seed)
    ours, theirs = (UpsampleConv2d(c, o, rng=generator(seed), dtype=dtype, method=m, paths=paths)
                    for m in ("difference", "col2im"))
    tol = 1e-12 if dtype == F64 else 1e-5
    for _ in range(2):
        x = rng.standard_normal((n, c, h, w)).astype(dtype)
        dy = rng.standard_normal((n, o, 2 * h, 2 * w)).astype(dtype)
        for what, a, b in zip(("y", "dx"), step(ours, x, dy), step(theirs, x, dy)):
            assert a.dtype == b.dtype == dtype and rel_err(a, b) <= tol, what
        for k in ("weight", "bias"):
            assert rel_err(ours.grads[k], theirs.grads[k]) <= tol, k


@given(o=st.integers(1, 4), c=st.integers(1, 4), seed=seeds)
def test_difference_kernel_transpose_is_the_adjoint(o, c, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((o, c, 3, 3))
    dk = rng.standard_normal((9, o, c))
    lhs = float((difference_kernels(w) * dk).sum())
    rhs = float((w * difference_kernels_transpose(dk)).sum())
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


def test_difference_kernels_are_the_factor_sums():
    """Eq. (3): a = w0, b = w1 + w2, d = w1 along each axis; DIFF_MAP is invertible (no information lost)."""
    w = np.arange(9.0).reshape(1, 1, 3, 3)
    factors = {0: lambda r: r[0], 1: lambda r: r[1] + r[2], 2: lambda r: r[1]}
    k = difference_kernels(w)[:, 0, 0]
    for i, (rho, kappa) in enumerate(PRODUCTS):
        rows = [factors[kappa](w[0, 0, t]) for t in range(3)]  # each kernel row's column factor
        assert k[i] == factors[rho](rows)
    assert abs(np.linalg.det(DIFF_MAP)) == pytest.approx(1.0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="in_channels=0"):
        UpsampleConv2d(0, 2, rng=generator(0))
    with pytest.raises(ValueError, match="method='fast': expected one of auto, im2col, col2im, difference"):
        UpsampleConv2d(2, 2, rng=generator(0), method="fast")
    layer = UpsampleConv2d(2, 3, rng=generator(0), dtype=F64)
    with pytest.raises(ValueError, match=r"expected x of shape \(N, C=2, H, W\), got \(1, 3, 4, 4\)"):
        layer.forward(np.zeros((1, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"got \(2, 4, 4\)"):
        layer.forward(np.zeros((2, 4, 4)))
    with pytest.raises(RuntimeError, match="without a cached forward"):
        layer.backward(np.zeros((1, 3, 8, 8)))
    layer.forward(np.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match=r"expected dy of shape \(1, 3, 8, 8\), got \(1, 3, 4, 4\)"):
        layer.backward(np.zeros((1, 3, 4, 4)))


@pytest.mark.cuda
@pytest.mark.parametrize("method", EVALUATIONS)
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_cupy_matches_numpy(method, dtype, tol):
    cp = get_xp("cupy")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 6, 7))
    dy = rng.standard_normal((3, 4, 12, 14))
    host = UpsampleConv2d(5, 4, rng=generator(9), dtype=dtype, method=method)
    device = UpsampleConv2d(5, 4, rng=generator(9), xp=cp, dtype=dtype, method=method)
    for _ in range(2):
        y, dx = step(host, x.astype(dtype), dy.astype(dtype))
        y_d, dx_d = step(device, to_device(x, cp, dtype), to_device(dy, cp, dtype))
        for ours, theirs in [(y_d, y), (dx_d, dx), (device.grads["weight"], host.grads["weight"]),
                             (device.grads["bias"], host.grads["bias"])]:
            assert ours.dtype == dtype
            assert rel_err(ours, theirs) <= tol
