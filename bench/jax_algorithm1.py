"""The paper's gated VAE and Algorithm 1 in JAX (jax.grad, jax.lax, optax).

A second independent transcription of De Boom et al., "Dynamic Narrowing of VAE
Bottlenecks Using GECO and L0 Regularization" (Sections 2-4, Algorithm 1), next to
``bench/torch_algorithm1.py``: the same architecture, parameter names and
interpretation switches as refimpl (``refimpl/model.py``, ``refimpl/algorithm1.py``,
``refimpl/INTERPRETATIONS.md``). Here the model is a set of pure functions of flat
dicts of arrays named as refimpl's state dict (``encoder.conv1.weight``, ...,
``gamma``, plus ``lambda``), one step of Algorithm 1 is a pure function

    step(params, buffers, opt_state, geco, x, u, eps, u1=None) -> (params, buffers, opt_state, geco, record)

(jit-compiled by default), gradients come from ``jax.grad``, StopGradient is
``jax.lax.stop_gradient``, the clamp of l. 21 is a ``jax.custom_vjp`` (interpretation
(c)), the ARM term (or DisARM, or REINFORCE-LOO: ``estimator``, interpretation (o)) is
added to gamma's gradient after ``jax.grad``, and ``optax.adam`` takes the step, with
lambda's gradient negated under ``lambda_update="ascent"`` so that Adam maximises L
over it. optax's update (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) is refimpl's
and torch's (``refimpl/adam.py``) up to rounding. l. 3 is the caller's: ``u`` is None
on steps that sample no gates (:func:`samples_gates` reads the GECO state). Importing
this module turns on ``jax_enable_x64`` for the process, so everything runs in float64
unless the inputs are float32. refimpl is imported only to read and write trace files.

Adam's step count (interpretation (n)): optax's Adam keeps one count for the parameters
it is given, so gamma gets an Adam state of its own beside the rest's
(``opt_state = {"gamma": ..., "rest": ...}``). With ``adam_steps="global"`` (refimpl's
default, as one optax.adam over everything) both are stepped every step, gamma with a
zero gradient while it takes no part in L; with ``"per_parameter"`` (torch.optim.Adam's
behaviour) gamma's state, value and count stay as they are on a step where it has no
gradient: no L0 term (l. 24) and no gates sampled (l. 29).

Readings (p)-(r) of refimpl/INTERPRETATIONS.md: ``constraint="per_image"`` adds the L0
term times the fraction of images with e_b <= tau inside the objective; with ``lambda_lr``
or ``lambda_optimizer="sgd"`` lambda gets an optax state of its own (``opt_state["lambda"]``:
``optax.adam`` at its rate, or ``optax.sgd``, plain gradient ascent on the negated
gradient); ``encoder_output="literal"`` samples with sigma = exp(s) and applies Eq. 15's
"log sigma - sigma" to s as printed.

Agreement with refimpl in float64 (``tests/test_crosscheck.py``): every
intermediate, gradient (the ARM term too), parameter and BatchNorm statistic to ~1e-13
relative on the test models, under every interpretation switch. On Section 4's 64x64
model parameters can differ more where a gradient is ~0 (Adam amplifies rounding noise
by up to lr / eps, see docs/porting.md, "Tolerances"): ``refimpl compare --param-rtol 1e-5``.

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
        u, u1, eps = ja.draw(sub, geco, hyper, x.shape[0], 10)   # u is None unless gates are sampled (l. 3)
        params, buffers, opt_state, geco, log = step(params, buffers, opt_state, geco, x, u, eps, u1)
        print(log["scalars"]["E2"], log["scalars"]["lambda_eff"])

Replay a golden trace (``refimpl trace``, see refimpl/trace.py) and compare::

    refimpl trace --image-size 16 --latent 4 --batch-size 8 --steps 3 --force-hit --out ref.npz
    .venv/bin/python bench/jax_algorithm1.py ref.npz --out jax.npz
    refimpl compare ref.npz jax.npz        # exit status 0: every tensor agrees

``--plant NAME`` plants one of the porting bugs of refimpl's catalogue
(``refimpl/porting_bugs.py``; ``--plant list`` prints it) to see ``compare`` find it:
every bug of the catalogue has its hook here, as in the torch script (``--flip-arm-sign``
is ``--plant arm-sign``; ``--plant no-stop-gradient`` drops l. 20's StopGradient, so
dC'/dC = 1 - alpha instead of 1 once C_ma has history).
"""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # before any array is made: float64 as refimpl's traces

