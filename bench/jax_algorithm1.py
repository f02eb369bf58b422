"""The paper's gated VAE and Algorithm 1 in JAX (jax.grad, jax.lax, optax).

A second independent transcription of De Boom et al., "Dynamic Narrowing of VAE
Bottlenecks Using GECO and L0 Regularization" (Sections 2-4, Algorithm 1), next to
``bench/torch_algorithm1.py``: the same architecture, parameter names and
interpretation switches as refimpl (``refimpl/model.py``, ``refimpl/algorithm1.py``,
``refimpl/INTERPRETATIONS.md``). Here the model is a set of pure functions of flat
dicts of arrays named as refimpl's state dict (``encoder.conv1.weight``, ...,
``gamma``, plus ``lambda``), one step of Algorithm 1 is a pure function

    step(params, buffers, opt_state, geco, x, u, eps) -> (params, buffers, opt_state, geco, record)

(jit-compiled by default), gradients come from ``jax.grad``, StopGradient is
``jax.lax.stop_gradient``, the clamp of l. 21 is a ``jax.custom_vjp`` (interpretation
(c)), the ARM term is added to gamma's gradient after ``jax.grad``, and ``optax.adam``
takes the step, with lambda's gradient negated under ``lambda_update="ascent"`` so that
Adam maximises L over it. optax's update (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
is refimpl's and torch's (``refimpl/adam.py``) up to rounding. l. 3 is the caller's:
``u`` is None on steps that sample no gates (:func:`samples_gates` reads the GECO
state). Importing this module turns on ``jax_enable_x64`` for the process, so
everything runs in float64 unless the inputs are float32. refimpl is imported only to
read and write trace files.

Agreement with refimpl in float64 (``tests/test_jax_crosscheck.py``): every
intermediate, gradient (the ARM term too), parameter and BatchNorm statistic to ~1e-13
relative on the test models, under every interpretation switch. On Section 4's 64x64
model parameters can differ more where a gradient is ~0 (Adam amplifies rounding noise
by up to lr / eps, see README "Tolerances"): ``refimpl compare --param-rtol 1e-5``.

Layouts: NCHW activations and OIHW kernels (``jax.lax.conv_general_dilated`` with
``dimension_numbers=("NCHW", "OIHW", "NCHW")``), linear weights (out, in), so the
parameters of a refimpl trace load without glue. BatchNorm follows refimpl's
convention (``refimpl/layers/batchnorm.py``): training mode normalises with the
biased batch variance, running = momentum * running + (1 - momentum) * batch with
Keras's momentum 0.8, eps 1e-3, and the biased (default) or unbiased batch variance
in ``running_var``. Its running statistics are explicit state: the ``buffers`` dict in,
a new one out.

Use it on its own::

    import jax, jax_algorithm1 as ja
    arch = ja.paper_architecture(channels=1)            # Section 4's 64x64 network (refimpl's Architecture works too)
    hyper = {"tau": 30.0}                               # Section 4 defaults for the rest (ja.DEFAULTS)
    params, buffers = ja.init_model(arch, 10, jax.random.key(0), hyper)
    opt_state, geco = ja.init_state(params, hyper)
    step = ja.make_step(arch, hyper, n_latent=10)
    key = jax.random.key(1)
    for x in batches:                                   # x: (B, C, H, W) in [0, 1]
        key, sub = jax.random.split(key)
        u, eps = ja.draw(sub, geco, hyper, x.shape[0], 10)   # u is None unless gates are sampled (l. 3)
        params, buffers, opt_state, geco, log = step(params, buffers, opt_state, geco, x, u, eps)
        print(log["scalars"]["E2"], log["scalars"]["lambda_eff"])

Replay a golden trace (``refimpl trace``, see refimpl/trace.py) and compare::

    refimpl trace --image-size 16 --latent 4 --batch-size 8 --steps 3 --force-hit --out ref.npz
    .venv/bin/python bench/jax_algorithm1.py ref.npz --out jax.npz
    refimpl compare ref.npz jax.npz        # exit status 0: every tensor agrees

``--plant arm-sign`` (or ``--flip-arm-sign``, as in the torch script) negates the ARM
term of l. 29; ``--plant no-stop-gradient`` drops l. 20's StopGradient (so dC'/dC =
1 - alpha instead of 1 once C_ma has history). Both are bugs planted to see ``compare``
find them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import jax

jax.config.update("jax_enable_x64", True)  # before any array is made: float64 as refimpl's traces

import jax.numpy as jnp  # noqa: E402
import numpy  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

# Algorithm 1's parameters (Section 4) and refimpl's default interpretations (refimpl.algorithm1.Hyper).
DEFAULTS = {
    "alpha": 0.99, "k": 7.0, "lambda_min": 1e-5, "lambda_max": 5.0, "lr": 1e-3, "betas": (0.9, 0.999),
    "adam_eps": 1e-8, "gamma_init": 0.42, "lambda_init": 1.0,
    "error": "sse",  # (a) "sse" | "l2"
    "lambda_update": "ascent",  # (b) "ascent" | "descent"
    "lambda_clamp_grad": "outward",  # (c) "outward" | "zero"
    "lambda_init_on": "raw",  # (d) "raw" | "effective"
    "encoder_output": "logvar",  # (e) "logvar" | "logstd"
    "kl_normalizer": "open",  # (f) "open" | "all"
    "hit": "sticky",  # (g) "sticky" | "per_step"
    "e1_batchnorm": "batch",  # (h) "batch" | "batch_update" | "running"
    "gate_samples": "batch",  # (i) "batch" | "per_example"
    "arm_objective": "error",  # (k) "error" | "loss"
}
ARCH_DEFAULTS = {"hidden": 128, "leaky_slope": 0.02, "bn_momentum": 0.8, "bn_eps": 1e-3, "bn_running_var": "biased"}
# Planted bugs, for seeing `refimpl compare` find them: name -> what is wrong.
PLANTS = {
    "arm-sign": "l. 29: the ARM term is subtracted from gamma's gradient instead of added",
    "no-stop-gradient": "l. 20: C' = C_ma without StopGradient, so dC'/dC = 1 - alpha after the first step",
}


def as_config(obj, defaults=None) -> SimpleNamespace:
    """A namespace from a dict, a dataclass (refimpl's Architecture or Hyper) or a namespace."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    elif not isinstance(obj, dict):
        obj = vars(obj)
    return SimpleNamespace(**{**(defaults or {}), **obj})


# ----------------------------------------------------------------------------------------
# The model (Section 4): pure functions of flat dicts named as refimpl's state dict


def _conv_out(size: int, spec) -> int:
    return (size + 2 * spec.padding - spec.kernel) // spec.stride + 1


def _specs(arch):
    return [as_config(s) for s in arch.encoder_convs], [as_config(s) for s in arch.decoder_convs]


def feature_shape(arch) -> tuple:
    """(channels, height, width) after the encoder's last conv."""
    c, h, w = arch.image_shape
    for spec in _specs(arch)[0]:
        c, h, w = spec.channels, _conv_out(h, spec), _conv_out(w, spec)
    return c, h, w


def paper_architecture(channels: int = 1) -> dict:
    """Section 4's network for 64x64 images with ``channels`` colour channels (refimpl's widths and paddings)."""
    def conv(c, k, s, p):
        return {"channels": c, "kernel": k, "stride": s, "padding": p}

    return {"image_shape": (channels, 64, 64),
            "encoder_convs": [conv(32, 4, 2, 1), conv(32, 3, 2, 1), conv(64, 3, 2, 1), conv(64, 3, 2, 1)],
            "decoder_convs": [conv(64, 3, 1, 1), conv(32, 3, 1, 1), conv(32, 3, 1, 1), conv(channels, 3, 1, 1)],
            **ARCH_DEFAULTS}


def leaky_relu(x, slope):
    return jnp.where(x > 0, x, slope * x)


def linear(p, name, x):
    """y = x W^T + b, W: (out, in) as torch.nn.Linear."""
    return x @ p[name + ".weight"].T + p[name + ".bias"]


def conv2d(p, name, x, spec):
    """NCHW input, OIHW kernel, square stride and zero padding (torch.nn.Conv2d's layout)."""
    y = lax.conv_general_dilated(x, p[name + ".weight"], (spec.stride, spec.stride),
                                 [(spec.padding, spec.padding)] * 2, dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                 precision=lax.Precision.HIGHEST)
    return y + p[name + ".bias"][None, :, None, None]


def upsample2(x):
    """Nearest-neighbour x2: y[n, c, i, j] = x[n, c, i // 2, j // 2]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)


def batchnorm(p, buffers, name, x, arch, mode: str):
    """BatchNorm over the channel axis of x: (N, C, H, W), refimpl's conventions.

    mode "update": batch statistics, running statistics updated (returned); "batch":
    batch statistics, running ones left alone; "eval": running statistics.
    Returns (y, {name.running_mean: ..., name.running_var: ...}) with the new statistics.
    """
    rm, rv = buffers[name + ".running_mean"], buffers[name + ".running_var"]
    if mode == "eval":
        mean, var = rm[None, :, None, None], rv[None, :, None, None]
        new = {}
    else:
        mean = x.mean(axis=(0, 2, 3), keepdims=True)
        var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)  # biased, as refimpl and torch normalise
        new = {}
        if mode == "update":
            m = arch.bn_momentum  # Keras convention: the weight of the old running value
            count = x.size // x.shape[1]
            scale = 1.0 if arch.bn_running_var == "biased" else count / (count - 1)
            batch_mean, batch_var = lax.stop_gradient(mean.reshape(-1)), lax.stop_gradient(var.reshape(-1))
            new = {name + ".running_mean": m * rm + (1 - m) * batch_mean,
                   name + ".running_var": m * rv + (1 - m) * (batch_var * scale)}
    x_hat = (x - mean) / jnp.sqrt(var + arch.bn_eps)
    y = x_hat * p[name + ".weight"][None, :, None, None] + p[name + ".bias"][None, :, None, None]
    return y, new


def encoder(p, buffers, x, arch, mode="update"):
    """x: (N, C, H, W) -> (N, 2n), new buffers.

    [conv -> leaky ReLU -> BatchNorm] per conv, flatten, fc1, leaky ReLU, fc2.
    """
    new = {}
    for i, spec in enumerate(_specs(arch)[0], start=1):
        x = leaky_relu(conv2d(p, f"encoder.conv{i}", x, spec), arch.leaky_slope)
        x, stats = batchnorm(p, buffers, f"encoder.bn{i}", x, arch, mode)
        new.update(stats)
    x = x.reshape(x.shape[0], -1)
    x = leaky_relu(linear(p, "encoder.fc1", x), arch.leaky_slope)
    return linear(p, "encoder.fc2", x), new


def decoder(p, buffers, z, arch, mode="update"):
    """z: (N, n) -> x': (N, C, H, W), new buffers: fc1, fc2, reshape, [BatchNorm -> x2 upsample -> conv] blocks."""
    x = leaky_relu(linear(p, "decoder.fc1", z), arch.leaky_slope)
    x = leaky_relu(linear(p, "decoder.fc2", x), arch.leaky_slope)
    x = x.reshape(x.shape[0], *feature_shape(arch))
    specs, new = _specs(arch)[1], {}
    for i, spec in enumerate(specs, start=1):
        x, stats = batchnorm(p, buffers, f"decoder.bn{i}", x, arch, mode)
        new.update(stats)
        x = conv2d(p, f"decoder.conv{i}", upsample2(x), spec)
        x = jax.nn.sigmoid(x) if i == len(specs) else leaky_relu(x, arch.leaky_slope)
    return x, new


def parameter_shapes(arch, n_latent: int) -> dict:
    """Name -> shape of every model parameter, in refimpl's state-dict order (gamma, encoder, decoder)."""
    arch = as_config(arch, ARCH_DEFAULTS)
    enc, dec = _specs(arch)
    shapes, in_ch = {"gamma": (n_latent,)}, arch.image_shape[0]
    for i, s in enumerate(enc, start=1):
        shapes[f"encoder.conv{i}.weight"] = (s.channels, in_ch, s.kernel, s.kernel)
        shapes[f"encoder.conv{i}.bias"] = (s.channels,)
        shapes[f"encoder.bn{i}.weight"] = shapes[f"encoder.bn{i}.bias"] = (s.channels,)
        in_ch = s.channels
    flat = math.prod(feature_shape(arch))
    shapes.update({"encoder.fc1.weight": (arch.hidden, flat), "encoder.fc1.bias": (arch.hidden,),
                   "encoder.fc2.weight": (2 * n_latent, arch.hidden), "encoder.fc2.bias": (2 * n_latent,),
                   "decoder.fc1.weight": (arch.hidden, n_latent), "decoder.fc1.bias": (arch.hidden,),
                   "decoder.fc2.weight": (flat, arch.hidden), "decoder.fc2.bias": (flat,)})
    in_ch = feature_shape(arch)[0]
    for i, s in enumerate(dec, start=1):
        shapes[f"decoder.bn{i}.weight"] = shapes[f"decoder.bn{i}.bias"] = (in_ch,)
        shapes[f"decoder.conv{i}.weight"] = (s.channels, in_ch, s.kernel, s.kernel)
        shapes[f"decoder.conv{i}.bias"] = (s.channels,)
        in_ch = s.channels
    return shapes


def init_model(arch, n_latent: int, key, hyper=None, dtype=jnp.float64):
    """Fresh (params, buffers): PyTorch's default init (U(+-1/sqrt(fan_in)) for conv and linear weights
    and biases), BatchNorm weight 1, bias 0, running mean 0, var 1; gamma = gamma_init; lambda per (d)."""
    h = as_config(hyper or {}, DEFAULTS)
    shapes = parameter_shapes(arch, n_latent)
    drawn = [name for name in shapes if name != "gamma" and ".bn" not in name]
    # one draw of U(-1, 1) for every conv and linear parameter, cut up on the host (one compiled op)
    flat = numpy.asarray(jax.random.uniform(key, (sum(math.prod(shapes[k]) for k in drawn),), dtype, -1.0, 1.0))
    params, buffers, at = {}, {}, 0
    for name, shape in shapes.items():
        layer = name.rsplit(".", 1)[0]
        if name == "gamma":
            params[name] = jnp.full(shape, h.gamma_init, dtype)
        elif ".bn" in name:
            params[name] = (jnp.ones if name.endswith("weight") else jnp.zeros)(shape, dtype)
            buffers[layer + ".running_mean"] = jnp.zeros(shape, dtype)
            buffers[layer + ".running_var"] = jnp.ones(shape, dtype)
        else:
            bound = 1.0 / math.sqrt(math.prod(shapes[layer + ".weight"][1:]))  # fan_in
            size = math.prod(shape)
            params[name] = jnp.asarray(bound * flat[at:at + size].reshape(shape))
            at += size
    params["lambda"] = jnp.asarray(initial_lambda(h), dtype)
    return params, buffers


# ----------------------------------------------------------------------------------------
# Algorithm 1


def initial_lambda(h) -> float:
    """Raw lambda at the start, interpretation (d): lambda = lambda_init, or lambda' = lambda_init."""
    if h.lambda_init_on == "raw":
        return float(h.lambda_init)
    return math.log(math.expm1(math.sqrt(h.lambda_init)))  # softplus(lambda)^2 = lambda_init


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def clamp_lambda(raw, lo: float, hi: float, rule: str, ascent: bool):
    """l. 21's clamp of softplus(lambda)^2 to [lambda_min, lambda_max], gradient per interpretation (c).

    Inside the range the gradient passes. Outside, "zero" blocks it; "outward" (Sonnet's
    GECO) blocks it only if Adam would push lambda further out: d raw / d lambda > 0, so
    lambda moves up iff the upstream gradient is > 0 under ascent (< 0 under descent).
    """
    return jnp.clip(raw, lo, hi)


def _clamp_fwd(raw, lo, hi, rule, ascent):
    return jnp.clip(raw, lo, hi), raw


def _clamp_bwd(lo, hi, rule, ascent, raw, g):
    inside = (raw >= lo) & (raw <= hi)
    if rule == "zero":
        keep = inside
    else:
        moves_up = g > 0 if ascent else g < 0
        pushes_out = ((raw > hi) & moves_up) | ((raw < lo) & ~moves_up)
        keep = inside | ~pushes_out
    return (jnp.where(keep, g, jnp.zeros_like(g)),)


clamp_lambda.defvjp(_clamp_fwd, _clamp_bwd)


def per_image_error(x_rec, x, kind: str):
    """l. 12-13, interpretation (a): summed squared error per image ("sse") or its square root ("l2"). -> (B,)"""
    sse = ((x_rec - x) ** 2).reshape(x.shape[0], -1).sum(axis=1)
    return sse if kind == "sse" else jnp.sqrt(sse)


def kl_elementwise(mu, s, encoder_output: str):
    """Eq. 15 with s = log sigma^2 ("logvar") or s = log sigma ("logstd"), interpretation (e). -> (B, n)"""
    log_var = s if encoder_output == "logvar" else 2.0 * s
    return -0.5 * (1.0 + log_var - jnp.exp(log_var) - mu * mu)


def make_optimizer(hyper) -> optax.GradientTransformation:
    """l. 31: Adam in PyTorch's form (eps outside the square root, no eps_root; refimpl/adam.py)."""
    h = as_config(hyper, DEFAULTS)
    return optax.adam(h.lr, b1=h.betas[0], b2=h.betas[1], eps=h.adam_eps, eps_root=0.0)


def init_state(params: dict, hyper):
    """Adam's state (fresh) and GECO's (l. 1: hit = False; C_ma unset, NaN until l. 16 sets it)."""
    dtype = params["gamma"].dtype
    geco = {"hit": jnp.asarray(False), "c_ma": jnp.asarray(jnp.nan, dtype), "last_constraint_met": jnp.asarray(False)}
    return make_optimizer(hyper).init(params), geco


def samples_gates(geco: dict, hyper) -> bool:
    """l. 3: whether this step samples gates: hit, or the previous step's C <= 0 with hit="per_step" (g)."""
    h = as_config(hyper, DEFAULTS)
    return bool(geco["hit"] if h.hit == "sticky" else geco["last_constraint_met"])


def draw(key, geco: dict, hyper, batch: int, n: int, dtype=jnp.float64):
    """The step's random draws from a JAX key: u (S, n) if gates are sampled (l. 4; else None), eps (B, n) (l. 11)."""
    h = as_config(hyper, DEFAULTS)
    ku, ke = jax.random.split(key)
    samples = 1 if h.gate_samples == "batch" else batch
    u = jax.random.uniform(ku, (samples, n), dtype) if samples_gates(geco, h) else None
    return u, jax.random.normal(ke, (batch, n), dtype)


# XLA options for replays: a few small steps, where compiling takes ~100x longer than running. LLVM's
# optimisation level changes code speed, not results (no fast-math either way); it halves compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_step(arch, hyper, n_latent: int, *, plant: str | None = None, jit: bool = True,
              compiler_options: dict | None = None):
    """Algorithm 1's loop body (l. 3-31) as a pure function of the training state and the step's inputs.

    ``step(params, buffers, opt_state, geco, x, u, eps) -> (params, buffers, opt_state, geco, record)``:
    params: name -> array (the model's, and ``lambda``); buffers: BatchNorm running
    statistics; opt_state: optax Adam state; geco: ``hit``, ``c_ma`` (NaN before the first
    step), ``last_constraint_met``; x: (B, C, H, W); u: (S, n) uniforms, or None when
    the step samples no gates (l. 3 is the caller's: :func:`samples_gates`); eps: (B, n).
    record: the step's inputs, intermediates, gradients (ARM term included) and scalars
    as arrays, in the layout of refimpl's ``train_step(record=...)``.
    plant: None, or one of :data:`PLANTS` (a deliberate bug). jit: compile the step with
    ``jax.jit`` (``compiler_options`` passed on), else run it op by op.
    """
    arch, h = as_config(arch, ARCH_DEFAULTS), as_config(hyper, DEFAULTS)
    if plant is not None and plant not in PLANTS:
        raise ValueError(f"plant={plant!r}: expected one of {', '.join(PLANTS)}")
    n, optimizer = int(n_latent), make_optimizer(h)
    ascent = h.lambda_update == "ascent"
    e1_mode = {"batch": "batch", "batch_update": "update", "running": "eval"}[h.e1_batchnorm]

    def step(params, buffers, opt_state, geco, x, u, eps):
        dtype, batch = params["gamma"].dtype, x.shape[0]
        x, eps = jnp.asarray(x, dtype), jnp.asarray(eps, dtype)
        samples = 1 if h.gate_samples == "batch" else batch
        sampling = u is not None  # l. 3 (decided by the caller from geco)

        # l. 3-10: the gates, (S, n); never differentiated
        gamma = lax.stop_gradient(params["gamma"])
        if sampling:
            u = jnp.asarray(u, dtype)  # l. 4
            nu1 = (u > jax.nn.sigmoid(-h.k * gamma)).astype(dtype)  # l. 5
            nu2 = (u < jax.nn.sigmoid(h.k * gamma)).astype(dtype)  # l. 6
        else:
            nu1 = jnp.ones((samples, n), dtype)  # l. 8
            nu2 = jnp.ones((samples, n), dtype)  # l. 9

        def objective(p):
            """L (l. 22-24) as a function of every parameter, and the intermediates as aux."""
            # l. 11: z ~ f_enc(x), reparameterised (Eq. 6)
            encoded, new_buffers = encoder(p, buffers, x, arch)
            mu, s = encoded[:, :n], encoded[:, n:]
            sigma = jnp.exp(0.5 * s) if h.encoder_output == "logvar" else jnp.exp(s)
            z = mu + sigma * eps
            bufs = {**buffers, **new_buffers}

            # l. 12: E1, never differentiated, BatchNorm per interpretation (h). Without sampling
            # nu1 = nu2 = 1 and E1 = E2, so the pass is skipped unless it must update the statistics.
            run_e1 = sampling or h.e1_batchnorm == "batch_update"
            if run_e1:
                x1, stats = decoder(lax.stop_gradient(p), bufs, lax.stop_gradient(z) * nu1, arch, e1_mode)
                bufs.update(stats)
                e1 = per_image_error(x1, x, h.error)
            # l. 13: E2, differentiated
            x2, stats = decoder(p, bufs, z * nu2, arch)
            bufs.update(stats)
            e2 = per_image_error(x2, x, h.error)
            if not run_e1:
                x1, e1 = lax.stop_gradient(x2), lax.stop_gradient(e2)
            E1, E2 = e1.mean(), e2.mean()

            C = E2 - h.tau  # l. 14
            c_ma_before = geco["c_ma"]
            C_ma = jnp.where(jnp.isnan(c_ma_before), C,  # l. 15-16: i = 0
                             h.alpha * c_ma_before + (1 - h.alpha) * C)  # l. 17-18
            if plant == "no-stop-gradient":
                C_prime = C_ma  # planted bug: dC'/dC = 1 - alpha
            else:
                C_prime = C + lax.stop_gradient(C_ma - C)  # l. 20
            raw = jax.nn.softplus(p["lambda"]) ** 2
            lam_eff = clamp_lambda(raw, h.lambda_min, h.lambda_max, h.lambda_clamp_grad, ascent)  # l. 21

            # l. 22: L = lambda' C' + ||KL_elem * nu2||_1 / ||nu2||_0 (batch mean; (f): 0/0 -> 0)
            kl = kl_elementwise(mu, s, h.encoder_output)
            if h.kl_normalizer == "open":
                norm = jnp.maximum(nu2.sum(axis=1, keepdims=True), 1)
            else:
                norm = jnp.full((samples, 1), float(n), dtype)
            kl_per_image = (kl * nu2 / norm).sum(axis=1)
            kl_term = kl_per_image.mean()
            loss = lam_eff * C_prime + kl_term
            gates_l1 = jax.nn.sigmoid(h.k * p["gamma"]).sum()
            l0_added = C <= 0  # l. 23
            loss = loss + jnp.where(l0_added, gates_l1, jnp.zeros_like(gates_l1))  # l. 24
            aux = {"mu": mu, "s": s, "z": z, "x1": x1, "x2": x2, "e1": e1, "e2": e2, "kl_elem": kl,
                   "kl_per_image": kl_per_image, "buffers": bufs, "norm": norm,
                   "scalars": {"E1": E1, "E2": E2, "C": C, "C_ma": C_ma, "C_prime": C_prime, "lambda_eff": lam_eff,
                               "kl": kl_term, "gates_l1": gates_l1, "loss": loss, "l0_added": l0_added}}
            return loss, lax.stop_gradient(aux)

        # l. 27: backpropagation
        grads, aux = jax.grad(objective, has_aux=True)(params)
        sc = aux["scalars"]

        # l. 28-30: the ARM term, lambda' k (F(nu1) - F(nu2)) (u - 1/2), F per interpretation (k).
        # On the step where hit first becomes true no u was drawn: nu1 = nu2, the term is 0 and skipped (l).
        arm = None
        if sampling:
            lam_value = sc["lambda_eff"]
            f1, f2 = lam_value * aux["e1"], lam_value * aux["e2"]
            if h.arm_objective == "loss":
                norm1 = jnp.maximum(nu1.sum(axis=1, keepdims=True), 1) if h.kl_normalizer == "open" else aux["norm"]
                f1 = f1 + (aux["kl_elem"] * nu1 / norm1).sum(axis=1)
                f2 = f2 + aux["kl_per_image"]
            arm = h.k * ((f1 - f2)[:, None] * (u - 0.5)).mean(axis=0)  # l. 29
            if plant == "arm-sign":
                arm = -arm  # planted bug
            grads = {**grads, "gamma": grads["gamma"] + arm}

        # l. 31: Adam on theta, phi, gamma and lambda; lambda is maximised under "ascent" (b)
        descent = {**grads, "lambda": -grads["lambda"]} if ascent else grads
        updates, opt_state = optimizer.update(descent, opt_state, params)
        params = optax.apply_updates(params, updates)

        l0_added = sc["l0_added"]
        geco = {"hit": geco["hit"] | l0_added,  # l. 25
                "c_ma": sc["C_ma"], "last_constraint_met": l0_added}
        record = {"x": x, "u": u, "nu1": nu1, "nu2": nu2, "eps": eps, "arm": arm, "grads": grads,
                  **{k: aux[k] for k in ("mu", "s", "z", "x1", "x2", "e1", "e2", "kl_elem")},
                  "scalars": {**sc, "hit": geco["hit"]}}
        return params, aux["buffers"], opt_state, geco, record

    return jax.jit(step, compiler_options=compiler_options) if jit else step


