"""Forward + backward time of every layer of the paper's 64x64x3 model: refimpl (NumPy) vs PyTorch CPU.

Each layer of the encoder and decoder (Section 4; channel widths from
``refimpl.model.paper_architecture``) is run at its own input shape: one training-mode
forward, then one backward of a random upstream gradient (dx and parameter gradients).
The decoder's "x2 nearest upsample + 3x3 conv" blocks are timed twice on the refimpl
side: as the reference pair ``Sequential(Upsample(2), Conv2d)`` and as the fused
``UpsampleConv2d``; torch runs ``nn.Upsample`` + ``nn.Conv2d`` for both. Flatten and
Reshape are views and are left out.

torch runs each layer in both memory formats of bench/torch_configs.py's eager
configurations: NCHW (its default) and channels_last (a copy of the module, the input and
the upstream gradient converted to ``torch.channels_last``; 4-D inputs only, the Linear
layers have no such layout). Every ratio is refimpl's time over the faster of the two,
named in the tables, as bench_step.py reports against torch's fastest configuration.

refimpl and torch run in the same process, interleaved (refimpl, torch NCHW, torch
channels_last, refimpl, ...), with the same inputs, after warm-up runs; the table reports
medians. torch is optional: without it only the refimpl column is filled.

    .venv/bin/python bench/bench_layers.py --batch 64 --repeats 30 --out bench/results/layers_cpu.md
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import side_by_side  # noqa: E402 (sets thread-wait policies before numpy and torch load)

import numpy  # noqa: E402 (after the environment above)

from refimpl.atomic import atomic_write  # noqa: E402
from refimpl.backend import get_xp, to_device  # noqa: E402
from refimpl.layers import BatchNorm, Conv2d, LeakyReLU, Linear, Sequential, Sigmoid, Upsample  # noqa: E402
from refimpl.layers.upsample_conv2d import UpsampleConv2d  # noqa: E402
from refimpl.model import paper_architecture  # noqa: E402
from refimpl.rng import generator  # noqa: E402
from timing import fastest  # noqa: E402

try:
    import torch
except ImportError as exc:  # torch is optional: a crosscheck extra, never a dependency
    torch = None
    TORCH_MISSING = f"PyTorch is not importable ({exc}); timing refimpl only (pip install 'refimpl[crosscheck]')"

LAYOUTS = ("nchw", "channels_last")  # torch's memory formats, named as in torch_configs.py


@dataclass(eq=False)
class Case:
    """One layer at one input shape; ``block`` groups the reference pair and the fused layer it replaces."""

    name: str
    what: str
    x_shape: tuple
    ours: Callable  # dtype -> refimpl Layer
    theirs: Callable  # () -> torch.nn.Module (float32; cast by the caller)
    block: str | None = None
    variant: str | None = None  # "pair" or "fused"


def paper_cases(n_latent: int, image_shape=(3, 64, 64)) -> list[Case]:
    """Every layer of the paper's encoder and decoder, in order, at its input shape (without the batch axis)."""
    arch = paper_architecture(image_shape)
    slope, mom, eps = arch.leaky_slope, arch.bn_momentum, arch.bn_eps
    nn = torch.nn if torch is not None else None
    rng = generator(0)
    cases = []

    def leaky(prefix, i, shape):
        cases.append(Case(f"{prefix}.act{i}", f"LeakyReLU {fmt(shape)}", shape, lambda d, xp: LeakyReLU(slope),
                          lambda: nn.LeakyReLU(slope)))

    def bn(name, shape):
        c = shape[0]
        cases.append(Case(name, f"BatchNorm {fmt(shape)}", shape,
                          lambda d, xp: BatchNorm(c, mom, eps, arch.bn_running_var, xp=xp, dtype=d),
                          lambda: nn.BatchNorm2d(c, eps=eps, momentum=1 - mom)))  # torch momentum = 1 - Keras's

    def linear(name, fin, fout):
        cases.append(Case(name, f"Linear {fin}->{fout}", (fin,), lambda d, xp: Linear(fin, fout, rng=rng, xp=xp, dtype=d),
                          lambda: nn.Linear(fin, fout)))

    # encoder: conv -> leaky ReLU -> BatchNorm, four times; flatten; linear 128; leaky ReLU; linear 2n
    shape = tuple(image_shape)
    for i, s in enumerate(arch.encoder_convs, start=1):
        cin, (h, w) = shape[0], shape[1:]
        out = (s.channels, (h + 2 * s.padding - s.kernel) // s.stride + 1, (w + 2 * s.padding - s.kernel) // s.stride + 1)
        cases.append(Case(f"encoder.conv{i}", f"Conv2d {cin}->{s.channels} {s.kernel}x{s.kernel}/{s.stride} {h}->{out[1]}",
                          shape, lambda d, xp, cin=cin, s=s: Conv2d(cin, s.channels, s.kernel, s.stride, s.padding, rng=rng,
                                                                xp=xp, dtype=d),
                          lambda cin=cin, s=s: nn.Conv2d(cin, s.channels, s.kernel, s.stride, s.padding)))
        shape = out
        leaky("encoder", i, shape)
        bn(f"encoder.bn{i}", shape)
    flat = math.prod(shape)
    linear("encoder.fc1", flat, arch.hidden)
    cases.append(Case("encoder.act_fc1", f"LeakyReLU ({arch.hidden},)", (arch.hidden,), lambda d, xp: LeakyReLU(slope),
                      lambda: nn.LeakyReLU(slope)))
    linear("encoder.fc2", arch.hidden, 2 * n_latent)

    # decoder: linear n->128, leaky ReLU, linear 128->flat, leaky ReLU, reshape; 4 x [BN, up x2, conv 3x3], act
    linear("decoder.fc1", n_latent, arch.hidden)
    cases.append(Case("decoder.act_fc1", f"LeakyReLU ({arch.hidden},)", (arch.hidden,), lambda d, xp: LeakyReLU(slope),
                      lambda: nn.LeakyReLU(slope)))
    linear("decoder.fc2", arch.hidden, flat)
    cases.append(Case("decoder.act_fc2", f"LeakyReLU ({flat},)", (flat,), lambda d, xp: LeakyReLU(slope),
                      lambda: nn.LeakyReLU(slope)))
    last = len(arch.decoder_convs)
    for i, s in enumerate(arch.decoder_convs, start=1):
        assert (s.kernel, s.stride, s.padding) == (3, 1, 1), "the fused layer covers 3x3/1 pad 1 convs"
        cin, (h, w) = shape[0], shape[1:]
        bn(f"decoder.bn{i}", shape)
        what = f"up x2 + conv {cin}->{s.channels} 3x3 {h}->{2 * h}"

        def torch_pair(cin=cin, s=s):
            return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, s.channels, 3, 1, 1))

        cases.append(Case(f"decoder.up{i}+conv{i}", what + " (pair)", shape,
                          lambda d, xp, cin=cin, s=s: Sequential(Upsample(2), Conv2d(cin, s.channels, 3, 1, 1, rng=rng, xp=xp, dtype=d)),
                          torch_pair, block=f"decoder block {i}", variant="pair"))
        fused_method = UpsampleConv2d(cin, s.channels, rng=generator(0)).method
        cases.append(Case(f"decoder.conv{i} fused", what + f" (fused, {fused_method})", shape,
                          lambda d, xp, cin=cin, s=s: UpsampleConv2d(cin, s.channels, rng=rng, xp=xp, dtype=d),
                          torch_pair, block=f"decoder block {i}", variant="fused"))
        shape = (s.channels, 2 * h, 2 * w)
        if i == last:
            cases.append(Case(f"decoder.act{i}", f"Sigmoid {fmt(shape)}", shape, lambda d, xp: Sigmoid(), lambda: nn.Sigmoid()))
        else:
            leaky("decoder", i, shape)
    return cases


