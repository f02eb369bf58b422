"""Backend and dtype resolution, host/device moves, and the seeded draws in refimpl.rng."""

import sys
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.backend import (
    BackendError,
    array_module,
    backend_name,
    cuda_available,
    get_dtype,
    get_xp,
    to_device,
    to_host,
)
from refimpl.rng import generator, get_state, set_state, standard_normal, uniform

# ---------------------------------------------------------------- backend names


def test_explicit_name_wins_over_environment(monkeypatch):
    monkeypatch.setenv("REFIMPL_BACKEND", "cupy")
    assert backend_name("numpy") == "numpy"
    assert get_xp("numpy") is np


def test_default_is_numpy(monkeypatch):
    monkeypatch.delenv("REFIMPL_BACKEND", raising=False)
    assert backend_name() == "numpy"
    assert get_xp() is np


@pytest.mark.parametrize("value", ["numpy", "cupy"])
def test_environment_variable_is_read(monkeypatch, value):
    monkeypatch.setenv("REFIMPL_BACKEND", value)
    assert backend_name() == value
    assert backend_name(None) == value


def test_unknown_explicit_name(monkeypatch):
    monkeypatch.delenv("REFIMPL_BACKEND", raising=False)
    with pytest.raises(BackendError) as info:
        get_xp("jax")
    message = str(info.value)
    assert "'jax'" in message and "numpy" in message and "cupy" in message and "backend" in message
    assert "\n" not in message


def test_unknown_environment_name_says_where_it_came_from(monkeypatch):
    monkeypatch.setenv("REFIMPL_BACKEND", "NumPy")  # names are case-sensitive
    with pytest.raises(BackendError) as info:
        backend_name()
    message = str(info.value)
    assert "REFIMPL_BACKEND" in message and "'NumPy'" in message and "numpy, cupy" in message


# ---------------------------------------------------------------- cupy without CUDA


@pytest.mark.skipif(cuda_available(), reason="CUDA is available here: get_xp('cupy') succeeds")
def test_cupy_without_cuda_is_a_one_line_backend_error():
    with pytest.raises(BackendError) as info:
        get_xp("cupy")
    message = str(info.value)
    assert message.startswith("backend 'cupy' needs")
    assert "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # raised `from None`: no chained trace
    assert cuda_available() is False


def test_cupy_not_importable(monkeypatch):
    """Whether or not CuPy is installed here, a failing import becomes a one-line BackendError."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(BackendError) as info:
        get_xp("cupy")
    message = str(info.value)
    assert "CuPy" in message and "pip install" in message and "\n" not in message
    assert cuda_available() is False


def fake_cupy(device_count):
    """A stand-in module whose CUDA runtime reports ``device_count`` devices, or raises it if it is an exception."""

    def get_device_count():
        if isinstance(device_count, Exception):
            raise device_count
        return device_count

    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    return module


@pytest.mark.parametrize("count, words", [
    (RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected"), "CUDA reported"),
    (0, "none is visible"),
])
def test_cupy_without_a_device(monkeypatch, count, words):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(count))
    with pytest.raises(BackendError, match=words) as info:
        get_xp("cupy")
    assert str(info.value).startswith("backend 'cupy' needs a CUDA device")
    assert cuda_available() is False


def test_cupy_with_a_device_is_returned(monkeypatch):
    module = fake_cupy(1)
    monkeypatch.setitem(sys.modules, "cupy", module)
    assert get_xp("cupy") is module
    assert cuda_available() is True


# ---------------------------------------------------------------- array_module, dtypes, moves


def test_array_module_of_host_arrays_is_numpy():
    assert array_module(np.zeros(3)) is np
    assert array_module(np.zeros(3), 1.0, None) is np
    assert array_module() is np


def test_array_module_and_to_host_recognise_cupy_arrays(monkeypatch):
    """Dispatch is by the array type's module, so a cupy array anywhere in the arguments picks cupy."""
    module = fake_cupy(1)

    class ndarray:  # a minimal device array: .get() copies to the host
        __module__ = "cupy._core.core"

        def __init__(self, host):
            self.host = host

        def get(self):
            return self.host.copy()

    monkeypatch.setitem(sys.modules, "cupy", module)
    device = ndarray(np.arange(3.0))
    assert array_module(np.zeros(2), device) is module
    host = to_host(device)
    assert type(host) is np.ndarray
    np.testing.assert_array_equal(host, np.arange(3.0))


@pytest.mark.parametrize("name, dtype", [("float32", np.float32), ("float64", np.float64)])
def test_get_dtype(name, dtype):
    assert get_dtype(name) == np.dtype(dtype)
    assert isinstance(get_dtype(name), np.dtype)