# ----------------------------------------------------------------------------------------
# Replaying a golden trace (refimpl/trace.py)


def load_adam_state(opt_state, t: int, m: dict, v: dict):
    """optax's Adam state with step count t and moments m, v (name -> array), e.g. a trace's ``init/``."""
    adam, *rest = opt_state
    if not isinstance(adam, optax.ScaleByAdamState):
        raise TypeError(f"expected optax.adam's state, got {type(adam).__name__}")
    dtype = {k: p.dtype for k, p in adam.mu.items()}
    adam = adam._replace(count=jnp.asarray(t, jnp.int32),
                         mu={k: jnp.asarray(m[k], dtype[k]) for k in adam.mu},
                         nu={k: jnp.asarray(v[k], dtype[k]) for k in adam.nu})
    return (adam, *rest)


def from_trace(trace):
    """(arch, hyper, n, params, buffers, opt_state, geco): the state a trace starts from."""
    m = trace.manifest
    first = trace.step(0)
    dtype = jnp.dtype(str(first["input/x"].dtype))
    arch, hyper = as_config(m["architecture"], ARCH_DEFAULTS), as_config(m["hyper"], DEFAULTS)
    params = {name: jnp.asarray(first["param/" + name], dtype) for name in m["parameters"]}
    buffers = {name: jnp.asarray(first["buffer/" + name], dtype) for name in m["buffers"]}
    expected = parameter_shapes(arch, m["n_latent"])
    got = {k: tuple(v.shape) for k, v in params.items() if k != "lambda"}
    if got != {k: tuple(s) for k, s in expected.items()}:
        raise ValueError(f"{trace.path}: parameters {sorted(got)} do not fit the architecture in its manifest")
    opt_state, _ = init_state(params, hyper)
    init = m["initial_state"]
    opt_state = load_adam_state(opt_state, int(init["adam_t"]), trace.initial("adam_m"), trace.initial("adam_v"))
    geco = {"hit": jnp.asarray(bool(init["hit"])),
            "c_ma": jnp.asarray(numpy.nan if init["c_ma"] is None else float(init["c_ma"]), dtype),
            "last_constraint_met": jnp.asarray(bool(init["last_constraint_met"]))}
    return arch, hyper, int(m["n_latent"]), params, buffers, opt_state, geco


