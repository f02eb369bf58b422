"""Algorithm 1's step without reading anything back to the host: the fast path for GPUs.

:func:`refimpl.algorithm1.train_step` is the reference: it computes GECO's scalars (E,
C, C_ma, lambda') on the host in float64 and branches in Python on l. 3 (sample gates?)
and l. 23 (add the L0 term?). On a GPU every such read waits for the device to finish,
five times a step, so the host can never queue the next kernels ahead; and a step
that reads the host cannot be captured as one CUDA graph (issue 13).

:class:`DeviceStep` computes the same step with every scalar a 0-d device array:

- E1, E2, C, C_ma, lambda', the KL term and the loss are 0-d float64 arrays, computed
  with the same operations in the same order as the host's Python floats (a float32
  mean, cast to float64, then float64 arithmetic); where the host multiplies a float32
  array by a Python float, NumPy first rounds the float to float32, and so does this
  module (``_as``);
- l. 21's softplus and clamp, and the gradient of lambda through them
  (interpretation (c)), are written with ``xp.where`` instead of ``if``;
- l. 23's branch is a 0/1 mask: the L0 term and its gradient are added times the mask
  (adding 0.0 changes nothing, multiplying by 1.0 neither); with ``constraint="per_image"``
  (interpretation (p)) the mask is the fraction of images with e_b <= tau, as the host's;
- l. 31 is :func:`refimpl.algorithm1.update_parameters`, the host's, which reads nothing back
  (lambda's own rate and plain gradient ascent, interpretation (q), included);
- l. 3 is not a branch: the fast path applies only where l. 3 is certainly true,
  i.e. with ``hit="sticky"`` (interpretation (g), the default) once hit is set
  (:func:`applies`); every later step samples gates. Before the first hit, and with
  ``hit="per_step"``, the caller runs :func:`train_step`.

What still differs from :func:`train_step`: the device's exp and log1p in l. 21 (NumPy's
or CUDA's instead of the C library's) may round the last bit of lambda' differently.
``tests/test_device_step.py`` checks both paths step for step, under every interpretation
switch that applies after the first hit, in float32 and float64: every parameter, buffer,
optimizer moment and logged scalar agrees to 1e-12 (float64) and 1e-6 (float32). Measured
over 30 steps (bench/NOTES.md, 2026-12-03): float32 parameters bit for bit in all 17
variants, float64 in 11 of 17 (the largest difference 1.5e-11).

The random draws are the reference's, from the same host generator in the same order
(u, u1 for REINFORCE-LOO, eps), so a run can switch between the two paths at any step.
The logged scalars come back as one small host transfer per step
(:meth:`DeviceStep.host_log`), after the step's kernels have been queued.
"""

from __future__ import annotations

from .algorithm1 import (TrainState, _decoder_e1_pass, clamp_keeps_gradient, encoder_output_gradient,
                         estimator_objectives, estimator_term, gate_masks, gated_kl, kl_elementwise, per_image_error,
                         per_image_error_grad, update_parameters)
from .backend import array_module, to_host
from .layers.activations import sigmoid
from .rng import standard_normal, uniform

# The logged scalars, in the order of :func:`train_step`'s log (step and hit are the host's).
LOG_KEYS = ("E1", "E2", "C", "C_ma", "lambda_eff", "lambda_raw", "loss", "kl", "gates_l1", "open_gates",
            "hit_fraction", "l0_added")


def applies(state: TrainState) -> bool:
    """True when every step from now on samples gates (l. 3 true): hit is sticky and set."""
    return state.hyper.hit == "sticky" and state.hit and state.c_ma is not None


def _as(value, dtype):
    """A float64 0-d array rounded to ``dtype``, as NumPy rounds a Python float that multiplies an array of it."""
    return value.astype(dtype)


def softplus(v):
    """softplus of a 0-d float64 array: max(v, 0) + log1p(exp(-|v|)), as :func:`refimpl.algorithm1.softplus`."""
    xp = array_module(v)
    return xp.maximum(v, 0.0) + xp.log1p(xp.exp(-xp.abs(v)))


def logistic(v):
    """The logistic function of a 0-d float64 array, in the two branches :func:`refimpl.algorithm1.logistic` uses."""
    xp = array_module(v)
    e = xp.exp(-xp.abs(v))  # exp(-v) for v >= 0, exp(v) for v < 0
    return xp.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def effective_lambda(lam, hyper):
    """l. 21: lambda' = max(min(softplus(lambda)^2, lambda_max), lambda_min), on a 0-d float64 array."""
    xp = array_module(lam)
    return xp.minimum(xp.maximum(softplus(lam) ** 2, hyper.lambda_min), hyper.lambda_max)


def lambda_gradient(lam, c_prime, hyper):
    """dL/dlambda through l. 21's clamp (interpretation (c)), as :func:`refimpl.algorithm1.lambda_gradient`."""
    sp = softplus(lam)
    grad = c_prime * 2.0 * sp * logistic(lam)
    return array_module(lam).where(clamp_keeps_gradient(sp**2, grad, hyper), grad, 0.0)


