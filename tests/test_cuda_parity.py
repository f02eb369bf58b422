"""CuPy vs NumPy: every layer's forward/backward, Adam's steps and the seeded draws agree.

Runs only where CuPy and a CUDA device are usable (the ``cuda`` marker skips it otherwise;
CI has no GPU). Both backends are built from the same seed: parameters are drawn on the
host, so they must be identical, and results must agree to 1e-12 relative (float64) or
1e-5 (float32), relative error = max|cupy - numpy| / max|numpy|.
"""

import numpy as np
import pytest

from refimpl.adam import Adam
from refimpl.backend import array_module, get_xp, to_device, to_host
from refimpl.execution import Execution
from refimpl.layers import BatchNorm, Conv2d, Flatten, LeakyReLU, Linear, Reshape, Sequential, Sigmoid, Upsample
from refimpl.rng import generator, standard_normal, uniform

pytestmark = pytest.mark.cuda

TOL = {np.float64: 1e-12, np.float32: 1e-5}
DTYPES = [np.float64, np.float32]


@pytest.fixture(scope="module")
def cp():
    return get_xp("cupy")


def rel_err(ours, ref):
    ours, ref = to_host(ours), to_host(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = np.abs(ref).max()
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max()
    return diff / scale if scale > 0 else diff


def assert_parity(device, host, dtype, what):
    assert array_module(host) is np
    assert device.dtype == host.dtype == dtype, (what, device.dtype, host.dtype)
    err = rel_err(device, host)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]}"


def randomized_batchnorm(c, xp, dtype, training, seed, paths=None):
    """BatchNorm with random affine parameters and running statistics, identical on both backends."""
    layer = BatchNorm(c, xp=xp, dtype=dtype, paths=paths)
    rng = np.random.default_rng(seed)
    values = {"weight": rng.uniform(-2, 2, c), "bias": rng.standard_normal(c),
              "running_mean": rng.standard_normal(c), "running_var": rng.uniform(0.5, 2.0, c)}
    for name, target in layer.state_dict().items():
        target[...] = to_device(values[name], xp, dtype)  # device-to-device assignment
    return layer.train(training)


# name -> (make(xp, dtype) -> layer, input shape)
LAYERS = {
    "conv_square": (lambda xp, d, p: Conv2d(3, 4, 3, stride=1, padding=1, rng=generator(0), xp=xp, dtype=d, paths=p),
                    (4, 3, 8, 8)),
    "conv_strided": (lambda xp, d, p: Conv2d(2, 5, (5, 2), stride=(2, 3), padding=(2, 1), rng=generator(1), xp=xp,
                                          dtype=d, paths=p), (3, 2, 11, 9)),
    "conv_1x1": (lambda xp, d, p: Conv2d(3, 2, 1, rng=generator(2), xp=xp, dtype=d, paths=p), (2, 3, 4, 5)),
    "conv_phases": (lambda xp, d, p: Conv2d(3, 4, 4, stride=2, padding=1, rng=generator(13), xp=xp, dtype=d,
                                            paths=p),
                    (4, 3, 8, 8)),  # the stride-phase im2col/col2im path (with the CUDA kernels off)
    "upsample": (lambda xp, d, p: Upsample(3), (2, 3, 4, 5)),
    "batchnorm_train_2d": (lambda xp, d, p: randomized_batchnorm(5, xp, d, True, 3, p), (8, 5)),
    "batchnorm_eval_2d": (lambda xp, d, p: randomized_batchnorm(5, xp, d, False, 4, p), (8, 5)),
    "batchnorm_train_4d": (lambda xp, d, p: randomized_batchnorm(3, xp, d, True, 5, p), (4, 3, 5, 6)),
    "batchnorm_eval_4d": (lambda xp, d, p: randomized_batchnorm(3, xp, d, False, 6, p), (4, 3, 5, 6)),
    "leaky_relu": (lambda xp, d, p: LeakyReLU(0.02), (4, 3, 5, 6)),
    "sigmoid": (lambda xp, d, p: Sigmoid(), (4, 3, 5, 6)),
    "linear": (lambda xp, d, p: Linear(7, 5, rng=generator(7), xp=xp, dtype=d), (6, 7)),
    "flatten": (lambda xp, d, p: Flatten(), (4, 3, 5, 6)),
    "reshape": (lambda xp, d, p: Reshape((3, 2, 2)), (4, 12)),
    "sequential": (lambda xp, d, p: Sequential(
        Conv2d(2, 4, 3, stride=2, padding=1, rng=generator(8), xp=xp, dtype=d, paths=p), LeakyReLU(0.02),
        randomized_batchnorm(4, xp, d, True, 9, p), Flatten(), Linear(64, 12, rng=generator(10), xp=xp, dtype=d),
        Reshape((3, 2, 2)), Upsample(2), Conv2d(3, 1, 3, padding=1, rng=generator(11), xp=xp, dtype=d, paths=p),
        Sigmoid()),
        (4, 2, 8, 8)),
}