import jax.numpy as jnp  # noqa: E402
import numpy  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/transcription.py, when imported from elsewhere
# Framework-free parts shared with bench/torch_algorithm1.py: Section 4's defaults and refimpl's interpretations
# (DEFAULTS), architecture helpers, initial lambda (d), the plant catalogue and the trace replay loop.
from transcription import (ARCH_DEFAULTS, DEFAULTS, as_config, check_plant, conv_specs, feature_shape,  # noqa: E402
                           initial_lambda, lambda_rate, paper_architecture, plant_catalogue)
import transcription  # noqa: E402

__all__ = ["ARCH_DEFAULTS", "DEFAULTS", "as_config", "draw", "feature_shape", "init_model", "init_state", "make_step",
           "paper_architecture", "plant_catalogue", "replay", "samples_gates"]


# ----------------------------------------------------------------------------------------
# The model (Section 4): pure functions of flat dicts named as refimpl's state dict


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
    for i, spec in enumerate(conv_specs(arch)[0], start=1):
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
    specs, new = conv_specs(arch)[1], {}
    for i, spec in enumerate(specs, start=1):
        x, stats = batchnorm(p, buffers, f"decoder.bn{i}", x, arch, mode)
        new.update(stats)
        x = conv2d(p, f"decoder.conv{i}", upsample2(x), spec)
        x = jax.nn.sigmoid(x) if i == len(specs) else leaky_relu(x, arch.leaky_slope)
    return x, new


def parameter_shapes(arch, n_latent: int) -> dict:
    """Name -> shape of every model parameter, in refimpl's state-dict order (gamma, encoder, decoder)."""
    arch = as_config(arch, ARCH_DEFAULTS)
    enc, dec = conv_specs(arch)
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
    """Eq. 15 with s = log sigma^2 ("logvar") or s = log sigma ("logstd"), interpretation (e); or, with
    "literal" (r), Eq. 15's "log sigma - sigma" as printed on Eq. 3's s = log sigma. -> (B, n)"""
    if encoder_output == "literal":
        return -0.5 * (1.0 + s - jnp.exp(s) - mu * mu)
    log_var = s if encoder_output == "logvar" else 2.0 * s
    return -0.5 * (1.0 + log_var - jnp.exp(log_var) - mu * mu)


def make_optimizer(hyper, lr: float | None = None) -> optax.GradientTransformation:
    """l. 31: Adam in PyTorch's form (eps outside the square root, no eps_root; refimpl/adam.py), at ``lr``
    (default: hyper's)."""
    h = as_config(hyper, DEFAULTS)
    return optax.adam(h.lr if lr is None else lr, b1=h.betas[0], b2=h.betas[1], eps=h.adam_eps, eps_root=0.0)


def _own_lambda(h) -> bool:
    """Whether lambda has an optimizer of its own (interpretation (q)): its own rate, or plain gradient ascent."""
    return h.lambda_lr is not None or h.lambda_optimizer == "sgd"


def part_optimizers(hyper) -> dict:
    """The optimizer of each part of :func:`_split`: Adam for gamma and the rest; lambda's under (q) Adam at
    lambda's rate, or optax.sgd (plain gradient descent on the negated gradient under ascent, no state)."""
    h = as_config(hyper, DEFAULTS)
    out = {"gamma": make_optimizer(h), "rest": make_optimizer(h)}
    if _own_lambda(h):
        out["lambda"] = optax.sgd(lambda_rate(h)) if h.lambda_optimizer == "sgd" else make_optimizer(h, lambda_rate(h))
    return out


def _split(params: dict, hyper) -> dict:
    """{"gamma": {"gamma": ...}, "rest": every other parameter}: gamma keeps an Adam state of its own (n);
    lambda too, as "lambda", when it has an optimizer or a rate of its own (q)."""
    own = ("gamma", "lambda") if _own_lambda(as_config(hyper, DEFAULTS)) else ("gamma",)
    return {**{name: {name: params[name]} for name in own},
            "rest": {k: v for k, v in params.items() if k not in own}}