class DeviceStep:
    """:func:`refimpl.algorithm1.train_step` without host reads, for a state where :func:`applies`.

    ``DeviceStep(state)(x, rng)`` runs one step on images x: (B, C, H, W) and returns the
    logged scalars as 0-d device arrays (:data:`LOG_KEYS`); :meth:`host_log` turns them into
    the reference's log dict with one transfer, and writes C_ma and the constraint's state
    back into ``state`` (so checkpoints and :func:`train_step` carry on from it).
    """

    def __init__(self, state: TrainState):
        if not applies(state):
            raise ValueError("DeviceStep applies once every step samples gates: hit='sticky' and hit set "
                             f"(hit={state.hyper.hit!r}, state.hit={state.hit})")
        self.state = state
        self.xp = state.model.xp
        self.c_ma = self.xp.asarray(state.c_ma, dtype="float64")  # l. 16-18's moving average, on the device

    def __call__(self, x, rng) -> dict:
        state = self.state
        model, hyper, xp = state.model, state.hyper, self.xp
        dtype, n, f64 = model.dtype, model.n_latent, "float64"
        model.check_images(x)  # shapes only: no read of x
        batch = x.shape[0]
        gamma = model.params["gamma"]
        model.zero_grad()
        samples = 1 if hyper.gate_samples == "batch" else batch

        # l. 3-6: gates are always sampled here (applies(state))
        u = uniform(rng, (samples, n), xp, dtype)  # l. 4
        u1 = uniform(rng, (samples, n), xp, dtype) if hyper.estimator == "reinforce_loo" else None
        nu1, nu2 = gate_masks(u, gamma, hyper.k, u1)  # l. 5-6

        # l. 11
        encoded = model.encoder.forward(x)
        mu, s = encoded[:, :n], encoded[:, n:]
        eps = standard_normal(rng, (batch, n), xp, dtype)
        sigma = xp.exp(0.5 * s) if hyper.encoder_output == "logvar" else xp.exp(s)
        z = mu + sigma * eps

        # l. 12-13, in order or side by side (refimpl/threads.py)
        x1, x2 = state.passes(z * nu1, z * nu2, hyper.e1_batchnorm, _decoder_e1_pass)
        e1 = per_image_error(x1, x, hyper.error)
        e2 = per_image_error(x2, x, hyper.error)
        E1, E2 = e1.mean().astype(f64), e2.mean().astype(f64)

        c = E2 - hyper.tau  # l. 14
        c_ma = hyper.alpha * self.c_ma + (1 - hyper.alpha) * c  # l. 17-18 (i > 0: applies() needs a C_ma)
        c_prime = c_ma  # l. 20
        lam = state.lam.astype(f64)
        lam_eff = effective_lambda(lam, hyper)  # l. 21

        # l. 22-25: the L0 term times the mask of l. 23
        kl = kl_elementwise(mu, s, hyper.encoder_output)
        kl_per_image, open_count = gated_kl(kl, nu2, hyper.kl_normalizer)
        kl_term = kl_per_image.mean().astype(f64)
        hit_fraction = (e2 <= hyper.tau).mean().astype(f64)
        l0_weight = hit_fraction if hyper.constraint == "per_image" else (c <= 0).astype(f64)  # l. 23, (p)
        l0_added = l0_weight > 0
        gate_prob = sigmoid(hyper.k * gamma)
        gates_l1 = gate_prob.sum().astype(f64)
        loss = lam_eff * c_prime + kl_term + xp.where(l0_added, l0_weight * gates_l1, 0.0)  # l. 22, 24

        # l. 27
        dx2 = _as(lam_eff / batch, dtype) * per_image_error_grad(x2, x, e2, hyper.error)
        dz = model.decoder.backward(dx2) * nu2
        dkl = nu2 / (open_count * batch)
        model.encoder.backward(encoder_output_gradient(dz, dkl, mu, sigma, eps, hyper.encoder_output))
        dgamma = model.grads["gamma"]
        dgamma += _as(l0_weight, dtype) * (hyper.k * gate_prob * (1 - gate_prob))  # l. 24's gradient, masked
        state.lam_grad[...] = lambda_gradient(lam, c_prime, hyper)

        # l. 28-30
        f1, f2 = estimator_objectives(_as(lam_eff, dtype), e1, e2, kl, nu1, kl_per_image, hyper)
        dgamma += estimator_term(hyper.estimator, u, nu1, nu2, gamma, f1, f2, hyper.k)

        update_parameters(state)  # l. 31: gamma has a gradient on every sampling step
        self.c_ma = c_ma
        state.step += 1
        return {"E1": E1, "E2": E2, "C": c, "C_ma": c_ma, "lambda_eff": lam_eff,
                "lambda_raw": state.lam.astype(f64), "loss": loss, "kl": kl_term, "gates_l1": gates_l1,
                "open_gates": model.inference_gates().sum().astype(f64),
                "hit_fraction": hit_fraction, "l0_added": l0_added.astype(f64)}

    def host_log(self, log: dict) -> dict:
        """The reference's log dict from :meth:`__call__`'s device scalars (one transfer), and C_ma and
        the constraint's state written back into the :class:`TrainState`."""
        values = to_host(self.xp.stack([log[k] for k in LOG_KEYS])).tolist()
        out = dict(zip(LOG_KEYS, values))
        out["open_gates"], out["l0_added"] = int(out["open_gates"]), bool(out["l0_added"])
        state = self.state
        state.c_ma = out["C_ma"]
        state.last_constraint_met = out["l0_added"]  # C <= 0, or any image's (p)
        return {"step": state.step, **out, "hit": state.hit}
