"""Where a refimpl training step spends its time: cProfile by function, and on a GPU the CUDA kernels.

Runs Algorithm 1's gated step (both decoder passes) of the paper's 64x64 model at batch 64,
as bench_step.py builds it, on ``--backend numpy`` or ``cupy``. Prints:

1. wall time per step;
2. cProfile's top functions by own time, and the time inside each layer type's
   ``forward``/``backward`` (cumulative);
3. on CuPy, with PyTorch's profiler importable (it records every CUDA kernel in the
   process, CuPy's too): kernels launched per step, their summed GPU time per step against
   the wall time, and the kernels with the most GPU time. GPU time far under wall time
   means the step is bound by launching kernels from Python, not by the GPU.

    python bench/profile_step.py --backend cupy --steps 20
    python bench/profile_step.py --backend cupy --no-cuda-kernels     # the plain array code on the GPU

The execution options of ``refimpl train`` choose the fast paths (``--reference``, ``--no-fused``,
``--no-cuda-kernels``, ...; refimpl/execution.py).
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402 (also applies side_by_side's thread settings)

import numpy  # noqa: E402

from refimpl import options  # noqa: E402
from refimpl.backend import get_xp  # noqa: E402
from refimpl.execution import Execution  # noqa: E402
from refimpl.rng import generator  # noqa: E402


def layer_times(stats: pstats.Stats, steps: int) -> list[tuple[str, int, float]]:
    """(module.function, calls per step, cumulative ms per step) of every layer forward/backward."""
    rows = []
    for (file, line, func), (_, ncalls, _, cumtime, _) in stats.stats.items():
        if "refimpl/layers/" in file.replace("\\", "/") and func in ("forward", "backward"):
            rows.append((f"{Path(file).stem}.{func} (l. {line})", ncalls // steps, 1e3 * cumtime / steps))
    return sorted(rows, key=lambda r: -r[2])


def cuda_kernels(step, steps: int, top: int) -> None:
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        print("(torch.profiler not importable: no kernel counts)")
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    gpu_us = sum(e.device_time for e in kernels) / steps
    print(f"\nCUDA kernels per step: {len(kernels) / steps:.0f}; their GPU time {gpu_us / 1e3:.2f} ms "
          f"of {1e3 * wall:.2f} ms wall ({100 * gpu_us / 1e3 / (1e3 * wall):.0f}% busy)")
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.device_time
    print(f"{'kernel':60s} {'per step':>8s} {'GPU ms/step':>12s}")
    for name, (count, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{name[:60]:60s} {count / steps:8.1f} {us / steps / 1e3:12.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--plain", action="store_true", help="the plain step (one decoder pass) instead of the gated one")
    p.add_argument("--top", type=int, default=25)
    options.add_options(p, Execution, exclude=("device_step",), title="execution (refimpl/execution.py)")
    args = p.parse_args(argv)
    xp = get_xp(args.backend)
    x = (generator(7).uniform(size=(64, 3, 64, 64)) > 0.7).astype(numpy.float64)
    model, step = bench_step.refimpl_step(numpy.dtype(args.dtype).type, not args.plain, 10, x, xp,
                                          execution=Execution(**options.given(args, Execution)))
    sync = xp.cuda.Device().synchronize if args.backend == "cupy" else bench_step.nothing
    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall = (time.perf_counter() - t0) / args.steps
    fast = [name for name, on in model.paths.to_dict().items() if on is True]
    print(f"{args.backend} {args.dtype} {'plain' if args.plain else 'gated'} step, fast paths "
          f"{', '.join(fast) or 'none'}: {1e3 * wall:.2f} ms per step (mean of {args.steps})")

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        step()
    sync()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(args.top)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:20000])
    print(f"\n{'layer method':40s} {'calls/step':>10s} {'cum ms/step':>12s}")
    for name, calls, ms in layer_times(stats, args.steps):
        print(f"{name:40s} {calls:10d} {ms:12.2f}")
    if args.backend == "cupy":
        cuda_kernels(step, args.steps, args.top)


if __name__ == "__main__":
    main()
