"""One training step of Algorithm 1 (both decoder passes) and one plain VAE step: refimpl vs PyTorch.

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
``--backend numpy`` compares with PyTorch on the CPU (same thread count); ``--backend cupy``
with PyTorch on the same CUDA device, TF32 off on both (CuPy's default; torch's flags set
here), each side synchronised before its clock stops. The table also gives each side's peak
memory: on the CPU the peak resident size of a fresh process running only that side
(bench/step_memory.py; torch's includes its ~220 MiB import); on the GPU CuPy's memory
pool (``total_bytes``, what the pool holds) and torch's ``max_memory_reserved``, both
after the timed runs.

    .venv/bin/python bench/bench_step.py --repeats 30 --out bench/results/step_cpu.md
    python bench/bench_step.py --backend cupy --repeats 100 --out bench/results/step_gpu.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import side_by_side  # noqa: E402 (sets thread-wait policies before numpy and torch load)

import numpy  # noqa: E402

from refimpl.algorithm1 import Hyper, init_state, train_step
from refimpl.atomic import atomic_write
from refimpl.backend import get_xp, to_device, to_host
from refimpl.model import GatedVAE, paper_architecture
from refimpl.rng import generator

try:
    import torch
    import torch_algorithm1 as ta
except ImportError as exc:
    torch = None
    TORCH_MISSING = f"PyTorch is not importable ({exc}); timing refimpl only"


def refimpl_step(dtype, gated, n_latent, x_host, xp, seed=0, fused=None):
    """A closure running one refimpl training step on x, on backend ``xp``."""
    model = GatedVAE(paper_architecture(x_host.shape[1:]), n_latent, rng=generator(seed), xp=xp, dtype=dtype,
                     fused=fused)
    state = init_state(model, Hyper(tau=1e9 if gated else 0.0))
    state.hit = gated
    rng, x = generator(seed + 1), to_device(x_host, xp, dtype)
    return model, lambda: train_step(state, x, rng)


def torch_step(model_np, dtype, gated, x_host, device, k=7.0, tau=1e9):
    """A closure running the same step in PyTorch on ``device`` from a copy of refimpl's initial weights."""
    tdtype = {numpy.float32: torch.float32, numpy.float64: torch.float64}[numpy.dtype(dtype).type]
    model = ta.GatedVAE(ta.paper_architecture(channels=x_host.shape[1]), model_np.n_latent, dtype=tdtype).to(device)
    model.load_arrays({k_: to_host(v) for k_, v in model_np.state_dict().items()})
    lam = torch.nn.Parameter(torch.tensor(1.0, dtype=tdtype, device=device))
    opt = torch.optim.Adam([{"params": list(model.parameters())}, {"params": [lam], "maximize": True}], lr=1e-3)
    x = torch.from_numpy(x_host.astype(dtype)).to(device)
    n, gen = model.n_latent, torch.Generator(device=device).manual_seed(1)
    model.gamma.grad = torch.zeros_like(model.gamma)  # gamma is outside the graph; its gradient is the ARM term
    on = {"dtype": tdtype, "device": device}

    def step():
        opt.zero_grad(set_to_none=False)
        u = torch.rand(1, n, generator=gen, **on)
        nu1 = (u > torch.sigmoid(-k * model.gamma.detach())).to(tdtype) if gated else torch.ones(1, n, **on)
        nu2 = (u < torch.sigmoid(k * model.gamma.detach())).to(tdtype) if gated else nu1
        enc = model.encoder(x)
        mu, s = enc[:, :n], enc[:, n:]
        z = mu + torch.exp(0.5 * s) * torch.randn(mu.shape, generator=gen, **on)
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


def nothing():
    pass


def device_tools(backend):
    """(xp, torch device, refimpl sync, torch sync) for ``backend``.

    On the GPU every timed call ends with a synchronize of its own side.
    """
    xp = get_xp(backend)
    if backend == "numpy":
        return xp, "cpu", nothing, nothing
    side_by_side.gpu_setup(torch)
    return xp, "cuda", xp.cuda.Device().synchronize, (torch.cuda.synchronize if torch else nothing)


def reset_gpu_peaks(xp):
    """Empty both allocators' pools and torch's peak counter, so each table row measures its own peak."""
    xp.get_default_memory_pool().free_all_blocks()
    if torch is not None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gpu_peaks(xp):
    """(refimpl, torch) MiB held: CuPy's default pool and torch's caching allocator (its peak)."""
    theirs = torch.cuda.max_memory_reserved() / 2**20 if torch is not None else float("nan")
    return xp.get_default_memory_pool().total_bytes() / 2**20, theirs


