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
C_ma, lambda') are computed on the host in float64.

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
from dataclasses import asdict, dataclass, fields

import numpy

from .adam import Adam
from .backend import array_module, to_host
from .layers.activations import sigmoid
from .model import GatedVAE
from .optionspec import OptionError, float_pair, option
from .rng import standard_normal, uniform
from .threads import DecoderPasses, Execution, resolve


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


def softplus(v: float) -> float:
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def logistic(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def initial_lambda_raw(hyper: Hyper) -> float:
    """The raw parameter lambda at step 0 (interpretation (d))."""
    if hyper.lambda_init_on == "raw":
        return hyper.lambda_init
    return math.log(math.expm1(math.sqrt(hyper.lambda_init)))  # softplus(lambda)^2 = lambda_init


def effective_lambda(lam: float, hyper: Hyper) -> float:
    """l. 21: lambda' = max(min(softplus(lambda)^2, lambda_max), lambda_min)."""
    return min(max(softplus(lam) ** 2, hyper.lambda_min), hyper.lambda_max)


def lambda_gradient(lam: float, c_prime: float, hyper: Hyper) -> float:
    """dL/dlambda = C' * d lambda'/d lambda, through the clamp of l. 21 (interpretation (c))."""
    raw = softplus(lam) ** 2
    grad = c_prime * 2.0 * softplus(lam) * logistic(lam)
    return grad if clamp_keeps_gradient(numpy.float64(raw), numpy.float64(grad), hyper) else 0.0


def clamp_keeps_gradient(raw, grad, hyper: Hyper):
    """Interpretation (c): whether dL/dlambda survives l. 21's clamp, given raw = softplus(lambda)^2.

    Inside [lambda_min, lambda_max] always. Outside: never with ``lambda_clamp_grad="zero"``;
    with "outward" (Sonnet's GECO) unless the step would push lambda' further out. raw, grad:
    NumPy float64 scalars or 0-d arrays of any backend; returns a bool of the same kind.
    """
    inside = (hyper.lambda_min <= raw) & (raw <= hyper.lambda_max)
    if hyper.lambda_clamp_grad == "zero":
        return inside
    moves_up = grad > 0 if hyper.lambda_update == "ascent" else grad < 0
    pushes_out = ((raw > hyper.lambda_max) & moves_up) | ((raw < hyper.lambda_min) & ~moves_up)
    return inside | ~pushes_out


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


def init_state(model: GatedVAE, hyper: Hyper, execution: Execution | None = None) -> TrainState:
    """Section 4 initialisation: gamma = gamma_init everywhere, lambda per (d), Adam on every parameter.

    execution: how the step runs on this machine (refimpl/threads.py; default ``Execution()``).
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
                     lrs={"lambda": hyper.lambda_rate})  # (q)
    passes = DecoderPasses(model, resolve(execution or Execution(), model))
    return TrainState(model, hyper, lam, lam_grad, optimizer, passes=passes)


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
    u1 = None
    if sampling:  # l. 3
        u = uniform(rng, (samples, n), xp, dtype)  # l. 4
        if hyper.estimator == "reinforce_loo":  # (o): a second, independent gate sample for the E1 pass
            u1 = uniform(rng, (samples, n), xp, dtype)
        nu1, nu2 = gate_masks(u, gamma, hyper.k, u1)  # l. 5-6 (Eq. 12's 1[u < sigma(k gamma)] and its antithetic twin)
    else:
        u = None
        nu1 = xp.ones((samples, n), dtype=dtype)  # l. 8
        nu2 = xp.ones((samples, n), dtype=dtype)  # l. 9

    # l. 11: z = mu + sigma * eps (Eq. 6)
    encoded = model.encoder.forward(x)
    mu, s = encoded[:, :n], encoded[:, n:]
    eps = standard_normal(rng, (batch, n), xp, dtype)
    sigma = xp.exp(0.5 * s) if hyper.encoder_output == "logvar" else xp.exp(s)
    z = mu + sigma * eps

    # l. 12: E1 with nu1; never differentiated, so no caches. Without sampling nu1 = nu2, so
    # E1 = E2 exactly and the pass is skipped (unless it must update BatchNorm's statistics).
    # l. 13: E2 with nu2, cached for backpropagation. state.passes runs l. 12 and l. 13 in this
    # order, or side by side in two threads with the same numbers (refimpl/threads.py).
    run_e1 = sampling or hyper.e1_batchnorm == "batch_update"
    if run_e1:
        x1, x2 = state.passes(z * nu1, z * nu2, hyper.e1_batchnorm, _decoder_e1_pass)
        e1 = per_image_error(x1, x, hyper.error)
    else:
        x2 = model.decoder.forward(z * nu2)
    e2 = per_image_error(x2, x, hyper.error)
    if not run_e1:
        x1, e1 = x2, e2
    E1, E2 = float(e1.mean()), float(e2.mean())

    c = E2 - hyper.tau  # l. 14: the constraint of Eq. 9 (C <= 0: E2 within tolerance)
    if state.c_ma is None:  # l. 15: i == 0
        c_ma = c  # l. 16
    else:  # l. 17
        c_ma = hyper.alpha * state.c_ma + (1 - hyper.alpha) * c  # l. 18
    # l. 19 (end); l. 20: C' = C + StopGradient(C_ma - C) has the value C_ma and dC'/dC = 1
    c_prime = c_ma
    lam = float(state.lam)
    lam_eff = effective_lambda(lam, hyper)  # l. 21

    # l. 22: L = lambda' C' + (1/||nu2||_0) ||KL_elem * nu2||_1, batch mean (Eq. 14's Lagrangian,
    # with Eq. 8's lambda E[C] and the L0 term of Eq. 11 added at l. 24)
    kl = kl_elementwise(mu, s, hyper.encoder_output)  # (B, n), Eq. 15
    kl_per_image, open_count = gated_kl(kl, nu2, hyper.kl_normalizer)  # (B,), (S, 1)
    kl_term = float(kl_per_image.mean())
    loss = lam_eff * c_prime + kl_term
    hit_fraction = float((e2 <= hyper.tau).mean())  # the fraction of images with C_b = e_b - tau <= 0
    l0_weight = l0_term_weight(c, hit_fraction, hyper)  # l. 23: 1 if C <= 0 else 0, or per image (p)
    l0_added = l0_weight > 0
    gates_l1 = float(sigmoid(hyper.k * gamma).sum())  # Eq. 12's L0 term sum_j sigma(k gamma_j)
    if l0_added:
        loss += l0_weight * gates_l1  # l. 24
        state.hit = True  # l. 25

    # l. 27: backpropagation
    dx2 = (lam_eff / batch) * per_image_error_grad(x2, x, e2, hyper.error)  # dL/dx2 = lambda' dE2/dx2
    dz = model.decoder.backward(dx2) * nu2  # dL/dz: the decoder saw z * nu2
    dkl = nu2 / (open_count * batch)  # dL/dKL_elem
    model.encoder.backward(encoder_output_gradient(dz, dkl, mu, sigma, eps, hyper.encoder_output))
    dgamma = model.grads["gamma"]
    if l0_added:
        gate_prob = sigmoid(hyper.k * gamma)
        # d/dgamma sum_j sigmoid(k gamma_j), Eq. 13's last term, times l. 23's weight (1 unless (p))
        dgamma += l0_weight * (hyper.k * gate_prob * (1 - gate_prob))
    state.lam_grad[...] = lambda_gradient(lam, c_prime, hyper)  # dL/dlambda through l. 21-22

    # l. 28-30: the ARM term (or the estimator of (o)). On the step where hit first becomes true
    # no u was drawn (l. 3 was false), nu1 = nu2 and E1 - E2 = 0, so the term is zero and skipped.
    arm = None
    if sampling:
        f1, f2 = estimator_objectives(lam_eff, e1, e2, kl, nu1, kl_per_image, hyper)
        # l. 29: Eq. 13's first term, times lambda' (in f) and k, or DisARM / REINFORCE-LOO per (o). (n,)
        arm = estimator_term(hyper.estimator, u, nu1, nu2, gamma, f1, f2, hyper.k)
        dgamma += arm

    # l. 31. (n): gamma is part of L only through the L0 term (l. 24) and the ARM term (l. 29); on a
    # step with neither it has no gradient, and with adam_steps="per_parameter" Adam leaves it alone.
    gamma_has_gradient = l0_added or sampling
    skip = ("gamma",) if hyper.adam_steps == "per_parameter" and not gamma_has_gradient else ()
    update_parameters(state, skip)  # l. 31
    state.c_ma = c_ma
    state.last_constraint_met = bool(l0_added)
    state.step += 1

    hard_gates = model.inference_gates()
    log = {
        "step": state.step, "E1": E1, "E2": E2, "C": c, "C_ma": c_ma, "lambda_eff": lam_eff,
        "lambda_raw": float(state.lam), "loss": loss, "kl": kl_term, "gates_l1": gates_l1,
        "open_gates": int(hard_gates.sum()), "hit_fraction": hit_fraction,
        "hit": state.hit, "l0_added": bool(l0_added),
    }
    if record is not None:
        tensors = {"x": x, "u": u, "u1": u1, "nu1": nu1, "nu2": nu2, "eps": eps, "mu": mu, "s": s, "z": z, "x1": x1, "x2": x2,
                   "e1": e1, "e2": e2, "kl_elem": kl, "arm": arm}
        record.update({k: (None if v is None else to_host(v).copy()) for k, v in tensors.items()})
        record["grads"] = {k: to_host(v).copy() for k, v in state.gradients().items()}
        record["scalars"] = dict(log)
    return log


def l0_term_weight(c: float, hit_fraction: float, hyper: Hyper) -> float:
    """l. 23 as the weight of l. 24's L0 term (interpretation (p)): 1.0 if C <= 0 else 0.0 (``constraint="batch"``),
    or with ``"per_image"`` the fraction of the batch's images with C_b = e_b - tau <= 0 (``hit_fraction``)."""
    if hyper.constraint == "per_image":
        return hit_fraction
    return 1.0 if c <= 0 else 0.0


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


def _decoder_e1_pass(model: GatedVAE, z_gated, mode: str):
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
