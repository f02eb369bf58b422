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
Adam updates theta, phi, gamma and lambda (l. 31). GECO's scalars (C, C_ma, lambda')
are computed on the host in float64.

Random draws, in this order per step, from the one generator passed in: u (S, n)
when gates are sampled (l. 4), then eps (B, n) for the reparameterisation (l. 11).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .adam import Adam
from .backend import array_module, to_host
from .layers.activations import sigmoid
from .model import GatedVAE
from .rng import standard_normal, uniform

OPTIONS = {
    "error": ("sse", "l2"),  # (a)
    "lambda_update": ("ascent", "descent"),  # (b)
    "lambda_clamp_grad": ("outward", "zero"),  # (c)
    "lambda_init_on": ("raw", "effective"),  # (d)
    "encoder_output": ("logvar", "logstd"),  # (e)
    "kl_normalizer": ("open", "all"),  # (f)
    "hit": ("sticky", "per_step"),  # (g)
    "e1_batchnorm": ("batch", "batch_update", "running"),  # (h)
    "gate_samples": ("batch", "per_example"),  # (i)
    "arm_objective": ("error", "loss"),  # (k)
}


@dataclass(frozen=True)
class Hyper:
    """Algorithm 1's parameters (Section 4 defaults) and the interpretation switches.

    Interpretations (defaults first; see INTERPRETATIONS.md for the reasons):
    (a) error: "sse" squared error summed over pixels per image | "l2" the L2 norm of l. 12-13
    (b) lambda_update: "ascent" maximise L over lambda (Sec. 2.1 min-max) | "descent" as l. 31 reads
    (c) lambda_clamp_grad: "outward" clamp in the forward pass, zero only gradients that push
        lambda' further out of [lambda_min, lambda_max] (Sonnet's GECO) | "zero" plain clamp
    (d) lambda_init_on: "raw" lambda = lambda_init | "effective" lambda' = lambda_init
    (e) encoder_output: "logvar" s = log sigma^2 (Eq. 15) | "logstd" s = log sigma (Eq. 3)
    (f) kl_normalizer: "open" divide by ||nu2||_0 (l. 22; 0 when every gate is closed, as the
        numerator is then 0 too) | "all" divide by n
    (g) hit: "sticky" never resets (l. 25) | "per_step" hit = (C <= 0) of the previous step
    (h) e1_batchnorm: the l. 12 decoder pass uses its own batch statistics and leaves the running
        statistics alone | "batch_update" also updates them (twice per step) | "running" eval mode
        (the L0-ARM authors' code)
    (i) gate_samples: "batch" one u per batch | "per_example" one u per image
    (k) arm_objective: "error" F = lambda' E as l. 29 | "loss" F = lambda' E + the KL term
    """

    tau: float
    alpha: float = 0.99
    k: float = 7.0
    lambda_min: float = 1e-5
    lambda_max: float = 5.0
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    gamma_init: float = 0.42
    lambda_init: float = 1.0
    error: str = "sse"
    lambda_update: str = "ascent"
    lambda_clamp_grad: str = "outward"
    lambda_init_on: str = "raw"
    encoder_output: str = "logvar"
    kl_normalizer: str = "open"
    hit: str = "sticky"
    e1_batchnorm: str = "batch"
    gate_samples: str = "batch"
    arm_objective: str = "error"

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
        for name, ok, expected in checks:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise ValueError(f"{name}={value!r}: expected a finite number {expected}")
        for name, choices in OPTIONS.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(choices)}")

    def as_dict(self) -> dict:
        return asdict(self)


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
    if hyper.lambda_min <= raw <= hyper.lambda_max:
        return grad
    if hyper.lambda_clamp_grad == "zero":
        return 0.0
    moves_up = grad > 0 if hyper.lambda_update == "ascent" else grad < 0
    pushes_out = (raw > hyper.lambda_max and moves_up) or (raw < hyper.lambda_min and not moves_up)
    return 0.0 if pushes_out else grad


def gate_masks(u, gamma, k: float):
    """l. 5-6: nu1 = 1[u > sigmoid(-k gamma)], nu2 = 1[u < sigmoid(k gamma)]. u: (S, n), gamma: (n,) -> two (S, n)."""
    return (u > sigmoid(-k * gamma)).astype(u.dtype), (u < sigmoid(k * gamma)).astype(u.dtype)