def init_state(params: dict, hyper):
    """Adam's state (fresh: gamma's and the rest's, interpretation (n); lambda's under (q)) and GECO's (l. 1:
    hit = False; C_ma unset, NaN until l. 16 sets it)."""
    dtype = params["gamma"].dtype
    geco = {"hit": jnp.asarray(False), "c_ma": jnp.asarray(jnp.nan, dtype), "last_constraint_met": jnp.asarray(False)}
    optimizers = part_optimizers(hyper)
    return {part: optimizers[part].init(group) for part, group in _split(params, hyper).items()}, geco


def samples_gates(geco: dict, hyper) -> bool:
    """l. 3: whether this step samples gates: hit, or the previous step's C <= 0 with hit="per_step" (g)."""
    h = as_config(hyper, DEFAULTS)
    return bool(geco["hit"] if h.hit == "sticky" else geco["last_constraint_met"])


def draw(key, geco: dict, hyper, batch: int, n: int, dtype=jnp.float64):
    """The step's random draws from a JAX key: (u, u1, eps). u (S, n) if gates are sampled (l. 4; else None);
    u1 (S, n), the second independent sample, only with estimator="reinforce_loo" (else None); eps (B, n) (l. 11)."""
    h = as_config(hyper, DEFAULTS)
    ku, ku1, ke = jax.random.split(key, 3)
    samples = 1 if h.gate_samples == "batch" else batch
    sampling = samples_gates(geco, h)
    u = jax.random.uniform(ku, (samples, n), dtype) if sampling else None
    u1 = jax.random.uniform(ku1, (samples, n), dtype) if sampling and h.estimator == "reinforce_loo" else None
    return u, u1, jax.random.normal(ke, (batch, n), dtype)


# XLA options for replays: a few small steps, where compiling takes ~100x longer than running. LLVM's
# optimisation level changes code speed, not results (no fast-math either way); it halves compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Where a planted bug needs uniforms the step was not given (more rows of u, or u where the trace has none).
PLANT_DRAWS = numpy.random.default_rng(0)


