"""Shared test settings: Hypothesis profiles and the CUDA skip marker."""

import os

import pytest
from hypothesis import HealthCheck, settings

# "ci": no deadline (a 2-core machine is slow and noisy), bounded examples so the
# default suite stays under ~10 minutes. "dev": more examples for local digging.
settings.register_profile(
    "ci", deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    from refimpl.backend import cuda_available

    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
