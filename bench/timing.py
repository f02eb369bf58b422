"""How the step benchmarks summarise timings and describe where they were taken (no side effects on import).

- :func:`spread` / :func:`cell`: median with the interquartile range or min-max, in ms;
- :func:`fastest`: the fastest of several torch configurations by median;
- :func:`environment`: the header lines every result file carries: date, CPU, numpy's BLAS
  and threads, torch and its threads, the thread-wait settings, the scheduler autogroup
  of this process (bench/foreground.sh) and the load average.
"""

from __future__ import annotations

import datetime
import os
import statistics


def spread(times_s, kind="iqr"):
    """(median, low, high) in ms: low-high the interquartile range (``kind="iqr"``) or min-max."""
    ms = sorted(1e3 * t for t in times_s)
    if kind == "minmax" or len(ms) < 4:
        return statistics.median(ms), ms[0], ms[-1]
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return statistics.median(ms), q1, q3


def cell(times_s, kind="iqr"):
    """'median (low-high)' in ms, or '' without times."""
    if not times_s:
        return ""
    m, lo, hi = spread(times_s, kind)
    return f"{m:.1f} ({lo:.0f}-{hi:.0f})" if m >= 100 else f"{m:.1f} ({lo:.1f}-{hi:.1f})"


def fastest(medians: dict):
    """(name, median) of the smallest median in {name: median}; (None, nan) when empty."""
    if not medians:
        return None, float("nan")
    name = min(medians, key=medians.get)
    return name, medians[name]


def autogroup() -> str:
    """This process's scheduler autogroup and its nice, or why there is none."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            if f.read().strip() != "1":
                return "scheduler autogroups off"
        with open("/proc/self/autogroup") as f:
            return f.read().strip()
    except OSError:
        return "no scheduler autogroups"


def environment(torch=None, threads_note=True) -> dict:
    """{field: text} describing the machine and the conditions, for a result file's header."""
    import numpy

    from bench_layers import blas_info, cpu_model

    blas, blas_threads = blas_info()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs, {cpu_model()}",
        "numpy": f"{numpy.__version__} with {blas}, {blas_threads} BLAS threads",
        "torch": (f"{torch.__version__}, {torch.get_num_threads()} intra-op threads, oneDNN "
                  f"{'on' if torch.backends.mkldnn.is_available() else 'off'}") if torch is not None else "absent",
    }
    if threads_note:
        env["thread waits"] = ", ".join(f"{k}={os.environ.get(k, 'unset')}"
                                        for k in ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY"))
    env["scheduler"] = autogroup() + " (bench/foreground.sh)"
    env["load average at start"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return env
