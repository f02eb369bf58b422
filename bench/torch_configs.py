"""The PyTorch configurations a user could pick for the training step, and the lean torch step itself.

Every configuration runs the same lean step (the same work as refimpl's ``train_step``,
gated or plain) on the same network (``bench/torch_algorithm1.py``, refimpl's initial
weights), batch and dtype; only how PyTorch executes it differs:

- ``nchw``: eager, the default NCHW memory format (PyTorch's default);
- ``channels_last``: eager, model and input converted with
  ``.to(memory_format=torch.channels_last)``; the decoder's reshape output is converted
  too, so every conv, BatchNorm and upsample sees channels_last input (checked by
  :func:`check_channels_last` with forward pre-hooks before timing);
- ``compile``, ``channels_last+compile``: the step's forward (gates, encoder,
  reparameterisation, both decoder passes, the loss) under ``torch.compile`` (default
  mode, Inductor); backward runs AOTAutograd's compiled backward; the optimizer stays eager;
- GPU only: ``cudnn.benchmark`` and ``channels_last+cudnn.benchmark`` (cuDNN autotuning),
  ``compile:reduce-overhead`` (Inductor plus CUDA graphs) and ``compile:max-autotune``.

The random draws (u, eps) stay outside the compiled region (``torch.compile`` does not
trace ``generator=`` arguments) and happen in the same order in every configuration.

    .venv/bin/python bench/torch_configs.py                  # check every CPU configuration: layouts, one step each
    .venv/bin/python bench/torch_configs.py --device cuda    # the GPU ones
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_algorithm1 as ta  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    channels_last: bool = False
    compile_mode: str | None = None  # None: eager; "default", "reduce-overhead", "max-autotune": torch.compile
    cudnn_benchmark: bool = False  # GPU only
    gpu_only: bool = False


CONFIGS = [
    Config("nchw"),
    Config("channels_last", channels_last=True),
    Config("compile", compile_mode="default"),
    Config("channels_last+compile", channels_last=True, compile_mode="default"),
    Config("cudnn.benchmark", cudnn_benchmark=True, gpu_only=True),
    Config("channels_last+cudnn.benchmark", channels_last=True, cudnn_benchmark=True, gpu_only=True),
    Config("compile:reduce-overhead", compile_mode="reduce-overhead", cudnn_benchmark=True, gpu_only=True),
    Config("compile:max-autotune", compile_mode="max-autotune", cudnn_benchmark=True, gpu_only=True),
]
BY_NAME = {c.name: c for c in CONFIGS}


def configs_for(device: str) -> list[Config]:
    """Every configuration that applies on ``device`` ("cpu" or "cuda")."""
    return [c for c in CONFIGS if device != "cpu" or not c.gpu_only]


def compile_unavailable() -> str | None:
    """Why torch.compile cannot run here (no C++ compiler for Inductor's CPU code), or None."""
    import shutil

    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++/c++/clang++) on PATH: Inductor's CPU backend compiles C++"
    return None


class ChannelsLast(nn.Module):
    """Returns its input in channels_last layout (after the decoder's reshape, which yields NCHW)."""

    def forward(self, x):
        return x.contiguous(memory_format=torch.channels_last)


def build_model(model_np, channels: int, tdtype, device, config: Config, arch=None):
    """torch_algorithm1's network with refimpl's initial weights, laid out as ``config`` asks.

    arch: the architecture (refimpl's Architecture); default: Section 4's 64x64 one."""
    arch = arch if arch is not None else ta.paper_architecture(channels=channels)
    model = ta.GatedVAE(arch, model_np.n_latent, dtype=tdtype).to(device)
    model.load_arrays({k: numpy.asarray(_host(v)) for k, v in model_np.state_dict().items()})
    for bn in model.batchnorms():
        # Running statistics do not enter a training step's outputs. refimpl blends in the biased batch
        # variance, torch_algorithm1 fixes torch's unbiased one up with an extra pass over x; blending
        # torch's own costs the same as refimpl's (one scalar factor apart), so let torch do it natively.
        bn.biased_running_var = False
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.decoder.reshape = nn.Sequential(model.decoder.reshape, ChannelsLast())
    return model


def _host(v):
    return v.get() if hasattr(v, "get") else v


