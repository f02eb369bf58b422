"""One training step of Algorithm 1 (both decoder passes) and one plain VAE step: refimpl vs every PyTorch configuration.

Model: Section 4's 64x64 network (``refimpl.model.paper_architecture``) with 1 and 3 image
channels, batch 64, n = 10 latent dimensions, float32 and float64. The torch side is the
same network from ``bench/torch_algorithm1.py`` (same parameter names and initial
weights), driven by bench/torch_configs.py's lean step (encoder, reparameterisation, the
E1 pass under ``no_grad``, the E2 pass, l. 22's loss, backward, the ARM term,
``torch.optim.Adam``): the same work as refimpl's ``train_step``. It runs in every
configuration of torch_configs.py that applies (CPU: NCHW eager, channels_last eager,
``torch.compile``, channels_last + ``torch.compile``; GPU: also cudnn.benchmark and
``torch.compile(mode="reduce-overhead")``), and the table gives the ratio of refimpl to
the **fastest** of them.

- "gated step": gates sampled (hit already true): two decoder passes, as l. 12-13.
- "plain step": gates not yet sampled (hit false; the tau = 0 baseline VAE of Table 1):
  one decoder pass, since E1 = E2 (INTERPRETATIONS.md (l)).

Everything runs in one process: each side is warmed up on its own first (torch.compile
compiles then; its first-call time is reported), then the sides run in turn, the order
rotated every round, and each cell is the median with the interquartile range. Two
thread pools in one process disturb each other (side_by_side.py); bench/separate_processes.py
runs each side alone in fresh processes instead. ``--backend numpy`` compares with PyTorch on
the CPU (same thread count); ``--backend cupy`` with PyTorch on the same CUDA device, TF32 off
on both, each side synchronised before its clock stops. Peak memory: on the CPU ``VmHWM``
of a fresh process running only that side (bench/step_memory.py; torch's includes its
~220 MiB import); on the GPU CuPy's pool and torch's ``max_memory_reserved`` (all
configurations of a row together).

    bench/foreground.sh .venv/bin/python bench/bench_step.py --out bench/results/step_cpu.md
    .venv/bin/python bench/bench_step.py --channels 3 --dtype float32 --configs nchw,channels_last --no-memory
    python bench/bench_step.py --backend cupy --repeats 100 --warmup 10 --out bench/results/gpu/step_gpu.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import side_by_side  # noqa: E402 (sets thread-wait policies before numpy and torch load)

import numpy  # noqa: E402

import timing  # noqa: E402
from refimpl.algorithm1 import Hyper, init_state, train_step  # noqa: E402
from refimpl.device_step import DeviceStep  # noqa: E402
from refimpl.execution import Execution  # noqa: E402
from refimpl.atomic import atomic_write  # noqa: E402
from refimpl.backend import get_xp, to_device  # noqa: E402
from refimpl.model import GatedVAE, paper_architecture  # noqa: E402
from refimpl.rng import generator  # noqa: E402
from refimpl.threads import blas_limit  # noqa: E402

try:
    import torch
    import torch_configs
except ImportError as exc:
    torch = torch_configs = None
    TORCH_MISSING = f"PyTorch is not importable ({exc}); timing refimpl only"


def refimpl_step(dtype, gated, n_latent, x_host, xp, seed=0, execution=None, device_step=False):
    """(model, closure running one refimpl training step on x) on backend ``xp``.

    ``execution``: the fast paths (refimpl/execution.py; default: the default setting's).
    ``device_step``: time :class:`refimpl.device_step.DeviceStep` (no host reads mid-step; its
    one transfer of the logged scalars included) instead of ``train_step``; gated steps only.
    """
    model = GatedVAE(paper_architecture(x_host.shape[1:]), n_latent, rng=generator(seed), xp=xp, dtype=dtype,
                     paths=(execution or Execution()).resolve(xp))
    state = init_state(model, Hyper(tau=1e9 if gated else 0.0))
    state.hit = gated
    rng, x = generator(seed + 1), to_device(x_host, xp, dtype)
    blas = state.passes.threads.blas  # the run's BLAS threads for the whole step, as Run.train sets them
    if device_step and gated:
        state.c_ma = 0.0  # as after a first step
        fast = DeviceStep(state)
        return model, lambda: with_blas(blas, lambda: fast.host_log(fast(x, rng)))
    return model, lambda: with_blas(blas, lambda: train_step(state, x, rng))


def with_blas(threads, call):
    with blas_limit(threads):
        return call()


def torch_step(model_np, dtype, gated, x_host, device, config="nchw"):
    """The lean torch step in configuration ``config`` (a name of torch_configs.CONFIGS)."""
    return torch_configs.lean_step(model_np, dtype, gated, x_host, device, torch_configs.BY_NAME[config])


def images(batch, channels, seed=7):
    """The benchmark batch: binary 64x64 images (dSprites-like), float64 on the host."""
    return (generator(seed).uniform(size=(batch, channels, 64, 64)) > 0.7).astype(numpy.float64)


@dataclass
class Row:
    channels: int
    gated: bool
    dtype: str
    times: dict = field(default_factory=dict)  # side -> [seconds]
    first_call: dict = field(default_factory=dict)  # side -> seconds of the first call (compilation included)
    memory: dict = field(default_factory=dict)  # side -> peak MiB

    @property
    def step(self):
        return "gated (2 decoder passes)" if self.gated else "plain (1 decoder pass)"

    def medians(self):
        return {side: timing.spread(ts)[0] for side, ts in self.times.items()}

    def fastest_torch(self):
        return timing.fastest({s: m for s, m in self.medians().items() if s != "refimpl"})


def nothing():
    pass


def device_tools(backend):
    """(xp, torch device, refimpl sync, torch sync) for ``backend``; on the GPU each timed call ends synchronised."""
    xp = get_xp(backend)
    if backend == "numpy":
        return xp, "cpu", nothing, nothing
    side_by_side.gpu_setup(torch)
    return xp, "cuda", xp.cuda.Device().synchronize, (torch.cuda.synchronize if torch else nothing)


def config_names(device, wanted=None):
    """The torch configurations to time on ``device`` (all that apply, or ``wanted``), less those that cannot run."""
    if torch is None:
        return []
    names = [c.name for c in torch_configs.configs_for(device)]
    if wanted:
        unknown = sorted(set(wanted) - set(torch_configs.BY_NAME))
        if unknown:
            raise SystemExit(f"unknown torch configurations {unknown}; known: {', '.join(torch_configs.BY_NAME)}")
        names = [n for n in names if n in wanted]
    why = torch_configs.compile_unavailable()
    if why:
        print(f"torch.compile configurations skipped: {why}", file=sys.stderr)
        names = [n for n in names if torch_configs.BY_NAME[n].compile_mode is None]
    return names


def cpu_peak(side, dtype, gated, batch, n_latent, channels):
    """Peak resident MiB of a fresh process running only ``side`` ("refimpl" or "torch:CONFIG")."""
    args = [side, numpy.dtype(dtype).name, "gated" if gated else "plain", str(batch), str(n_latent), str(channels)]
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("step_memory.py")), *args],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[1])


def time_sides(sides, sync, repeats, warmup, row):
    """Warm each side up alone (its first call timed), then run them in turn, the order rotated every round."""
    names = list(sides)
    for name in names:
        sync[name]()
        t0 = time.perf_counter()
        sides[name]()
        sync[name]()
        row.first_call[name] = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            sides[name]()
        row.times[name] = []
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            sync[name]()
            t0 = time.perf_counter()
            sides[name]()
            sync[name]()
            row.times[name].append(time.perf_counter() - t0)


def run(repeats, warmup, batch, n_latent, channels_list, dtypes, backend, memory=True, configs=None, steps=(True, False),
        device_step=False):
    """Time every case (channels x dtype x gated/plain) on every side; a list of Rows."""
    rows = []
    xp, device, sync_ours, sync_theirs = device_tools(backend)
    names = config_names(device, configs)
    for channels in channels_list:
        x = images(batch, channels)
        for dtype in dtypes:
            for gated in steps:
                row = Row(channels, gated, numpy.dtype(dtype).name)
                if device != "cpu":
                    xp.get_default_memory_pool().free_all_blocks()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                model, ours = refimpl_step(dtype, gated, n_latent, x, xp, device_step=device_step)
                sides, sync = {"refimpl": ours}, {"refimpl": sync_ours}
                for name in names:
                    sides[name], sync[name] = torch_step(model, dtype, gated, x, device, name), sync_theirs
                time_sides(sides, sync, repeats, warmup, row)
                if device != "cpu":
                    row.memory = {"refimpl": xp.get_default_memory_pool().total_bytes() / 2**20}
                    if names:
                        row.memory["torch (all configurations)"] = torch.cuda.max_memory_reserved() / 2**20
                elif memory:
                    for side in sides:
                        row.memory[side] = cpu_peak(side if side == "refimpl" else f"torch:{side}", dtype, gated,
                                                    batch, n_latent, channels)
                del sides
                if torch is not None:
                    torch._dynamo.reset()  # compiled graphs of this row hold its models; start the next row clean
                rows.append(row)
                best, best_ms = row.fastest_torch()
                print(f"64x64x{channels} {row.step:26s} {row.dtype:8s} "
                      + "  ".join(f"{s} {timing.cell(ts)}" for s, ts in row.times.items())
                      + (f"  -> refimpl / {best} = {row.medians()['refimpl'] / best_ms:.2f}" if best else ""),
                      flush=True)
    return rows


def to_markdown(rows, args, env, wall_s):
    gpu = args.backend == "cupy"
    sides = list(dict.fromkeys(s for r in rows for s in r.times))
    torch_sides = [s for s in sides if s != "refimpl"]
    peer = "PyTorch CUDA" if gpu else "PyTorch CPU"
    cmd = (f"{'' if gpu else 'bench/foreground.sh '}.venv/bin/python bench/bench_step.py --backend {args.backend} "
           f"--repeats {args.repeats} --warmup {args.warmup} --batch {args.batch} --latent {args.latent} "
           f"--channels {','.join(map(str, args.channels))} --dtype {args.dtype}"
           + (f" --configs {','.join(args.configs)}" if args.configs else ""))
    lines = [f"# Training step, refimpl ({'CuPy' if gpu else 'NumPy'}) vs {peer} in every configuration, one process",
             "", f"Generated by `bench/bench_step.py` (bench/README.md). Command: `{cmd}`.", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- model: Section 4's 64x64xC network, n = {args.latent}, batch {args.batch}",
              f"- timing: each side warmed up alone ({args.warmup} calls), then {args.repeats} rounds of every side "
              "in turn (order rotated per round), all in this one process; median (interquartile range), ms",
              f"- bench wall time: {wall_s:.0f} s", "",
              "| image | step | dtype | refimpl | " + " | ".join(f"torch {s}" for s in torch_sides)
              + " | fastest torch | refimpl / fastest |",
              "|---|---|---|---:|" + "---:|" * len(torch_sides) + "---|---:|"]
    for r in rows:
        best, best_ms = r.fastest_torch()
        ratio = f"{r.medians()['refimpl'] / best_ms:.2f}" if best else ""
        lines.append(f"| 64x64x{r.channels} | {r.step} | {r.dtype} | {timing.cell(r.times['refimpl'])} | "
                     + " | ".join(timing.cell(r.times.get(s, [])) for s in torch_sides) + f" | {best or ''} | {ratio} |")
    compiled = [s for s in torch_sides if torch_configs and torch_configs.BY_NAME[s].compile_mode]
    if compiled:
        lines += ["", "First call of each torch.compile configuration (s, compilation included; Inductor's cache "
                  "in /tmp may already hold the graphs):", "",
                  "| image | step | dtype | " + " | ".join(compiled) + " |", "|---|---|---|" + "---:|" * len(compiled)]
        for r in rows:
            lines.append(f"| 64x64x{r.channels} | {r.step} | {r.dtype} | "
                         + " | ".join(f"{r.first_call.get(s, float('nan')):.1f}" for s in compiled) + " |")
    mem_sides = list(dict.fromkeys(s for r in rows for s in r.memory))
    if mem_sides:
        what = ("CuPy's memory pool and torch's max_memory_reserved (all its configurations in this process)" if gpu
                else "VmHWM of a fresh process running only that side, 3 steps (bench/step_memory.py)")
        lines += ["", f"Peak memory, MiB: {what}.", "",
                  "| image | step | dtype | " + " | ".join(mem_sides) + " |", "|---|---|---|" + "---:|" * len(mem_sides)]
        for r in rows:
            lines.append(f"| 64x64x{r.channels} | {r.step} | {r.dtype} | "
                         + " | ".join(f"{r.memory[s]:.0f}" if s in r.memory else "" for s in mem_sides) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--latent", type=int, default=10)
    p.add_argument("--channels", type=lambda s: [int(c) for c in s.split(",")], default=[1, 3],
                   help="image channels, comma-separated: 1 (dSprites), 3 (default: 1,3)")
    p.add_argument("--dtype", choices=("float32", "float64", "both"), default="both")
    p.add_argument("--step", choices=("gated", "plain", "both"), default="both")
    p.add_argument("--configs", type=lambda s: s.split(","), default=None,
                   help="comma-separated torch configurations (default: all that apply; see torch_configs.py)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                   help="numpy: against PyTorch CPU; cupy: against PyTorch CUDA on the same GPU")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the peak-memory processes")
    p.add_argument("--device-step", action="store_true",
                   help="time refimpl's gated step as DeviceStep (refimpl/device_step.py: no host reads mid-step, "
                        "for GPUs) instead of train_step")
    p.add_argument("--out", help="write the tables as markdown to this file (atomically)")
    args = p.parse_args(argv)
    if torch is None:
        print(TORCH_MISSING, file=sys.stderr)
    dtypes = [numpy.float32, numpy.float64] if args.dtype == "both" else [numpy.dtype(args.dtype).type]
    steps = {"gated": (True,), "plain": (False,), "both": (True, False)}[args.step]
    env = (timing.environment(torch) if args.backend == "numpy" else
           {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": side_by_side.gpu_setup(torch)})
    start = time.perf_counter()
    rows = run(args.repeats, args.warmup, args.batch, args.latent, args.channels, dtypes, args.backend,
               memory=not args.no_memory, configs=args.configs, steps=steps, device_step=args.device_step)
    env["load average at end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    if args.out:
        text = to_markdown(rows, args, env, time.perf_counter() - start)
        atomic_write(args.out, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