@pytest.mark.parametrize("kernels_on", [True, False], ids=["kernels", "array-code"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", LAYERS)
def test_layer_parity(cp, name, dtype, kernels_on):
    """Each layer on CuPy, with the CUDA kernels and with the array code NumPy runs (the stride-phase
    im2col, BatchNorm's fast path, the flat shifts), against NumPy."""
    make, shape = LAYERS[name]
    host, device = make(np, dtype, None), make(cp, dtype, Execution(cuda_kernels=kernels_on).resolve("cupy"))
    # same seed: bit-identical parameters and buffers, living on each backend
    host_state, device_state = host.state_dict(), device.state_dict()
    assert list(host_state) == list(device_state)
    for key in host_state:
        assert array_module(device_state[key]) is cp
        np.testing.assert_array_equal(to_host(device_state[key]), host_state[key])

    rng = np.random.default_rng(12)
    x = rng.standard_normal(shape)
    y_host = host.forward(x.astype(dtype))
    y_device = device.forward(to_device(x, cp, dtype))
    assert array_module(y_device) is cp
    assert_parity(y_device, y_host, dtype, "forward")

    dy = rng.standard_normal(y_host.shape)
    dx_host = host.backward(dy.astype(dtype))
    dx_device = device.backward(to_device(dy, cp, dtype))
    assert array_module(dx_device) is cp
    assert_parity(dx_device, dx_host, dtype, "dx")
    device_grads = device.gradients()
    for key, g in host.gradients().items():
        assert_parity(device_grads[key], g, dtype, f"grad {key}")
    device_buffers = dict(device.named_buffers())
    for key, b in host.named_buffers():  # running statistics after a training-mode forward
        assert_parity(device_buffers[key], b, dtype, f"buffer {key}")


ADAM_SHAPES = {"w": (4, 3, 3, 3), "b": (4,), "lam": ()}


def adam_grads(steps):
    rng = np.random.default_rng(13)
    return [{k: rng.standard_normal(s) * rng.uniform(0.1, 10.0) for k, s in ADAM_SHAPES.items()} for _ in range(steps)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_adam_parity(cp, dtype):
    rng = np.random.default_rng(14)
    start = {k: rng.standard_normal(s) for k, s in ADAM_SHAPES.items()}
    kwargs = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "maximize": ("lam",)}
    host_params = {k: v.astype(dtype) for k, v in start.items()}
    device_params = {k: to_device(v, cp, dtype) for k, v in start.items()}
    host_opt, device_opt = Adam(host_params, **kwargs), Adam(device_params, **kwargs, cuda_kernels=True)
    grads = adam_grads(12)
    for step, g in enumerate(grads[:10]):
        host_opt.step({k: v.astype(dtype) for k, v in g.items()})
        device_opt.step({k: to_device(v, cp, dtype) for k, v in g.items()})
        for k in ADAM_SHAPES:
            assert array_module(device_params[k]) is cp
            assert_parity(device_params[k], host_params[k], dtype, f"step {step + 1} {k}")
    # a device checkpoint is host arrays, and resumes on the host like the host optimiser
    state = device_opt.state_dict()
    assert state["t"] == 10 and all(array_module(a) is np for a in state["m"].values())
    resumed_params = {k: to_host(v).copy() for k, v in device_params.items()}
    resumed = Adam(resumed_params, **kwargs)
    resumed.load_state_dict(state)
    for g in grads[10:]:
        resumed.step({k: v.astype(dtype) for k, v in g.items()})
        host_opt.step({k: v.astype(dtype) for k, v in g.items()})
    for k in ADAM_SHAPES:
        assert_parity(resumed_params[k], host_params[k], dtype, f"resumed {k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_draws_are_identical_on_both_backends(cp, dtype):
    for draw in (standard_normal, uniform):
        device = draw(generator(15), (3, 7), cp, dtype)
        host = draw(generator(15), (3, 7), np, dtype)
        assert array_module(device) is cp and device.dtype == dtype
        np.testing.assert_array_equal(to_host(device), host)


def test_to_device_to_host_round_trip(cp):
    host = np.random.default_rng(16).standard_normal((5, 4))
    device = to_device(host, cp)
    assert array_module(device) is cp and device.dtype == np.float64
    back = to_host(device)
    assert type(back) is np.ndarray
    np.testing.assert_array_equal(back, host)
    np.testing.assert_array_equal(to_host(to_device(host, cp, np.float32)), host.astype(np.float32))


def test_load_host_state_into_device_layer(cp):
    host = Linear(4, 3, rng=generator(17), dtype=np.float64)
    device = Linear(4, 3, rng=generator(18), xp=cp, dtype=np.float64)
    device.load_state_dict(host.state_dict())
    for key, value in host.state_dict().items():
        np.testing.assert_array_equal(to_host(device.state_dict()[key]), value)
