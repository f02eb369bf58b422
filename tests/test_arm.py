"""The gradient estimators of l. 29 are unbiased: L0-ARM (Eq. 13, the paper's), DisARM and
two-sample REINFORCE with a leave-one-out baseline (``Hyper.estimator``, interpretation (o)).

With p = sigmoid(k gamma) and gates nu ~ prod_j Ber(p_j), each estimator g satisfies
d/dgamma E_nu[F(nu)] = E[g]; Eq. 13 (with the k of Section 3) is

    g_arm = k (F(1[u > sigmoid(-k gamma)]) - F(1[u < sigmoid(k gamma)])) (u - 1/2),

DisARM on the same two gate vectors nu1, nu2 is g = k 1/2 (F(nu1) - F(nu2)) (-1)^nu2
1[nu1 != nu2] sigmoid(|k gamma|), and REINFORCE-LOO on two independent samples nu1 =
1[u1 < p], nu2 = 1[u < p] is g = k 1/2 sum_i (F_i - F_other)(nu_i - p).

The left side is computed here by enumerating the 2^n gate vectors:
dP(nu)/dgamma_j = P(nu) k (nu_j - p_j). The right side is integrated exactly: on each
axis the two thresholds sigmoid(+-k gamma_j) cut [0, 1] into three intervals (for the
independent u and u1 of REINFORCE-LOO, sigmoid(k gamma_j) alone cuts each into two, and
the grid is the product over both draws); on each box of the product grid the gate
vectors are constant, so the estimator is a constant times (u - 1/2) (ARM) or a constant
(DisARM, LOO), linear in u, and its integral over the box is the box's volume times its
value at the box's centre. The estimator is evaluated by ``train_step`` itself (the
``arm`` entry of its record) at each box centre, with u, u1 and eps fed in by a stub
generator, so the library's l. 4-6 and 29 are what is tested; its gates are also read
near the corners of every box, to confirm they are constant there (else the centre rule
would not see a wrong threshold). Tolerance: 1e-10 absolute (the errors seen are ~1e-14).

``train_step`` runs with Adam's lr = 1e-300: parameters (and lambda) do not move, so
every call sees the same model.
"""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.algorithm1 import ESTIMATORS, Hyper, disarm_term, init_state, train_step
from refimpl.layers import Layer
from refimpl.model import Architecture, ConvSpec, GatedVAE
from refimpl.rng import generator

F64 = np.float64
FROZEN_LR = 1e-300  # Adam steps vanish below float64 resolution: the model stays put between calls


def tiny_arch():
    """(1, 8, 8) images, 2 encoder convs (8 -> 4 -> 2 px), 2 decoder blocks (2 -> 4 -> 8 px)."""
    return Architecture((1, 8, 8), encoder_convs=(ConvSpec(3, 4, 2, 1), ConvSpec(4, 3, 2, 1)),
                        decoder_convs=(ConvSpec(3, 3, 1, 1), ConvSpec(1, 3, 1, 1)), hidden=8).validate()


class Draws:
    """A stand-in for numpy.random.Generator: u from ``u`` (an array, or a generator to draw from), eps fixed.

    ``u1``: the second uniform draw of a step (REINFORCE-LOO's second sample); a step draws u,
    then u1 if its estimator needs it, then eps."""

    def __init__(self, u, eps, u1=None):
        self.u, self.u1, self.eps = u, u1, eps
        self.calls = 0  # uniform draws in this step

    def uniform(self, low, high, size):
        assert (low, high) == (0.0, 1.0)
        if isinstance(self.u, np.random.Generator):
            return self.u.uniform(low, high, size)
        self.calls += 1
        u = {1: self.u, 2: self.u1}[self.calls]
        assert u is not None and tuple(size) == u.shape
        return u

    def standard_normal(self, size):
        assert tuple(size) == self.eps.shape
        self.calls = 0
        return self.eps


