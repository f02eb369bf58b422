"""The two transcriptions of Algorithm 1 (bench/torch_algorithm1.py, bench/jax_algorithm1.py) as
interchangeable ports for the tests that run the same check on both (a helper, not a test module).

``port`` fixtures parametrize over :data:`NAMES`; :func:`load` imports one, or skips the test
cleanly when its framework is not installed (``pip install -e '.[crosscheck]'``).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from refimpl.model import build_architecture

BENCH = Path(__file__).resolve().parents[1] / "bench"
NAMES = ("torch", "jax")
# The small networks the cross-checks run: 16x16 (channels 4, 8) and the MNIST-shaped 28x28 (three convs).
ARCH16 = build_architecture((1, 16, 16), channels=(4, 8), hidden=16)
ARCH28 = build_architecture((1, 28, 28), channels=(4, 8, 8), hidden=16)
BATCH = 6


def module_fixture(name: str):
    """A module-scoped pytest fixture yielding the transcription ``name``'s module (skipped without its framework)."""
    @pytest.fixture(scope="module")
    def fixture():
        with load(name) as port:
            yield port.module
    return fixture


@contextmanager
def load(name: str):
    """The port ``name`` as a namespace: ``module``, ``replay(ref, out, compile=False, **kw)``, ``main(argv)`` and
    ``writer`` (how its traces' manifests start).

    JAX runs the step op by op unless ``compile``: each op is compiled once per shape and dtype and reused,
    so after the first replay of a session one on the same shapes takes well under a second, where
    compiling the whole step takes seconds; a model of other shapes or dtype is cheaper compiled whole."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name == "torch":
        torch = pytest.importorskip("torch")
        import torch_algorithm1 as module

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: torch's thread pool only adds overhead on a 2-core machine
        try:
            def replay(ref, out, compile=False, **kw):
                return module.replay(ref, out, **kw)

            yield SimpleNamespace(name=name, module=module, replay=replay, main=module.main,
                                  writer="bench/torch_algorithm1.py (torch ")
        finally:
            torch.set_num_threads(threads)
    elif name == "jax":
        pytest.importorskip("jax")
        pytest.importorskip("optax")
        import jax_algorithm1 as module

        def replay(ref, out, compile=False, **kw):
            return module.replay(ref, out, jit=compile, **kw)

        yield SimpleNamespace(name=name, module=module, replay=replay, main=module.main,
                              writer="bench/jax_algorithm1.py (jax ")
    else:
        raise ValueError(f"no port {name!r}; expected one of {NAMES}")
