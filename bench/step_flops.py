"""The training step's arithmetic floor: its GEMM FLOPs, counted from the architecture, and this machine's GEMM peak.

FLOPs (2 per multiply-add) of every convolution and linear layer of the paper's 64x64
model (``refimpl.model.paper_architecture``), forward and backward, batch N:

- a conv with O x C x k x k weights and Ho x Wo outputs: N O Ho Wo C k^2 multiply-adds
  forward, the same again for dW and for dx (dx is not needed for the first encoder conv,
  whose input is the data: both sides skip it, refimpl since 2026-12-03);
- a linear layer in -> out: N in out each for forward, dW and dx;
- a decoder block "x2 nearest upsample, 3x3 conv" costs 9 O C (2H)(2W) = 36 O C H W per
  image as written (PyTorch runs it so); refimpl's fused layer (``method="col2im"``,
  refimpl/layers/upsample_conv2d.py) does the same map with 16 O C H W GEMM multiply-adds,
  4/9 of it (forward, dW and dx alike);
- gated step: encoder forward + backward, decoder forward twice (E1 under no_grad, E2) and
  backward once; plain step: one decoder pass. Adam, BatchNorm and activations are
  elementwise (a few hundred thousand to a few million operations) and not counted.

The PyTorch count is cross-checked against ``torch.utils.flop_counter.FlopCounterMode``
on bench/torch_configs.py's lean step. The peak: ``numpy.matmul`` (and ``torch.mm``) of
large square matrices on every thread, float32 and float64, the best and the median of
several runs.

    .venv/bin/python bench/step_flops.py --out bench/results/step_flops.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy  # noqa: E402

from refimpl.atomic import atomic_write  # noqa: E402
from refimpl.layers.im2col import conv_output_size  # noqa: E402
from refimpl.model import paper_architecture  # noqa: E402


def layer_macs(arch, n_latent, batch, fused_decoder):
    """[(part, name, forward MACs, dW MACs, dx MACs)] of every conv and linear layer, for the whole batch."""
    rows = []
    c, h, w = arch.image_shape
    for i, s in enumerate(arch.encoder_convs, start=1):
        h, w = (conv_output_size(v, s.kernel, s.stride, s.padding) for v in (h, w))
        m = batch * s.channels * h * w * c * s.kernel ** 2
        rows.append(("encoder", f"conv{i} {c}->{s.channels} {s.kernel}x{s.kernel}/{s.stride} -> {h}x{w}", m, m, m))
        c = s.channels
    flat = c * h * w
    for name, i, o in (("fc1", flat, arch.hidden), ("fc2", arch.hidden, 2 * n_latent)):
        rows.append(("encoder", f"{name} {i}->{o}", batch * i * o, batch * i * o, batch * i * o))
    for name, i, o in (("fc1", n_latent, arch.hidden), ("fc2", arch.hidden, flat)):
        rows.append(("decoder", f"{name} {i}->{o}", batch * i * o, batch * i * o, batch * i * o))
    for i, s in enumerate(arch.decoder_convs, start=1):
        taps = 16 if fused_decoder else 4 * s.kernel ** 2  # per low-resolution pixel and (O, C) pair
        m = batch * s.channels * c * h * w * taps
        rows.append(("decoder", f"up x2 + conv{i} {c}->{s.channels} {s.kernel}x{s.kernel} -> {2 * h}x{2 * w}"
                     + (" (fused, 16 taps)" if fused_decoder else ""), m, m, m))
        c, h, w = s.channels, 2 * h, 2 * w
    return rows


def step_flops(arch, n_latent, batch, gated, side):
    """GEMM FLOPs of one training step as ``side`` ("torch" or "refimpl") computes it."""
    rows = layer_macs(arch, n_latent, batch, fused_decoder=side == "refimpl")
    macs = 0
    for k, (part, name, fwd, dw, dx) in enumerate(rows):
        if k == 0:
            dx = 0  # the data needs no gradient: autograd does not compute it, nor refimpl (Conv2d.input_grad)
        passes = 2 if part == "decoder" and gated else 1  # forward: E1 and E2 passes; backward: E2 only
        macs += passes * fwd + dw + dx
    return 2 * macs


def torch_counted_flops(channels, gated, batch, n_latent):
    """FlopCounterMode's total for one lean torch step (NCHW eager), or None without torch."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    import bench_step
    import torch_configs

    x = bench_step.images(batch, channels)
    model_np, _ = bench_step.refimpl_step(numpy.float32, gated, n_latent, x, numpy)
    step = torch_configs.lean_step(model_np, numpy.float32, gated, x, "cpu")
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    del torch
    return counter.get_total_flops()