def cpu_peaks(dtype, gated, batch, n_latent, channels):
    """(refimpl, torch) peak resident MiB of a CPU step, each side alone in a fresh process."""
    peaks = []
    for side in ("refimpl", "torch") if torch is not None else ("refimpl",):
        args = [side, numpy.dtype(dtype).name, "gated" if gated else "plain", str(batch), str(n_latent), str(channels)]
        out = subprocess.run([sys.executable, str(Path(__file__).with_name("step_memory.py")), *args],
                             capture_output=True, text=True, check=True).stdout
        peaks.append(float(out.split()[1]))
    return (*peaks, float("nan"))[:2]


def run(repeats, warmup, batch, n_latent, channels, dtypes, backend, memory=True):
    rows = []
    xp, device, sync_ours, sync_theirs = device_tools(backend)
    gpu = backend != "numpy"
    x = (generator(7).uniform(size=(batch, channels, 64, 64)) > 0.7).astype(numpy.float64)
    for dtype in dtypes:
        for gated in (True, False):
            if gpu:
                reset_gpu_peaks(xp)
            model, ours = refimpl_step(dtype, gated, n_latent, x, xp)
            theirs = torch_step(model, dtype, gated, x, device) if torch is not None else None
            t_ours, t_theirs = [], []
            for i in range(warmup + repeats):
                for fn, sync, acc in ((ours, sync_ours, t_ours), (theirs, sync_theirs, t_theirs)):
                    if fn is None:
                        continue
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    if i >= warmup:
                        acc.append(time.perf_counter() - t0)
            ours_ms = median_ms(t_ours)
            theirs_ms = median_ms(t_theirs) if t_theirs else float("nan")
            if gpu:
                mem = gpu_peaks(xp)
            else:
                mem = cpu_peaks(dtype, gated, batch, n_latent, channels) if memory else (None, None)
            rows.append(("gated (2 decoder passes)" if gated else "plain (1 decoder pass)", numpy.dtype(dtype).name,
                         ours_ms, theirs_ms, ours_ms / theirs_ms, *mem))
            line = (f"{rows[-1][0]:26s} {rows[-1][1]:8s} refimpl {ours_ms:8.2f} ms  torch {theirs_ms:8.2f} ms  "
                    f"ratio {rows[-1][4]:.2f}")
            if mem[0] is not None:
                line += f"  peak MiB refimpl {mem[0]:.0f} torch {mem[1]:.0f}"
            print(line, flush=True)
    return rows


def machine(backend):
    if backend == "numpy":
        from bench_layers import blas_info, cpu_model

        blas, threads = blas_info()
        return (f"{os.cpu_count()} cores, {cpu_model()}; numpy {numpy.__version__} with {blas}, {threads} BLAS "
                f"threads; torch {torch.__version__ if torch else 'absent'} "
                f"({torch.get_num_threads() if torch else '-'} threads).")
    return side_by_side.gpu_setup(torch) + f"; numpy {numpy.__version__}."


def to_markdown(rows, args):
    peer = "PyTorch CPU" if args.backend == "numpy" else "PyTorch CUDA"
    gpu = args.backend == "cupy"
    mem = rows and rows[0][5] is not None
    lines = [
        f"# Training step, refimpl ({'NumPy' if not gpu else 'CuPy'}) vs {peer} — {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine(args.backend)}",
        f"Model: Section 4, 64x64x{args.channels}, n = {args.latent}, batch {args.batch}; median of {args.repeats} "
        f"interleaved runs after {args.warmup} warm-up runs. Command: `python bench/bench_step.py "
        f"--backend {args.backend} --repeats {args.repeats} --channels {args.channels}`.",
        "",
        "| step | dtype | refimpl ms | torch ms | ratio (refimpl / torch) |" + (" peak MiB refimpl | peak MiB torch |" if mem else ""),
        "|---|---|---:|---:|---:|" + ("---:|---:|" if mem else ""),
    ]
    for r in rows:
        line = f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} |"
        lines.append(line + (f" {r[5]:.0f} | {r[6]:.0f} |" if mem else ""))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--latent", type=int, default=10)
    p.add_argument("--channels", type=int, default=3, help="image channels: 1 (dSprites) or 3")
    p.add_argument("--dtype", choices=("float32", "float64", "both"), default="both")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                   help="numpy: against PyTorch CPU; cupy: against PyTorch CUDA on the same GPU")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the peak-memory processes")
    p.add_argument("--out", help="write the table as markdown to this file (atomically)")
    args = p.parse_args(argv)
    if torch is None:
        print(TORCH_MISSING, file=sys.stderr)
    dtypes = [numpy.float32, numpy.float64] if args.dtype == "both" else [numpy.dtype(args.dtype).type]
    rows = run(args.repeats, args.warmup, args.batch, args.latent, args.channels, dtypes, args.backend,
               memory=not args.no_memory)
    if args.out:
        text = to_markdown(rows, args)
        atomic_write(args.out, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
