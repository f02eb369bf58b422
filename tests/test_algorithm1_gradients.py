"""Gradients of Algorithm 1's loss (l. 22-24, l. 27) against central finite differences, float64.

The loss is rebuilt here from the paper, independently of refimpl/algorithm1.py:

    L = lambda' C' + mean_b (1/||nu2||_0) sum_j KL(N(mu_bj, sigma_bj^2) || N(0, 1)) nu2_j  [+ w sum_j sigmoid(k gamma_j)]

with z = mu + sigma eps (Eq. 6), nu2 = 1[u < sigmoid(k gamma)] (l. 6), E2 the batch mean of
the per-image error of g_dec(z nu2) (l. 13), C = E2 - tau (l. 14), lambda' = clamp(softplus(lambda)^2)
(l. 21) and C' = C + StopGradient(C_ma - C) (l. 20): its value is C_ma and its gradient that of C,
so the test holds C_ma - C fixed at its value from the step. u and eps are the step's own
(from ``record``), so finite differences see the same gates and noise. The gradients compared
are those train_step hands to Adam (``record["grads"]``); gamma's is compared after removing
the ARM term (l. 29), which is an estimator and not a derivative of L at fixed u. w, l. 23's
weight of the L0 term, is 1 if C <= 0 else 0, or (interpretation (p), constraint="per_image")
the fraction of images with e_b <= tau; it is piecewise constant, so the differences hold it
at the step's value. With encoder_output="literal" (r) the KL is Eq. 15 as printed,
-1/2 (1 + s - e^s - mu^2), while z = mu + e^s eps.
"""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.algorithm1 import Hyper, init_state, kl_elementwise, lambda_gradient, train_step
from refimpl.execution import Execution
from refimpl.model import Architecture, ConvSpec, GatedVAE
from refimpl.rng import generator

F64 = np.float64
FD_EPS = 1e-6
PER_TENSOR = 20  # elements checked per parameter tensor
RTOL, ATOL = 1e-6, 1e-8


def tiny_arch():
    """(1, 8, 8) images, 2 encoder convs (8 -> 4 -> 2 px), 2 decoder blocks (2 -> 4 -> 8 px)."""
    return Architecture((1, 8, 8), encoder_convs=(ConvSpec(3, 4, 2, 1), ConvSpec(4, 3, 2, 1)),
                        decoder_convs=(ConvSpec(3, 3, 1, 1), ConvSpec(1, 3, 1, 1)), hidden=8).validate()


def gaussian_kl(mu, log_var):
    """KL(N(mu, sigma^2) || N(0, 1)) = log(1/sigma) + (sigma^2 + mu^2)/2 - 1/2."""
    return -0.5 * log_var + 0.5 * (np.exp(log_var) + mu**2) - 0.5


def paper_loss(state, x, u, eps, c_ma_minus_c, l0_weight, constant=True):
    """Algorithm 1's L (l. 22, 24) at the model's current parameters and raw lambda. -> float

    constant=False leaves out lambda' (C_ma - C - tau), which only lambda moves: with tau = 1000
    it would swamp the finite differences in theta, phi and gamma with rounding error.
    """
    model, h = state.model, state.hyper
    n, batch = model.n_latent, x.shape[0]
    encoded = model.encoder.forward(x, cache=False)
    mu, s = encoded[:, :n], encoded[:, n:]
    if h.encoder_output == "literal":  # (r): sigma = e^s (Eq. 3), Eq. 15's "log sigma - sigma" on s as printed
        z, kl_elem = mu + np.exp(s) * eps, -0.5 * (1.0 + s - np.exp(s) - mu**2)
    else:
        log_var = s if h.encoder_output == "logvar" else 2.0 * s  # (e): s = log sigma^2 or log sigma
        z, kl_elem = mu + np.exp(0.5 * log_var) * eps, gaussian_kl(mu, log_var)
    p = 1.0 / (1.0 + np.exp(-h.k * model.params["gamma"]))
    nu2 = np.ones((1, n)) if u is None else (u < p).astype(F64)  # l. 6 / l. 9
    x2 = model.decoder.forward(z * nu2, cache=False)
    sse = ((x2 - x) ** 2).reshape(batch, -1).sum(axis=1)
    error = sse if h.error == "sse" else np.sqrt(sse)  # (a)
    lam = float(state.lam)
    lam_eff = min(max(math.log1p(math.exp(lam)) ** 2, h.lambda_min), h.lambda_max)
    kl_sum = (kl_elem * nu2).sum(axis=1)
    if h.kl_normalizer == "open":
        count = np.broadcast_to(nu2.sum(axis=1), kl_sum.shape)
        kl_image = np.divide(kl_sum, count, out=np.zeros_like(kl_sum), where=count > 0)  # (f): 0 if all closed
    else:
        kl_image = kl_sum / n
    loss = lam_eff * (error.mean() + (c_ma_minus_c - h.tau if constant else 0.0)) + kl_image.mean()
    return loss + l0_weight * p.sum()  # l. 23-24


