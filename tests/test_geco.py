"""GECO's behaviour in Algorithm 1 (l. 14-26, 31) over a few dozen steps of a tiny real model.

Expectations come from the paper: Section 2.1 (L is maximised over lambda, so lambda grows
while the constraint C <= 0 is violated and shrinks once it holds), l. 15-21 (the moving
average and the clamped multiplier), l. 23-25 (the L0 term and ``hit``), l. 3-9 (gates are
only sampled once hit is set), and Section 4 (lambda initialised to 1). The tolerance tau is
switched between steps (``state.hyper`` is read afresh by every step) to force C's sign:
tau = 0 always violates the constraint, tau = 1000 always meets it (8x8 images: E <= 64).
"""

import dataclasses
import math

import numpy as np
import pytest

from refimpl.algorithm1 import Hyper, init_state, train_step
from refimpl.model import Architecture, ConvSpec, GatedVAE
from refimpl.rng import generator

F64 = np.float64
MET, VIOLATED = 1e3, 0.0  # values of tau


def tiny_arch():
    """(1, 8, 8) images, 2 encoder convs (8 -> 4 -> 2 px), 2 decoder blocks (2 -> 4 -> 8 px)."""
    return Architecture((1, 8, 8), encoder_convs=(ConvSpec(3, 4, 2, 1), ConvSpec(4, 3, 2, 1)),
                        decoder_convs=(ConvSpec(3, 3, 1, 1), ConvSpec(1, 3, 1, 1)), hidden=8).validate()


def make_state(seed=0, n=3, **hyper):
    hyper.setdefault("tau", VIOLATED)
    model = GatedVAE(tiny_arch(), n, rng=generator(seed), dtype=F64)
    return init_state(model, Hyper(**hyper))


def run(state, taus, seed=1, batch=3, records=False):
    """One step per entry of ``taus`` on fresh random batches; returns the logs (and records)."""
    rng, images = generator(seed), generator(seed + 1000)
    logs, recs = [], []
    for tau in taus:
        state.hyper = dataclasses.replace(state.hyper, tau=tau)
        record = {} if records else None
        logs.append(train_step(state, images.uniform(0, 1, (batch, 1, 8, 8)), rng, record))
        recs.append(record)
    return (logs, recs) if records else logs


def lambdas(logs):
    return np.array([log["lambda_eff"] for log in logs])


@pytest.mark.parametrize("update", ["ascent", "descent"])
def test_lambda_follows_the_constraint(update):
    """(b) "ascent" (Sec. 2.1): lambda' rises while C > 0 and falls while C <= 0; "descent" (l. 31 read
    literally) does the opposite."""
    for tau, rising in ((VIOLATED, True), (MET, False)):
        state = make_state(lr=0.02, alpha=0.5, lambda_update=update)
        logs = run(state, [tau] * 20)
        assert all((log["C"] > 0) == (tau == VIOLATED) for log in logs)
        steps = np.diff(lambdas(logs))
        expect_up = rising if update == "ascent" else not rising
        assert np.all(steps > 0) if expect_up else np.all(steps < 0), lambdas(logs)


@pytest.mark.parametrize("rule", ["outward", "zero"])
def test_lambda_clamp_and_return_from_lambda_max(rule):
    """l. 21 keeps lambda' in [lambda_min, lambda_max]. (c): after a violated stretch at lambda_max, a met
    constraint brings lambda' back down under "outward" (down to lambda_min); under "zero" it sticks at lambda_max."""
    lo, hi = 0.5, 3.0
    state = make_state(lr=0.2, alpha=0.5, lambda_min=lo, lambda_max=hi, lambda_clamp_grad=rule)
    violated = lambdas(run(state, [VIOLATED] * 25))
    met = lambdas(run(state, [MET] * 35, seed=2))
    both = np.concatenate([violated, met])
    assert np.all((both >= lo) & (both <= hi))
    assert np.all(violated[-10:] == hi)  # reached and held the upper clamp
    if rule == "outward":
        assert met.min() == lo and met[-1] == lo
        assert np.all(np.diff(met[met < hi]) <= 0)
    else:
        assert np.all(met == hi)