class TableDecoder(Layer):
    """A decoder whose per-image squared error is looked up from the gate pattern it receives.

    z_gated: (B, n) -> (B, 1, 8, 8) zeros except pixel (0, 0) = sqrt(table[b, index(nu_b)]),
    where nu_b = 1[z_gated[b] != 0] (z is almost surely non-zero), index(nu) = sum_j nu_j 2^j.
    Against all-zero images, the "sse" error of image b is table[b, index(nu_b)].
    """

    def __init__(self, table, image_shape):
        super().__init__()
        self.table, self.image_shape = table, image_shape

    def forward(self, z_gated, cache=True):
        nu = (z_gated != 0).astype(int)
        index = nu @ (2 ** np.arange(nu.shape[1]))
        out = np.zeros((z_gated.shape[0], *self.image_shape))
        out[:, 0, 0, 0] = np.sqrt(self.table[np.arange(z_gated.shape[0]), index])
        self._cache = z_gated.shape if cache else None
        return out

    def backward(self, dy):
        return np.zeros(self._take_cache())


def gate_vectors(n):
    """All 2^n gate vectors, row i being the binary digits of i (nu_j = bit j), matching TableDecoder."""
    return np.array([[(i >> j) & 1 for j in range(n)] for i in range(2**n)], dtype=F64)


def enumerated_gradient(values, gamma, k):
    """d/dgamma sum_nu P(nu) values[nu] for nu ~ prod Ber(sigmoid(k gamma)). values: (2^n,) -> (n,)."""
    p = 1.0 / (1.0 + np.exp(-k * gamma))
    nus = gate_vectors(len(gamma))
    prob = np.prod(np.where(nus == 1, p, 1 - p), axis=1)
    return ((values * prob)[:, None] * k * (nus - p)).sum(axis=0)


def axis_intervals(gamma_j, k, thresholds=2):
    """The intervals that sigmoid(-k gamma_j) and sigmoid(k gamma_j) cut [0, 1] into (three), or
    sigmoid(k gamma_j) alone (two: ``thresholds=1``, the gate 1[u < sigmoid(k gamma_j)] of an independent draw)."""
    b = 1.0 / (1.0 + math.exp(-k * gamma_j))
    if thresholds == 1:
        return [(0.0, b), (b, 1.0)]
    a = 1.0 / (1.0 + math.exp(k * gamma_j))
    lo, hi = min(a, b), max(a, b)
    return [(0.0, lo), (lo, hi), (hi, 1.0)]


def exact_expectation(step, gamma, k, rows, independent=False):
    """E[arm(u, u1)] for u (and u1): (rows, n) uniform, exactly: sum over boxes of volume * arm(box centre).

    step(u, u1) -> (arm, nu1, nu2) runs the library. ``independent`` (REINFORCE-LOO): u1 is a second,
    independent draw and the grid is the product over both; else u1 is None. The centre rule needs the
    library's gates to be constant on each box, so they are also read near both far corners of every box
    and compared with l. 5-6 evaluated here: nu1 = 1[u > sigmoid(-k gamma)] (antithetic) or 1[u1 <
    sigmoid(k gamma)] (independent), nu2 = 1[u < sigmoid(k gamma)].
    """
    n = len(gamma)
    lower = np.tile(1.0 / (1.0 + np.exp(k * gamma)), (rows, 1))  # sigmoid(-k gamma)
    upper = np.tile(1.0 / (1.0 + np.exp(-k * gamma)), (rows, 1))  # sigmoid(k gamma)
    draws = 2 if independent else 1
    per_axis = [axis_intervals(g, k, 1 if independent else 2) for g in gamma] * (rows * draws)
    total = 0.0

    def split(a):  # (draws * rows * n,) -> u, u1
        a = a.reshape(draws, rows, n)
        return a[0], (a[1] if independent else None)

    def expected_gates(u, u1):
        return (u1 < upper) if independent else (u > lower), u < upper

    for box in itertools.product(*per_axis):
        volume = math.prod(r - l for l, r in box)
        if volume == 0.0:
            continue
        left = np.array([l for l, _ in box])
        right = np.array([r for _, r in box])
        centre = split((left + right) / 2)
        arm, nu1, nu2 = step(*centre)
        total = total + volume * arm
        if (right - left).min() > 1e-12:  # a narrower box (|gamma| ~ 1e-16) adds < 1e-11 to the total, and
            want1, want2 = expected_gates(*centre)  # its centre may round to either side of sigmoid(+-k gamma)
            np.testing.assert_array_equal(nu1, want1)
            np.testing.assert_array_equal(nu2, want2)
        inset = 1e-6 * (right - left)
        if inset.min() > 1e-12:  # boxes far wider than rounding in sigmoid
            for u in (left + inset, right - inset):
                _, nu1_u, nu2_u = step(*split(u))
                np.testing.assert_array_equal(nu1_u, nu1)
                np.testing.assert_array_equal(nu2_u, nu2)
    return total