def make_step(arch, hyper, n_latent: int, *, plant: str | None = None, jit: bool = True,
              compiler_options: dict | None = None):
    """Algorithm 1's loop body (l. 3-31) as a pure function of the training state and the step's inputs.

    ``step(params, buffers, opt_state, geco, x, u, eps, u1=None) -> (params, buffers, opt_state, geco, record)``:
    params: name -> array (the model's, and ``lambda``); buffers: BatchNorm running
    statistics; opt_state: :func:`init_state`'s Adam states; geco: ``hit``, ``c_ma`` (NaN
    before the first step), ``last_constraint_met``; x: (B, C, H, W); u: (S, n) uniforms,
    or None when the step samples no gates (l. 3 is the caller's: :func:`samples_gates`);
    eps: (B, n); u1: (S, n), the second sample's uniforms of estimator="reinforce_loo".
    record: the step's inputs, intermediates, gradients (the estimator's term included) and
    scalars as arrays, in the layout of refimpl's ``train_step(record=...)``.
    plant: None, or a porting bug of refimpl's catalogue (``refimpl/porting_bugs.py``) to
    plant; each is one ``plant == ...`` hook below. jit: compile the step with ``jax.jit``
    (``compiler_options`` passed on), else run it op by op.
    """
    arch, h = as_config(arch, ARCH_DEFAULTS), as_config(hyper, DEFAULTS)
    check_plant(plant)
    # plants that change a convention of the model (Sec. 4, interpretation (m))
    if plant == "leaky-slope":
        arch.leaky_slope = 0.01  # torch's default
    if plant == "bn-unbiased-var":
        arch.bn_running_var = "unbiased"
    if plant == "bn-torch-momentum":
        arch.bn_momentum = 1.0 - arch.bn_momentum  # torch's momentum (weight of the batch) read as Keras's
    n, optimizers = int(n_latent), part_optimizers(h)
    ascent = h.lambda_update == "ascent"
    maximise_lambda = ascent != (plant == "lambda-minimised")
    adam_steps = h.adam_steps
    if plant == "adam-steps":
        adam_steps = {"global": "per_parameter", "per_parameter": "global"}[adam_steps]
    e1_batchnorm = {"e1-eval-mode": "running", "e1-updates-bn": "batch_update"}.get(plant, h.e1_batchnorm)
    e1_mode = {"batch": "batch", "batch_update": "update", "running": "eval"}[e1_batchnorm]
    loo = h.estimator == "reinforce_loo"  # (o): two independent gate samples instead of an antithetic pair

    def step(params, buffers, opt_state, geco, x, u, eps, u1=None):
        dtype, batch = params["gamma"].dtype, x.shape[0]
        x, eps = jnp.asarray(x, dtype), jnp.asarray(eps, dtype)
        samples = 1 if h.gate_samples == "batch" else batch
        sampling = u is not None  # l. 3 (decided by the caller from geco)

        # l. 3-10: the gates, (S, n); never differentiated
        gamma = lax.stop_gradient(params["gamma"])
        if sampling:
            u = jnp.asarray(u, dtype)  # l. 4
            if loo:
                u1 = jnp.asarray(u1, dtype)  # the second sample's uniforms
            if plant == "u-per-image" and u.shape[0] == 1:
                u = jnp.concatenate([u, jnp.asarray(PLANT_DRAWS.uniform(size=(batch - 1, n)), dtype)])
            if loo and plant != "loo-antithetic":
                nu1 = (u1 < jax.nn.sigmoid(h.k * gamma)).astype(dtype)  # (o): an independent sample for the E1 pass
            else:
                nu1 = (u > jax.nn.sigmoid(-h.k * gamma)).astype(dtype)  # l. 5
            nu2 = (u < jax.nn.sigmoid(h.k * gamma)).astype(dtype)  # l. 6: the E2 pass and the KL term, every estimator
            if plant == "nu-swapped":
                nu1, nu2 = nu2, nu1
        else:
            u1 = None
            nu1 = jnp.ones((samples, n), dtype)  # l. 8
            nu2 = jnp.ones((samples, n), dtype)  # l. 9

        def objective(p):
            """L (l. 22-24) as a function of every parameter, and the intermediates as aux."""
            # l. 11: z ~ f_enc(x), reparameterised (Eq. 6)
            encoded, new_buffers = encoder(p, buffers, x, arch)
            mu, s = encoded[:, :n], encoded[:, n:]
            sigma = jnp.exp(0.5 * s) if h.encoder_output == "logvar" and plant != "exp-s" else jnp.exp(s)
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
            E1, E2 = (e1.sum(), e2.sum()) if plant == "batch-sum" else (e1.mean(), e2.mean())

            C = E2 - h.tau  # l. 14
            c_ma_before = geco["c_ma"]
            first_c_ma = (1 - h.alpha) * C if plant == "c-ma-from-zero" else C
            C_ma = jnp.where(jnp.isnan(c_ma_before), first_c_ma,  # l. 15-16: i = 0
                             h.alpha * c_ma_before + (1 - h.alpha) * C)  # l. 17-18
            C_prime = C + lax.stop_gradient(C_ma - C)  # l. 20
            if plant == "loss-uses-c":
                C_prime = C
            if plant == "detach-wrong-side":
                C_prime = lax.stop_gradient(C) + (C_ma - C)
            if plant == "no-stop-gradient":
                C_prime = C_ma
            raw = jax.nn.softplus(p["lambda"]) ** 2
            lo, hi = (h.lambda_max, h.lambda_min) if plant == "clamp-limits-swapped" else (h.lambda_min, h.lambda_max)
            lam_eff = clamp_lambda(raw, lo, hi, h.lambda_clamp_grad, ascent)  # l. 21
            if plant == "no-lambda-clamp":
                lam_eff = raw

            # l. 22: L = lambda' C' + ||KL_elem * nu2||_1 / ||nu2||_0 (batch mean; (f): 0/0 -> 0)
            kl = kl_elementwise(mu, s, h.encoder_output)
            if plant == "kl-without-mu2":
                kl = kl - 0.5 * mu * mu
            kl_mask = nu1 if plant == "kl-on-nu1" else nu2
            if h.kl_normalizer == "open" and plant != "kl-over-n":
                norm = jnp.maximum(kl_mask.sum(axis=1, keepdims=True), 1)
            else:
                norm = jnp.full((samples, 1), float(n), dtype)
            kl_per_image = (kl * kl_mask / norm).sum(axis=1)
            kl_term = kl_per_image.mean()
            loss = lam_eff * C_prime + kl_term
            gates_l1 = jax.nn.sigmoid((1.0 if plant == "l0-without-k" else h.k) * p["gamma"]).sum()
            l0_added = C > 0 if plant == "l0-when-violated" else C <= 0  # l. 23
            l0_weight = 1.0
            if h.constraint == "per_image":  # (p): C_b = e_b - tau per image; weight: the fraction with C_b <= 0
                l0_weight = (e2 <= h.tau).astype(jnp.float64).mean()
                l0_added = l0_weight > 0
            loss = loss + jnp.where(l0_added, l0_weight * gates_l1, jnp.zeros_like(gates_l1))  # l. 24
            aux = {"mu": mu, "s": s, "z": z, "x1": x1, "x2": x2, "e1": e1, "e2": e2, "kl_elem": kl,
                   "kl_per_image": kl_per_image, "buffers": bufs, "norm": norm,
                   "scalars": {"E1": E1, "E2": E2, "C": C, "C_ma": C_ma, "C_prime": C_prime, "lambda_eff": lam_eff,
                               "kl": kl_term, "gates_l1": gates_l1, "loss": loss, "l0_added": l0_added}}
            return loss, lax.stop_gradient(aux)

        # l. 27: backpropagation
        grads, aux = jax.grad(objective, has_aux=True)(params)
        sc = aux["scalars"]

        # l. 28-30: the ARM term, lambda' k (F(nu1) - F(nu2)) (u - 1/2), F per interpretation (k), or another
        # estimator of gamma's gradient from the same two decoder passes (interpretation (o)).
        # On the step where hit first becomes true no u was drawn: nu1 = nu2, the term is 0 and skipped (l).
        arm = None
        if sampling:
            lam_value = 1.0 if plant == "arm-without-lambda" else sc["lambda_eff"]
            f1, f2 = lam_value * aux["e1"], lam_value * aux["e2"]
            if h.arm_objective == "loss":
                norm1 = jnp.maximum(nu1.sum(axis=1, keepdims=True), 1) if h.kl_normalizer == "open" else aux["norm"]
                f1 = f1 + (aux["kl_elem"] * nu1 / norm1).sum(axis=1)
                f2 = f2 + aux["kl_per_image"]
            k = 1.0 if plant == "arm-without-k" else h.k  # d phi / d gamma for the logits phi = k gamma
            df = (f1 - f2)[:, None]
            if h.estimator == "arm":  # l. 29, Eq. 13 (Yin & Zhou 2019)
                arm = k * (df * (u - 0.5)).mean(axis=0)
            elif h.estimator == "disarm":  # Dong, Mnih & Tucker 2020 on the same antithetic pair:
                # 1/2 (F(b) - F(b~)) (-1)^b~ 1[b != b~] sigmoid(|phi|), b = nu1 = 1[1 - u < sigmoid(phi)], b~ = nu2;
                # (-1)^b = 1 - 2b for b in {0, 1}
                sign = 1.0 - 2.0 * (nu1 if plant == "disarm-sign" else nu2)
                arm = k * (0.5 * df * sign * (nu1 != nu2) * jax.nn.sigmoid(jnp.abs(h.k * gamma))).mean(axis=0)
            else:  # REINFORCE with a leave-one-out baseline, two samples: 1/2 sum_i (F_i - F_other)(nu_i - p)
                prob = jax.nn.sigmoid(h.k * gamma)
                arm = k * (0.5 * (df * (nu1 - prob) + (-df) * (nu2 - prob))).mean(axis=0)
            if plant == "arm-sign":
                arm = -arm
            grads = {**grads, "gamma": grads["gamma"] + arm}

        # l. 31: Adam on theta, phi, gamma and lambda; lambda is maximised under "ascent" (b)
        descent = {**grads, "lambda": -grads["lambda"]} if maximise_lambda else grads
        l0_added = sc["l0_added"]
        parts = _split(params, h)
        updates, new_state = {}, {}
        for part, group in parts.items():
            part_updates, new_state[part] = optimizers[part].update({k: descent[k] for k in group}, opt_state[part],
                                                                    group)
            if plant == "adam-no-bias-correction" and _is_adam(new_state[part]):  # without 1 - beta^t
                adam = new_state[part][0]
                part_updates = jax.tree.map(lambda m, v: -h.lr * m / (jnp.sqrt(v) + h.adam_eps), adam.mu, adam.nu)
            updates.update(part_updates)
        if adam_steps == "per_parameter":
            # (n): gamma takes part in L only through the L0 term (l. 24) and the estimator (l. 29); on a step
            # with neither it has no gradient, and its value, moments and count stay as they are (torch.optim.Adam)
            has_gradient = jnp.logical_or(sampling, l0_added)
            new_state["gamma"] = jax.tree.map(lambda new, old: jnp.where(has_gradient, new, old),
                                              new_state["gamma"], opt_state["gamma"])
            updates["gamma"] = jnp.where(has_gradient, updates["gamma"], jnp.zeros_like(updates["gamma"]))
        params = optax.apply_updates(params, updates)

        hit = True if plant == "hit-every-step" else geco["hit"] | l0_added  # l. 25
        geco = {"hit": jnp.asarray(hit), "c_ma": sc["C_ma"], "last_constraint_met": l0_added}
        record = {"x": x, "u": u, "u1": u1, "nu1": nu1, "nu2": nu2, "eps": eps, "arm": arm, "grads": grads,
                  **{k: aux[k] for k in ("mu", "s", "z", "x1", "x2", "e1", "e2", "kl_elem")},
                  "scalars": {**sc, "hit": geco["hit"]}}
        return params, aux["buffers"], new_state, geco, record

    return jax.jit(step, compiler_options=compiler_options) if jit else step