def gemm_peak(dtype, size, repeats, lib="numpy"):
    """(best, median) GFLOP/s of a size x size matmul, all threads."""
    if lib == "numpy":
        a = numpy.random.default_rng(0).standard_normal((size, size)).astype(dtype)
        b, out = a.T.copy(), numpy.empty_like(a)

        def mm():
            numpy.matmul(a, b, out=out)
    else:
        import torch

        a = torch.randn(size, size, dtype={"float32": torch.float32, "float64": torch.float64}[dtype])
        b, out = a.t().contiguous(), torch.empty_like(a)

        def mm():
            torch.mm(a, b, out=out)
    mm()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm()
        rates.append(2 * size ** 3 / (time.perf_counter() - t0) / 1e9)
    return max(rates), statistics.median(rates)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--latent", type=int, default=10)
    p.add_argument("--size", type=int, default=4096, help="square GEMM size for the peak")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-torch", action="store_true", help="skip the FlopCounterMode cross-check and torch.mm")
    p.add_argument("--out")
    args = p.parse_args(argv)
    lines = [f"# The training step's GEMM FLOPs and this machine's GEMM peak — {datetime.date.today().isoformat()}", "",
             f"Command: `.venv/bin/python bench/step_flops.py` (batch {args.batch}, n = {args.latent}); "
             "see its docstring for what is counted.", "",
             "## FLOPs per step (GFLOP; 2 per multiply-add)", "",
             "| image | step | PyTorch (as written) | FlopCounterMode (torch) | refimpl (fused decoder) |",
             "|---|---|---:|---:|---:|"]
    for channels in (1, 3):
        arch = paper_architecture((channels, 64, 64))
        for gated in (True, False):
            theirs, ours = (step_flops(arch, args.latent, args.batch, gated, s) for s in ("torch", "refimpl"))
            counted = None if args.no_torch else torch_counted_flops(channels, gated, args.batch, args.latent)
            lines.append(f"| 64x64x{channels} | {'gated' if gated else 'plain'} | {theirs / 1e9:.2f} | "
                         f"{counted / 1e9 if counted else float('nan'):.2f} | {ours / 1e9:.2f} |")
            print(lines[-1], flush=True)
    lines += ["", "Per layer (64x64x3, GFLOP per pass of the whole batch; forward = dW = dx):", "",
              "| part | layer | as written | refimpl |", "|---|---|---:|---:|"]
    arch = paper_architecture((3, 64, 64))
    for plain, fused in zip(layer_macs(arch, args.latent, args.batch, False),
                            layer_macs(arch, args.latent, args.batch, True)):
        lines.append(f"| {plain[0]} | {plain[1]} | {2 * plain[2] / 1e9:.3f} | {2 * fused[2] / 1e9:.3f} |")

    from bench_layers import blas_info, cpu_model

    blas, threads = blas_info()
    lines += ["", f"## GEMM peak, {args.size}x{args.size} matmul, best / median of {args.repeats} (GFLOP/s)", "",
              f"Machine: {os.cpu_count()} cores, {cpu_model()}; numpy {numpy.__version__} with {blas}, {threads} "
              f"threads; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}.", "",
              "| library | float32 best | float32 median | float64 best | float64 median |", "|---|---:|---:|---:|---:|"]
    for lib in ("numpy",) + (() if args.no_torch else ("torch",)):
        (b32, m32), (b64, m64) = (gemm_peak(d, args.size, args.repeats, lib) for d in ("float32", "float64"))
        lines.append(f"| {lib} | {b32:.0f} | {m32:.0f} | {b64:.0f} | {m64:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write(args.out, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
