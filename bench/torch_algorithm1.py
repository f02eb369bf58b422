"""The paper's gated VAE and Algorithm 1 in plain PyTorch (torch.nn modules and autograd).

This is the worked example: an independent transcription of De Boom et al., "Dynamic
Narrowing of VAE Bottlenecks Using GECO and L0 Regularization" (Sections 2-4,
Algorithm 1), written from the paper, with the same architecture, parameter names and
interpretation switches as refimpl (``refimpl/model.py``, ``refimpl/algorithm1.py``,
``refimpl/INTERPRETATIONS.md``). refimpl writes every gradient by hand; here autograd
does it, StopGradient is ``.detach()``, and ``torch.optim.Adam`` (with ``maximize``
for lambda) takes the step. The two agree to ~1e-12 in float64
(``tests/test_torch_crosscheck.py``). The model and Algorithm 1 use torch only; refimpl
is imported only to read and write trace files.

Use it on its own::

    import torch, torch_algorithm1 as ta
    arch = ta.paper_architecture(channels=1)    # Section 4's 64x64 network (dict; refimpl's Architecture works too)
    model = ta.GatedVAE(arch, n_latent=10)
    algo = ta.Algorithm1(model, {"tau": 30.0})  # Section 4 defaults for the rest (ta.DEFAULTS)
    g = torch.Generator().manual_seed(0)
    for x in batches:                             # x: (B, C, H, W) in [0, 1]
        log = algo.step(x, generator=g)           # one pass of l. 3-31
        print(log["scalars"]["E2"], log["scalars"]["lambda_eff"])

Replay a golden trace (``refimpl trace``, see refimpl/trace.py) and compare::

    refimpl trace --image-size 16 --latent 4 --batch-size 8 --steps 3 --force-hit --out ref.npz
    .venv/bin/python bench/torch_algorithm1.py ref.npz --out torch.npz
    refimpl compare ref.npz torch.npz        # exit status 0: every tensor agrees

The replay reads the trace's manifest (architecture, Hyper, initial GECO and Adam
state), loads the parameters and BatchNorm statistics recorded before step 0, then
runs each step on the recorded inputs x, eps and u, and writes the same keys.
``--flip-arm-sign`` plants a bug (the ARM term's sign) to see ``compare`` find it.

BatchNorm: torch's ``momentum`` is the weight of the new batch, the paper's (Keras)
"momentum 0.8" the weight of the old running value, so torch momentum = 1 - 0.8. torch
blends the *unbiased* batch variance into ``running_var``; refimpl (like Keras) the
biased one by default (``Architecture.bn_running_var``). :class:`BatchNorm` lets torch
do its update and then fixes ``running_var`` up to the biased convention when asked.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

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


def as_config(obj, defaults=None) -> SimpleNamespace:
    """A namespace from a dict, a dataclass (refimpl's Architecture or Hyper) or a namespace."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    elif not isinstance(obj, dict):
        obj = vars(obj)
    return SimpleNamespace(**{**(defaults or {}), **obj})


# ----------------------------------------------------------------------------------------
# The model (Section 4)


class BatchNorm(nn.BatchNorm2d):
    """nn.BatchNorm2d with refimpl's two conventions on top.

    ``biased_running_var``: running_var blends in the biased batch variance (Keras)
    instead of torch's unbiased one. ``update_running = False``: a training-mode pass
    that normalises with the batch statistics and leaves the running ones alone (the
    E1 decoder pass, interpretation (h)).
    """

    def __init__(self, channels: int, keras_momentum: float, eps: float, running_var: str = "biased"):
        super().__init__(channels, eps=eps, momentum=1.0 - keras_momentum)
        self.biased_running_var = running_var == "biased"
        self.update_running = True

    def forward(self, x):
        if self.training and not self.update_running:
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        old_var = self.running_var.clone() if self.training and self.biased_running_var else None
        y = super().forward(x)
        if old_var is not None:  # torch blended in var * m / (m - 1); blend in var instead
            with torch.no_grad():
                var = x.var(dim=(0, 2, 3), unbiased=False)
                # a new tensor, not copy_(): autograd saved the one torch just updated
                self.running_var = (1.0 - self.momentum) * old_var + self.momentum * var
        return y


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


def build_encoder(arch, n: int) -> nn.Sequential:
    """x: (N, C, H, W) -> (N, 2n): [conv -> leaky ReLU -> BatchNorm] per conv, flatten, fc1, leaky ReLU, fc2."""
    layers, in_ch = OrderedDict(), arch.image_shape[0]
    for i, spec in enumerate(_specs(arch)[0], start=1):
        layers[f"conv{i}"] = nn.Conv2d(in_ch, spec.channels, spec.kernel, spec.stride, spec.padding)
        layers[f"act{i}"] = nn.LeakyReLU(arch.leaky_slope)
        layers[f"bn{i}"] = BatchNorm(spec.channels, arch.bn_momentum, arch.bn_eps, arch.bn_running_var)
        in_ch = spec.channels
    layers["flatten"] = nn.Flatten()
    layers["fc1"] = nn.Linear(math.prod(feature_shape(arch)), arch.hidden)
    layers["act_fc1"] = nn.LeakyReLU(arch.leaky_slope)
    layers["fc2"] = nn.Linear(arch.hidden, 2 * n)
    return nn.Sequential(layers)


def build_decoder(arch, n: int) -> nn.Sequential:
    """z: (N, n) -> x': (N, C, H, W): fc1, fc2, reshape, then [BatchNorm -> x2 nearest upsample -> conv] blocks."""
    feature = feature_shape(arch)
    layers = OrderedDict()
    layers["fc1"] = nn.Linear(n, arch.hidden)
    layers["act_fc1"] = nn.LeakyReLU(arch.leaky_slope)
    layers["fc2"] = nn.Linear(arch.hidden, math.prod(feature))
    layers["act_fc2"] = nn.LeakyReLU(arch.leaky_slope)
    layers["reshape"] = nn.Unflatten(1, feature)
    specs, in_ch = _specs(arch)[1], feature[0]
    for i, spec in enumerate(specs, start=1):
        layers[f"bn{i}"] = BatchNorm(in_ch, arch.bn_momentum, arch.bn_eps, arch.bn_running_var)
        layers[f"up{i}"] = nn.Upsample(scale_factor=2, mode="nearest")
        layers[f"conv{i}"] = nn.Conv2d(in_ch, spec.channels, spec.kernel, spec.stride, spec.padding)
        layers[f"act{i}"] = nn.Sigmoid() if i == len(specs) else nn.LeakyReLU(arch.leaky_slope)
        in_ch = spec.channels
    return nn.Sequential(layers)


ARCH_DEFAULTS = {"hidden": 128, "leaky_slope": 0.02, "bn_momentum": 0.8, "bn_eps": 1e-3, "bn_running_var": "biased"}


def paper_architecture(channels: int = 1) -> dict:
    """Section 4's network for 64x64 images with ``channels`` colour channels (refimpl's widths and paddings).

    Encoder: convs 4x4/2 then three 3x3/2 (32, 32, 64, 64 channels, padding 1) down to 4x4;
    decoder: four blocks of x2 upsample + 3x3/1 conv (64, 32, 32, C channels).
    """
    def conv(c, k, s, p):
        return {"channels": c, "kernel": k, "stride": s, "padding": p}

    return {"image_shape": (channels, 64, 64),
            "encoder_convs": [conv(32, 4, 2, 1), conv(32, 3, 2, 1), conv(64, 3, 2, 1), conv(64, 3, 2, 1)],
            "decoder_convs": [conv(64, 3, 1, 1), conv(32, 3, 1, 1), conv(32, 3, 1, 1), conv(channels, 3, 1, 1)],
            **ARCH_DEFAULTS}


class GatedVAE(nn.Module):
    """Encoder, decoder and the gate logits ``gamma`` (n,); state_dict names as refimpl's GatedVAE."""

    def __init__(self, arch, n_latent: int, gamma_init: float = 0.42, dtype=torch.float32):
        super().__init__()
        self.arch = as_config(arch, ARCH_DEFAULTS)
        self.n_latent = int(n_latent)
        self.gamma = nn.Parameter(torch.full((self.n_latent,), float(gamma_init)))
        self.encoder = build_encoder(self.arch, self.n_latent)
        self.decoder = build_decoder(self.arch, self.n_latent)
        self.to(dtype)

    def batchnorms(self):
        return [m for m in self.modules() if isinstance(m, BatchNorm)]

    def load_arrays(self, state: dict) -> None:
        """Copy parameters and buffers (name -> array, e.g. refimpl's ``state_dict()``) into this model."""
        own = {k: v for k, v in self.state_dict().items() if not k.endswith("num_batches_tracked")}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"state mismatch: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, target in own.items():
                target.copy_(torch.as_tensor(state[name], dtype=target.dtype))


# ----------------------------------------------------------------------------------------
# Algorithm 1


class ClampLambda(torch.autograd.Function):
    """l. 21's clamp of softplus(lambda)^2 to [lambda_min, lambda_max], with interpretation (c) for its gradient.

    Inside the range the gradient passes. Outside, "zero" blocks it (a plain clamp);
    "outward" (Sonnet's GECO) blocks it only if the optimizer would push lambda further
    out: d raw / d lambda = 2 softplus(lambda) sigmoid(lambda) > 0, so lambda moves up
    iff the upstream gradient is > 0 under ascent (< 0 under descent).
    """

    @staticmethod
    def forward(ctx, raw, lo: float, hi: float, rule: str, ascent: bool):
        ctx.save_for_backward(raw)
        ctx.lo, ctx.hi, ctx.rule, ctx.ascent = lo, hi, rule, ascent
        return raw.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (raw,) = ctx.saved_tensors
        r, g = raw.item(), grad.item()
        if ctx.lo <= r <= ctx.hi:
            return grad, None, None, None, None
        if ctx.rule == "zero":
            return torch.zeros_like(grad), None, None, None, None
        moves_up = g > 0 if ctx.ascent else g < 0
        pushes_out = (r > ctx.hi and moves_up) or (r < ctx.lo and not moves_up)
        return (torch.zeros_like(grad) if pushes_out else grad), None, None, None, None


def per_image_error(x_rec, x, kind: str):
    """l. 12-13, interpretation (a): summed squared error per image ("sse") or its square root ("l2"). -> (B,)"""
    sse = (x_rec - x).pow(2).flatten(1).sum(dim=1)
    return sse if kind == "sse" else sse.sqrt()


def kl_elementwise(mu, s, encoder_output: str):
    """Eq. 15 with s = log sigma^2 ("logvar") or s = log sigma ("logstd"), interpretation (e). -> (B, n)"""
    log_var = s if encoder_output == "logvar" else 2.0 * s
    return -0.5 * (1.0 + log_var - log_var.exp() - mu.pow(2))


def initial_lambda(h) -> float:
    """Raw lambda at the start, interpretation (d): lambda = lambda_init, or lambda' = lambda_init."""
    if h.lambda_init_on == "raw":
        return float(h.lambda_init)
    return math.log(math.expm1(math.sqrt(h.lambda_init)))  # softplus(lambda)^2 = lambda_init


def _host(t):
    return t.detach().cpu().numpy().copy()


class Algorithm1:
    """Algorithm 1's state (hit, C_ma, lambda, Adam) around a :class:`GatedVAE`; :meth:`step` is l. 3-31.

    Batched reading (interpretation (i)): one u per batch (or per image with
    gate_samples="per_example"), E1, E2 and the KL term are batch means and C <= 0 is
    tested on the batch-mean C.
    """

    def __init__(self, model: GatedVAE, hyper, lam: float | None = None):
        self.model, self.h = model, as_config(hyper, DEFAULTS)
        if not hasattr(self.h, "tau"):
            raise ValueError("hyper needs 'tau', the GECO tolerance")
        dtype = model.gamma.dtype
        with torch.no_grad():
            model.gamma.fill_(self.h.gamma_init)
        self.lam = nn.Parameter(torch.tensor(initial_lambda(self.h) if lam is None else lam, dtype=dtype))
        self.hit = False  # l. 1
        self.c_ma = None  # set by l. 16 on the first step
        self.last_constraint_met = False  # for hit="per_step"
        # l. 31: Adam on theta, phi, gamma and lambda; lambda is maximised (interpretation (b))
        self.optimizer = torch.optim.Adam(
            [{"params": list(model.parameters())},
             {"params": [self.lam], "maximize": self.h.lambda_update == "ascent"}],
            lr=self.h.lr, betas=tuple(self.h.betas), eps=self.h.adam_eps)

    def named_parameters(self) -> dict:
        """Every parameter Adam updates, refimpl's names: the model's, then ``lambda``."""
        return {**dict(self.model.named_parameters()), "lambda": self.lam}

    def load_adam_state(self, t: int, m: dict, v: dict) -> None:
        """Adam's step count and moments (name -> array), e.g. from a trace's ``init/``."""
        if t == 0:
            return
        for name, p in self.named_parameters().items():
            self.optimizer.state[p] = {"step": torch.tensor(float(t)),
                                       "exp_avg": torch.as_tensor(m[name], dtype=p.dtype).clone(),
                                       "exp_avg_sq": torch.as_tensor(v[name], dtype=p.dtype).clone()}

    def _decoder_e1(self, z_gated):
        """l. 12's decoder pass, never differentiated, with BatchNorm per interpretation (h)."""
        decoder, mode = self.model.decoder, self.h.e1_batchnorm
        with torch.no_grad():
            if mode == "running":
                decoder.eval()
                try:
                    return decoder(z_gated)
                finally:
                    decoder.train()
            for bn in self.model.batchnorms():
                bn.update_running = mode == "batch_update"
            try:
                return decoder(z_gated)
            finally:
                for bn in self.model.batchnorms():
                    bn.update_running = True

    def step(self, x, eps=None, u=None, generator=None, arm_sign: float = 1.0) -> dict:
        """One pass of Algorithm 1's loop body on x: (B, C, H, W).

        eps (B, n) and u (S, n) are drawn from ``generator`` unless given (a replay gives
        the recorded ones). ``arm_sign=-1`` plants a bug, for testing comparisons.
        Returns host copies of inputs, intermediates, gradients and scalars, in the
        layout of refimpl's ``train_step(record=...)``.
        """
        h, model = self.h, self.model
        dtype, n, batch = model.gamma.dtype, model.n_latent, x.shape[0]
        x = torch.as_tensor(x, dtype=dtype)
        gamma = model.gamma
        samples = 1 if h.gate_samples == "batch" else batch
        sampling = self.hit if h.hit == "sticky" else self.last_constraint_met

        # l. 3-10: the gates
        with torch.no_grad():
            if sampling:  # l. 3
                if u is None:
                    u = torch.rand((samples, n), generator=generator, dtype=dtype)  # l. 4
                u = torch.as_tensor(u, dtype=dtype)
                nu1 = (u > torch.sigmoid(-h.k * gamma)).to(dtype)  # l. 5
                nu2 = (u < torch.sigmoid(h.k * gamma)).to(dtype)  # l. 6
            else:
                u = None
                nu1 = torch.ones((samples, n), dtype=dtype)  # l. 8
                nu2 = torch.ones((samples, n), dtype=dtype)  # l. 9

        # l. 11: z ~ f_enc(x) with the reparameterisation trick (Eq. 6)
        encoded = model.encoder(x)
        mu, s = encoded[:, :n], encoded[:, n:]
        if eps is None:
            eps = torch.randn((batch, n), generator=generator, dtype=dtype)
        eps = torch.as_tensor(eps, dtype=dtype)
        sigma = torch.exp(0.5 * s) if h.encoder_output == "logvar" else torch.exp(s)
        z = mu + sigma * eps

        # l. 12: E1 (only for the ARM term; without sampling nu1 = nu2 = 1 and E1 = E2, so the
        # pass is skipped unless it must update BatchNorm's statistics)
        run_e1 = sampling or h.e1_batchnorm == "batch_update"
        if run_e1:
            x1 = self._decoder_e1(z.detach() * nu1)
            e1 = per_image_error(x1, x, h.error)
        # l. 13: E2, differentiated
        x2 = model.decoder(z * nu2)
        e2 = per_image_error(x2, x, h.error)
        E2 = e2.mean()
        if not run_e1:
            x1, e1 = x2.detach(), e2.detach()
        E1 = e1.mean()

        C = E2 - h.tau  # l. 14
        C_ma = C if self.c_ma is None else h.alpha * self.c_ma + (1 - h.alpha) * C  # l. 15-19
        C_prime = C + (C_ma - C).detach()  # l. 20: C' = C + StopGradient(C_ma - C)
        raw = F.softplus(self.lam) ** 2  # (torch's softplus is the identity above 20: off by < 1e-8 there)
        lam_eff = ClampLambda.apply(raw, h.lambda_min, h.lambda_max, h.lambda_clamp_grad,
                                    h.lambda_update == "ascent")  # l. 21

        # l. 22: L = lambda' C' + ||KL_elem * nu2||_1 / ||nu2||_0 (batch mean; (f): 0/0 -> 0)
        kl = kl_elementwise(mu, s, h.encoder_output)
        if h.kl_normalizer == "open":
            norm = nu2.sum(dim=1, keepdim=True).clamp(min=1)
        else:
            norm = torch.full((samples, 1), float(n), dtype=dtype)
        kl_per_image = (kl * nu2 / norm).sum(dim=1)
        kl_term = kl_per_image.mean()
        loss = lam_eff * C_prime + kl_term
        gates_l1 = torch.sigmoid(h.k * gamma).sum()
        l0_added = C.item() <= 0  # l. 23
        if l0_added:
            loss = loss + gates_l1  # l. 24
            self.hit = True  # l. 25

        # l. 27: backpropagation
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = self.named_parameters()
        for p in params.values():  # parameters outside the graph (gamma without the L0 term) get 0, as in refimpl
            if p.grad is None:
                p.grad = torch.zeros_like(p)

        # l. 28-30: the ARM term, lambda' k (F(nu1) - F(nu2)) (u - 1/2), F per interpretation (k)
        arm = None
        if sampling:
            with torch.no_grad():
                lam_value = lam_eff.detach()
                f1, f2 = lam_value * e1, lam_value * e2.detach()
                if h.arm_objective == "loss":
                    norm1 = nu1.sum(dim=1, keepdim=True).clamp(min=1) if h.kl_normalizer == "open" else norm
                    f1 = f1 + (kl.detach() * nu1 / norm1).sum(dim=1)
                    f2 = f2 + kl_per_image.detach()
                arm = arm_sign * h.k * ((f1 - f2)[:, None] * (u - 0.5)).mean(dim=0)
                gamma.grad += arm
        grads = {name: _host(p.grad) for name, p in params.items()}

        self.optimizer.step()  # l. 31
        self.c_ma = C_ma.item()
        self.last_constraint_met = l0_added

        return {
            "x": _host(x), "u": None if u is None else _host(u), "nu1": _host(nu1), "nu2": _host(nu2),
            "eps": _host(eps), "mu": _host(mu), "s": _host(s), "z": _host(z), "x1": _host(x1), "x2": _host(x2),
            "e1": _host(e1), "e2": _host(e2), "kl_elem": _host(kl), "arm": None if arm is None else _host(arm),
            "grads": grads,
            "scalars": {"E1": E1.item(), "E2": E2.item(), "C": C.item(), "C_ma": C_ma.item(),
                        "C_prime": C_prime.item(), "lambda_eff": lam_eff.item(), "kl": kl_term.item(),
                        "gates_l1": gates_l1.item(), "loss": loss.item(), "l0_added": l0_added, "hit": self.hit},
        }


# ----------------------------------------------------------------------------------------
# Replaying a golden trace (refimpl/trace.py)


def _torch_dtype(name: str):
    return {"float32": torch.float32, "float64": torch.float64}[name]


def from_trace(trace) -> Algorithm1:
    """Model and Algorithm 1 in the state a trace starts from: weights, statistics, lambda, GECO and Adam state."""
    m = trace.manifest
    first = trace.step(0)
    dtype = _torch_dtype(str(first["input/x"].dtype))
    model = GatedVAE(m["architecture"], m["n_latent"], dtype=dtype)
    algo = Algorithm1(model, dict(m["hyper"]))
    params = {k[len("param/"):]: v for k, v in first.items() if k.startswith("param/")}
    buffers = {k[len("buffer/"):]: v for k, v in first.items() if k.startswith("buffer/")}
    with torch.no_grad():
        algo.lam.copy_(torch.as_tensor(params.pop("lambda"), dtype=dtype))
    model.load_arrays({**params, **buffers})  # after Algorithm1(), which sets gamma to gamma_init
    init = m["initial_state"]
    algo.hit, algo.c_ma, algo.last_constraint_met = bool(init["hit"]), init["c_ma"], bool(init["last_constraint_met"])
    algo.load_adam_state(int(init["adam_t"]), trace.initial("adam_m"), trace.initial("adam_v"))
    return algo


def _state(algo: Algorithm1):
    from refimpl.trace import snapshot

    buffers = {k: v for k, v in algo.model.state_dict().items() if not k.endswith("num_batches_tracked")
               and k not in dict(algo.model.named_parameters())}
    return snapshot({k: _host(p) for k, p in algo.named_parameters().items()}, {k: _host(b) for k, b in buffers.items()},
                    algo.hit, algo.c_ma, algo.last_constraint_met)


def replay(trace_path, out_path, *, steps: int | None = None, arm_sign: float = 1.0) -> dict:
    """Replay the trace at ``trace_path`` in torch on its recorded inputs; write a trace to ``out_path``.

    Returns the manifest written. A step at which the replay samples gates but the trace
    holds no u (the two disagree on ``hit``) raises a ValueError naming the step.
    """
    from refimpl.trace import build_manifest, read_trace, save_trace, step_entries, step_prefix

    trace = read_trace(trace_path)
    steps = trace.steps if steps is None else min(int(steps), trace.steps)
    algo = from_trace(trace)
    arrays = {f"init/adam_{which}/{k}": v for which in ("m", "v") for k, v in trace.initial(f"adam_{which}").items()}
    for k in range(steps):
        recorded = trace.step(k)
        sampling = algo.hit if algo.h.hit == "sticky" else algo.last_constraint_met
        if sampling and "input/u" not in recorded:
            raise ValueError(f"{trace.path}: the torch replay samples gates at step {k}, but the trace has no "
                             f"{step_prefix(k)}/input/u (the two disagree on hit)")
        before = _state(algo)
        record = algo.step(torch.as_tensor(recorded["input/x"]), eps=torch.as_tensor(recorded["input/eps"]),
                           u=torch.as_tensor(recorded["input/u"]) if sampling else None, arm_sign=arm_sign)
        arrays.update(step_entries(k, before, record, _state(algo)))
    m = trace.manifest
    manifest = build_manifest(
        arrays, steps=steps, writer=f"bench/torch_algorithm1.py (torch {torch.__version__})",
        architecture=m["architecture"], hyper=m["hyper"], n_latent=m["n_latent"], parameters=m["parameters"],
        buffers=m["buffers"], initial_state=m["initial_state"], seed=m.get("seed"),
        extra={"replay_of": str(trace.path), "arm_sign": arm_sign})
    save_trace(out_path, arrays, manifest)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Replay a refimpl trace in PyTorch and write a trace of the replay.")
    parser.add_argument("trace", help="trace file written by `refimpl trace` (refimpl/trace.py)")
    parser.add_argument("--out", default="torch_trace.npz", help="trace of the replay (default: torch_trace.npz)")
    parser.add_argument("--steps", type=int, default=None, help="replay only the first STEPS steps")
    parser.add_argument("--flip-arm-sign", action="store_true", help="plant a bug: negate the ARM term (l. 29)")
    args = parser.parse_args(argv)
    manifest = replay(args.trace, args.out, steps=args.steps, arm_sign=-1.0 if args.flip_arm_sign else 1.0)
    print(f"replayed {manifest['steps']} steps of {args.trace} in torch {torch.__version__}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # refimpl from this checkout when not installed
    raise SystemExit(main())