# ----------------------------------------------------------------------------------------
# Replaying a golden trace (refimpl/trace.py)


def load_adam_state(opt_state, t: int, m: dict, v: dict, steps: dict | None = None):
    """:func:`init_state`'s Adam states with moments m, v (name -> array), e.g. a trace's ``init/``, and step
    counts: each parameter's own (``steps``, refimpl's Adam ``state_dict()["steps"]``; interpretation (n)),
    or the global count ``t`` for all. Every parameter but gamma shares one optax count, so theirs must agree.
    lambda's plain gradient ascent (q) has no state: refimpl's moments for it (kept, unused) are not read."""
    steps = steps or {name: t for part in opt_state.values() if _is_adam(part) for name in part[0].mu}
    new = {}
    for part, state in opt_state.items():
        if part == "lambda" and not _is_adam(state):
            new[part] = state
            continue
        adam, *rest = state
        if not isinstance(adam, optax.ScaleByAdamState):
            raise TypeError(f"expected optax.adam's state, got {type(adam).__name__}")
        counts = {int(steps[name]) for name in adam.mu}
        if len(counts) != 1:
            raise ValueError(f"Adam step counts {sorted(counts)} for the parameters of {part!r}: optax keeps one")
        dtype = {k: p.dtype for k, p in adam.mu.items()}
        adam = adam._replace(count=jnp.asarray(counts.pop(), jnp.int32),
                             mu={k: jnp.asarray(m[k], dtype[k]) for k in adam.mu},
                             nu={k: jnp.asarray(v[k], dtype[k]) for k in adam.nu})
        new[part] = (adam, *rest)
    return new


