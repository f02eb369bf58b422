"""Algorithm 1 of the paper, transcribed line by line: one call of :func:`train_step`
is one pass of the loop body (l. 3-31) on a batch.

The paper writes the loop per data point x_i; the experiments use batches of 64.
Batched reading (interpretation (i)): one uniform draw u per batch (or one per image
with ``gate_samples="per_example"``), E = batch mean of the per-image error, C <= 0
tested on that mean. Every place where the paper can be read two ways is a field of
:class:`Hyper`, lettered as in ``refimpl/INTERPRETATIONS.md``, which maps each line of
Algorithm 1 and each of Eqs. 8-15 to this file.

Gradients are written by hand, in the order of the chain rule from L back to the
parameters (l. 27), then the ARM term is added to gamma's gradient (l. 28-30) and
Adam updates theta, phi, gamma and lambda (l. 31; with ``adam_steps="per_parameter"``
gamma only on steps where it has a gradient, interpretation (n)). GECO's scalars (C,
C_ma, lambda', dL/dlambda, l. 23's weight: :func:`geco`) are computed on the host in
float64, as Python floats with the math module's exp and log1p.

:class:`refimpl.device_step.DeviceStep` runs the same step without host reads. It calls the
pieces of :func:`train_step` written here (:func:`sample_gates`, :func:`reparameterise`,
:func:`decoder_passes`, :func:`geco`, :func:`lagrangian`, :func:`backpropagate`,
:func:`l0_gradient`, :func:`gate_estimator_gradient`, :func:`update_parameters`); the scalar
ones take Python floats or 0-d float64 arrays of either backend (:func:`scalar_ops`).

The gradient estimator of l. 29 (interpretation (o), ``Hyper.estimator``): L0-ARM as
the paper writes it (Eq. 13), DisARM on the same antithetic pair of gate vectors, or
two-sample REINFORCE with a leave-one-out baseline on two independent gate vectors;
all three use the two decoder passes of l. 12-13, and the E2 pass (l. 13, the one the
loss and the KL term use) always has nu2 = 1[u < sigmoid(k gamma)].

l. 23's test weighs the L0 term of l. 24 (interpretation (p), ``Hyper.constraint``): 1 or 0
by the batch-mean C, or the fraction of images with e_b <= tau (:func:`l0_term_weight`).
l. 31 (interpretation (q)): lambda at its own rate (``lambda_lr``), by Adam or by plain
gradient ascent (``lambda_optimizer``), in :func:`update_parameters`.

Random draws, in this order per step, from the one generator passed in: u (S, n)
when gates are sampled (l. 4), then u1 (S, n), the second independent sample, only
with ``estimator="reinforce_loo"``, then eps (B, n) for the reparameterisation (l. 11).
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

from .adam import Adam
from .backend import array_module, to_host
from .layers.activations import sigmoid
from .model import GatedVAE
from .optionspec import OptionError, float_pair, option
from .rng import standard_normal, uniform
from .threads import DecoderPasses, resolve


# l. 29's gradient estimators for gamma (interpretation (o)); the first is the paper's.
ESTIMATORS = ("arm", "disarm", "reinforce_loo")


@dataclass(frozen=True)
class Hyper:
    """Algorithm 1's parameters (Section 4 defaults) and the interpretation switches.

    Each field declares its ``refimpl train`` option (:func:`refimpl.optionspec.option`);
    a switch's metadata holds its choices (default first) and its letter in
    ``refimpl/INTERPRETATIONS.md``, where the reasons for each default are given.
    """

    tau: float = option(help="GECO tolerance tau of l. 14, in the units of the error (a) (default: per dataset, "
                             "scaled by the pixel ratio with --image-size)", parse=float, metavar="T")
    alpha: float = option(0.99, "l. 18: the moving average rate of C")
    k: float = option(7.0, "l. 5-6, 24, 29: the sigmoid's scale")
    lambda_min: float = option(1e-5, "l. 21: lower clamp of lambda'")
    lambda_max: float = option(5.0, "l. 21: upper clamp of lambda'")
    lr: float = option(1e-3, "l. 31: Adam's learning rate")
    betas: tuple = option((0.9, 0.999), "l. 31: Adam's betas", parse=float_pair, metavar="B1,B2")
    adam_eps: float = option(1e-8, "l. 31: Adam's epsilon (PyTorch's default)")
    gamma_init: float = option(0.42, "Section 4: initial gate logits, sigmoid(7 * 0.42) = 0.95")
    lambda_init: float = option(1.0, "Section 4: initial lambda, on the side (d) says")
    error: str = option("sse", "l. 12-13: per-image squared error summed over pixels, or its square root (the "
                        "L2 norm as written)", choices=("sse", "l2"), letter="a")
    lambda_update: str = option("ascent", "l. 31: maximise L over lambda (Section 2.1's min-max), or descend as "
                                "l. 31 reads", choices=("ascent", "descent"), letter="b")
    lambda_clamp_grad: str = option("outward", "l. 21: zero only the gradients that push lambda' further out of "
                                    "[lambda_min, lambda_max] (Sonnet's GECO), or every gradient while clamped",
                                    choices=("outward", "zero"), letter="c")
    lambda_init_on: str = option("raw", "Section 4's lambda = 1: the raw lambda, or the effective lambda'",
                                 choices=("raw", "effective"), letter="d")
    encoder_output: str = option("logvar", "l. 11: the encoder's second half is log sigma^2 (Eq. 15), or log sigma "
                                 "(Eq. 3), or log sigma for sampling with Eq. 15's 'log sigma - sigma' applied to "
                                 "it as printed (both equations literally)",
                                 choices=("logvar", "logstd", "literal"), letter="e, r")
    kl_normalizer: str = option("open", "l. 22: divide the KL by ||nu2||_0 (0 when every gate is closed, as the "
                                "numerator then is too), or by n", choices=("open", "all"), letter="f")
    hit: str = option("sticky", "l. 25: hit never resets, or hit = (C <= 0) of the previous step",
                      choices=("sticky", "per_step"), letter="g")
    e1_batchnorm: str = option("batch", "l. 12: the E1 decoder pass uses its own batch statistics and leaves the "
                               "running ones alone, also updates them, or uses them (eval mode, the L0-ARM "
                               "authors' code)", choices=("batch", "batch_update", "running"), letter="h")
    gate_samples: str = option("batch", "l. 4: one u per batch, or one per image", choices=("batch", "per_example"),
                               letter="i")
    arm_objective: str = option("error", "l. 29: F = lambda' E as written, or lambda' E plus the KL term",
                                choices=("error", "loss"), letter="k")
    adam_steps: str = option("global", "l. 31: one Adam step count for every parameter (TF/Keras, optax), or a "
                             "count per parameter that starts at its first gradient (torch.optim.Adam: gamma before "
                             "the first hit has none)", choices=("global", "per_parameter"), letter="n")
    estimator: str = option("arm", "l. 29: the gradient estimator for gamma from the two decoder passes: L0-ARM "
                            "(Eq. 13, the paper's), DisARM (Dong et al. 2020) on the same antithetic gates, or "
                            "two-sample REINFORCE with a leave-one-out baseline on two independent gate samples "
                            "(draws a second u)", choices=ESTIMATORS, letter="o")
    constraint: str = option("batch", "l. 23-25: C <= 0 on the batch-mean error, or per image: the L0 term weighted "
                             "by the fraction of images with e_b <= tau (Figure 1's 'percentage of GECO tolerance "
                             "hits'), hit when any image meets it; GECO's lambda (l. 14-22) on the batch mean "
                             "either way", choices=("batch", "per_image"), letter="p")
    lambda_optimizer: str = option("adam", "l. 31: lambda by Adam with the other parameters, or by plain gradient "
                                   "ascent lambda += lambda_lr dL/dlambda (GECO's own update; descent per (b))",
                                   choices=("adam", "sgd"), letter="q")
    lambda_lr: float | None = option(None, "l. 31: lambda's own learning rate, for Adam or plain gradient ascent "
                                     "(default: lr)", parse=float, metavar="LR", letter="q")

    def __post_init__(self):
        checks = [
            ("tau", self.tau >= 0, ">= 0"),
            ("alpha", 0 < self.alpha < 1, "in (0, 1)"),
            ("k", self.k > 0, "> 0"),
            ("lambda_min", self.lambda_min > 0, "> 0"),
            ("lambda_max", self.lambda_max >= self.lambda_min, f">= lambda_min={self.lambda_min}"),
            ("lr", self.lr > 0, "> 0"),
            ("adam_eps", self.adam_eps > 0, "> 0"),
            ("gamma_init", True, ""),
            ("lambda_init", self.lambda_init > 0 or self.lambda_init_on == "raw", "> 0 when lambda_init_on='effective'"),
        ]
        if self.lambda_lr is not None:
            checks.append(("lambda_lr", self.lambda_lr > 0, "> 0 (or None: lr)"))
        for name, ok, expected in checks:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise OptionError(f"{name}={value!r}: expected a finite number {expected}")
        for name, choices in OPTIONS.items():
            if getattr(self, name) not in choices:
                raise OptionError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(choices)}")

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def lambda_rate(self) -> float:
        """lambda's learning rate at l. 31 (interpretation (q)): ``lambda_lr``, or Adam's ``lr`` when None."""
        return self.lr if self.lambda_lr is None else self.lambda_lr


# The interpretation switches: field name -> choices (default first), from the fields' metadata.
OPTIONS = {f.name: f.metadata["choices"] for f in fields(Hyper) if f.metadata.get("choices")}


class _HostScalars:
    """The few operations GECO's scalar math needs, on Python floats: the math module's exp and
    log1p (the reference's rounding), Python's max, min, abs, not and if."""

    exp, log1p = staticmethod(math.exp), staticmethod(math.log1p)
    abs, maximum, minimum = staticmethod(abs), staticmethod(max), staticmethod(min)
    logical_not = staticmethod(operator.not_)

    @staticmethod
    def where(cond, a, b):
        return a if cond else b


def is_host_scalar(v) -> bool:
    """A Python float (or int), as the reference computes GECO's scalars; not a NumPy scalar or 0-d array."""
    return type(v) in (int, float)


def scalar_ops(v):
    """Where GECO's scalar math (l. 14-24) finds exp, log1p, where, ...: the host's for a Python float
    (the reference, float64), the array module for a 0-d array of either backend (no host read)."""
    return _HostScalars if is_host_scalar(v) else array_module(v)


def softplus(v):
    """max(v, 0) + log1p(exp(-|v|)); v: a float or a 0-d float64 array (:func:`scalar_ops`)."""
    ops = scalar_ops(v)
    return ops.maximum(v, 0.0) + ops.log1p(ops.exp(-ops.abs(v)))


def logistic(v):
    """1 / (1 + e^-v), written as e / (1 + e) with e = exp(v) for v < 0; v: a float or a 0-d float64 array."""
    ops = scalar_ops(v)
    e = ops.exp(-ops.abs(v))  # exp(-v) for v >= 0, exp(v) for v < 0
    return ops.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def initial_lambda_raw(hyper: Hyper) -> float:
    """The raw parameter lambda at step 0 (interpretation (d))."""
    if hyper.lambda_init_on == "raw":
        return hyper.lambda_init
    return math.log(math.expm1(math.sqrt(hyper.lambda_init)))  # softplus(lambda)^2 = lambda_init


def effective_lambda(lam, hyper: Hyper):
    """l. 21: lambda' = max(min(softplus(lambda)^2, lambda_max), lambda_min); lam: a float or a 0-d float64 array."""
    ops = scalar_ops(lam)
    return ops.minimum(ops.maximum(softplus(lam) ** 2, hyper.lambda_min), hyper.lambda_max)


def lambda_gradient(lam, c_prime, hyper: Hyper):
    """dL/dlambda = C' * d lambda'/d lambda, through the clamp of l. 21 (interpretation (c)).
    lam, c_prime: floats or 0-d float64 arrays."""
    sp = softplus(lam)
    grad = c_prime * 2.0 * sp * logistic(lam)
    return scalar_ops(lam).where(clamp_keeps_gradient(sp**2, grad, hyper), grad, 0.0)


def clamp_keeps_gradient(raw, grad, hyper: Hyper):
    """Interpretation (c): whether dL/dlambda survives l. 21's clamp, given raw = softplus(lambda)^2.

    Inside [lambda_min, lambda_max] always. Outside: never with ``lambda_clamp_grad="zero"``;
    with "outward" (Sonnet's GECO) unless the step would push lambda' further out. raw, grad:
    floats or 0-d arrays of either backend; returns a bool of the same kind.
    """
    inside = (hyper.lambda_min <= raw) & (raw <= hyper.lambda_max)
    if hyper.lambda_clamp_grad == "zero":
        return inside
    ops = scalar_ops(raw)
    moves_up = grad > 0 if hyper.lambda_update == "ascent" else grad < 0
    pushes_out = ((raw > hyper.lambda_max) & moves_up) | ((raw < hyper.lambda_min) & ops.logical_not(moves_up))
    return inside | ops.logical_not(pushes_out)


class GecoScalars(NamedTuple):
    """GECO's scalars of one step (l. 14-21, 23): floats on the host, 0-d float64 arrays in DeviceStep."""

    c: object  # l. 14: C = E2 - tau
    c_ma: object  # l. 15-19: its moving average
    c_prime: object  # l. 20: C' (the value of C_ma)
    lam_eff: object  # l. 21: lambda'
    lam_grad: object  # dL/dlambda through l. 21-22, (c)
    l0_weight: object  # l. 23: the weight of l. 24's L0 term, (p)
    l0_added: object  # l. 23: l0_weight > 0


def geco(e2_mean, c_ma, lam, hit_fraction, hyper: Hyper) -> GecoScalars:
    """l. 14-21 and l. 23 from the batch mean E2, the previous step's C_ma (None at i == 0), the raw
    lambda and the fraction of images with e_b <= tau. All floats (the reference: float64 on the host)
    or all 0-d float64 arrays of one backend (:class:`refimpl.device_step.DeviceStep`: no host read)."""
    c = e2_mean - hyper.tau  # l. 14: the constraint of Eq. 9 (C <= 0: E2 within tolerance)
    if c_ma is None:  # l. 15: i == 0
        c_ma = c  # l. 16
    else:  # l. 17
        c_ma = hyper.alpha * c_ma + (1 - hyper.alpha) * c  # l. 18
    # l. 19 (end); l. 20: C' = C + StopGradient(C_ma - C) has the value C_ma and dC'/dC = 1
    c_prime = c_ma
    lam_eff = effective_lambda(lam, hyper)  # l. 21
    l0_weight = l0_term_weight(c, hit_fraction, hyper)  # l. 23: 1 if C <= 0 else 0, or per image (p)
    return GecoScalars(c, c_ma, c_prime, lam_eff, lambda_gradient(lam, c_prime, hyper), l0_weight, l0_weight > 0)


def l0_term_weight(c, hit_fraction, hyper: Hyper):
    """l. 23 as the weight of l. 24's L0 term (interpretation (p)): 1.0 if C <= 0 else 0.0 (``constraint="batch"``),
    or with ``"per_image"`` the fraction of the batch's images with C_b = e_b - tau <= 0 (``hit_fraction``).
    c, hit_fraction: floats or 0-d float64 arrays."""
    if hyper.constraint == "per_image":
        return hit_fraction
    return scalar_ops(c).where(c <= 0, 1.0, 0.0)


def lagrangian(g: GecoScalars, kl_term, gates_l1):
    """l. 22 and l. 24: L = lambda' C' + the KL term, plus l. 23's weight times the L0 term sum_j sigmoid(k gamma_j)
    when it is added (Eq. 14). Floats or 0-d float64 arrays."""
    return g.lam_eff * g.c_prime + kl_term + scalar_ops(g.lam_eff).where(g.l0_added, g.l0_weight * gates_l1, 0.0)


def gate_masks(u, gamma, k: float, u1=None):
    """l. 5-6: nu1 = 1[u > sigmoid(-k gamma)], nu2 = 1[u < sigmoid(k gamma)]. u: (S, n), gamma: (n,) -> two (S, n).

    ``u1`` (reinforce_loo, interpretation (o)): a second, independent draw; then nu1 =
    1[u1 < sigmoid(k gamma)], an independent sample instead of l. 5's antithetic twin
    (1[u > sigmoid(-k gamma)] = 1[1 - u < sigmoid(k gamma)]). nu2 is l. 6's either way.
    """
    p = sigmoid(k * gamma)
    nu2 = (u < p).astype(u.dtype)
    if u1 is None:
        return (u > sigmoid(-k * gamma)).astype(u.dtype), nu2
    return (u1 < p).astype(u.dtype), nu2


def arm_term(u, f1, f2, k: float):
    """l. 29 without lambda' (carried in f): k * mean_b[(F(nu1)_b - F(nu2)_b) (u_b - 1/2)].

    u: (S, n) with S = 1 or B; f1, f2: (B,) per-image objectives under nu1 and nu2 -> (n,).
    With S = 1 this is k (mean F1 - mean F2)(u - 1/2), Eq. 13 on batch means.
    """
    return k * ((f1 - f2)[:, None] * (u - 0.5)).mean(axis=0)


def disarm_term(nu1, nu2, gamma, f1, f2, k: float):
    """DisARM (Dong, Mnih & Tucker 2020) on l. 5-6's antithetic pair, per logit phi = k gamma, times k:

        k * mean_b[ 1/2 (F(nu1)_b - F(nu2)_b) (-1)^nu2 1[nu1 != nu2] sigmoid(|k gamma|) ].

    (-1)^nu2 1[nu1 != nu2] = nu1 - nu2 (it is +1 where nu1 = 1, nu2 = 0 and -1 the other way),
    which is how it is computed here. Their b = 1[1 - u < sigmoid(phi)] is our nu1, their
    b~ = 1[u < sigmoid(phi)] our nu2; the sign is (-1)^(b~) = (-1)^nu2, checked exactly against
    the enumerated gradient in tests/test_arm.py. nu1, nu2: (S, n); f1, f2: (B,) -> (n,).
    """
    weight = 0.5 * (nu1 - nu2) * sigmoid(k * abs(gamma))
    return k * ((f1 - f2)[:, None] * weight).mean(axis=0)


def reinforce_loo_term(nu1, nu2, gamma, f1, f2, k: float):
    """Two-sample REINFORCE with a leave-one-out baseline (Kool et al. 2019), times k:

        k * mean_b[ 1/2 ((F(nu1)_b - F(nu2)_b)(nu1 - p) + (F(nu2)_b - F(nu1)_b)(nu2 - p)) ],  p = sigmoid(k gamma),

    nu - p being d log P(nu)/d(k gamma) of a Bernoulli; each sample's baseline is the other's F.
    With two samples it equals k mean_b[1/2 (F1 - F2)(nu1 - nu2)]. nu1, nu2: two independent
    samples (:func:`gate_masks` with ``u1``), (S, n); f1, f2: (B,) -> (n,).
    """
    p = sigmoid(k * gamma)
    d = (f1 - f2)[:, None]
    return k * (0.5 * (d * (nu1 - p) + (-d) * (nu2 - p))).mean(axis=0)


def estimator_term(estimator: str, u, nu1, nu2, gamma, f1, f2, k: float):
    """l. 29's term for gamma under interpretation (o), without lambda' (carried in f). -> (n,)"""
    if estimator == "arm":
        return arm_term(u, f1, f2, k)
    if estimator == "disarm":
        return disarm_term(nu1, nu2, gamma, f1, f2, k)
    if estimator == "reinforce_loo":
        return reinforce_loo_term(nu1, nu2, gamma, f1, f2, k)
    raise ValueError(f"estimator={estimator!r}: expected one of {', '.join(ESTIMATORS)}")


def gated_kl(kl, nu, normalizer: str):
    """l. 22's KL term per image: (1/||nu||_0) ||KL_elem * nu||_1 (interpretation (f): or / n).

    kl: (B, n); nu: (S, n) with S = 1 or B. Returns (per image (B,), the divisor (S, 1));
    the divisor is at least 1, so with every gate closed the term is 0 (numerator 0).
    """
    xp = array_module(kl)
    count = nu.sum(axis=1, keepdims=True) if normalizer == "open" else xp.full((nu.shape[0], 1), nu.shape[1],
                                                                               dtype=nu.dtype)
    count = xp.maximum(count, 1)
    return (kl * nu / count).sum(axis=1), count


def estimator_objectives(lam_eff, e1, e2, kl, nu1, kl_per_image2, hyper: Hyper):
    """F(nu1)_b and F(nu2)_b of l. 29 (interpretation (k)): lambda' e_b, plus the KL term of each
    gate vector with ``arm_objective="loss"``. e1, e2: (B,); kl: (B, n); nu1: (S, n);
    kl_per_image2: the KL term under nu2 (:func:`gated_kl`). Returns two (B,)."""
    f1, f2 = lam_eff * e1, lam_eff * e2
    if hyper.arm_objective == "loss":
        f1 = f1 + gated_kl(kl, nu1, hyper.kl_normalizer)[0]
        f2 = f2 + kl_per_image2
    return f1, f2


def encoder_output_gradient(dz, dkl, mu, sigma, eps, encoder_output: str):
    """l. 27 through l. 11 and Eq. 15: dL/d[mu, s] (B, 2n) from dL/dz and dL/dKL_elem, each (B, n)."""
    # mu reaches L through z = mu + sigma eps (dz/dmu = 1) and KL_elem (dKL/dmu = mu):
    dmu = dz + dkl * mu
    # s reaches L through sigma and KL_elem. "logvar": sigma = exp(s/2), dsigma/ds = sigma/2, and
    # KL = -1/2 (1 + s - e^s - mu^2) gives dKL/ds = (e^s - 1)/2 = (sigma^2 - 1)/2.
    # "logstd": sigma = exp(s), dsigma/ds = sigma; KL = -1/2 (1 + 2s - e^2s - mu^2), dKL/ds = sigma^2 - 1.
    # "literal" (r): sigma = exp(s), dsigma/ds = sigma; KL = -1/2 (1 + s - e^s - mu^2), dKL/ds = (sigma - 1)/2.
    if encoder_output == "logvar":
        ds = dz * eps * 0.5 * sigma + dkl * 0.5 * (sigma * sigma - 1.0)
    elif encoder_output == "literal":
        ds = dz * eps * sigma + dkl * 0.5 * (sigma - 1.0)
    else:
        ds = dz * eps * sigma + dkl * (sigma * sigma - 1.0)
    return array_module(dz).concatenate([dmu, ds], axis=1)


def per_image_error(x_rec, x, kind: str):
    """e_b for l. 12-13: sum of squared errors over pixels ("sse") or its square root ("l2"). -> (B,)"""
    d = (x_rec - x).reshape(x.shape[0], -1)
    sse = (d * d).sum(axis=1)
    return sse if kind == "sse" else sse**0.5


def per_image_error_grad(x_rec, x, e, kind: str):
    """d e_b / d x_rec, shaped like x_rec. For "l2" the gradient at e_b = 0 is taken as 0."""
    d = x_rec - x
    if kind == "sse":
        return 2.0 * d
    e = e.reshape(-1, *([1] * (x.ndim - 1)))
    return d / (e + (e == 0))


def kl_elementwise(mu, s, encoder_output: str):
    """Eq. 15: KL_elem[b, j] = -1/2 (1 + log sigma^2 - sigma^2 - mu^2), s = log sigma^2 or log sigma. (B, n)

    "literal" (interpretation (r)): Eq. 15 as printed, -1/2 (1 + s - e^s - mu^2) on s = log sigma
    (Eq. 3): the formula of "logvar", while l. 11 samples with sigma = e^s as "logstd" does.
    """
    log_var = 2.0 * s if encoder_output == "logstd" else s
    return -0.5 * (1.0 + log_var - array_module(log_var).exp(log_var) - mu * mu)


@dataclass
class TrainState:
    """Everything Algorithm 1 carries from one step to the next."""

    model: GatedVAE
    hyper: Hyper
    lam: object  # raw lambda, a 0-d backend array (optimised by Adam)
    lam_grad: object
    optimizer: Adam
    hit: bool = False  # l. 1
    c_ma: float | None = None  # l. 16 sets it on the first step
    step: int = 0
    last_constraint_met: bool = False  # for hit="per_step"
    passes: DecoderPasses | None = None  # how l. 12-13 execute (refimpl/threads.py); not part of the run

    def parameters(self) -> dict:
        return {**self.model.parameters(), "lambda": self.lam}

    def gradients(self) -> dict:
        return {**self.model.gradients(), "lambda": self.lam_grad}


def init_state(model: GatedVAE, hyper: Hyper) -> TrainState:
    """Section 4 initialisation: gamma = gamma_init everywhere, lambda per (d), Adam on every parameter.

    How the step executes (Adam's twin, the decoder passes' threads) follows the model's resolved
    setting, ``model.paths`` (refimpl/execution.py).
    """
    if not model.gated:
        raise ValueError("Algorithm 1 needs a gated model (GatedVAE(..., gated=True))")
    xp, dtype = model.xp, model.dtype
    model.params["gamma"][...] = hyper.gamma_init
    lam = xp.asarray(initial_lambda_raw(hyper), dtype=dtype)
    lam_grad = xp.zeros((), dtype=dtype)
    params = {**model.parameters(), "lambda": lam}
    maximize = ("lambda",) if hyper.lambda_update == "ascent" else ()
    optimizer = Adam(params, lr=hyper.lr, betas=hyper.betas, eps=hyper.adam_eps, maximize=maximize,
                     lrs={"lambda": hyper.lambda_rate}, cuda_kernels=model.paths.cuda_kernels)  # (q)
    passes = DecoderPasses(model, resolve(model.paths, model))
    return TrainState(model, hyper, lam, lam_grad, optimizer, passes=passes)


def in_dtype(value, dtype):
    """A float64 scalar as a factor of a ``dtype`` array: a float as it is (NumPy rounds it to dtype when it
    multiplies), a 0-d float64 array rounded to dtype the same way (on the device, no host read)."""
    return value if is_host_scalar(value) else value.astype(dtype)


def sample_gates(rng, samples: int, gamma, hyper: Hyper):
    """l. 4-6: u (S, n) from rng, u1 too with ``estimator="reinforce_loo"`` (o), else None; then nu1, nu2.
    -> u, u1, nu1, nu2"""
    xp, dtype, shape = array_module(gamma), gamma.dtype, (samples, gamma.shape[0])
    u = uniform(rng, shape, xp, dtype)  # l. 4
    # (o): a second, independent gate sample for the E1 pass
    u1 = uniform(rng, shape, xp, dtype) if hyper.estimator == "reinforce_loo" else None
    # l. 5-6 (Eq. 12's 1[u < sigma(k gamma)] and its antithetic twin)
    return (u, u1, *gate_masks(u, gamma, hyper.k, u1))


def reparameterise(model: GatedVAE, x, rng, encoder_output: str):
    """l. 11: z = mu + sigma * eps (Eq. 6), eps (B, n) from rng; sigma per (e), (r).
    -> mu, s, sigma, eps, z, each (B, n)"""
    xp, n = model.xp, model.n_latent
    encoded = model.encoder.forward(x)
    mu, s = encoded[:, :n], encoded[:, n:]
    eps = standard_normal(rng, (x.shape[0], n), xp, model.dtype)
    sigma = xp.exp(0.5 * s) if encoder_output == "logvar" else xp.exp(s)
    return mu, s, sigma, eps, mu + sigma * eps


def decoder_passes(state: TrainState, x, z, nu1, nu2, run_e1: bool):
    """l. 12-13: the decoder on z * nu1 (E1) and z * nu2 (E2), and the per-image errors. -> x1, x2, e1, e2

    l. 12 is never differentiated, so it caches nothing (:func:`decoder_e1_pass`); l. 13 is cached for
    backpropagation. state.passes runs them in this order, or side by side in two threads with the same
    numbers (refimpl/threads.py). Without ``run_e1`` only l. 13 runs and E1 is E2 (nu1 = nu2)."""
    model, hyper = state.model, state.hyper
    if not run_e1:
        x2 = model.decoder.forward(z * nu2)  # l. 13
        e2 = per_image_error(x2, x, hyper.error)
        return x2, x2, e2, e2
    x1, x2 = state.passes(z * nu1, z * nu2, hyper.e1_batchnorm, decoder_e1_pass)  # l. 12, 13
    return x1, x2, per_image_error(x1, x, hyper.error), per_image_error(x2, x, hyper.error)


def backpropagate(model: GatedVAE, x, x2, e2, lam_eff, nu2, open_count, mu, sigma, eps, hyper: Hyper) -> None:
    """l. 27 from L back to the decoder's and encoder's parameters (into ``model.grads``; gamma's gets
    nothing here). lam_eff: lambda', a float or a 0-d float64 array; open_count: (S, 1) from :func:`gated_kl`."""
    batch = x.shape[0]
    # dL/dx2 = lambda' dE2/dx2
    dx2 = in_dtype(lam_eff / batch, model.dtype) * per_image_error_grad(x2, x, e2, hyper.error)
    dz = model.decoder.backward(dx2) * nu2  # dL/dz: the decoder saw z * nu2
    dkl = nu2 / (open_count * batch)  # dL/dKL_elem
    model.encoder.backward(encoder_output_gradient(dz, dkl, mu, sigma, eps, hyper.encoder_output))


def l0_gradient(gamma, weight, k: float):
    """d/dgamma of l. 24's term: weight * k sigmoid(k gamma)(1 - sigmoid(k gamma)), Eq. 13's last term, times
    l. 23's weight (1 unless (p)); weight: a float or a 0-d float64 array. gamma: (n,) -> (n,)"""
    gate_prob = sigmoid(k * gamma)
    return in_dtype(weight, gamma.dtype) * (k * gate_prob * (1 - gate_prob))


def gate_estimator_gradient(u, nu1, nu2, gamma, lam_eff, e1, e2, kl, kl_per_image2, hyper: Hyper):
    """l. 29: Eq. 13's first term, times lambda' (in F) and k, or DisARM / REINFORCE-LOO per (o). -> (n,)"""
    f1, f2 = estimator_objectives(in_dtype(lam_eff, e1.dtype), e1, e2, kl, nu1, kl_per_image2, hyper)
    return estimator_term(hyper.estimator, u, nu1, nu2, gamma, f1, f2, hyper.k)


def train_step(state: TrainState, x, rng, record: dict | None = None) -> dict:
    """One pass of Algorithm 1's loop body on images x: (B, C, H, W) in [0, 1].

    rng: numpy.random.Generator for u and eps. record: if a dict, receives host copies
    of every input, intermediate and gradient of the step (golden traces).
    Returns the logged scalars of Figure 1 and a few more.
    """
    model, hyper = state.model, state.hyper
    xp, dtype, n = model.xp, model.dtype, model.n_latent
    model.check_images(x)
    batch = x.shape[0]
    gamma = model.params["gamma"]
    model.zero_grad()
    samples = 1 if hyper.gate_samples == "batch" else batch
    sampling = state.hit if hyper.hit == "sticky" else state.last_constraint_met

    # l. 3-10: gate masks, (S, n) with S = 1 (one u per batch) or B
    if sampling:  # l. 3
        u, u1, nu1, nu2 = sample_gates(rng, samples, gamma, hyper)  # l. 4-6
    else:
        u = u1 = None
        nu1 = xp.ones((samples, n), dtype=dtype)  # l. 8
        nu2 = xp.ones((samples, n), dtype=dtype)  # l. 9

    mu, s, sigma, eps, z = reparameterise(model, x, rng, hyper.encoder_output)  # l. 11
    # l. 12-13. Without sampling nu1 = nu2, so E1 = E2 exactly and l. 12 is skipped (unless it must
    # update BatchNorm's statistics).
    x1, x2, e1, e2 = decoder_passes(state, x, z, nu1, nu2, sampling or hyper.e1_batchnorm == "batch_update")
    E1, E2 = float(e1.mean()), float(e2.mean())

    # l. 22: L = lambda' C' + (1/||nu2||_0) ||KL_elem * nu2||_1, batch mean (Eq. 14's Lagrangian,
    # with Eq. 8's lambda E[C] and the L0 term of Eq. 11 added at l. 24)
    kl = kl_elementwise(mu, s, hyper.encoder_output)  # (B, n), Eq. 15
    kl_per_image, open_count = gated_kl(kl, nu2, hyper.kl_normalizer)  # (B,), (S, 1)
    kl_term = float(kl_per_image.mean())
    hit_fraction = float((e2 <= hyper.tau).mean())  # the fraction of images with C_b = e_b - tau <= 0
    g = geco(E2, state.c_ma, float(state.lam), hit_fraction, hyper)  # l. 14-21, 23 (float64 on the host)
    gates_l1 = float(sigmoid(hyper.k * gamma).sum())  # Eq. 12's L0 term sum_j sigma(k gamma_j)
    loss = lagrangian(g, kl_term, gates_l1)  # l. 22, 24
    if g.l0_added:  # l. 23
        state.hit = True  # l. 25

    # l. 27: backpropagation
    backpropagate(model, x, x2, e2, g.lam_eff, nu2, open_count, mu, sigma, eps, hyper)
    dgamma = model.grads["gamma"]
    if g.l0_added:
        dgamma += l0_gradient(gamma, g.l0_weight, hyper.k)  # l. 24's term
    state.lam_grad[...] = g.lam_grad  # dL/dlambda through l. 21-22

    # l. 28-30: the ARM term (or the estimator of (o)). On the step where hit first becomes true
    # no u was drawn (l. 3 was false), nu1 = nu2 and E1 - E2 = 0, so the term is zero and skipped.
    arm = None
    if sampling:
        arm = gate_estimator_gradient(u, nu1, nu2, gamma, g.lam_eff, e1, e2, kl, kl_per_image, hyper)  # l. 29
        dgamma += arm

    # l. 31. (n): gamma is part of L only through the L0 term (l. 24) and the ARM term (l. 29); on a
    # step with neither it has no gradient, and with adam_steps="per_parameter" Adam leaves it alone.
    gamma_has_gradient = g.l0_added or sampling
    skip = ("gamma",) if hyper.adam_steps == "per_parameter" and not gamma_has_gradient else ()
    update_parameters(state, skip)  # l. 31
    state.c_ma = g.c_ma
    state.last_constraint_met = bool(g.l0_added)
    state.step += 1

    hard_gates = model.inference_gates()
    log = {
        "step": state.step, "E1": E1, "E2": E2, "C": g.c, "C_ma": g.c_ma, "lambda_eff": g.lam_eff,
        "lambda_raw": float(state.lam), "loss": loss, "kl": kl_term, "gates_l1": gates_l1,
        "open_gates": int(hard_gates.sum()), "hit_fraction": hit_fraction,
        "hit": state.hit, "l0_added": bool(g.l0_added),
    }
    if record is not None:
        tensors = {"x": x, "u": u, "u1": u1, "nu1": nu1, "nu2": nu2, "eps": eps, "mu": mu, "s": s, "z": z, "x1": x1, "x2": x2,
                   "e1": e1, "e2": e2, "kl_elem": kl, "arm": arm}
        record.update({k: (None if v is None else to_host(v).copy()) for k, v in tensors.items()})
        record["grads"] = {k: to_host(v).copy() for k, v in state.gradients().items()}
        record["scalars"] = dict(log)
    return log


def update_parameters(state: TrainState, skip=()) -> None:
    """l. 31: Adam on every parameter but those in ``skip`` (interpretation (n)), lambda at its own rate
    (``Hyper.lambda_rate``, (q)); with ``lambda_optimizer="sgd"`` lambda moves by plain gradient ascent
    instead (descent under (b)'s "descent"), lambda += lambda_rate dL/dlambda, and Adam leaves its
    moments and count as they are. No host read: :class:`refimpl.device_step.DeviceStep` uses it too."""
    hyper = state.hyper
    if hyper.lambda_optimizer == "sgd":
        rate = hyper.lambda_rate if hyper.lambda_update == "ascent" else -hyper.lambda_rate
        state.lam[...] = state.lam + rate * state.lam_grad
        skip = (*skip, "lambda")
    state.optimizer.step(state.gradients(), skip=skip)


def decoder_e1_pass(model: GatedVAE, z_gated, mode: str):
    """The l. 12 decoder pass under interpretation (h); restores the model's modes afterwards."""
    if mode == "running":
        model.decoder.eval()
        try:
            return model.decoder.forward(z_gated, cache=False)
        finally:
            model.decoder.train()
    model.set_batchnorm_update(mode == "batch_update")
    try:
        return model.decoder.forward(z_gated, cache=False)
    finally:
        model.set_batchnorm_update(True)
