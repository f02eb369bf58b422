"""Peak resident memory of one side's CPU training step, alone in a fresh process.

    python bench/step_memory.py refimpl|torch[:CONFIG] float32|float64 gated|plain [batch] [latent] [channels]

CONFIG: a torch configuration of bench/torch_configs.py (nchw, the default; channels_last;
compile; channels_last+compile). Prints two numbers in MiB: the resident size after
imports and model set-up, and the peak (``VmHWM`` of /proc/self/status) after three steps
as bench_step.py runs them (for the compiled configurations the first of them compiles:
Inductor's own peak in this process counts, its compile workers' do not).
(Not ``ru_maxrss``: Linux carries it over from the forking parent into the exec'd child,
so a child of a large benchmark process would report the parent's peak.) For ``refimpl`` torch
is kept out of the process (``sys.modules["torch"] = None``), so the numbers are NumPy's
and refimpl's alone; for ``torch`` they include torch's import (about 220 MiB on its
own) and a small refimpl model whose initial weights torch copies. bench_step.py runs
this once per side and table row.
"""

from __future__ import annotations

import sys
from pathlib import Path


def status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(argv) -> None:
    side, dtype_name, kind = argv[:3]
    side, _, config = side.partition(":")
    batch, latent, channels = (int(a) for a in (argv[3:6] or (64, 10, 3)))
    if side not in ("refimpl", "torch") or kind not in ("gated", "plain"):
        raise SystemExit(f"usage: {__doc__.split(chr(10))[2].strip()}")
    if side == "refimpl":
        sys.modules["torch"] = None  # bench_step's `import torch` then fails: torch stays out
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_step
    import numpy

    dtype = numpy.dtype(dtype_name).type
    x = bench_step.images(batch, channels)
    model, step = bench_step.refimpl_step(dtype, kind == "gated", latent, x, numpy)
    if side == "torch":
        step = bench_step.torch_step(model, dtype, kind == "gated", x, "cpu", config or "nchw")
    before = status_mib("VmRSS")
    for _ in range(3):
        step()
    print(f"{before:.1f} {status_mib('VmHWM'):.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
