"""The fused CUDA kernels (refimpl/kernels.py) against the plain array code they replace.

The reference runs on NumPy, the kernel on CuPy, on the same inputs. im2col and col2im
are gathers of the same values, col2im summing in the reference's order: equal exactly.
Adam's kernel computes the reference's formulas with no contracted multiply-adds: equal
to within a few units in the last place. Without CUDA only the dispatch test runs. Which code
runs is the resolved setting's ``cuda_kernels`` (refimpl/execution.py), on CuPy only.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import kernels
from refimpl.adam import Adam
from refimpl.backend import get_xp, to_device, to_host
from refimpl.execution import Execution
from refimpl.layers.im2col import col2im, conv_output_size, im2col

KERNELS = Execution().resolve("cupy")  # the default on CuPy: the kernels on
ARRAY_CODE = Execution(cuda_kernels=False).resolve("cupy")


def test_kernels_apply_on_cupy_only():
    assert KERNELS.cuda_kernels and not ARRAY_CODE.cuda_kernels
    assert not Execution(cuda_kernels=True).resolve("numpy").cuda_kernels
    assert not Execution(reference=True).resolve("cupy").cuda_kernels
    assert Execution(reference=True, cuda_kernels=True).resolve("cupy").cuda_kernels  # a switch given wins


@pytest.mark.cuda
def test_kernels_can_be_switched_off(monkeypatch):
    """--no-cuda-kernels: CuPy arrays take the plain array code, with equal results."""
    cp = get_xp("cupy")
    x = np.random.default_rng(2).standard_normal((2, 3, 6, 5))
    fused = to_host(im2col(to_device(x, cp), (3, 3), (2, 1), (1, 1), paths=KERNELS))
    monkeypatch.setattr(kernels, "im2col", None)  # the kernel cannot run
    np.testing.assert_array_equal(to_host(im2col(to_device(x, cp), (3, 3), (2, 1), (1, 1), paths=ARRAY_CODE)), fused)


@st.composite
def conv_geometry(draw):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 12))
    w = draw(st.integers(max(1, kw - 2 * pw), 12))
    n, c = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return (n, c, h, w), (kh, kw), (sh, sw), (ph, pw), draw(st.integers(0, 2**32 - 1))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(geometry=conv_geometry())
def test_im2col_and_col2im_kernels_equal_the_reference(dtype, geometry):
    cp = get_xp("cupy")
    shape, kernel, stride, padding, seed = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    cols = im2col(x, kernel, stride, padding)
    cols_gpu = im2col(to_device(x, cp), kernel, stride, padding, paths=KERNELS)
    assert type(cols_gpu).__module__.startswith("cupy") and cols_gpu.dtype == dtype
    np.testing.assert_array_equal(to_host(cols_gpu), cols)

    dcols = rng.standard_normal(cols.shape).astype(dtype)
    dx = col2im(dcols, shape, kernel, stride, padding)
    dx_gpu = col2im(to_device(dcols, cp), shape, kernel, stride, padding, paths=KERNELS)
    assert dx_gpu.shape == shape and dx_gpu.dtype == dtype
    np.testing.assert_array_equal(to_host(dx_gpu), dx)


@pytest.mark.cuda
def test_col2im_kernel_reads_non_contiguous_columns():
    cp = get_xp("cupy")
    shape, kernel, stride, padding = (2, 3, 7, 6), (3, 2), (2, 1), (1, 0)
    ho, wo = conv_output_size(7, 3, 2, 1), conv_output_size(6, 2, 1, 0)
    dcols_t = np.random.default_rng(0).standard_normal((2 * ho * wo, 3 * 3 * 2))
    expected = col2im(np.ascontiguousarray(dcols_t.T), shape, kernel, stride, padding)
    np.testing.assert_array_equal(to_host(col2im(to_device(dcols_t, cp).T, shape, kernel, stride, padding,
                                                                     paths=KERNELS)), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, ulps", [(np.float64, 4), (np.float32, 4)])
def test_adam_kernel_equals_the_reference(dtype, ulps):
    cp = get_xp("cupy")
    rng = np.random.default_rng(1)
    shapes = {"w": (5, 3, 3, 3), "b": (5,), "lam": ()}
    start = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    kwargs = {"lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-8, "maximize": ("lam",)}
    host = {k: v.copy() for k, v in start.items()}
    device = {k: to_device(v, cp) for k, v in start.items()}
    host_opt, device_opt = Adam(host, **kwargs), Adam(device, **kwargs, cuda_kernels=True)
    for _ in range(25):
        grads = {k: (rng.standard_normal(s) * 10 ** rng.uniform(-3, 2)).astype(dtype) for k, s in shapes.items()}
        host_opt.step(grads)
        device_opt.step({k: to_device(g, cp) for k, g in grads.items()})
    for k in shapes:
        for name, ours, ref in (("p", device[k], host[k]), ("m", device_opt.m[k], host_opt.m[k]),
                                ("v", device_opt.v[k], host_opt.v[k])):
            tol = ulps * np.spacing(np.abs(ref).astype(dtype)).max()
            np.testing.assert_allclose(to_host(ours), ref, rtol=0, atol=tol, err_msg=f"{name} of {k}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@given(n=st.integers(2, 5), c=st.integers(1, 4), hw=st.sampled_from([None, (1, 3), (4, 5)]),
       training=st.booleans(), running_var=st.sampled_from(["biased", "unbiased"]), seed=st.integers(0, 2**32 - 1))
def test_batchnorm_kernels_equal_the_plain_code_on_the_gpu(dtype, rtol, n, c, hw, training, running_var, seed):
    """BatchNorm with the fused kernels and with the plain array code (--no-cuda-kernels --no-fast-batchnorm),
    on the same CuPy inputs."""
    from refimpl.layers import BatchNorm

    cp = get_xp("cupy")
    rng = np.random.default_rng(seed)
    shape = (n, c) if hw is None else (n, c, *hw)
    x, dy = rng.standard_normal(shape) * 3 + 1, rng.standard_normal(shape)
    state = {"weight": rng.uniform(-2, 2, c), "bias": rng.standard_normal(c),
             "running_mean": rng.standard_normal(c), "running_var": rng.uniform(0.5, 2.0, c)}
    results = []
    for paths in (KERNELS, Execution(cuda_kernels=False, fast_batchnorm=False).resolve("cupy")):
        layer = BatchNorm(c, 0.8, 1e-3, running_var, xp=cp, dtype=dtype, paths=paths).train(training)
        layer.load_state_dict(state)
        y = layer.forward(to_device(x, cp, dtype))
        dx = layer.backward(to_device(dy, cp, dtype))
        results.append({"y": y, "dx": dx, **layer.gradients(), **dict(layer.named_buffers())})
    fused, plain = results
    for key in plain:
        np.testing.assert_allclose(to_host(fused[key]), to_host(plain[key]), rtol=rtol, atol=rtol, err_msg=key)