def _is_adam(state) -> bool:
    """Whether an optax state is optax.adam's (else optax.sgd's, for lambda under (q))."""
    return isinstance(state[0], optax.ScaleByAdamState)


def from_trace(trace, plant: str | None = None):
    """(arch, hyper, n, params, buffers, opt_state, geco): the state a trace starts from."""
    init = transcription.initial_state(trace)
    dtype = jnp.dtype(init.dtype)
    arch, hyper = as_config(trace.manifest["architecture"], ARCH_DEFAULTS), as_config(trace.manifest["hyper"], DEFAULTS)
    params = {name: jnp.asarray(a, dtype) for name, a in init.params.items()}
    if plant == "lambda-init-wrong-side":  # the planted port keeps its own initial lambda
        params["lambda"] = jnp.asarray(initial_lambda(hyper, flip=True), dtype)
    buffers = {name: jnp.asarray(a, dtype) for name, a in init.buffers.items()}
    expected = parameter_shapes(arch, init.n_latent)
    got = {k: tuple(v.shape) for k, v in params.items() if k != "lambda"}
    if got != {k: tuple(s) for k, s in expected.items()}:
        raise ValueError(f"{trace.path}: parameters {sorted(got)} do not fit the architecture in its manifest")
    opt_state, _ = init_state(params, hyper)
    opt_state = load_adam_state(opt_state, init.adam_t, init.adam_m, init.adam_v, init.adam_steps)
    geco = {"hit": jnp.asarray(init.hit),
            "c_ma": jnp.asarray(numpy.nan if init.c_ma is None else init.c_ma, dtype),
            "last_constraint_met": jnp.asarray(init.last_constraint_met)}
    return arch, hyper, init.n_latent, params, buffers, opt_state, geco