def run_step(state, x, seed):
    """One train_step; returns its record with the parameters (and lambda) restored to their values before it."""
    before = {name: p.copy() for name, p in state.parameters().items()}
    record = {}
    train_step(state, x, generator(seed), record)
    for name, p in state.parameters().items():
        p[...] = before[name]
    return record


def check_against_finite_differences(state, x, record, rng):
    """Every parameter tensor (PER_TENSOR random elements of each) and lambda vs central differences of L."""
    scalars, h = record["scalars"], state.hyper
    delta = scalars["C_ma"] - scalars["C"]
    # l. 23: the weight of the L0 term, from the batch-mean C or per image (p)
    l0_weight = (record["e2"] <= h.tau).mean() if h.constraint == "per_image" else float(scalars["C"] <= 0)
    model = state.model
    model.set_batchnorm_update(False)  # the finite-difference passes leave the running statistics alone
    try:
        def loss(name=None):
            return paper_loss(state, x, record["u"], record["eps"], delta, l0_weight,
                              constant=name in (None, "lambda"))

        assert loss() == pytest.approx(scalars["loss"], rel=1e-12, abs=1e-12)
        checked = 0
        for name, p in state.parameters().items():
            analytic = record["grads"][name]
            if name == "gamma" and record["arm"] is not None:
                analytic = analytic - record["arm"]
            flat_p, flat_a = p.reshape(-1), analytic.reshape(-1)
            picks = np.arange(flat_p.size) if flat_p.size <= PER_TENSOR else rng.choice(flat_p.size, PER_TENSOR, replace=False)
            for i in picks:
                original = flat_p[i].copy()
                flat_p[i] = original + FD_EPS
                plus = loss(name)
                flat_p[i] = original - FD_EPS
                minus = loss(name)
                flat_p[i] = original
                numeric = (plus - minus) / (2 * FD_EPS)
                assert flat_a[i] == pytest.approx(numeric, rel=RTOL, abs=ATOL), (name, int(i), flat_a[i], numeric)
                checked += 1
        assert checked > 100
    finally:
        model.set_batchnorm_update(True)


