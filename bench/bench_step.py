"""One training step of Algorithm 1 (both decoder passes) and one plain VAE step: refimpl vs PyTorch CPU.

Model: Section 4's 64x64 network (``refimpl.model.paper_architecture``), batch 64, n = 10
latent dimensions, float32 and float64. The torch side is the same network from
``bench/torch_algorithm1.py`` (same parameter names and initial weights), driven by a
lean step written here: encoder forward, reparameterisation, the E1 decoder pass under
``torch.no_grad()``, the E2 pass, the loss of l. 22, backward, the ARM term on gamma's
gradient and ``torch.optim.Adam``; its bookkeeping is kept to what refimpl does.

- "gated step": gates sampled (hit already true): two decoder passes, as l. 12-13.
- "plain step": gates not yet sampled (hit false; the tau = 0 baseline VAE of Table 1):
  one decoder pass, since E1 = E2 (INTERPRETATIONS.md (l)).

Both sides run in one process, interleaved, on the same batch; the table gives medians.

    .venv/bin/python bench/bench_step.py --repeats 30 --out bench/results/step_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import side_by_side  # noqa: E402,F401 (sets thread-wait policies before numpy and torch load)

import numpy  # noqa: E402

from refimpl.algorithm1 import Hyper, init_state, train_step
from refimpl.atomic import atomic_write
from refimpl.model import GatedVAE, paper_architecture
from refimpl.rng import generator

try:
    import torch
    import torch_algorithm1 as ta
except ImportError as exc:
    torch = None
    TORCH_MISSING = f"PyTorch is not importable ({exc}); timing refimpl only"


def refimpl_step(dtype, gated, n_latent, x_host, seed=0):
    """A closure running one refimpl training step on x."""
    model = GatedVAE(paper_architecture(x_host.shape[1:]), n_latent, rng=generator(seed), dtype=dtype)
    state = init_state(model, Hyper(tau=1e9 if gated else 0.0))
    state.hit = gated
    rng, x = generator(seed + 1), x_host.astype(dtype)
    return model, lambda: train_step(state, x, rng)


def torch_step(model_np, dtype, gated, x_host, k=7.0, tau=1e9):
    """A closure running the same step in PyTorch on a copy of refimpl's initial weights."""
    tdtype = {numpy.float32: torch.float32, numpy.float64: torch.float64}[numpy.dtype(dtype).type]
    model = ta.GatedVAE(ta.paper_architecture(channels=x_host.shape[1]), model_np.n_latent, dtype=tdtype)
    model.load_arrays({k_: numpy.asarray(v) for k_, v in model_np.state_dict().items()})
    lam = torch.nn.Parameter(torch.tensor(1.0, dtype=tdtype))
    opt = torch.optim.Adam([{"params": list(model.parameters())}, {"params": [lam], "maximize": True}], lr=1e-3)
    x = torch.from_numpy(x_host.astype(dtype))
    n, gen = model.n_latent, torch.Generator().manual_seed(1)
    model.gamma.grad = torch.zeros_like(model.gamma)  # gamma is outside the graph; its gradient is the ARM term

    def step():
        opt.zero_grad(set_to_none=False)
        u = torch.rand(1, n, generator=gen, dtype=tdtype)
        nu1 = (u > torch.sigmoid(-k * model.gamma.detach())).to(tdtype) if gated else torch.ones(1, n, dtype=tdtype)
        nu2 = (u < torch.sigmoid(k * model.gamma.detach())).to(tdtype) if gated else nu1
        enc = model.encoder(x)
        mu, s = enc[:, :n], enc[:, n:]
        z = mu + torch.exp(0.5 * s) * torch.randn(mu.shape, generator=gen, dtype=tdtype)
        if gated:
            with torch.no_grad():
                e1 = ((model.decoder(z * nu1) - x) ** 2).flatten(1).sum(1).mean()
        e2 = ((model.decoder(z * nu2) - x) ** 2).flatten(1).sum(1).mean()
        lam_eff = torch.nn.functional.softplus(lam) ** 2
        c = e2 - tau
        kl = (-0.5 * (1 + s - s.exp() - mu * mu) * nu2 / nu2.sum()).sum(1).mean()
        loss = lam_eff * c + kl
        loss.backward()
        if gated:
            model.gamma.grad += (lam_eff * k * (e1 - e2.detach()) * (u[0] - 0.5)).detach()
        opt.step()

    return step


def median_ms(times):
    return 1000 * statistics.median(times)


def run(repeats, warmup, batch, n_latent, channels, dtypes):
    rows = []
    x = (generator(7).uniform(size=(batch, channels, 64, 64)) > 0.7).astype(numpy.float64)
    for dtype in dtypes:
        for gated in (True, False):
            model, ours = refimpl_step(dtype, gated, n_latent, x)
            theirs = torch_step(model, dtype, gated, x) if torch is not None else None
            t_ours, t_theirs = [], []
            for i in range(warmup + repeats):
                for fn, acc in ((ours, t_ours), (theirs, t_theirs)):
                    if fn is None:
                        continue
                    t0 = time.perf_counter()
                    fn()
                    if i >= warmup:
                        acc.append(time.perf_counter() - t0)
            ours_ms = median_ms(t_ours)
            theirs_ms = median_ms(t_theirs) if t_theirs else float("nan")
            rows.append(("gated (2 decoder passes)" if gated else "plain (1 decoder pass)", numpy.dtype(dtype).name,
                         ours_ms, theirs_ms, ours_ms / theirs_ms))
            print(f"{rows[-1][0]:26s} {rows[-1][1]:8s} refimpl {ours_ms:8.1f} ms  torch {theirs_ms:8.1f} ms  "
                  f"ratio {rows[-1][4]:.2f}", flush=True)
    return rows


def to_markdown(rows, args):
    lines = [
        f"# Training step, refimpl (NumPy) vs PyTorch CPU — {datetime.date.today().isoformat()}",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; numpy {numpy.__version__}, "
        f"torch {torch.__version__ if torch else 'absent'} ({torch.get_num_threads() if torch else '-'} threads).",
        f"Model: Section 4, 64x64x{args.channels}, n = {args.latent}, batch {args.batch}; median of {args.repeats} "
        f"interleaved runs after {args.warmup} warm-up runs. Command: `python bench/bench_step.py "
        f"--repeats {args.repeats} --channels {args.channels}`.",
        "",
        "| step | dtype | refimpl ms | torch ms | ratio (refimpl / torch) |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--latent", type=int, default=10)
    p.add_argument("--channels", type=int, default=3, help="image channels: 1 (dSprites) or 3")
    p.add_argument("--dtype", choices=("float32", "float64", "both"), default="both")
    p.add_argument("--out", help="write the table as markdown to this file (atomically)")
    args = p.parse_args(argv)
    if torch is None:
        print(TORCH_MISSING, file=sys.stderr)
    dtypes = [numpy.float32, numpy.float64] if args.dtype == "both" else [numpy.dtype(args.dtype).type]
    rows = run(args.repeats, args.warmup, args.batch, args.latent, args.channels, dtypes)
    if args.out:
        text = to_markdown(rows, args)
        atomic_write(args.out, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
