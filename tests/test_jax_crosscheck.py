"""bench/jax_algorithm1.py on its own: the JAX transcription used without a trace.

That it agrees with refimpl tensor by tensor (three steps, float64, 1e-8, every
interpretation switch and every estimator, Adam's step count for gamma both ways) is
tested through golden traces for both transcriptions at once in tests/test_crosscheck.py;
its planted porting bugs in tests/test_porting_bugs.py. Here: the pure step trained from
JAX keys, with REINFORCE-LOO's second sample; gamma's own Adam state (interpretation (n))
set from a trace's per-parameter step counts. Skipped without jax or optax.
"""

import numpy as np
import pytest

from refimpl.rng import generator

import transcription_ports
from transcription_ports import ARCH16, BATCH

jax = pytest.importorskip("jax")
pytest.importorskip("optax")
ja = transcription_ports.module_fixture("jax")


@pytest.mark.parametrize("estimator", ["arm", "reinforce_loo"])
def test_standalone_training_draws_from_its_key(ja, estimator):
    """Without a trace: weights and the draws u, u1, eps from JAX keys; same keys, same run; the step is pure."""
    hyper = {"tau": 40.0, "gamma_init": 0.1, "estimator": estimator}
    step = ja.make_step(ARCH16, hyper, 4, jit=False)  # op by op (the compiled step: tests/test_crosscheck.py)
    images = generator(5)
    xs = [images.uniform(size=(BATCH, 1, 16, 16)) for _ in range(3)]

    def train(seed):
        params, buffers = ja.init_model(ARCH16, 4, jax.random.key(123), hyper)
        opt_state, geco = ja.init_state(params, hyper)
        start = (params, buffers, opt_state, geco)
        key, logs = jax.random.key(seed), []
        for x in xs:
            key, sub = jax.random.split(key)
            u, u1, eps = ja.draw(sub, geco, hyper, BATCH, 4)
            params, buffers, opt_state, geco, log = step(params, buffers, opt_state, geco, x, u, eps, u1)
            logs.append(log)
        return logs, params, start

    logs, params, start = train(0)
    logs2, params2, start2 = train(0)
    logs3, _, _ = train(1)
    assert all(np.array_equal(params[k], params2[k]) for k in params)
    assert all(np.array_equal(start[0][k], start2[0][k]) for k in params)  # inputs untouched: the step is pure
    assert float(start[0]["lambda"]) == 1.0 and np.all(np.asarray(start[0]["gamma"]) == 0.1)
    assert logs[0]["u"] is None and logs[1]["u"].shape == (1, 4) and logs[1]["eps"].shape == (BATCH, 4)
    assert (logs[1]["u1"] is not None) == (estimator == "reinforce_loo") and logs[0]["u1"] is None
    assert bool(logs[0]["scalars"]["l0_added"]) and bool(logs[1]["scalars"]["hit"])
    assert logs[1]["arm"] is not None and logs[0]["arm"] is None
    assert not np.array_equal(logs[1]["eps"], logs3[1]["eps"])
    assert float(params["lambda"]) < 1.0  # constraint met (C' < 0): lambda is maximised, so it decreases


def test_gamma_has_an_adam_state_of_its_own(ja):
    """(n): optax keeps one step count per state, so gamma gets its own; a trace's per-parameter counts load into
    the two, and counts that differ among the other parameters (one optax count) are refused."""
    params, _ = ja.init_model(ARCH16, 4, jax.random.key(0))
    opt_state, _ = ja.init_state(params, {"tau": 1.0})
    assert set(opt_state) == {"gamma", "rest"} and set(opt_state["gamma"][0].mu) == {"gamma"}
    zeros = {k: np.zeros(np.shape(p)) for k, p in params.items()}
    steps = {k: 5 for k in params} | {"gamma": 2}
    loaded = ja.load_adam_state(opt_state, 5, zeros, zeros, steps)
    assert int(loaded["gamma"][0].count) == 2 and int(loaded["rest"][0].count) == 5
    assert int(ja.load_adam_state(opt_state, 5, zeros, zeros)["gamma"][0].count) == 5  # older traces: adam_t
    with pytest.raises(ValueError, match="optax keeps one"):
        ja.load_adam_state(opt_state, 5, zeros, zeros, steps | {"lambda": 4})