@pytest.mark.parametrize("init_on, expected", [("raw", math.log(1 + math.e) ** 2), ("effective", 1.0)])
def test_initial_lambda(init_on, expected):
    """(d) Section 4's "lambda = 1": raw lambda = 1 gives lambda' = softplus(1)^2 = ln(1 + e)^2 = 1.7247 at
    step 0; on the multiplier itself, lambda' = 1."""
    state = make_state(lambda_init_on=init_on)
    log = run(state, [VIOLATED])[0]
    assert log["lambda_eff"] == pytest.approx(expected, rel=1e-13)
    assert log["loss"] == pytest.approx(expected * log["C_ma"] + log["kl"], rel=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 0.99])
def test_moving_average_of_the_constraint(alpha):
    """l. 15-19: C_ma starts at the first C, then C_ma <- alpha C_ma + (1 - alpha) C."""
    state = make_state(alpha=alpha, lr=0.01)
    logs = run(state, [VIOLATED, MET, 3.0, VIOLATED, 7.0, MET, VIOLATED, 1.0])
    c = [log["C"] for log in logs]
    c_ma = [log["C_ma"] for log in logs]
    assert c_ma[0] == c[0]
    for t in range(1, len(c)):
        assert c_ma[t] == pytest.approx(alpha * c_ma[t - 1] + (1 - alpha) * c[t], rel=1e-13, abs=1e-12)
    assert len(set(np.sign(c))) == 2  # the average really mixed violated and met steps


def test_l0_term_added_exactly_when_constraint_met():
    """l. 23-24: L gains sum_j sigmoid(k gamma_j), and gamma's gradient its derivative, iff C <= 0."""
    k = 7.0
    state = make_state(k=k, lr=0.01)
    taus = [VIOLATED, VIOLATED, MET, VIOLATED, MET, MET, VIOLATED, MET]
    gammas = []
    logs, recs = [], []
    rng, images = generator(1), generator(5)
    for tau in taus:
        gammas.append(state.model.params["gamma"].copy())
        state.hyper = dataclasses.replace(state.hyper, tau=tau)
        record = {}
        logs.append(train_step(state, images.uniform(0, 1, (3, 1, 8, 8)), rng, record))
        recs.append(record)
    for tau, gamma, log, rec in zip(taus, gammas, logs, recs):
        met = log["C"] <= 0
        assert met == (tau == MET) and log["l0_added"] == met
        sig = 1.0 / (1.0 + np.exp(-k * gamma))
        assert log["gates_l1"] == pytest.approx(sig.sum(), rel=1e-14)
        extra = log["loss"] - (log["lambda_eff"] * log["C_ma"] + log["kl"])
        assert extra == pytest.approx(sig.sum() if met else 0.0, rel=1e-10, abs=1e-9)
        gamma_grad = rec["grads"]["gamma"] - (0.0 if rec["arm"] is None else rec["arm"])
        np.testing.assert_allclose(gamma_grad, k * sig * (1 - sig) if met else 0.0, rtol=1e-12, atol=1e-15)


def test_constraint_exactly_zero_counts_as_met():
    """l. 23 tests C <= 0: with tau equal to this step's E2, C = 0 and the L0 term is added, hit set."""
    state = make_state()
    x = generator(3).uniform(0, 1, (3, 1, 8, 8))
    probe = train_step(make_state(), x, generator(4))  # an identical twin of state
    state.hyper = dataclasses.replace(state.hyper, tau=probe["E2"])
    log = train_step(state, x, generator(4))
    assert log["E2"] == probe["E2"] and log["C"] == 0.0
    assert log["l0_added"] and log["hit"] and state.hit


@pytest.mark.parametrize("mode", ["sticky", "per_step"])
def test_hit_decides_when_gates_are_sampled(mode):
    """(g) l. 3, 25: "sticky" samples gates on every step after the first met constraint; "per_step" samples
    on a step iff the previous step met it."""
    taus = [VIOLATED, MET, VIOLATED, VIOLATED, MET, VIOLATED, VIOLATED, MET]
    state = make_state(hit=mode)
    logs, recs = run(state, taus, records=True)
    met = [log["C"] <= 0 for log in logs]
    assert met == [tau == MET for tau in taus]
    sampled = [rec["u"] is not None for rec in recs]
    if mode == "sticky":
        first = met.index(True)
        assert sampled == [t > first for t in range(len(taus))]
        assert [log["hit"] for log in logs] == [t >= first for t in range(len(taus))]
    else:
        assert sampled == [False] + met[:-1]