def make_state(n, k, gamma, hyper_kw=None, table=None, seed=0, batch=2):
    """A float64 tiny model in the sampling phase (hit = True) with gamma set; optionally a TableDecoder."""
    model = GatedVAE(tiny_arch(), n, rng=generator(seed), dtype=F64)
    if table is not None:
        model.decoder = TableDecoder(table, model.arch.image_shape)
    state = init_state(model, Hyper(tau=0.0, k=k, lr=FROZEN_LR, **(hyper_kw or {})))
    model.params["gamma"][...] = gamma
    state.hit = True
    return state


def arm_of(state, x, u, eps, u1=None):
    """The estimator's term train_step adds to gamma's gradient (l. 29) for the given u (u1) and eps, and its record."""
    if state.hyper.estimator == "reinforce_loo" and u1 is None:
        u1 = np.full_like(u, 0.5)
    record = {}
    train_step(state, x, Draws(u, eps, u1), record)
    np.testing.assert_array_equal(record["u"], u)
    if state.hyper.estimator == "reinforce_loo":
        np.testing.assert_array_equal(record["u1"], u1)
    else:
        assert record["u1"] is None
    return record["arm"], record


def stepper(state, x, eps):
    """(u, u1) -> (arm, nu1, nu2) from one train_step."""
    def step(u, u1):
        arm, record = arm_of(state, x, u, eps, u1)
        return arm, record["nu1"], record["nu2"]
    return step


def softplus_sq(v):
    return math.log1p(math.exp(v)) ** 2


def kl_gauss(mu, log_var):
    """KL(N(mu, sigma^2) || N(0, 1)) = log(1/sigma) + (sigma^2 + mu^2)/2 - 1/2, elementwise."""
    return -0.5 * log_var + 0.5 * (np.exp(log_var) + mu**2) - 0.5


def independent(estimator):
    return estimator == "reinforce_loo"


def objective_values(table, record, n, objective, normalizer):
    """F(nu) for every gate vector: lambda' times the batch-mean error (l. 29), plus the KL term for "loss" (k)."""
    lam = record["scalars"]["lambda_eff"]
    nus = gate_vectors(n)
    values = lam * table.mean(axis=0)
    if objective == "loss":
        kl = kl_gauss(record["mu"], record["s"])  # default encoder_output: s = log sigma^2
        count = nus.sum(axis=1) if normalizer == "open" else np.full(2**n, n)
        kl_term = (kl @ nus.T).mean(axis=0) / np.maximum(count, 1)  # all gates closed: numerator 0, term 0
        values = values + kl_term
    return values


def check_exact_expectation(estimator, k, gamma, table, seed, objective, normalizer):
    """l. 29 as train_step computes it, integrated exactly over u (and u1), is d/dgamma E_nu[F] (to 1e-10)."""
    n, batch = len(gamma), table.shape[0]
    hyper = {"arm_objective": objective, "kl_normalizer": normalizer, "estimator": estimator}
    state = make_state(n, k, gamma, hyper, table, seed, batch)
    x = np.zeros((batch, 1, 8, 8))
    eps = generator(seed + 1).standard_normal((batch, n))

    _, record = arm_of(state, x, np.full((1, n), 0.5), eps)
    assert record["scalars"]["lambda_eff"] == pytest.approx(softplus_sq(1.0), rel=1e-14)  # raw lambda = 1, in range

    expected = enumerated_gradient(objective_values(table, record, n, objective, normalizer), gamma, k)
    got = exact_expectation(stepper(state, x, eps), gamma, k, rows=1, independent=independent(estimator))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@given(n=st.integers(1, 4), k=st.floats(0.5, 10.0), data=st.data(),
       objective=st.sampled_from(["error", "loss"]), normalizer=st.sampled_from(["open", "all"]))
