"""Forward and backward time of UpsampleConv2d's evaluation methods on the paper's decoder blocks.

The four fused decoder blocks of the 64x64 model (C -> O at input size H: 64 -> 64 at 4,
64 -> 32 at 8, 32 -> 32 at 16, 32 -> 3 at 32; ``--out-last 1`` for the 64x64x1 model) at
batch 64, each method timed in the same process, interleaved (method 1, method 2, ...,
method 1, ...), after warm-up calls; medians in ms. The layer runs on the default
setting's paths (``--no-parallel-grads`` / ``--no-shift-flat`` to change them); BLAS
threads as the environment says (``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1`` for one).

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/bench_upsample_methods.py --dtype float32
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy

from refimpl.execution import Execution
from refimpl.layers.upsample_conv2d import UpsampleConv2d
from refimpl.rng import generator

BLOCKS = ((64, 64, 4), (64, 32, 8), (32, 32, 16), (32, 3, 32))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--methods", default="col2im,difference")
    p.add_argument("--out-last", type=int, default=3, help="the last block's output channels (image channels)")
    p.add_argument("--blocks", help="other blocks than the paper's: C,O,H;C,O,H;...")
    p.add_argument("--no-parallel-grads", action="store_true")
    p.add_argument("--no-shift-flat", action="store_true")
    args = p.parse_args(argv)
    dtype = numpy.dtype(args.dtype)
    paths = dataclasses.replace(Execution().resolve("numpy"), **({"parallel_grads": False} if args.no_parallel_grads
                                                                 else {}),
                                **({"shift_flat": False} if args.no_shift_flat else {}))
    methods = args.methods.split(",")
    print(f"batch {args.batch}, {args.dtype}, parallel_grads={paths.parallel_grads}, shift_flat={paths.shift_flat}, "
          f"median of {args.repeats} (ms)")
    print("| block | " + " | ".join(f"{m} fwd | {m} bwd" for m in methods) + " |")
    print("|---|" + "---:|" * (2 * len(methods)))
    rng = numpy.random.default_rng(0)
    blocks = BLOCKS[:-1] + ((BLOCKS[-1][0], args.out_last, BLOCKS[-1][2]),)
    if args.blocks:
        blocks = [tuple(int(v) for v in b.split(",")) for b in args.blocks.split(";")]
    for c, o, h in blocks:
        x = rng.standard_normal((args.batch, c, h, h)).astype(dtype)
        dy = rng.standard_normal((args.batch, o, 2 * h, 2 * h)).astype(dtype)
        layers = {m: UpsampleConv2d(c, o, rng=generator(0), dtype=dtype, method=m, paths=paths) for m in methods}
        times = {m: ([], []) for m in methods}
        for r in range(args.warmup + args.repeats):
            for m, layer in layers.items():
                t0 = time.perf_counter()
                layer.forward(x)
                t1 = time.perf_counter()
                layer.backward(dy)
                t2 = time.perf_counter()
                if r >= args.warmup:
                    times[m][0].append(1e3 * (t1 - t0))
                    times[m][1].append(1e3 * (t2 - t1))
        cells = [f"{statistics.median(t):.2f}" for m in methods for t in times[m]]
        print(f"| {c}->{o} at {h} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