def _host(a):
    return numpy.array(a)


def host_record(record: dict, names) -> dict:
    """The record with host numpy arrays, Python scalars and gradients in ``names`` order (state-dict order)."""
    out = {k: (None if v is None else _host(v)) for k, v in record.items() if k not in ("grads", "scalars")}
    out["grads"] = {name: _host(record["grads"][name]) for name in names}
    out["scalars"] = {k: (bool(v) if k in ("l0_added", "hit") else float(v)) for k, v in record["scalars"].items()}
    return out


class _Port:
    """The pure step and its state, as bench/transcription.py's replay loop drives them."""

    def __init__(self, trace, plant, jit=True):
        arch, self.hyper, self.n, self.params, self.buffers, self.opt_state, self.geco = from_trace(trace, plant)
        self.names, self.buffer_names = list(trace.manifest["parameters"]), list(trace.manifest["buffers"])
        self.step = make_step(arch, self.hyper, self.n, plant=plant, jit=jit, compiler_options=FAST_COMPILE)

    def sampling(self) -> bool:
        return samples_gates(self.geco, self.hyper)  # l. 3

    def snapshot(self) -> dict:
        from refimpl.trace import snapshot

        return snapshot({k: _host(self.params[k]) for k in self.names},
                        {k: _host(self.buffers[k]) for k in self.buffer_names}, bool(self.geco["hit"]),
                        float(self.geco["c_ma"]), bool(self.geco["last_constraint_met"]))

    def replay_step(self, x, eps, u, u1) -> dict:
        if self.sampling():  # a planted bug that changes hit samples where the trace has no u: its own draws
            rows = 1 if self.hyper.gate_samples == "batch" else x.shape[0]
            u = PLANT_DRAWS.uniform(size=(rows, self.n)) if u is None else u
            if self.hyper.estimator == "reinforce_loo" and u1 is None:
                u1 = PLANT_DRAWS.uniform(size=(rows, self.n))
        else:
            u = u1 = None
        self.params, self.buffers, self.opt_state, self.geco, record = self.step(
            self.params, self.buffers, self.opt_state, self.geco, x, u, eps, u1)
        return host_record(record, self.names)


def replay(trace_path, out_path, *, steps: int | None = None, plant: str | None = None, jit: bool = True) -> dict:
    """Replay the trace at ``trace_path`` in JAX on its recorded inputs; write a trace to ``out_path``.

    ``plant``: a porting bug from refimpl's catalogue to plant (``refimpl/porting_bugs.py``).
    Returns the manifest written. A step at which the replay samples gates but the trace
    holds no u (the two disagree on ``hit``) raises a ValueError naming the step; with a
    plant, the replay draws its own u there instead, so that ``compare`` can show where hit
    went wrong. ``jit=False`` runs the step op by op (no compilation of the whole step: for
    many short replays, e.g. the tests, after the first).
    """
    return transcription.replay(trace_path, out_path, partial(_Port, jit=jit), framework="JAX", steps=steps,
                                plant=plant, writer=f"bench/jax_algorithm1.py (jax {jax.__version__}, optax "
                                                    f"{optax.__version__})")


def main(argv=None) -> int:
    def add_arguments(parser):
        parser.add_argument("--no-jit", action="store_true", help="run the step op by op instead of compiling it")

    return transcription.main(argv, framework="JAX", version=f"jax {jax.__version__} (optax {optax.__version__})",
                              replay_trace=replay, default_out="jax_trace.npz", add_arguments=add_arguments,
                              replay_options=lambda args: {"jit": not args.no_jit})


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # refimpl from this checkout when not installed
    raise SystemExit(main())