def arm_term(u, f1, f2, k: float):
    """l. 29 without lambda' (carried in f): k * mean_b[(F(nu1)_b - F(nu2)_b) (u_b - 1/2)].

    u: (S, n) with S = 1 or B; f1, f2: (B,) per-image objectives under nu1 and nu2 -> (n,).
    With S = 1 this is k (mean F1 - mean F2)(u - 1/2), Eq. 13 on batch means.
    """
    return k * ((f1 - f2)[:, None] * (u - 0.5)).mean(axis=0)


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
    """Eq. 15: KL_elem[b, j] = -1/2 (1 + log sigma^2 - sigma^2 - mu^2), s = log sigma^2 or log sigma. (B, n)"""
    log_var = s if encoder_output == "logvar" else 2.0 * s
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

    def parameters(self) -> dict:
        return {**self.model.parameters(), "lambda": self.lam}

    def gradients(self) -> dict:
        return {**self.model.gradients(), "lambda": self.lam_grad}


def init_state(model: GatedVAE, hyper: Hyper) -> TrainState:
    """Section 4 initialisation: gamma = gamma_init everywhere, lambda per (d), Adam on every parameter."""
    if not model.gated:
        raise ValueError("Algorithm 1 needs a gated model (GatedVAE(..., gated=True))")
    xp, dtype = model.xp, model.dtype
    model.params["gamma"][...] = hyper.gamma_init
    lam = xp.asarray(initial_lambda_raw(hyper), dtype=dtype)
    lam_grad = xp.zeros((), dtype=dtype)
    params = {**model.parameters(), "lambda": lam}
    maximize = ("lambda",) if hyper.lambda_update == "ascent" else ()
    optimizer = Adam(params, lr=hyper.lr, betas=hyper.betas, eps=hyper.adam_eps, maximize=maximize)
    return TrainState(model, hyper, lam, lam_grad, optimizer)


