"""The paper's gated VAE and Algorithm 1 in plain PyTorch (torch.nn modules and autograd).

This is the worked example: an independent transcription of De Boom et al., "Dynamic
Narrowing of VAE Bottlenecks Using GECO and L0 Regularization" (Sections 2-4,
Algorithm 1), written from the paper, with the same architecture, parameter names and
interpretation switches as refimpl (``refimpl/model.py``, ``refimpl/algorithm1.py``,
``refimpl/INTERPRETATIONS.md``). refimpl writes every gradient by hand; here autograd
does it, StopGradient is ``.detach()``, and ``torch.optim.Adam`` (with ``maximize``
for lambda) takes the step. The two agree to ~1e-12 in float64
(``tests/test_crosscheck.py``). The model and Algorithm 1 use torch only; refimpl
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
``--plant NAME`` plants one of the porting bugs of refimpl's catalogue
(``refimpl/porting_bugs.py``; ``--plant list`` prints it) to see ``compare`` find it;
``--flip-arm-sign`` is ``--plant arm-sign``.

Adam's step count (interpretation (n)): torch.optim.Adam skips a parameter whose
``.grad`` is None, so gamma, which is outside the graph until the first hit (no L0 term,
no ARM term), starts counting its steps there: ``adam_steps="per_parameter"``. With
``"global"`` (refimpl's default) gamma is given a zero gradient on such steps, so torch
counts them too, as TF/Keras and optax do.

Gradient estimator of l. 29 (interpretation (o), ``hyper["estimator"]``): L0-ARM as in
Eq. 13 (the default), DisARM on the same antithetic pair, or two-sample REINFORCE with
a leave-one-out baseline, whose E1 pass uses a second, independent sample nu1 = 1[u1 <
sigmoid(k gamma)] (u1 drawn after u); the E2 pass, the loss and the KL term use l. 6's
nu2 = 1[u < sigmoid(k gamma)] under all three.

Readings (p)-(r) of refimpl/INTERPRETATIONS.md: ``constraint="per_image"`` adds the L0
term times the fraction of images with e_b <= tau (hit when any image meets it);
``lambda_lr`` puts lambda in an Adam parameter group with its own ``lr``, and
``lambda_optimizer="sgd"`` steps it with ``torch.optim.SGD`` (plain gradient ascent, with
``maximize``) instead of Adam; ``encoder_output="literal"`` samples with sigma = exp(s) and
applies Eq. 15's "log sigma - sigma" to s as printed.

BatchNorm: torch's ``momentum`` is the weight of the new batch, the paper's (Keras)
"momentum 0.8" the weight of the old running value, so torch momentum = 1 - 0.8. torch
blends the *unbiased* batch variance into ``running_var``; refimpl (like Keras) the
biased one by default (``Architecture.bn_running_var``). :class:`BatchNorm` lets torch
do its update and then fixes ``running_var`` up to the biased convention when asked.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/transcription.py, when imported from elsewhere
# Framework-free parts shared with bench/jax_algorithm1.py: Section 4's defaults and refimpl's interpretations
# (DEFAULTS), architecture helpers, initial lambda (d), the plant catalogue and the trace replay loop.
from transcription import (ARCH_DEFAULTS, DEFAULTS, as_config, check_plant, conv_specs, feature_shape,  # noqa: E402
                           initial_lambda, lambda_rate, paper_architecture, plant_catalogue)
import transcription  # noqa: E402

__all__ = ["ARCH_DEFAULTS", "DEFAULTS", "Algorithm1", "GatedVAE", "as_config", "feature_shape", "paper_architecture",
           "plant_catalogue", "replay"]


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


def build_encoder(arch, n: int) -> nn.Sequential:
    """x: (N, C, H, W) -> (N, 2n): [conv -> leaky ReLU -> BatchNorm] per conv, flatten, fc1, leaky ReLU, fc2."""
    layers, in_ch = OrderedDict(), arch.image_shape[0]
    for i, spec in enumerate(conv_specs(arch)[0], start=1):
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
    specs, in_ch = conv_specs(arch)[1], feature[0]
    for i, spec in enumerate(specs, start=1):
        layers[f"bn{i}"] = BatchNorm(in_ch, arch.bn_momentum, arch.bn_eps, arch.bn_running_var)
        layers[f"up{i}"] = nn.Upsample(scale_factor=2, mode="nearest")
        layers[f"conv{i}"] = nn.Conv2d(in_ch, spec.channels, spec.kernel, spec.stride, spec.padding)
        layers[f"act{i}"] = nn.Sigmoid() if i == len(specs) else nn.LeakyReLU(arch.leaky_slope)
        in_ch = spec.channels
    return nn.Sequential(layers)


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
    """Eq. 15 with s = log sigma^2 ("logvar") or s = log sigma ("logstd"), interpretation (e); or, with
    "literal" (r), Eq. 15's "log sigma - sigma" as printed on Eq. 3's s = log sigma. -> (B, n)"""
    if encoder_output == "literal":
        return -0.5 * (1.0 + s - s.exp() - mu.pow(2))
    log_var = s if encoder_output == "logvar" else 2.0 * s
    return -0.5 * (1.0 + log_var - log_var.exp() - mu.pow(2))


def _host(t):
    return t.detach().cpu().numpy().copy()


class Algorithm1:
    """Algorithm 1's state (hit, C_ma, lambda, Adam) around a :class:`GatedVAE`; :meth:`step` is l. 3-31.

    Batched reading (interpretation (i)): one u per batch (or per image with
    gate_samples="per_example"), E1, E2 and the KL term are batch means and C <= 0 is
    tested on the batch-mean C.

    ``plant``: None, or the name of a porting bug from refimpl's catalogue
    (``refimpl/porting_bugs.py``, ``--plant list``) to plant in this transcription; each
    is one ``if self.plant == ...`` hook below.
    """

    def __init__(self, model: GatedVAE, hyper, lam: float | None = None, plant: str | None = None):
        self.model, self.h = model, as_config(hyper, DEFAULTS)
        if not hasattr(self.h, "tau"):
            raise ValueError("hyper needs 'tau', the GECO tolerance")
        self.plant = check_plant(plant)
        dtype = model.gamma.dtype
        with torch.no_grad():
            model.gamma.fill_(self.h.gamma_init)
        if lam is None:
            lam = initial_lambda(self.h)
            if self.plant == "lambda-init-wrong-side":
                lam = initial_lambda(self.h, flip=True)
        self.lam = nn.Parameter(torch.tensor(lam, dtype=dtype))
        self.hit = False  # l. 1
        self.c_ma = None  # set by l. 16 on the first step
        self.last_constraint_met = False  # for hit="per_step"
        # (n): "per_parameter" is torch's own behaviour (a parameter without .grad is skipped, so
        # gamma's step count starts at its first gradient); "global" gives it a zero gradient instead.
        self.adam_steps = self.h.adam_steps
        if self.plant == "adam-steps":
            self.adam_steps = {"global": "per_parameter", "per_parameter": "global"}[self.adam_steps]
        # l. 31: Adam on theta, phi, gamma and lambda; lambda is maximised (interpretation (b)), at its own
        # rate (q); with lambda_optimizer="sgd" lambda moves by plain gradient ascent (torch.optim.SGD) instead
        maximize = self.h.lambda_update == "ascent"
        if self.plant == "lambda-minimised":
            maximize = not maximize
        groups = [{"params": list(model.parameters())}]
        self.lambda_sgd = None
        if self.h.lambda_optimizer == "sgd":
            self.lambda_sgd = torch.optim.SGD([self.lam], lr=lambda_rate(self.h), maximize=maximize)
        else:
            groups.append({"params": [self.lam], "maximize": maximize, "lr": lambda_rate(self.h)})
        self.optimizer = torch.optim.Adam(groups, lr=self.h.lr, betas=tuple(self.h.betas), eps=self.h.adam_eps)
        if self.plant == "leaky-slope":
            for m in model.modules():
                if isinstance(m, nn.LeakyReLU):
                    m.negative_slope = 0.01
        if self.plant == "bn-unbiased-var":
            for bn in model.batchnorms():
                bn.biased_running_var = False
        if self.plant == "bn-torch-momentum":
            for bn in model.batchnorms():
                bn.momentum = model.arch.bn_momentum

    def named_parameters(self) -> dict:
        """Every parameter Adam updates, refimpl's names: the model's, then ``lambda``."""
        return {**dict(self.model.named_parameters()), "lambda": self.lam}

    def load_adam_state(self, t: int, m: dict, v: dict, steps: dict | None = None) -> None:
        """Adam's moments (name -> array) and step counts, e.g. from a trace's ``init/`` and manifest.

        ``steps``: each parameter's own count (refimpl's Adam state ``steps``); default ``t`` for all.
        A parameter whose count is 0 has never been updated and gets no state, as in torch. Under
        lambda_optimizer="sgd" (q) lambda is not Adam's, and its moments (refimpl keeps them, unused) are not read.
        """
        adam_params = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        for name, p in self.named_parameters().items():
            count = t if steps is None else int(steps[name])
            if count == 0 or id(p) not in adam_params:
                continue
            self.optimizer.state[p] = {"step": torch.tensor(float(count)),
                                       "exp_avg": torch.as_tensor(m[name], dtype=p.dtype).clone(),
                                       "exp_avg_sq": torch.as_tensor(v[name], dtype=p.dtype).clone()}

    def _decoder_e1(self, z_gated):
        """l. 12's decoder pass, never differentiated, with BatchNorm per interpretation (h)."""
        decoder, mode = self.model.decoder, self.h.e1_batchnorm
        if self.plant == "e1-eval-mode":
            mode = "running"
        if self.plant == "e1-updates-bn":
            mode = "batch_update"
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

    def samples_gates(self) -> bool:
        """l. 3: hit, or the previous step's C <= 0 with hit="per_step" (interpretation (g))."""
        return self.hit if self.h.hit == "sticky" else self.last_constraint_met

    def step(self, x, eps=None, u=None, generator=None, u1=None) -> dict:
        """One pass of Algorithm 1's loop body on x: (B, C, H, W).

        eps (B, n), u (S, n) and, with estimator="reinforce_loo", u1 (S, n) are drawn from
        ``generator`` unless given (a replay gives the recorded ones), in the order u, u1,
        eps. Returns host copies of inputs, intermediates, gradients and scalars, in the
        layout of refimpl's ``train_step(record=...)``.
        """
        h, model = self.h, self.model
        dtype, n, batch = model.gamma.dtype, model.n_latent, x.shape[0]
        x = torch.as_tensor(x, dtype=dtype)
        gamma = model.gamma
        samples = 1 if h.gate_samples == "batch" else batch
        sampling = self.samples_gates()
        loo = h.estimator == "reinforce_loo"  # (o): two independent gate samples instead of an antithetic pair

        # l. 3-10: the gates
        with torch.no_grad():
            if sampling:  # l. 3
                if u is None:
                    u = torch.rand((samples, n), generator=generator, dtype=dtype)  # l. 4
                u = torch.as_tensor(u, dtype=dtype)
                if loo:  # the second sample's uniforms, drawn after u
                    if u1 is None:
                        u1 = torch.rand((samples, n), generator=generator, dtype=dtype)
                    u1 = torch.as_tensor(u1, dtype=dtype)
                if self.plant == "u-per-image" and u.shape[0] == 1:
                    more = torch.rand((batch - 1, n), generator=torch.Generator().manual_seed(0), dtype=dtype)
                    u = torch.cat([u, more])
                if loo and self.plant != "loo-antithetic":
                    nu1 = (u1 < torch.sigmoid(h.k * gamma)).to(dtype)  # (o): an independent sample for the E1 pass
                else:
                    nu1 = (u > torch.sigmoid(-h.k * gamma)).to(dtype)  # l. 5
                nu2 = (u < torch.sigmoid(h.k * gamma)).to(dtype)  # l. 6: the E2 pass and the KL term, every estimator
                if self.plant == "nu-swapped":
                    nu1, nu2 = nu2, nu1
            else:
                u = u1 = None
                nu1 = torch.ones((samples, n), dtype=dtype)  # l. 8
                nu2 = torch.ones((samples, n), dtype=dtype)  # l. 9

        # l. 11: z ~ f_enc(x) with the reparameterisation trick (Eq. 6)
        encoded = model.encoder(x)
        mu, s = encoded[:, :n], encoded[:, n:]
        if eps is None:
            eps = torch.randn((batch, n), generator=generator, dtype=dtype)
        eps = torch.as_tensor(eps, dtype=dtype)
        sigma = torch.exp(0.5 * s) if h.encoder_output == "logvar" else torch.exp(s)
        if self.plant == "exp-s":
            sigma = torch.exp(s)
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
        if self.plant == "batch-sum":
            E1, E2 = e1.sum(), e2.sum()

        C = E2 - h.tau  # l. 14
        C_ma = C if self.c_ma is None else h.alpha * self.c_ma + (1 - h.alpha) * C  # l. 15-19
        if self.plant == "c-ma-from-zero" and self.c_ma is None:
            C_ma = (1 - h.alpha) * C
        C_prime = C + (C_ma - C).detach()  # l. 20: C' = C + StopGradient(C_ma - C)
        if self.plant == "loss-uses-c":
            C_prime = C
        if self.plant == "detach-wrong-side":
            C_prime = C.detach() + (C_ma - C)
        if self.plant == "no-stop-gradient":
            C_prime = C_ma
        raw = F.softplus(self.lam) ** 2  # (torch's softplus is the identity above 20: off by < 1e-8 there)
        lo, hi = h.lambda_min, h.lambda_max
        if self.plant == "clamp-limits-swapped":
            lo, hi = hi, lo
        lam_eff = ClampLambda.apply(raw, lo, hi, h.lambda_clamp_grad, h.lambda_update == "ascent")  # l. 21
        if self.plant == "no-lambda-clamp":
            lam_eff = raw

        # l. 22: L = lambda' C' + ||KL_elem * nu2||_1 / ||nu2||_0 (batch mean; (f): 0/0 -> 0)
        kl = kl_elementwise(mu, s, h.encoder_output)
        if self.plant == "kl-without-mu2":
            kl = kl - 0.5 * mu.pow(2)
        kl_mask = nu1 if self.plant == "kl-on-nu1" else nu2
        if h.kl_normalizer == "open" and self.plant != "kl-over-n":
            norm = kl_mask.sum(dim=1, keepdim=True).clamp(min=1)
        else:
            norm = torch.full((samples, 1), float(n), dtype=dtype)
        kl_per_image = (kl * kl_mask / norm).sum(dim=1)
        kl_term = kl_per_image.mean()
        loss = lam_eff * C_prime + kl_term
        gates_l1 = torch.sigmoid(h.k * gamma).sum()
        if self.plant == "l0-without-k":
            gates_l1 = torch.sigmoid(gamma).sum()
        l0_added = C.item() <= 0  # l. 23
        if self.plant == "l0-when-violated":
            l0_added = C.item() > 0
        l0_weight = 1.0
        if h.constraint == "per_image":  # (p): C_b = e_b - tau per image; weight: the fraction with C_b <= 0
            l0_weight = (e2.detach() <= h.tau).double().mean().item()
            l0_added = l0_weight > 0
        if l0_added:
            loss = loss + l0_weight * gates_l1  # l. 24
            self.hit = True  # l. 25
        if self.plant == "hit-every-step":
            self.hit = True

        # l. 27: backpropagation
        self.optimizer.zero_grad(set_to_none=True)
        self.lam.grad = None  # Adam's with lambda_optimizer="adam", SGD's with "sgd" (q)
        loss.backward()
        params = self.named_parameters()
        if self.adam_steps == "global":  # (n): a zero gradient where a parameter is outside the graph (gamma
            for p in params.values():  # without the L0 and ARM terms), so Adam counts this step for it too
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

        # l. 28-30: the ARM term, lambda' k (F(nu1) - F(nu2)) (u - 1/2), F per interpretation (k), or another
        # estimator of gamma's gradient from the same two decoder passes (interpretation (o))
        arm = None
        if sampling:
            with torch.no_grad():
                lam_value = lam_eff.detach()
                if self.plant == "arm-without-lambda":
                    lam_value = torch.ones_like(lam_value)
                f1, f2 = lam_value * e1, lam_value * e2.detach()
                if h.arm_objective == "loss":
                    norm1 = nu1.sum(dim=1, keepdim=True).clamp(min=1) if h.kl_normalizer == "open" else norm
                    f1 = f1 + (kl.detach() * nu1 / norm1).sum(dim=1)
                    f2 = f2 + kl_per_image.detach()
                k = 1.0 if self.plant == "arm-without-k" else h.k  # d phi / d gamma for the logits phi = k gamma
                df = (f1 - f2)[:, None]
                if h.estimator == "arm":  # Eq. 13 (Yin & Zhou 2019)
                    arm = k * (df * (u - 0.5)).mean(dim=0)
                elif h.estimator == "disarm":  # Dong, Mnih & Tucker 2020 on the same antithetic pair:
                    # 1/2 (F(b) - F(b~)) (-1)^b~ 1[b != b~] sigmoid(|phi|), b = nu1 = 1[1 - u < sigmoid(phi)], b~ = nu2
                    sign = (-1.0) ** (nu1 if self.plant == "disarm-sign" else nu2)
                    arm = k * (0.5 * df * sign * (nu1 != nu2) * torch.sigmoid((h.k * gamma).abs())).mean(dim=0)
                else:  # REINFORCE with a leave-one-out baseline, two samples: 1/2 sum_i (F_i - F_other)(nu_i - p)
                    p = torch.sigmoid(h.k * gamma)
                    arm = k * (0.5 * (df * (nu1 - p) + (-df) * (nu2 - p))).mean(dim=0)
                if self.plant == "arm-sign":
                    arm = -arm
                if gamma.grad is None:  # per_parameter: gamma's first gradient may be the ARM term alone
                    gamma.grad = arm.clone()
                else:
                    gamma.grad += arm
        grads = {name: _host(torch.zeros_like(p) if p.grad is None else p.grad) for name, p in params.items()}

        if self.plant == "adam-no-bias-correction":
            adam_without_bias_correction(self.optimizer)
        else:
            self.optimizer.step()  # l. 31
        if self.lambda_sgd is not None:
            self.lambda_sgd.step()  # l. 31 for lambda under (q): lambda += lambda_lr dL/dlambda (maximize)
        self.c_ma = C_ma.item()
        self.last_constraint_met = l0_added

        return {
            "x": _host(x), "u": None if u is None else _host(u), "u1": None if u1 is None else _host(u1),
            "nu1": _host(nu1), "nu2": _host(nu2),
            "eps": _host(eps), "mu": _host(mu), "s": _host(s), "z": _host(z), "x1": _host(x1), "x2": _host(x2),
            "e1": _host(e1), "e2": _host(e2), "kl_elem": _host(kl), "arm": None if arm is None else _host(arm),
            "grads": grads,
            "scalars": {"E1": E1.item(), "E2": E2.item(), "C": C.item(), "C_ma": C_ma.item(),
                        "C_prime": C_prime.item(), "lambda_eff": lam_eff.item(), "kl": kl_term.item(),
                        "gates_l1": gates_l1.item(), "loss": loss.item(), "l0_added": l0_added, "hit": self.hit},
        }