def test_exact_expectation_equals_enumerated_gradient(estimator, n, k, data, objective, normalizer):
    batch = 2
    gamma = np.array(data.draw(st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n)))
    table = np.array(data.draw(st.lists(st.lists(st.floats(0.0, 10.0), min_size=2**n, max_size=2**n),
                                        min_size=batch, max_size=batch)))
    seed = data.draw(st.integers(0, 2**16))
    check_exact_expectation(estimator, k, gamma, table, seed, objective, normalizer)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("gamma", [2.220446049250313e-16, -5e-324, 0.0])
def test_exact_expectation_gamma_near_zero(estimator, gamma):
    """A CI draw: at gamma = 2.2e-16 the middle box is one ulp wide and its centre rounded to the
    other side of sigmoid(-k gamma) in the test than in the library; such a box adds nothing measurable."""
    check_exact_expectation(estimator, 1.0, np.array([gamma]), np.zeros((2, 2)), 0, "error", "open")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_exact_expectation_per_example_gates(estimator):
    """(i) "per_example": one u (and u1) per image; the batch-mean term is unbiased for
    d/dgamma E[lambda' mean_b e_b]."""
    n, k, batch = 2, 3.0, 2
    gamma = np.array([0.3, -0.45])
    table = generator(7).uniform(0, 5, (batch, 2**n))
    state = make_state(n, k, gamma, {"gate_samples": "per_example", "estimator": estimator}, table, seed=3,
                       batch=batch)
    x = np.zeros((batch, 1, 8, 8))
    eps = generator(8).standard_normal((batch, n))
    lam = softplus_sq(1.0)
    expected = np.mean([enumerated_gradient(lam * table[b], gamma, k) for b in range(batch)], axis=0)
    got = exact_expectation(stepper(state, x, eps), gamma, k, rows=batch, independent=independent(estimator))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def real_decoder_setup(n=3, k=7.0, batch=2, seed=11, estimator="arm"):
    """The real tiny decoder: the batch, eps, parameters and gamma fixed; E(nu) for all 2^n gate vectors."""
    gamma = np.array([0.12, -0.08, 0.05])[:n]
    state = make_state(n, k, gamma, {"estimator": estimator}, seed=seed, batch=batch)
    x = generator(seed + 1).uniform(0, 1, (batch, 1, 8, 8))
    eps = generator(seed + 2).standard_normal((batch, n))
    _, record = arm_of(state, x, np.full((1, n), 0.5), eps)
    z = record["z"]
    decoder = state.model.decoder
    errors = []
    for nu in gate_vectors(n):  # E(nu): batch mean of the per-image sum of squared errors, BatchNorm on batch stats
        x_rec = decoder.forward(z * nu, cache=False)
        errors.append(((x_rec - x) ** 2).reshape(batch, -1).sum(axis=1).mean())
    lam = softplus_sq(1.0)
    expected = enumerated_gradient(lam * np.array(errors), gamma, k)
    return state, x, eps, gamma, expected


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_exact_expectation_real_decoder(estimator):
    """Exact integration of train_step's term with the real decoder equals the enumerated gradient."""
    state, x, eps, gamma, expected = real_decoder_setup(estimator=estimator)
    got = exact_expectation(stepper(state, x, eps), gamma, state.hyper.k, rows=1, independent=independent(estimator))
    assert np.abs(expected).max() > 1e-3  # the check is not vacuous
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_monte_carlo_real_decoder(estimator):
    """Mean of train_step's term over 2000 draws of u (and u1) lies within 4 standard errors of the gradient."""
    state, x, eps, gamma, expected = real_decoder_setup(estimator=estimator)
    draws = Draws(generator(2024), eps)
    samples = []
    for _ in range(2000):
        record = {}
        train_step(state, x, draws, record)
        samples.append(record["arm"])
    samples = np.array(samples)
    mean = samples.mean(axis=0)
    stderr = samples.std(axis=0, ddof=1) / math.sqrt(len(samples))
    assert np.all(stderr > 0)
    assert np.all(np.abs(mean - expected) < 4 * stderr), (mean, expected, stderr)
    # and the estimate is informative: the gradient is many standard errors away from zero
    assert np.abs(expected).max() > 4 * stderr.max()