def train_step(state: TrainState, x, rng, record: dict | None = None) -> dict:
    """One pass of Algorithm 1's loop body on images x: (B, C, H, W) in [0, 1].

    rng: numpy.random.Generator for u and eps. record: if a dict, receives host copies
    of every input, intermediate and gradient of the step (golden traces).
    Returns the logged scalars of Figure 1 and a few more.
    """
    model, h = state.model, state.hyper
    xp, dtype, n = model.xp, model.dtype, model.n_latent
    model.check_images(x)
    batch = x.shape[0]
    gamma = model.params["gamma"]
    model.zero_grad()
    samples = 1 if h.gate_samples == "batch" else batch
    sampling = state.hit if h.hit == "sticky" else state.last_constraint_met

    # l. 3-10: gate masks, (S, n) with S = 1 (one u per batch) or B
    if sampling:  # l. 3
        u = uniform(rng, (samples, n), xp, dtype)  # l. 4
        nu1, nu2 = gate_masks(u, gamma, h.k)  # l. 5-6
    else:
        u = None
        nu1 = xp.ones((samples, n), dtype=dtype)  # l. 8
        nu2 = xp.ones((samples, n), dtype=dtype)  # l. 9

    # l. 11: z = mu + sigma * eps (Eq. 6)
    encoded = model.encoder.forward(x)
    mu, s = encoded[:, :n], encoded[:, n:]
    eps = standard_normal(rng, (batch, n), xp, dtype)
    sigma = xp.exp(0.5 * s) if h.encoder_output == "logvar" else xp.exp(s)
    z = mu + sigma * eps

    # l. 12: E1 with nu1; never differentiated, so no caches. Without sampling nu1 = nu2, so
    # E1 = E2 exactly and the pass is skipped (unless it must update BatchNorm's statistics).
    run_e1 = sampling or h.e1_batchnorm == "batch_update"
    if run_e1:
        x1 = _decoder_e1_pass(model, z * nu1, h.e1_batchnorm)
        e1 = per_image_error(x1, x, h.error)
    # l. 13: E2 with nu2, cached for backpropagation
    x2 = model.decoder.forward(z * nu2)
    e2 = per_image_error(x2, x, h.error)
    if not run_e1:
        x1, e1 = x2, e2
    E1, E2 = float(e1.mean()), float(e2.mean())

    c = E2 - h.tau  # l. 14
    c_ma = c if state.c_ma is None else h.alpha * state.c_ma + (1 - h.alpha) * c  # l. 15-19
    c_prime = c_ma  # l. 20: C' = C + StopGradient(C_ma - C) has the value C_ma and dC'/dC = 1
    lam = float(state.lam)
    lam_eff = effective_lambda(lam, h)  # l. 21

    # l. 22: L = lambda' C' + (1/||nu2||_0) ||KL_elem * nu2||_1, batch mean
    kl = kl_elementwise(mu, s, h.encoder_output)  # (B, n), Eq. 15
    norm = nu2.sum(axis=1, keepdims=True) if h.kl_normalizer == "open" else xp.full((samples, 1), n, dtype=dtype)
    norm = xp.maximum(norm, 1)  # (f): all gates closed -> numerator 0, term 0
    kl_per_image = (kl * nu2 / norm).sum(axis=1)  # (B,)
    kl_term = float(kl_per_image.mean())
    loss = lam_eff * c_prime + kl_term
    l0_added = c <= 0  # l. 23
    gates_l1 = float(sigmoid(h.k * gamma).sum())
    if l0_added:
        loss += gates_l1  # l. 24
        state.hit = True  # l. 25

    # l. 27: backpropagation
    dx2 = (lam_eff / batch) * per_image_error_grad(x2, x, e2, h.error)  # dL/dx2 = lambda' dE2/dx2
    dz = model.decoder.backward(dx2) * nu2
    dkl = nu2 / (norm * batch)  # dL/dKL_elem
    dmu = dz + dkl * mu
    if h.encoder_output == "logvar":
        ds = dz * eps * 0.5 * sigma + dkl * 0.5 * (sigma * sigma - 1.0)
    else:
        ds = dz * eps * sigma + dkl * (sigma * sigma - 1.0)
    model.encoder.backward(xp.concatenate([dmu, ds], axis=1))
    dgamma = model.grads["gamma"]
    if l0_added:
        sg = sigmoid(h.k * gamma)
        dgamma += h.k * sg * (1 - sg)  # d/dgamma sum_j sigmoid(k gamma_j)
    state.lam_grad[...] = lambda_gradient(lam, c_prime, h)

    # l. 28-30: the ARM term. On the step where hit first becomes true no u was drawn
    # (l. 3 was false), nu1 = nu2 and E1 - E2 = 0, so the term is zero and skipped.
    arm = None
    if sampling:
        f1, f2 = lam_eff * e1, lam_eff * e2
        if h.arm_objective == "loss":
            norm1 = xp.maximum(nu1.sum(axis=1, keepdims=True), 1) if h.kl_normalizer == "open" else norm
            f1 = f1 + (kl * nu1 / norm1).sum(axis=1)
            f2 = f2 + kl_per_image
        arm = arm_term(u, f1, f2, h.k)  # l. 29, (n,)
        dgamma += arm

    state.optimizer.step(state.gradients())  # l. 31
    state.c_ma = c_ma
    state.last_constraint_met = bool(c <= 0)
    state.step += 1

    hard_gates = model.inference_gates()
    log = {
        "step": state.step, "E1": E1, "E2": E2, "C": c, "C_ma": c_ma, "lambda_eff": lam_eff,
        "lambda_raw": float(state.lam), "loss": loss, "kl": kl_term, "gates_l1": gates_l1,
        "open_gates": int(hard_gates.sum()), "hit_fraction": float((e2 <= h.tau).mean()),
        "hit": state.hit, "l0_added": bool(l0_added),
    }
    if record is not None:
        tensors = {"x": x, "u": u, "nu1": nu1, "nu2": nu2, "eps": eps, "mu": mu, "s": s, "z": z, "x1": x1, "x2": x2,
                   "e1": e1, "e2": e2, "kl_elem": kl, "arm": arm}
        record.update({k: (None if v is None else to_host(v).copy()) for k, v in tensors.items()})
        record["grads"] = {k: to_host(v).copy() for k, v in state.gradients().items()}
        record["scalars"] = dict(log)
    return log


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