CONFIGS = {
    # name: (Hyper options, hit, tau, gamma or None, fused decoder)
    "default_violated": (dict(), False, 0.0, None, True),
    "default_violated_plain_decoder": (dict(), False, 0.0, None, False),
    "sampled_met_l0": (dict(), True, 1e3, [0.4, -0.3, 0.05, 0.2], True),
    "l2_logstd_all_per_example": (dict(error="l2", encoder_output="logstd", kl_normalizer="all",
                                       gate_samples="per_example"), True, 0.0, [0.1, -0.05, 0.3, -0.2], False),
    "l2_logvar_open_per_example_met": (dict(error="l2", gate_samples="per_example"), True, 50.0,
                                       [0.1, -0.05, 0.3, -0.2], True),
    "sse_logstd_open_batch": (dict(encoder_output="logstd"), True, 0.0, [0.2, -0.1, 0.02, 0.3], True),
    "all_closed": (dict(encoder_output="logstd"), True, 1e3, [-10.0, -10.0, -10.0, -10.0], True),
    "literal_met_l0": (dict(encoder_output="literal"), True, 1e3, [0.4, -0.3, 0.05, 0.2], True),
    "literal_violated_per_example": (dict(encoder_output="literal", gate_samples="per_example",
                                          kl_normalizer="all"), True, 0.0, [0.1, -0.05, 0.3, -0.2], False),
    "literal_unsampled": (dict(encoder_output="literal"), False, 0.0, None, False),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@settings(max_examples=3)
@given(seed=st.integers(0, 2**16))
def test_train_step_gradients_match_finite_differences(config, seed):
    options, hit, tau, gamma, fused = CONFIGS[config]
    n, batch = 4, 3
    model = GatedVAE(tiny_arch(), n, rng=generator(seed), dtype=F64, paths=Execution(fused=fused).resolve("numpy"))
    state = init_state(model, Hyper(tau=tau, **options))
    if gamma is not None:
        model.params["gamma"][...] = gamma
    state.hit = hit
    x = generator(seed + 1).uniform(0, 1, (batch, 1, 8, 8))
    record = run_step(state, x, seed + 2)
    assert (record["u"] is not None) == hit
    assert record["scalars"]["l0_added"] == (tau > 0)  # tau = 0: C > 0; the tau > 0 cases sit far below
    if config == "all_closed":
        assert not record["nu2"].any() and record["scalars"]["kl"] == 0.0
        assert all(np.isfinite(g).all() for g in record["grads"].values())
    check_against_finite_differences(state, x, record, generator(seed + 3))


def one_in_three_tau(seed, hit, gamma, **options):
    """A tau between the smallest and the middle per-image error of the step ``run_step(..., seed + 2)`` takes on
    the batch of ``seed + 1`` (found by a probe step on an equal model; tau does not change e_b): one image in
    three meets it, and the batch mean does not (mean > (e_(1) + e_(2)) / 2 unless all three are equal)."""
    model = GatedVAE(tiny_arch(), 4, rng=generator(seed), dtype=F64)
    probe = init_state(model, Hyper(tau=0.0, **options))
    model.params["gamma"][...] = gamma
    probe.hit = hit
    e2 = np.sort(run_step(probe, generator(seed + 1).uniform(0, 1, (3, 1, 8, 8)), seed + 2)["e2"])
    return 0.5 * (e2[0] + e2[1])


@pytest.mark.parametrize("options", [{}, {"gate_samples": "per_example", "encoder_output": "literal"}],
                         ids=["defaults", "per_example+literal"])
@settings(max_examples=3)
@given(seed=st.integers(0, 2**16), hit=st.booleans())
def test_per_image_l0_weight_gradients_match_finite_differences(options, seed, hit):
    """(p) constraint="per_image" with one image in three within tau and the batch-mean C > 0: l. 24 adds
    1/3 sum_j sigmoid(k gamma_j) to L (the batch reading adds nothing), and gamma's gradient 1/3 of its own."""
    gamma = [0.4, -0.3, 0.05, 0.2]
    tau = one_in_three_tau(seed, hit, gamma, **options)
    model = GatedVAE(tiny_arch(), 4, rng=generator(seed), dtype=F64)
    state = init_state(model, Hyper(tau=tau, constraint="per_image", **options))
    model.params["gamma"][...] = gamma
    state.hit = hit
    x = generator(seed + 1).uniform(0, 1, (3, 1, 8, 8))
    record = run_step(state, x, seed + 2)
    scalars = record["scalars"]
    assert scalars["C"] > 0 and scalars["l0_added"] and scalars["hit_fraction"] == 1 / 3 and state.hit
    check_against_finite_differences(state, x, record, generator(seed + 3))


@pytest.mark.parametrize("config", ["default_violated", "sampled_met_l0"])
@settings(max_examples=2)
@given(seed=st.integers(0, 2**16))
def test_gradients_two_steps_in_where_c_ma_differs_from_c(config, seed):
    """A step with history (the cases above start fresh, where C_ma = C and l. 20 cannot be checked): after a
    step on another batch, C_ma = alpha C_ma_prev + (1 - alpha) C != C. L must use C' with the value C_ma (not C:
    the loss value check fails) and the gradient of C (not of C_ma, (1 - alpha) = 0.01 times smaller, nor 0)."""
    options, hit, tau, gamma, fused = CONFIGS[config]
    n, batch = 4, 3
    model = GatedVAE(tiny_arch(), n, rng=generator(seed), dtype=F64, paths=Execution(fused=fused).resolve("numpy"))
    hyper = Hyper(tau=tau, **options)
    state = init_state(model, hyper)
    if gamma is not None:
        model.params["gamma"][...] = gamma
    state.hit = hit
    # the history: darker images (x^4, mean 1/5) than the checked batch's (mean 1/2), so that C_prev and C
    # differ by far more than draw-to-draw noise (two uniform batches once gave |C_ma - C| = 0.008)
    train_step(state, generator(seed + 4).uniform(0, 1, (batch, 1, 8, 8)) ** 4, generator(seed + 5))
    c_ma_before = state.c_ma
    x = generator(seed + 1).uniform(0, 1, (batch, 1, 8, 8))
    record = run_step(state, x, seed + 2)
    c, c_ma = record["scalars"]["C"], record["scalars"]["C_ma"]
    assert c_ma == pytest.approx(hyper.alpha * c_ma_before + (1 - hyper.alpha) * c, rel=1e-13, abs=1e-12)  # l. 18
    assert abs(c_ma - c) > 1e-2  # the loss value tells C_ma from C (E is ~20 here)
    assert record["scalars"]["loss"] == pytest.approx(
        record["scalars"]["lambda_eff"] * c_ma + record["scalars"]["kl"] + (record["scalars"]["gates_l1"] if c <= 0
                                                                            else 0.0), rel=1e-12)
    check_against_finite_differences(state, x, record, generator(seed + 3))


@pytest.mark.parametrize("rule", ["outward", "zero"])
@pytest.mark.parametrize("update", ["ascent", "descent"])
@pytest.mark.parametrize("side", ["max", "min"])
@pytest.mark.parametrize("violated", [True, False])
def test_lambda_gradient_through_the_clamp(rule, update, side, violated):
    """(c) with lambda' clamped: "zero" passes d(clamp)/d lambda = 0; "outward" passes the unclamped
    derivative C' d softplus(lambda)^2 / d lambda exactly when the optimiser would move lambda back inside."""
    bounds = dict(lambda_min=1e-5, lambda_max=1.0) if side == "max" else dict(lambda_min=3.0, lambda_max=5.0)
    hyper = Hyper(tau=0.0 if violated else 1e3, lambda_clamp_grad=rule, lambda_update=update, **bounds)
    model = GatedVAE(tiny_arch(), 3, rng=generator(5), dtype=F64)
    state = init_state(model, hyper)  # raw lambda = 1: softplus(1)^2 = 1.72 is outside both ranges
    x = generator(6).uniform(0, 1, (2, 1, 8, 8))
    record = run_step(state, x, 7)
    c_ma = record["scalars"]["C_ma"]
    assert record["scalars"]["lambda_eff"] == bounds["lambda_" + side]
    assert (c_ma > 0) == violated

    # finite differences of L in lambda: the clamped L is flat; the unclamped derivative is C' d(softplus^2)
    lam = float(state.lam)
    f = lambda v: min(max(math.log1p(math.exp(v)) ** 2, hyper.lambda_min), hyper.lambda_max) * c_ma  # noqa: E731
    clamped = (f(lam + FD_EPS) - f(lam - FD_EPS)) / (2 * FD_EPS)
    unclamped = c_ma * (math.log1p(math.exp(lam + FD_EPS)) ** 2 - math.log1p(math.exp(lam - FD_EPS)) ** 2) / (2 * FD_EPS)
    assert clamped == 0.0
    step_direction = np.sign(unclamped) if update == "ascent" else -np.sign(unclamped)
    moves_inside = step_direction < 0 if side == "max" else step_direction > 0
    expected = unclamped if (rule == "outward" and moves_inside) else clamped
    assert record["grads"]["lambda"] == pytest.approx(expected, rel=1e-7, abs=1e-12)
    assert lambda_gradient(lam, c_ma, hyper) == pytest.approx(expected, rel=1e-7, abs=1e-12)


@settings(max_examples=20)
@given(lam=st.floats(-3.0, 3.0), c_prime=st.floats(-50.0, 50.0))
def test_lambda_gradient_inside_the_range_is_the_derivative(lam, c_prime):
    """l. 21-22 inside [lambda_min, lambda_max]: dL/dlambda = C' d softplus(lambda)^2 / d lambda (any rule)."""
    hyper = Hyper(tau=0.0, lambda_min=1e-8, lambda_max=1e3)
    numeric = c_prime * (math.log1p(math.exp(lam + FD_EPS)) ** 2 - math.log1p(math.exp(lam - FD_EPS)) ** 2) / (2 * FD_EPS)
    for rule in ("outward", "zero"):
        h = dataclasses.replace(hyper, lambda_clamp_grad=rule)
        assert lambda_gradient(lam, c_prime, h) == pytest.approx(numeric, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("encoder_output", ["logvar", "logstd"])
def test_kl_elementwise_is_the_gaussian_kl(encoder_output):
    """Eq. 15 under both readings of s (e) is KL(N(mu, sigma^2) || N(0, 1)), checked against numerical integration."""
    scipy_integrate = pytest.importorskip("scipy.integrate")
    rng = generator(0)
    mu = rng.uniform(-2, 2, (3, 4))
    s = rng.uniform(-1.5, 1.0, (3, 4))
    sigma = np.exp(0.5 * s) if encoder_output == "logvar" else np.exp(s)
    got = kl_elementwise(mu, s, encoder_output)
    closed_form = np.log(1 / sigma) + (sigma**2 + mu**2) / 2 - 0.5
    np.testing.assert_allclose(got, closed_form, rtol=1e-12, atol=1e-14)
    for (b, j) in [(0, 0), (1, 2), (2, 3)]:
        m, sd = mu[b, j], sigma[b, j]
        log_q = lambda t: -0.5 * ((t - m) / sd) ** 2 - np.log(sd * np.sqrt(2 * np.pi))  # noqa: E731
        log_p = lambda t: -0.5 * t**2 - 0.5 * np.log(2 * np.pi)  # noqa: E731
        integral, _ = scipy_integrate.quad(lambda t: np.exp(log_q(t)) * (log_q(t) - log_p(t)), m - 12 * sd, m + 12 * sd,
                                           epsabs=1e-13, epsrel=1e-11)
        assert got[b, j] == pytest.approx(integral, rel=1e-8, abs=1e-10)
    assert np.all(got >= 0)
    np.testing.assert_allclose(kl_elementwise(np.zeros(3), np.zeros(3), encoder_output), 0.0, atol=0)


def test_literal_kl_is_not_the_kl_of_the_sampled_gaussian():
    """(r): Eq. 15 as printed on s = log sigma is the KL of N(mu, e^s) -- "logvar"'s formula on the same s -- while
    l. 11 samples N(mu, e^2s) ("logstd"'s KL): they differ by (s + e^s - e^2s)/2, which is 0 only at s = 0."""
    rng = generator(1)
    mu, s = rng.uniform(-2, 2, (3, 4)), rng.uniform(-1.5, 1.0, (3, 4))
    literal, sampled = kl_elementwise(mu, s, "literal"), kl_elementwise(mu, s, "logstd")
    np.testing.assert_array_equal(literal, kl_elementwise(mu, s, "logvar"))
    np.testing.assert_allclose(literal - sampled, 0.5 * (s + np.exp(s) - np.exp(2 * s)), rtol=1e-10, atol=1e-14)
    assert np.all(literal != sampled)
    np.testing.assert_array_equal(kl_elementwise(mu, np.zeros_like(s), "literal"),
                                  kl_elementwise(mu, np.zeros_like(s), "logstd"))


# ---------------------------------------------------------------- BatchNorm running statistics (h)


def bn_input(layers, upto, z):
    """Run a Sequential's layers before ``upto`` (a child name) on z, in training mode, without caching."""
    out = z
    for name, layer in layers.named_layers:
        if name == upto:
            return out
        out = layer.forward(out, cache=False)
    raise AssertionError(upto)


def channel_stats(a):
    """Batch mean and biased variance per channel of a: (N, C, H, W)."""
    return a.mean(axis=(0, 2, 3)), a.var(axis=(0, 2, 3))


def make_bn_state(mode, seed=3):
    model = GatedVAE(tiny_arch(), 3, rng=generator(seed), dtype=F64)
    state = init_state(model, Hyper(tau=0.0, e1_batchnorm=mode))
    model.params["gamma"][...] = [0.3, -0.3, 0.1]
    state.hit = True
    rng = generator(seed + 1)
    for layer_name in ("bn1", "bn2"):  # non-trivial running statistics to start from
        for seq in (model.encoder, model.decoder):
            seq[layer_name].buffers["running_mean"][...] = rng.uniform(-1, 1, seq[layer_name].num_features)
            seq[layer_name].buffers["running_var"][...] = rng.uniform(0.5, 2, seq[layer_name].num_features)
    return state


@pytest.mark.parametrize("mode", ["batch", "batch_update", "running"])
def test_batchnorm_running_statistics_per_step(mode):
    """(h): the running statistics follow running <- m running + (1 - m) batch once per pass that updates them:
    encoder once per step; decoder once ("batch", "running": the E2 pass) or twice ("batch_update": E1 then E2)."""
    state = make_bn_state(mode)
    model = state.model
    x = generator(9).uniform(0, 1, (3, 1, 8, 8))
    old = {name: b.copy() for name, b in model.named_buffers()}
    params_before = {name: p.copy() for name, p in model.parameters().items()}
    # find a seed whose u gives nu1 != nu2, so the two decoder passes have different batch statistics
    for seed in range(100):
        probe = {}
        trial = make_bn_state(mode)
        train_step(trial, x, generator(seed), probe)
        if not np.array_equal(probe["nu1"], probe["nu2"]):
            break
    record = {}
    train_step(state, x, generator(seed), record)
    after = {name: b.copy() for name, b in model.named_buffers()}
    assert not np.array_equal(record["nu1"], record["nu2"])
    m = model.arch.bn_momentum
    assert m == 0.8  # Section 4

    # the statistics are those of the inputs the layers saw, computed with the parameters before the step
    for name, p in model.parameters().items():
        p[...] = params_before[name]
    for name, b in model.named_buffers():
        b[...] = old[name]
    model.set_batchnorm_update(False)
    enc_in = bn_input(model.encoder, "bn1", x)
    dec_in_1 = bn_input(model.decoder, "bn1", record["z"] * record["nu1"])
    dec_in_2 = bn_input(model.decoder, "bn1", record["z"] * record["nu2"])
    model.set_batchnorm_update(True)

    mean, var = channel_stats(enc_in)
    np.testing.assert_allclose(after["encoder.bn1.running_mean"],
                               m * old["encoder.bn1.running_mean"] + (1 - m) * mean, rtol=1e-12)
    np.testing.assert_allclose(after["encoder.bn1.running_var"],
                               m * old["encoder.bn1.running_var"] + (1 - m) * var, rtol=1e-12)
    mean1, var1 = channel_stats(dec_in_1)
    mean2, var2 = channel_stats(dec_in_2)
    rm, rv = old["decoder.bn1.running_mean"], old["decoder.bn1.running_var"]
    if mode == "batch_update":
        rm, rv = m * rm + (1 - m) * mean1, m * rv + (1 - m) * var1
    rm, rv = m * rm + (1 - m) * mean2, m * rv + (1 - m) * var2
    np.testing.assert_allclose(after["decoder.bn1.running_mean"], rm, rtol=1e-12)
    np.testing.assert_allclose(after["decoder.bn1.running_var"], rv, rtol=1e-12)


def test_e1_pass_in_running_mode_uses_running_statistics():
    """(h) "running": x1 (l. 12) is the decoder in eval mode on z nu1 with the running statistics before the step,
    unlike the "batch" reading; the decoder is back in training mode afterwards."""
    results = {}
    for mode in ("running", "batch"):
        state = make_bn_state(mode)
        model = state.model
        x = generator(9).uniform(0, 1, (3, 1, 8, 8))
        decoder_buffers = {name: b.copy() for name, b in model.decoder.named_buffers()}
        params_before = {name: p.copy() for name, p in model.parameters().items()}
        record = {}
        train_step(state, x, generator(4), record)
        assert model.decoder.training and all(layer.training for _, layer in model.decoder.children())
        for name, p in model.parameters().items():
            p[...] = params_before[name]
        for name, b in model.decoder.named_buffers():
            b[...] = decoder_buffers[name]
        model.decoder.eval()
        eval_x1 = model.decoder.forward(record["z"] * record["nu1"], cache=False)
        model.decoder.train()
        model.set_batchnorm_update(False)
        batch_x1 = model.decoder.forward(record["z"] * record["nu1"], cache=False)
        model.set_batchnorm_update(True)
        results[mode] = (record["x1"], eval_x1, batch_x1)
    x1, eval_x1, batch_x1 = results["running"]
    np.testing.assert_allclose(x1, eval_x1, rtol=1e-12, atol=1e-14)
    assert np.abs(x1 - batch_x1).max() > 1e-3
    x1, eval_x1, batch_x1 = results["batch"]
    np.testing.assert_allclose(x1, batch_x1, rtol=1e-12, atol=1e-14)
    assert np.abs(x1 - eval_x1).max() > 1e-3