def test_disarm_sign_is_minus_one_to_the_nu2():
    """DisARM's sign for refimpl's nu1 = 1[u > sigmoid(-k gamma)], nu2 = 1[u < sigmoid(k gamma)]: (-1)^nu2
    (Dong et al.'s b~ = 1[u < sigmoid(phi)] is nu2). disarm_term computes it as nu1 - nu2, the same number
    for every pair of gates; with (-1)^nu1 instead, the exact expectation is minus the gradient."""
    for a, b in itertools.product((0.0, 1.0), repeat=2):
        assert a - b == (-1.0) ** b * (a != b)
    n, k = 2, 3.0
    gamma = np.array([0.3, -0.45])
    values = generator(5).uniform(0, 5, 2**n)  # F(nu), one image
    index = 2 ** np.arange(n)

    def disarm(sign_gate):
        """u -> (term, nu1, nu2): refimpl's disarm_term, or Dong et al.'s formula with (-1)^(sign_gate(nu1, nu2))."""
        def step(u, u1):
            nu1 = (u > 1.0 / (1.0 + np.exp(k * gamma))).astype(float)
            nu2 = (u < 1.0 / (1.0 + np.exp(-k * gamma))).astype(float)
            f1, f2 = values[(nu1 @ index).astype(int)], values[(nu2 @ index).astype(int)]
            if sign_gate is None:
                return disarm_term(nu1, nu2, gamma, f1, f2, k), nu1, nu2
            sign = (-1.0) ** sign_gate(nu1, nu2)
            term = k * 0.5 * (f1 - f2)[:, None] * sign * (nu1 != nu2) / (1 + np.exp(-k * np.abs(gamma)))
            return term.mean(axis=0), nu1, nu2
        return step

    expected = enumerated_gradient(values, gamma, k)
    assert np.abs(expected).min() > 1e-2
    np.testing.assert_allclose(exact_expectation(disarm(None), gamma, k, 1), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(exact_expectation(disarm(lambda nu1, nu2: nu2), gamma, k, 1), expected, rtol=0,
                               atol=1e-12)
    np.testing.assert_allclose(exact_expectation(disarm(lambda nu1, nu2: nu1), gamma, k, 1), -expected, rtol=0,
                               atol=1e-12)


def test_reinforce_loo_draws_a_second_independent_sample():
    """reinforce_loo draws u, then u1, then eps from the step's generator; nu2 (the E2 pass, the loss and the KL
    term) is l. 6's 1[u < sigmoid(k gamma)] as for ARM, nu1 = 1[u1 < sigmoid(k gamma)]; ARM and DisARM draw no u1."""
    n, seed = 3, 4
    records = {}
    for estimator in ESTIMATORS:
        state = make_state(n, 7.0, np.array([0.05, -0.02, 0.1]), {"estimator": estimator}, seed=seed)
        records[estimator] = {}
        train_step(state, np.zeros((2, 1, 8, 8)), generator(9), records[estimator])
    g = generator(9)
    u, u1 = g.uniform(0, 1, (1, n)), g.uniform(0, 1, (1, n))
    loo, arm = records["reinforce_loo"], records["arm"]
    np.testing.assert_array_equal(loo["u"], u)
    np.testing.assert_array_equal(loo["u1"], u1)
    np.testing.assert_array_equal(loo["eps"], g.standard_normal((2, n)))
    np.testing.assert_array_equal(arm["u"], u)
    assert arm["u1"] is None and records["disarm"]["u1"] is None
    np.testing.assert_array_equal(loo["nu2"], arm["nu2"])
    np.testing.assert_array_equal(records["disarm"]["nu1"], arm["nu1"])
    p = 1.0 / (1.0 + np.exp(-7.0 * np.array([0.05, -0.02, 0.1])))
    np.testing.assert_array_equal(loo["nu1"], (u1 < p).astype(float))