def test_gates_before_and_after_the_first_hit():
    """l. 3-9: before hit, nu1 = nu2 = 1 and no u is drawn (E1 = E2); after, u ~ U(0, 1)^n is drawn first,
    then eps, and nu1 = 1[u > sigmoid(-k gamma)], nu2 = 1[u < sigmoid(k gamma)] with the step's gamma."""
    n, batch, k, seed = 4, 3, 7.0, 11
    state = make_state(n=n, k=k, lr=0.05)
    state.model.params["gamma"][...] = [0.3, -0.2, 0.05, -0.01]
    rng, replay, images = generator(seed), generator(seed), generator(12)
    taus = [VIOLATED, MET] + [VIOLATED] * 6
    differ = []
    for t, tau in enumerate(taus):
        gamma = state.model.params["gamma"].copy()
        state.hyper = dataclasses.replace(state.hyper, tau=tau)
        record = {}
        log = train_step(state, images.uniform(0, 1, (batch, 1, 8, 8)), rng, record)
        if t <= 1:  # hit is set during step 1 (l. 25), after its gates were chosen
            assert record["u"] is None
            np.testing.assert_array_equal(record["nu1"], np.ones((1, n)))
            np.testing.assert_array_equal(record["nu2"], np.ones((1, n)))
            assert log["E1"] == log["E2"] and record["arm"] is None
        else:
            u = replay.uniform(0, 1, (1, n))
            np.testing.assert_array_equal(record["u"], u)
            np.testing.assert_array_equal(record["nu1"], (u > 1 / (1 + np.exp(k * gamma))).astype(F64))
            np.testing.assert_array_equal(record["nu2"], (u < 1 / (1 + np.exp(-k * gamma))).astype(F64))
            differ.append(not np.array_equal(record["nu1"], record["nu2"]))
        np.testing.assert_array_equal(record["eps"], replay.standard_normal((batch, n)))
    assert state.hit and any(differ)  # the sampled phase gave nu1 != nu2 on some step


def test_adam_steps_changes_only_gamma_and_only_from_the_first_hit():
    """(n): with the first hit at the third step, "global" and "per_parameter" give bit-identical runs except
    gamma, which neither moves before the hit (zero gradient, zero moments); from the hit on gamma's updates
    differ: its first is lr sign(g) per parameter, lr (1 - b1)/(1 - b1^3) sqrt((1 - b2^3)/(1 - b2)) globally."""
    taus = [VIOLATED, VIOLATED, MET, MET]
    runs = {}
    for adam_steps in ("global", "per_parameter"):
        state = make_state(adam_steps=adam_steps)
        gammas = [state.model.params["gamma"].copy()]
        logs = []
        for tau in taus:
            logs += run(state, [tau], seed=len(logs) + 1)
            gammas.append(state.model.params["gamma"].copy())
        runs[adam_steps] = (state, gammas, logs)
        assert [log["l0_added"] for log in logs] == [False, False, True, True]
        assert state.optimizer.steps["gamma"] == (4 if adam_steps == "global" else 2)
    (sg, gg, _), (sp, gp, _) = runs["global"], runs["per_parameter"]
    for name, p in sg.parameters().items():
        if name != "gamma":
            np.testing.assert_array_equal(p, sp.parameters()[name])
    for g in (gg, gp):
        np.testing.assert_array_equal(g[2], g[0])  # no move before the first hit
    factor = 0.1 / (1 - 0.9**3) * math.sqrt((1 - 0.999**3) / 0.001)
    np.testing.assert_allclose(np.abs(gg[3] - gg[2]), factor * 1e-3, rtol=1e-4)
    np.testing.assert_allclose(np.abs(gp[3] - gp[2]), 1e-3, rtol=1e-4)
