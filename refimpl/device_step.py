"""Algorithm 1's step without reading anything back to the host: the fast path for GPUs.

:func:`refimpl.algorithm1.train_step` is the reference: it computes GECO's scalars (E,
C, C_ma, lambda') on the host in float64 and branches in Python on l. 3 (sample gates?)
and l. 23 (add the L0 term?). On a GPU every such read waits for the device to finish,
five times a step, so the host can never queue the next kernels ahead; and a step
that reads the host cannot be captured as one CUDA graph (issue 13).

:class:`DeviceStep` computes the same step with the same functions of
:mod:`refimpl.algorithm1` (l. 4-6, 11, 12-13, 14-21 and 23 in :func:`~refimpl.algorithm1.geco`,
22 and 24, 27, 28-30, 31), with every scalar a 0-d device array. It differs from
:func:`train_step` only where that reads the host:

- E1, E2, the KL term, the L0 term and the fraction of images within tau are 0-d float64
  arrays (a float32 mean cast to float64, as the host's ``float(...)``), and so are GECO's
  scalars computed from them; where the host multiplies a float32 array by a Python float,
  NumPy first rounds the float to float32, and :func:`~refimpl.algorithm1.in_dtype` does the same;
- l. 21's softplus, logistic and clamp take ``xp.exp``, ``xp.log1p`` and ``xp.where``
  where the host takes ``math.exp``, ``math.log1p`` and ``if`` (:func:`~refimpl.algorithm1.scalar_ops`);
- l. 23's branch is a 0/1 mask: the L0 term's gradient is added times the weight every step
  (adding 0.0 changes nothing, multiplying by 1.0 neither); with ``constraint="per_image"``
  (interpretation (p)) the weight is the fraction of images with e_b <= tau, as the host's;
- l. 3 is not a branch: the fast path applies only where l. 3 is certainly true,
  i.e. with ``hit="sticky"`` (interpretation (g), the default) once hit is set
  (:func:`applies`); every later step samples gates, runs l. 12 and gives gamma a gradient
  (no Adam skip of (n)). Before the first hit, and with ``hit="per_step"``, the caller runs
  :func:`train_step`;
- l. 25 (hit) is already set, and C_ma and the constraint's state come back to the
  :class:`TrainState` in :meth:`DeviceStep.host_log`.

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

from .algorithm1 import (TrainState, backpropagate, decoder_passes, gate_estimator_gradient, gated_kl, geco,
                         kl_elementwise, l0_gradient, lagrangian, reparameterise, sample_gates, update_parameters)
from .backend import to_host
from .layers.activations import sigmoid

# The logged scalars, in the order of :func:`train_step`'s log (step and hit are the host's).
LOG_KEYS = ("E1", "E2", "C", "C_ma", "lambda_eff", "lambda_raw", "loss", "kl", "gates_l1", "open_gates",
            "hit_fraction", "l0_added")


def applies(state: TrainState) -> bool:
    """True when every step from now on samples gates (l. 3 true): hit is sticky and set."""
    return state.hyper.hit == "sticky" and state.hit and state.c_ma is not None


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
        model, hyper, f64 = state.model, state.hyper, "float64"
        model.check_images(x)  # shapes only: no read of x
        gamma = model.params["gamma"]
        model.zero_grad()
        samples = 1 if hyper.gate_samples == "batch" else x.shape[0]

        u, u1, nu1, nu2 = sample_gates(rng, samples, gamma, hyper)  # l. 3-6: l. 3 is true here (applies(state))
        mu, s, sigma, eps, z = reparameterise(model, x, rng, hyper.encoder_output)  # l. 11
        x1, x2, e1, e2 = decoder_passes(state, x, z, nu1, nu2, run_e1=True)  # l. 12-13
        E1, E2 = e1.mean().astype(f64), e2.mean().astype(f64)

        # l. 14-24 on 0-d float64 device arrays; l. 23's branch a mask (l0_weight 0 or, with (p), a fraction)
        kl = kl_elementwise(mu, s, hyper.encoder_output)
        kl_per_image, open_count = gated_kl(kl, nu2, hyper.kl_normalizer)
        kl_term = kl_per_image.mean().astype(f64)
        hit_fraction = (e2 <= hyper.tau).mean().astype(f64)
        g = geco(E2, self.c_ma, state.lam.astype(f64), hit_fraction, hyper)  # l. 14-21, 23
        gates_l1 = sigmoid(hyper.k * gamma).sum().astype(f64)
        loss = lagrangian(g, kl_term, gates_l1)  # l. 22, 24

        backpropagate(model, x, x2, e2, g.lam_eff, nu2, open_count, mu, sigma, eps, hyper)  # l. 27
        dgamma = model.grads["gamma"]
        dgamma += l0_gradient(gamma, g.l0_weight, hyper.k)  # l. 24's gradient, masked (times 0.0 when not added)
        state.lam_grad[...] = g.lam_grad
        dgamma += gate_estimator_gradient(u, nu1, nu2, gamma, g.lam_eff, e1, e2, kl, kl_per_image, hyper)  # l. 28-30

        update_parameters(state)  # l. 31: gamma has a gradient on every sampling step
        self.c_ma = g.c_ma
        state.step += 1
        return {"E1": E1, "E2": E2, "C": g.c, "C_ma": g.c_ma, "lambda_eff": g.lam_eff,
                "lambda_raw": state.lam.astype(f64), "loss": loss, "kl": kl_term, "gates_l1": gates_l1,
                "open_gates": model.inference_gates().sum().astype(f64),
                "hit_fraction": hit_fraction, "l0_added": g.l0_added.astype(f64)}

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