def fmt(shape):
    return "x".join(str(s) for s in shape)


def time_ours(layer, x, dy, sync):
    sync()
    t0 = time.perf_counter()
    layer.forward(x)
    layer.backward(dy)
    sync()
    return time.perf_counter() - t0


def time_theirs(module, x, dy, sync):
    x.grad = None
    sync()
    t0 = time.perf_counter()
    module(x).backward(dy)
    sync()
    return time.perf_counter() - t0


def nothing():
    pass


def run_case(case, batch, dtype, repeats, warmup, xp=numpy, seed=0, layouts=("nchw",)):
    """(refimpl median ms, then one torch median ms per entry of ``layouts``): interleaved runs after ``warmup``.

    A torch entry is None without torch, and for "channels_last" on a 2-D input (Linear
    layers), where that memory format does not exist. Each layout times its own copy of the
    module, with the input and upstream gradient in that format.

    With ``xp`` = cupy the refimpl layer lives on the GPU and torch's module on CUDA; each
    timed call ends with a synchronize of its own side.
    """
    gpu = xp is not numpy
    rng = numpy.random.default_rng(seed)
    layer = case.ours(dtype, xp)
    x_host = rng.standard_normal((batch, *case.x_shape)).astype(dtype)
    x = to_device(x_host, xp)
    dy_host = rng.standard_normal(layer.forward(x, cache=False).shape).astype(dtype)
    dy = to_device(dy_host, xp)
    sync_ours = xp.cuda.Device().synchronize if gpu else nothing
    runs = {"refimpl": lambda: time_ours(layer, x, dy, sync_ours)}
    if torch is not None:
        device = "cuda" if gpu else "cpu"
        module = case.theirs().to(device=device, dtype=torch.float32 if dtype == numpy.float32 else torch.float64).train()
        sync_theirs = torch.cuda.synchronize if gpu else nothing
        for layout in layouts:
            if layout == "channels_last" and x_host.ndim != 4:
                continue  # a memory format of 4-D tensors only
            mf = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}[layout]
            m = copy.deepcopy(module).to(memory_format=mf)  # converts the 4-D weights (convs)
            xt = torch.from_numpy(x_host.copy()).to(device).contiguous(memory_format=mf).requires_grad_(True)
            dyt = torch.from_numpy(dy_host.copy()).to(device).contiguous(memory_format=mf)
            runs[layout] = lambda m=m, xt=xt, dyt=dyt: time_theirs(m, xt, dyt, sync_theirs)
    times = {name: [] for name in runs}
    gc.collect()
    gc.disable()
    try:
        for r in range(warmup + repeats):
            for name, run in runs.items():
                t = run()
                if r >= warmup:
                    times[name].append(t)
    finally:
        gc.enable()
    medians = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    return (medians["refimpl"], *(medians.get(layout) for layout in layouts))


