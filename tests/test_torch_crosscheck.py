"""bench/torch_algorithm1.py on its own: the PyTorch transcription used without a trace.

That it agrees with refimpl tensor by tensor (three steps, float64, 1e-8, every
interpretation switch and every estimator) is tested through golden traces for both
transcriptions at once in tests/test_crosscheck.py; its planted porting bugs in
tests/test_porting_bugs.py. Here: Algorithm 1 trained from a torch.Generator, with its
draws in refimpl's order (u, then u1 for REINFORCE-LOO, then eps), and Section 4's
initial lambda computed by the transcription itself.
"""

import numpy as np
import pytest

from refimpl.algorithm1 import Hyper, initial_lambda_raw
from refimpl.rng import generator

import transcription_ports
from transcription_ports import ARCH16, BATCH

torch = pytest.importorskip("torch")
ta = transcription_ports.module_fixture("torch")


@pytest.mark.parametrize("init_on", ["raw", "effective"])
def test_initial_lambda_is_refimpl_s(ta, init_on):
    """Interpretation (d), computed by the transcription (a replay copies lambda from the trace instead)."""
    algo = ta.Algorithm1(ta.GatedVAE(ARCH16, 4, dtype=torch.float64), {"tau": 40.0, "lambda_init_on": init_on})
    assert algo.lam.item() == pytest.approx(initial_lambda_raw(Hyper(tau=40.0, lambda_init_on=init_on)), rel=1e-15)


@pytest.mark.parametrize("estimator", ["arm", "reinforce_loo"])
def test_standalone_training_draws_from_its_generator(ta, estimator):
    """Without a trace: u (and u1), eps come from the torch.Generator passed in; same seed, same run."""
    def train(seed):
        torch.manual_seed(123)  # weights from torch's default init; the draws of Algorithm 1 from the generator
        algo = ta.Algorithm1(ta.GatedVAE(ARCH16, 4, dtype=torch.float64),
                             {"tau": 40.0, "gamma_init": 0.1, "estimator": estimator})
        g, images = torch.Generator().manual_seed(seed), generator(5)
        logs = [algo.step(images.uniform(size=(BATCH, 1, 16, 16)), generator=g) for _ in range(3)]
        return logs, {k: p.detach().clone() for k, p in algo.named_parameters().items()}

    logs, params = train(0)
    _, params2 = train(0)
    logs3, _ = train(1)
    assert all(torch.equal(params[k], params2[k]) for k in params)
    assert logs[0]["u"] is None and logs[1]["u"].shape == (1, 4) and logs[1]["eps"].shape == (BATCH, 4)
    assert logs[0]["scalars"]["l0_added"] and logs[1]["scalars"]["hit"]
    assert not np.array_equal(logs[1]["eps"], logs3[1]["eps"])
    if estimator == "reinforce_loo":  # drawn in refimpl's order: u, u1, eps
        g = torch.Generator().manual_seed(0)
        torch.randn((BATCH, 4), generator=g, dtype=torch.float64)  # step 0 draws eps only
        np.testing.assert_array_equal(logs[1]["u"], torch.rand((1, 4), generator=g, dtype=torch.float64).numpy())
        np.testing.assert_array_equal(logs[1]["u1"], torch.rand((1, 4), generator=g, dtype=torch.float64).numpy())
    else:
        assert logs[1]["u1"] is None
    # constraint met (C' < 0): lambda is maximised, so it decreases
    assert params["lambda"].item() < 1.0
