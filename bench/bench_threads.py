"""The CPU step under refimpl's thread settings (refimpl/threads.py) beside PyTorch channels_last.

One process, sides interleaved (the order rotated every round), one step per call:

- refimpl ``T2 seq``: 2 BLAS threads, the decoder passes one after the other (before 2026-12-06);
- refimpl ``T1 seq``: 1 BLAS thread, in order (the reference of the next);
- refimpl ``T1 par``: 1 BLAS thread, the E1 pass in a second thread beside the E2 pass (the default here);
- refimpl ``T2+T1 par``: 2 BLAS threads, 1 for each decoder pass, side by side (``--blas-threads 2``);
- torch channels_last eager with ``torch.set_num_threads(1)`` and ``(2)``.

Cases: the gated step (gates sampled: both decoder passes) at batch 64 on the 16x16 model
of the README's main job, the 32x32 model and Section 4's 64x64 model. Prints a Markdown
table (median and min-max ms; ratios against torch on as many cores) and writes it to --out.

    bench/foreground.sh .venv/bin/python bench/bench_threads.py --out bench/results/step_cpu_threads.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import side_by_side  # noqa: E402,F401 (thread-wait policies before numpy and torch load)

import numpy  # noqa: E402

import timing  # noqa: E402
from refimpl.algorithm1 import Hyper, init_state, train_step  # noqa: E402
from refimpl.atomic import atomic_write  # noqa: E402
from refimpl.model import GatedVAE, build_architecture, paper_architecture  # noqa: E402
from refimpl.rng import generator  # noqa: E402
from refimpl.threads import DecoderPasses, Threads, blas_limit  # noqa: E402

import torch  # noqa: E402
import torch_configs  # noqa: E402

# refimpl's sides as resolved thread settings (refimpl.threads.Threads: step BLAS threads, each pass's, side by side)
REFIMPL_SIDES = {"refimpl T2 seq": Threads(2, 2, False),  # before 2026-12-06: OpenBLAS's default everywhere
                 "refimpl T1 seq": Threads(1, 1, False),  # --blas-threads 1 --decoder-passes sequential
                 "refimpl T1 par": Threads(1, 1, True),  # the default on 2 cores (--blas-threads auto)
                 "refimpl T2+T1 par": Threads(2, 1, True)}  # --blas-threads 2
TORCH_SIDES = {"torch T1": 1, "torch T2": 2}


def architecture(shape):
    return paper_architecture(shape) if shape[1] == 64 else build_architecture(shape)


def refimpl_side(shape, dtype, threads, x, n_latent=10):
    model = GatedVAE(architecture(shape), n_latent, rng=generator(0), dtype=dtype)
    state = init_state(model, Hyper(tau=1e9))
    state.passes = DecoderPasses(model, threads)
    state.hit = True  # gates sampled: both decoder passes
    rng = generator(1)

    def step():
        with blas_limit(threads.blas):  # as Run.train does
            train_step(state, x, rng)
    return model, step


def torch_side(model_np, dtype, x, threads):
    inner = torch_configs.lean_step(model_np, dtype, True, x, "cpu", torch_configs.BY_NAME["channels_last"],
                                    arch=architecture(x.shape[1:]))

    def step():
        torch.set_num_threads(threads)
        inner()
    return step


def time_case(shape, dtype, rounds, warmup):
    x = (generator(7).uniform(size=(64, *shape)) > 0.7).astype(dtype)
    sides = {}
    for name, threads in REFIMPL_SIDES.items():
        model, sides[name] = refimpl_side(shape, dtype, threads, x)
    for name, threads in TORCH_SIDES.items():
        sides[name] = torch_side(model, dtype, x, threads)
    for step in sides.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in sides}
    names = list(sides)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def to_markdown(results, args, env, wall_s):
    lines = [f"# The gated CPU step by thread setting, batch 64 ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"`bench/bench_threads.py --rounds {args.rounds} --warmup {args.warmup}`, {wall_s:.0f} s; condition: "
             f"{args.condition}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    names = list(REFIMPL_SIDES) + list(TORCH_SIDES)
    lines += ["", "Median (min-max) ms of one step, sides interleaved in one process.", "",
              "| image | dtype | " + " | ".join(names) + " | T1 par / torch T2 | T2+T1 par / torch T2 | T1 seq / torch T1 | T2 seq / torch T2 |",
              "|---|---|" + "---:|" * (len(names) + 4)]
    for (shape, dtype), times in results:
        med = {n: timing.spread(times[n], "minmax") for n in names}
        cells = [f"{m:.1f} ({lo:.0f}-{hi:.0f})" for m, lo, hi in (med[n] for n in names)]
        ratio = lambda a, b: f"{med[a][0] / med[b][0]:.2f}"  # noqa: E731
        lines.append(f"| {'x'.join(map(str, shape[1:]))}x{shape[0]} | {dtype} | " + " | ".join(cells)
                     + f" | {ratio('refimpl T1 par', 'torch T2')} | {ratio('refimpl T2+T1 par', 'torch T2')}"
                     + f" | {ratio('refimpl T1 seq', 'torch T1')}"
                     + f" | {ratio('refimpl T2 seq', 'torch T2')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16,32,64", help="image sides (1 channel; 64 also with 3)")
    p.add_argument("--dtype", choices=("float32", "float64", "both"), default="both", help="64x64 only; others float32")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--condition", default="", help="what else ran (for the file)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cases = []
    for size in map(int, args.sizes.split(",")):
        for channels in ((1, 3) if size == 64 else (1,)):
            dtypes = ("float32", "float64") if args.dtype == "both" else (args.dtype,)
            for dtype in (dtypes if size == 64 else ("float32",)):
                cases.append(((channels, size, size), dtype))
    env = timing.environment(torch)
    t0 = time.perf_counter()
    results = []
    for shape, dtype in cases:
        results.append(((shape, dtype), time_case(shape, numpy.dtype(dtype).type, args.rounds, args.warmup)))
        print(to_markdown(results[-1:], args, {}, 0).splitlines()[-1], flush=True)
    text = to_markdown(results, args, env, time.perf_counter() - t0)
    print(text)
    if args.out:
        atomic_write(args.out, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