# ---------------------------------------------------------------- environment


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _openblas_call(name, restype=ctypes.c_int):
    """A function of the OpenBLAS that numpy loaded (``get_num_threads``, ...), or None; found via /proc/self/maps."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and line.split()[-1].startswith("/")})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in (f"scipy_openblas_{name}64_", f"scipy_openblas_{name}", f"openblas_{name}64_", f"openblas_{name}"):
            func = getattr(lib, symbol, None)
            if func is not None:
                func.restype = restype
                return func
    return None


def blas_info():
    """(description, threads or None) of numpy's BLAS: threadpoolctl if installed, else OpenBLAS via ctypes."""
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            if info.get("user_api") == "blas":
                return f"{info.get('internal_api')} {info.get('version')} ({info.get('architecture')})", info.get("num_threads")
    except ImportError:
        pass
    try:
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        desc = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # show_config's layout differs across numpy versions
        desc = "unknown"
    config = _openblas_call("get_config", ctypes.c_char_p)
    if config is not None:
        desc += f" (runtime: {config().decode().strip()})"
    get_threads = _openblas_call("get_num_threads")
    return desc, (get_threads() if get_threads is not None else None)


def set_blas_threads(k):
    """Set numpy's BLAS thread count; False when neither threadpoolctl nor OpenBLAS's setter is available."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(k, user_api="blas")
        return True
    except ImportError:
        pass
    setter = _openblas_call("set_num_threads", None)
    if setter is None:
        return False
    setter(ctypes.c_int(k))
    return True


def environment(args):
    blas, blas_threads = blas_info()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}",
        "backend": args.backend + ("" if args.backend == "numpy" else
                                   f": {side_by_side.gpu_setup(torch)}; refimpl on CuPy, torch on CUDA"),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "numpy BLAS": blas,
        "BLAS threads": str(blas_threads) if blas_threads is not None else "unknown",
        "torch": torch.__version__ if torch is not None else "not installed",
        "torch threads": str(torch.get_num_threads()) if torch is not None else "n/a",
        "thread waits": f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')}, "
                        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        "batch": str(args.batch),
        "repeats": f"median of {args.repeats} after {args.warmup} warm-up runs each, refimpl and torch interleaved",
        "load average at start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    return env, blas_threads


# ---------------------------------------------------------------- report


def ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"


def ms(v):
    return f"{v:.2f}" if v is not None else "n/a"


def model_sums(results, dtype):
    """(refimpl with fused decoder blocks, refimpl with the reference pairs, then one torch sum per torch timing
    of the rows, None without torch): summed ms of every layer's forward+backward. torch counts each decoder block
    once, the mean of its two rows, and a layer without a timing in a layout (channels_last: the Linear layers)
    with its first one (NCHW), as it runs in a whole model converted to that layout."""
    rows = [(c, v) for (c, d), v in results.items() if d == dtype]
    fused = sum(v[0] for c, v in rows if c.variant != "pair")
    pairs = sum(v[0] for c, v in rows if c.variant != "fused")
    sums = []
    for k in range(1, max((len(v) for _, v in rows), default=2)):
        ts = [(c, v[1] if v[k] is None else v[k]) for c, v in rows]
        if any(t is None for _, t in ts):
            sums.append(None)
            continue
        block_t = {}
        for c, t in ts:
            if c.block:
                block_t.setdefault(c.block, []).append(t)
        sums.append(sum(t for c, t in ts if not c.block) + sum(statistics.mean(b) for b in block_t.values()))
    return (fused, pairs, *sums)


def fastest_torch(theirs):
    """(layout, ms) of the fastest of ``theirs`` (ms in LAYOUTS order, None where not timed); (None, None) if none."""
    name, t = fastest({layout: t for layout, t in zip(LAYOUTS, theirs) if t is not None})
    return (name, t) if name is not None else (None, None)


def channels_last_ms(case, t):
    """The channels_last cell: "—" where the layout does not apply (2-D input)."""
    return ms(t) if len(case.x_shape) == 3 else "—"


def tables(results, dtypes, totals=True):
    """Markdown lines: the per-layer table, the pair-vs-fused table and (``totals``) per-dtype sums.

    ``results``: {(case, dtype): (refimpl ms, torch NCHW ms, torch channels_last ms)}, as run_case returns
    with ``layouts=LAYOUTS``.
    """
    lines = ["Ratios: refimpl over the faster torch memory format of the row (\"fastest torch\"); channels_last "
             "—: not applicable (2-D input).", "",
             "| layer | shape / op | dtype | refimpl ms | torch NCHW ms | torch channels_last ms | fastest torch | "
             "ratio (refimpl/fastest torch) |", "|---|---|---|---:|---:|---:|---|---:|"]
    for (case, dtype), (ours, *theirs) in results.items():
        best, best_ms = fastest_torch(theirs)
        lines.append(f"| {case.name} | {case.what} | {dtype} | {ms(ours)} | {ms(theirs[0])} | "
                     f"{channels_last_ms(case, theirs[1])} | {best or 'n/a'} | {ratio(ours, best_ms)} |")
    lines += ["", "Decoder blocks, upsample + conv: reference pair vs fused `UpsampleConv2d` (refimpl only; torch runs "
              "nn.Upsample + nn.Conv2d for both, in each memory format).", "",
              "| block | dtype | pair ms | fused ms | speed-up (pair/fused) | torch NCHW ms (pair row, fused row) | "
              "torch channels_last ms (pair row, fused row) | fastest torch | fused/fastest torch |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    blocks = {}
    for (case, dtype), value in results.items():
        if case.block:
            blocks.setdefault((case.block, dtype), {})[case.variant] = value
    for (block, dtype), v in blocks.items():
        if len(v) < 2:  # --only selected one of the two
            continue
        (pair, *theirs), (fused, *theirs2) = v["pair"], v["fused"]
        # torch runs the same module in both rows: two timings far apart mean the machine was busy
        torch_ms = [statistics.mean([a, b]) if a is not None else None for a, b in zip(theirs, theirs2)]
        cells = [f"{ms(t)} ({ms(a)}, {ms(b)})" if t is not None else "n/a"
                 for t, a, b in zip(torch_ms, theirs, theirs2)]
        best, best_ms = fastest_torch(torch_ms)
        lines.append(f"| {block} | {dtype} | {ms(pair)} | {ms(fused)} | {ratio(pair, fused)} | {' | '.join(cells)} | "
                     f"{best or 'n/a'} | {ratio(fused, best_ms)} |")
    if not totals:
        return lines
    lines += ["", "Sums over the layers of one forward+backward of the whole model (encoder + decoder; torch "
              "counts each decoder block once, the mean of its two timings; its channels_last sum takes the Linear "
              "layers' NCHW times).", "",
              "| dtype | refimpl, fused decoder ms | refimpl, reference pairs ms | torch NCHW ms | torch channels_last ms "
              "| fastest torch | ratio (fused/fastest torch) | ratio (pairs/fastest torch) |",
              "|---|---:|---:|---:|---:|---|---:|---:|"]
    for dtype in dtypes:
        fused, pairs, *theirs = model_sums(results, dtype)
        best, best_ms = fastest_torch(theirs)
        lines.append(f"| {dtype} | {ms(fused)} | {ms(pairs)} | {' | '.join(ms(t) for t in theirs)} | {best or 'n/a'} | "
                     f"{ratio(fused, best_ms)} | {ratio(pairs, best_ms)} |")
    return lines


def prepare(args) -> dict:
    """Set the thread counts (``args.threads``, torch matched to the BLAS), print and return the environment."""
    if torch is None:
        print(TORCH_MISSING, file=sys.stderr)
    if args.threads is not None:
        if not set_blas_threads(args.threads):
            print(f"--threads {args.threads}: cannot set numpy's BLAS threads (no threadpoolctl, no OpenBLAS); "
                  "set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS instead", file=sys.stderr)
        if torch is not None:
            torch.set_num_threads(args.threads)
    env, blas_threads = environment(args)
    if torch is not None and blas_threads is not None and torch.get_num_threads() != blas_threads:
        torch.set_num_threads(blas_threads)  # same thread count on both sides
        env["torch threads"] = f"{torch.get_num_threads()} (set to match the BLAS)"
    for key, value in env.items():
        print(f"{key}: {value}")
    busy = os.getloadavg()[0]
    if busy > 0.5 * len(os.sched_getaffinity(0)):
        env["warning"] = f"1-minute load average {busy:.2f} at start: other processes compete for the CPUs"
        print(f"warning: {env['warning']}; timings (and torch's more than numpy's) will be inflated", file=sys.stderr)
    return env


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per layer and side (median; >= 1)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per layer and side first")
    parser.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                        help="numpy: against PyTorch CPU; cupy: against PyTorch CUDA on the same GPU")
    parser.add_argument("--n-latent", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS and torch intra-op threads (default: as loaded; torch is matched to the BLAS)")
    parser.add_argument("--only", default=None, help="time only layers whose name contains this string")
    parser.add_argument("--out", default=None, help="also write the tables as markdown to this file (atomically)")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.repeats < 1 or args.warmup < 0 or args.n_latent < 1 or (args.threads or 1) < 1:
        parser.error("--batch must be >= 2 (BatchNorm), --repeats >= 1, --warmup >= 0, --n-latent >= 1, --threads >= 1")

    env = prepare(args)
    if torch is not None:
        env["torch memory formats"] = "NCHW and channels_last (4-D inputs); ratios against the faster"

    xp = get_xp(args.backend)
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    cases = [c for c in paper_cases(args.n_latent) if args.only is None or args.only in c.name]
    results, loads = {}, [os.getloadavg()[0]]
    start = time.perf_counter()
    for dtype in dtypes:
        for case in cases:
            ours, *theirs = run_case(case, args.batch, numpy.dtype(dtype).type, args.repeats, args.warmup, xp,
                                     layouts=LAYOUTS)
            results[(case, dtype)] = (ours, *theirs)
            loads.append(os.getloadavg()[0])
            best, best_ms = fastest_torch(theirs)
            print(f"{case.name:24s} {case.what:48s} {dtype:8s} refimpl {ms(ours):>8s} ms  torch NCHW "
                  f"{ms(theirs[0]):>8s} ms  channels_last {channels_last_ms(case, theirs[1]):>8s} ms  "
                  f"ratio {ratio(ours, best_ms)} ({best or 'n/a'})", flush=True)
    env["load average at end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    env["1-minute load average during the run"] = f"min {min(loads):.2f}, max {max(loads):.2f} (sampled after each layer)"
    env["bench wall time"] = f"{time.perf_counter() - start:.0f} s"
    lines = tables(results, dtypes, totals=args.only is None)
    print()
    print("\n".join(lines))
    if args.out:
        peer = "(NumPy) vs PyTorch CPU" if args.backend == "numpy" else "(CuPy) vs PyTorch CUDA"
        header = [f"# Per-layer forward+backward time: refimpl {peer}", "",
                  "Generated by `bench/bench_layers.py` (see bench/README.md). Each time is one training-mode forward "
                  "plus one backward (dx and parameter gradients) of one layer at its shape in the paper's 64x64x3 "
                  f"model, n = {args.n_latent}. torch runs each layer in NCHW and in channels_last; ratios are against "
                  "the faster of the two.", ""]
        header += [f"- {k}: {v}" for k, v in env.items()] + [""]
        text = "\n".join(header + lines) + "\n"
        atomic_write(args.out, lambda f: f.write(text.encode()))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