# ----------------------------------------------------------------------------------------
# Planted porting bugs (refimpl/porting_bugs.py holds the catalogue: name, line, first tensor)


@torch.no_grad()
def adam_without_bias_correction(optimizer) -> None:
    """The ``adam-no-bias-correction`` plant: torch.optim.Adam's step without 1 - beta^t."""
    for group in optimizer.param_groups:
        b1, b2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = -p.grad if group["maximize"] else p.grad
            state = optimizer.state[p]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(group["lr"] * state["exp_avg"] / (state["exp_avg_sq"].sqrt() + group["eps"]))


# ----------------------------------------------------------------------------------------
# Replaying a golden trace (refimpl/trace.py)


def _torch_dtype(name: str):
    return {"float32": torch.float32, "float64": torch.float64}[name]


def from_trace(trace, plant: str | None = None) -> Algorithm1:
    """Model and Algorithm 1 in the state a trace starts from: weights, statistics, lambda, GECO and Adam state."""
    init = transcription.initial_state(trace)
    dtype = _torch_dtype(init.dtype)
    model = GatedVAE(trace.manifest["architecture"], init.n_latent, dtype=dtype)
    algo = Algorithm1(model, dict(trace.manifest["hyper"]), plant=plant)
    params = dict(init.params)
    lam = params.pop("lambda")
    if plant != "lambda-init-wrong-side":  # the planted port keeps its own initial lambda
        with torch.no_grad():
            algo.lam.copy_(torch.as_tensor(lam, dtype=dtype))
    model.load_arrays({**params, **init.buffers})  # after Algorithm1(), which sets gamma to gamma_init
    algo.hit, algo.c_ma, algo.last_constraint_met = init.hit, init.c_ma, init.last_constraint_met
    # each parameter's own step count (interpretation (n)): the manifest's, or adam_t for all in older traces
    algo.load_adam_state(init.adam_t, init.adam_m, init.adam_v, init.adam_steps)
    return algo