def _host(a):
    return numpy.array(a)


def host_record(record: dict, names) -> dict:
    """The record with host numpy arrays, Python scalars and gradients in ``names`` order (state-dict order)."""
    out = {k: (None if v is None else _host(v)) for k, v in record.items() if k not in ("grads", "scalars")}
    out["grads"] = {name: _host(record["grads"][name]) for name in names}
    out["scalars"] = {k: (bool(v) if k in ("l0_added", "hit") else float(v)) for k, v in record["scalars"].items()}
    return out


def _state(params, buffers, geco, names, buffer_names):
    from refimpl.trace import snapshot

    return snapshot({k: _host(params[k]) for k in names}, {k: _host(buffers[k]) for k in buffer_names},
                    bool(geco["hit"]), float(geco["c_ma"]), bool(geco["last_constraint_met"]))


def replay(trace_path, out_path, *, steps: int | None = None, plant: str | None = None, jit: bool = True) -> dict:
    """Replay the trace at ``trace_path`` in JAX on its recorded inputs; write a trace to ``out_path``.

    Returns the manifest written. A step at which the replay samples gates but the trace
    holds no u (the two disagree on ``hit``) raises a ValueError naming the step.
    """
    from refimpl.trace import build_manifest, read_trace, save_trace, step_entries, step_prefix

    trace = read_trace(trace_path)
    steps = trace.steps if steps is None else min(int(steps), trace.steps)
    arch, hyper, n, params, buffers, opt_state, geco = from_trace(trace)
    m = trace.manifest
    names, buffer_names = list(m["parameters"]), list(m["buffers"])
    step = make_step(arch, hyper, n, plant=plant, jit=jit, compiler_options=FAST_COMPILE)
    arrays = {f"init/adam_{which}/{k}": v for which in ("m", "v") for k, v in trace.initial(f"adam_{which}").items()}
    for k in range(steps):
        recorded = trace.step(k)
        sampling = samples_gates(geco, hyper)  # l. 3
        if sampling and "input/u" not in recorded:
            raise ValueError(f"{trace.path}: the JAX replay samples gates at step {k}, but the trace has no "
                             f"{step_prefix(k)}/input/u (the two disagree on hit)")
        before = _state(params, buffers, geco, names, buffer_names)
        params, buffers, opt_state, geco, record = step(params, buffers, opt_state, geco, recorded["input/x"],
                                                        recorded["input/u"] if sampling else None,
                                                        recorded["input/eps"])
        arrays.update(step_entries(k, before, host_record(record, names),
                                   _state(params, buffers, geco, names, buffer_names)))
    manifest = build_manifest(
        arrays, steps=steps, writer=f"bench/jax_algorithm1.py (jax {jax.__version__}, optax {optax.__version__})",
        architecture=m["architecture"], hyper=m["hyper"], n_latent=m["n_latent"], parameters=names,
        buffers=buffer_names, initial_state=m["initial_state"], seed=m.get("seed"),
        extra={"replay_of": str(trace.path), "plant": plant})
    save_trace(out_path, arrays, manifest)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Replay a refimpl trace in JAX and write a trace of the replay.")
    parser.add_argument("trace", help="trace file written by `refimpl trace` (refimpl/trace.py)")
    parser.add_argument("--out", default="jax_trace.npz", help="trace of the replay (default: jax_trace.npz)")
    parser.add_argument("--steps", type=int, default=None, help="replay only the first STEPS steps")
    parser.add_argument("--plant", choices=tuple(PLANTS), default=None,
                        help="plant a bug: " + "; ".join(f"{k}: {v}" for k, v in PLANTS.items()))
    parser.add_argument("--flip-arm-sign", action="store_true", help="the same as --plant arm-sign")
    parser.add_argument("--no-jit", action="store_true", help="run the step op by op instead of compiling it")
    args = parser.parse_args(argv)
    if args.flip_arm_sign and args.plant not in (None, "arm-sign"):
        parser.error("--flip-arm-sign and --plant name two different bugs")
    plant = "arm-sign" if args.flip_arm_sign else args.plant
    manifest = replay(args.trace, args.out, steps=args.steps, plant=plant, jit=not args.no_jit)
    print(f"replayed {manifest['steps']} steps of {args.trace} in jax {jax.__version__} (optax {optax.__version__})"
          f"{f', planted bug {plant}' if plant else ''}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # refimpl from this checkout when not installed
    raise SystemExit(main())