def test_get_dtype_default_is_float32():
    assert get_dtype() == np.dtype(np.float32)


@pytest.mark.parametrize("name", ["float16", "double", "int32", "Float32"])
def test_get_dtype_error_names_value_and_choices(name):
    with pytest.raises(BackendError) as info:
        get_dtype(name)
    message = str(info.value)
    assert f"dtype={name!r}" in message and "float32, float64" in message


@pytest.mark.parametrize("dtype", [None, np.float32, np.float64])
def test_to_device_to_host_round_trip(dtype):
    rng = np.random.default_rng(0)
    host = rng.standard_normal((3, 4))
    device = to_device(host, np, dtype)
    assert array_module(device) is np
    back = to_host(device)
    assert type(back) is np.ndarray and back.shape == host.shape
    expected = host if dtype is None else host.astype(dtype)
    assert back.dtype == expected.dtype
    np.testing.assert_array_equal(back, expected)


def test_to_device_accepts_lists_and_to_host_scalars():
    a = to_device([[1.0, 2.0], [3.0, 4.0]], np, np.float32)
    assert a.dtype == np.float32 and a.shape == (2, 2)
    s = to_host(2.5)
    assert isinstance(s, np.ndarray) and s.shape == () and float(s) == 2.5


# ---------------------------------------------------------------- seeded draws


@given(seed=st.integers(0, 2**63), shape=st.lists(st.integers(1, 5), min_size=0, max_size=3))
def test_same_seed_same_draws(seed, shape):
    a = standard_normal(generator(seed), shape, np, np.float64)
    b = standard_normal(generator(seed), shape, np, np.float64)
    assert a.shape == tuple(shape) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    # the draws are those of a plain PCG64 generator: nothing hidden in between
    np.testing.assert_array_equal(a, np.random.Generator(np.random.PCG64(seed)).standard_normal(shape))


def test_different_seeds_differ():
    a = standard_normal(generator(1), (100,), np, np.float64)
    b = standard_normal(generator(2), (100,), np, np.float64)
    assert not np.any(a == b)


@given(seed=st.integers(0, 2**32 - 1), low=st.floats(-5, 0), width=st.floats(0.1, 5))
def test_float32_draws_are_float64_draws_rounded(seed, low, width):
    n64 = standard_normal(generator(seed), (50,), np, np.float64)
    n32 = standard_normal(generator(seed), (50,), np, np.float32)
    assert n32.dtype == np.float32
    np.testing.assert_array_equal(n32, n64.astype(np.float32))
    u64 = uniform(generator(seed), (50,), np, np.float64, low, low + width)
    u32 = uniform(generator(seed), (50,), np, np.float32, low, low + width)
    np.testing.assert_array_equal(u32, u64.astype(np.float32))
    assert u64.min() >= low and u64.max() < low + width


def test_uniform_default_interval():
    u = uniform(generator(5), (1000,), np, np.float64)
    assert u.min() >= 0.0 and u.max() < 1.0 and 0.4 < u.mean() < 0.6


@given(seed=st.integers(0, 2**32 - 1), before=st.integers(0, 20))
def test_state_get_set_continues_the_stream(seed, before):
    rng = generator(seed)
    standard_normal(rng, (before,), np, np.float64)
    state = get_state(rng)
    expected = np.concatenate([standard_normal(rng, (7,), np, np.float64), uniform(rng, (5,), np, np.float64)])
    # into the same generator, after it moved on
    set_state(rng, state)
    again = np.concatenate([standard_normal(rng, (7,), np, np.float64), uniform(rng, (5,), np, np.float64)])
    np.testing.assert_array_equal(again, expected)
    # into a fresh generator with another seed
    other = generator(seed + 1)
    set_state(other, state)
    moved = np.concatenate([standard_normal(other, (7,), np, np.float64), uniform(other, (5,), np, np.float64)])
    np.testing.assert_array_equal(moved, expected)


def test_state_is_a_snapshot():
    rng = generator(3)
    state = get_state(rng)
    first = standard_normal(rng, (4,), np, np.float64)
    assert get_state(rng) != state  # drawing moved the generator, not the snapshot
    set_state(rng, state)
    np.testing.assert_array_equal(standard_normal(rng, (4,), np, np.float64), first)


@pytest.mark.parametrize("seed", [-1, 1.5, "3", None, 2.0])
def test_bad_seed(seed):
    with pytest.raises(ValueError) as info:
        generator(seed)
    assert f"seed={seed!r}" in str(info.value) and "non-negative integer" in str(info.value)


def test_numpy_integer_seed_is_accepted():
    np.testing.assert_array_equal(standard_normal(generator(np.int64(9)), (3,), np, np.float64),
                                  standard_normal(generator(9), (3,), np, np.float64))