class _Port:
    """Algorithm1 as bench/transcription.py's replay loop drives it."""

    def __init__(self, trace, plant):
        self.algo = from_trace(trace, plant=plant)
        self.own_draws = torch.Generator().manual_seed(0)  # a plant that changes hit draws its own u

    def sampling(self) -> bool:
        return self.algo.samples_gates()

    def snapshot(self) -> dict:
        from refimpl.trace import snapshot

        algo = self.algo
        params = dict(algo.model.named_parameters())
        buffers = {k: v for k, v in algo.model.state_dict().items()
                   if not k.endswith("num_batches_tracked") and k not in params}
        return snapshot({k: _host(p) for k, p in algo.named_parameters().items()},
                        {k: _host(b) for k, b in buffers.items()}, algo.hit, algo.c_ma, algo.last_constraint_met)

    def replay_step(self, x, eps, u, u1) -> dict:
        def tensor(a):
            return None if a is None else torch.as_tensor(a)

        return self.algo.step(tensor(x), eps=tensor(eps), u=tensor(u), u1=tensor(u1), generator=self.own_draws)


def replay(trace_path, out_path, *, steps: int | None = None, plant: str | None = None, arm_sign: float = 1.0) -> dict:
    """Replay the trace at ``trace_path`` in torch on its recorded inputs; write a trace to ``out_path``.

    ``plant``: a porting bug from refimpl's catalogue to plant (``refimpl/porting_bugs.py``);
    ``arm_sign=-1`` is the same as ``plant="arm-sign"``. Returns the manifest written. A
    step at which the replay samples gates but the trace holds no u (the two disagree on
    ``hit``) raises a ValueError naming the step; with a plant, the replay draws its own u
    there instead, so that ``compare`` can show where hit went wrong.
    """
    if arm_sign not in (1.0, -1.0):
        raise ValueError(f"arm_sign={arm_sign!r}: expected 1.0 or -1.0")
    if arm_sign == -1.0:
        if plant not in (None, "arm-sign"):
            raise ValueError(f"arm_sign=-1 and plant={plant!r} name two different bugs")
        plant = "arm-sign"
    return transcription.replay(trace_path, out_path, _Port, framework="torch", steps=steps, plant=plant,
                                writer=f"bench/torch_algorithm1.py (torch {torch.__version__})",
                                extra={"arm_sign": -1.0 if plant == "arm-sign" else 1.0})


def main(argv=None) -> int:
    return transcription.main(argv, framework="PyTorch", version=f"torch {torch.__version__}", replay_trace=replay,
                              default_out="torch_trace.npz")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # refimpl from this checkout when not installed
    raise SystemExit(main())