def lean_step(model_np, dtype, gated, x_host, device, config: Config = BY_NAME["nchw"], k=7.0, tau=1e9, arch=None):
    """A closure running one training step (gated: Algorithm 1 with gates sampled; plain: hit false) in torch.

    Encoder forward, reparameterisation, the E1 decoder pass under ``no_grad`` (BatchNorm
    on batch statistics, running ones untouched, as refimpl's default (h)), the E2 pass,
    l. 22's loss, backward, the ARM term on gamma's gradient, ``torch.optim.Adam``.
    """
    tdtype = {numpy.float32: torch.float32, numpy.float64: torch.float64}[numpy.dtype(dtype).type]
    model = build_model(model_np, x_host.shape[1], tdtype, device, config, arch)
    lam = nn.Parameter(torch.tensor(1.0, dtype=tdtype, device=device))
    opt = torch.optim.Adam([{"params": list(model.parameters())}, {"params": [lam], "maximize": True}], lr=1e-3)
    x = torch.from_numpy(numpy.ascontiguousarray(x_host, dtype=dtype)).to(device)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    n, gen = model.n_latent, torch.Generator(device=device).manual_seed(1)
    model.gamma.grad = torch.zeros_like(model.gamma)  # gamma is outside the graph; its gradient is the ARM term
    decoder_bns = [m for m in model.decoder.modules() if isinstance(m, ta.BatchNorm)]
    on = {"dtype": tdtype, "device": device}
    ones = torch.ones(1, n, **on)

    def forward(x, u, eps):
        gamma = model.gamma.detach()
        nu1 = (u > torch.sigmoid(-k * gamma)).to(tdtype) if gated else ones
        nu2 = (u < torch.sigmoid(k * gamma)).to(tdtype) if gated else ones
        enc = model.encoder(x)
        mu, s = enc[:, :n], enc[:, n:]
        z = mu + torch.exp(0.5 * s) * eps
        e1 = None
        if gated:
            with torch.no_grad():
                for bn in decoder_bns:
                    bn.update_running = False
                e1 = ((model.decoder(z * nu1) - x) ** 2).flatten(1).sum(1).mean()
                for bn in decoder_bns:
                    bn.update_running = True
        e2 = ((model.decoder(z * nu2) - x) ** 2).flatten(1).sum(1).mean()
        lam_eff = torch.nn.functional.softplus(lam) ** 2
        kl = (-0.5 * (1 + s - s.exp() - mu * mu) * nu2 / nu2.sum()).sum(1).mean()
        return lam_eff * (e2 - tau) + kl, lam_eff, e1, e2

    if config.compile_mode is not None:
        forward = torch.compile(forward, mode=config.compile_mode)
    cuda_graphs = config.compile_mode == "reduce-overhead"

    def step():
        if device != "cpu":
            torch.backends.cudnn.benchmark = config.cudnn_benchmark  # global: set for this configuration's step
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=False)
        u = torch.rand(1, n, generator=gen, **on)
        eps = torch.randn(x.shape[0], n, generator=gen, **on)
        loss, lam_eff, e1, e2 = forward(x, u, eps)
        loss.backward()
        if gated:
            model.gamma.grad += (lam_eff * k * (e1 - e2) * (u[0] - 0.5)).detach()
        opt.step()

    step.model, step.x = model, x
    return step


def check_channels_last(model, x, step) -> list[str]:
    """Run one step with pre-hooks on every conv, BatchNorm and upsample; the modules whose input was not channels_last."""
    wrong, hooks = [], []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Upsample)):
            def hook(mod, args, name=name):
                if not args[0].is_contiguous(memory_format=torch.channels_last):
                    wrong.append(f"{name} {tuple(args[0].shape)} strides {args[0].stride()}")
            hooks.append(m.register_forward_pre_hook(hook))
        if isinstance(m, nn.Conv2d) and not m.weight.is_contiguous(memory_format=torch.channels_last):
            wrong.append(f"{name}.weight strides {m.weight.stride()}")
    try:
        step()
    finally:
        for h in hooks:
            h.remove()
    if not x.is_contiguous(memory_format=torch.channels_last):
        wrong.append(f"input x strides {x.stride()}")
    return wrong


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    from bench_step import refimpl_step
    from refimpl.rng import generator

    x = (generator(7).uniform(size=(64, args.channels, 64, 64)) > 0.7).astype(numpy.float64)
    dtype = numpy.dtype(args.dtype).type
    model_np, _ = refimpl_step(dtype, True, 10, x, numpy)
    for config in configs_for(args.device):
        if config.compile_mode and compile_unavailable():
            print(f"{config.name:32s} skipped: {compile_unavailable()}")
            continue
        if config.channels_last:  # check the layout eagerly (hooks do not fire inside a compiled graph)
            eager = lean_step(model_np, dtype, True, x, args.device, Config("check", channels_last=True))
            wrong = check_channels_last(eager.model, eager.x, eager)
            print(f"{config.name:32s} channels_last everywhere: {'yes' if not wrong else 'NO: ' + '; '.join(wrong)}")
        t0 = time.perf_counter()
        step = lean_step(model_np, dtype, True, x, args.device, config)
        step()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        step()
        print(f"{config.name:32s} first step (incl. compile) {first:7.2f} s, second {time.perf_counter() - t0:6.3f} s",
              flush=True)


if __name__ == "__main__":
    main()
