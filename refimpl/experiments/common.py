"""What the experiment scripts share: options, running (and resuming) training runs, CSV, plots.

Every run of an experiment is an ordinary run folder (see :mod:`refimpl.training`) under
``OUT/runs/``; running an experiment again resumes unfinished runs from their checkpoints
and reuses finished ones, so an interrupted experiment loses at most ``checkpoint_every``
batches per run. With ``--jobs J`` up to J runs train at once, in separate processes
(each with one BLAS thread).

Each script has small defaults that show the effect on a 2-core CPU and ``--full`` for
the paper's settings; any option given explicitly overrides both.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..algorithm1 import OPTIONS
from ..atomic import atomic_write
from ..backend import BACKENDS, DTYPES, BackendError
from ..checkpoint import CheckpointError
from ..data import DATASET_NAMES, DatasetError
from ..training import CHECKPOINT_FILE, NonFiniteLoss, Run, RunConfig, TrainingInterrupted, config_differences

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class ExperimentError(Exception):
    """A problem to report in one line (exit 1)."""


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options every experiment takes; defaults are None (the script fills small or --full values)."""
    from ..cli import ArgumentParser, _int_list, _positive_int

    p = ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the paper's settings (hours to days on a CPU; use a GPU)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: experiments/<name>)")
    p.add_argument("--dataset", choices=DATASET_NAMES, default=None)
    p.add_argument("--data", default=None, metavar="PATH", help="dataset file or folder")
    p.add_argument("--batches", type=_positive_int, default=None, metavar="B", help="training batches per run")
    p.add_argument("--batch-size", type=_positive_int, default=None, metavar="B")
    p.add_argument("--image-size", type=_positive_int, default=None, metavar="S",
                   help="average-pool images to SxS (the small defaults use 16 or 32)")
    p.add_argument("--channels", type=_int_list, default=None, metavar="C1,C2,...", help="encoder conv widths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=BACKENDS, default=None, help="numpy or cupy (default: $REFIMPL_BACKEND)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--jobs", type=_positive_int, default=1, metavar="J", help="runs trained at once (processes)")
    p.add_argument("--blas-threads", type=int, default=1, metavar="T",
                   help="BLAS threads per run (default 1: on a busy CPU, one thread per process is several times "
                        "faster); 0 leaves the environment alone and, with --jobs 1, trains in this process")
    p.add_argument("--checkpoint-every", type=_positive_int, default=500, metavar="N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    for name, choices in OPTIONS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, choices=choices, default=None,
                       help="Algorithm 1 interpretation switch (see refimpl/INTERPRETATIONS.md)")
    return p


def settings(args, small: dict, full: dict) -> dict:
    """``full`` or ``small`` (by ``--full``), overridden by every option given explicitly."""
    chosen = dict(full if args.full else small)
    for key in ("dataset", "data", "batches", "batch_size", "image_size", "channels"):
        value = getattr(args, key, None)
        if value is not None:
            chosen[key] = value
    return chosen


def interpretation_switches(args) -> dict:
    return {name: getattr(args, name) for name in OPTIONS if getattr(args, name, None) is not None}


def run_spec(out, *, dataset, latent, tau, batches, seed=0, data=None, batch_size=64, image_size=None,
             channels=None, baseline=False, dtype="float32", backend=None, hyper=None, checkpoint_every=500,
             progress=True, holdout=1000) -> dict:
    """Everything :func:`train_one` needs, as a picklable dict."""
    h = dict(hyper or {})
    if not baseline:
        h["tau"] = float(tau)
    config = RunConfig(dataset=dataset, data=None if data is None else str(Path(data).resolve()), latent=latent,
                       batch_size=batch_size, dtype=dtype, seed=seed, image_size=image_size, channels=channels,
                       holdout=holdout, baseline=baseline, hyper=h)
    return {"out": str(out), "config": config.to_dict(), "batches": int(batches), "backend": backend,
            "checkpoint_every": checkpoint_every, "progress": progress}


def train_one(spec: dict) -> dict:
    """Create (or resume, or reuse) the run ``spec`` describes and train it to ``spec["batches"]``.

    Returns the run's summary plus ``out``.
    """
    out = Path(spec["out"])
    config = RunConfig.from_dict(spec["config"])
    if (out / CHECKPOINT_FILE).is_file():
        given = {k: v for k, v in spec["config"].items() if k != "fused"}
        diffs = config_differences(Run.load(out, backend=spec["backend"], for_training=False).config, given)
        if diffs:
            raise ExperimentError(f"{out} holds a run with other settings ({'; '.join(diffs)}); "
                                  "delete it or choose another --out")
        run = Run.load(out, backend=spec["backend"])
    else:
        run = Run.create(config, out, backend=spec["backend"])
    summary = run.train(spec["batches"], spec["checkpoint_every"], progress=spec["progress"])
    return {**summary, "out": str(out)}


def train_many(specs: list[dict], jobs: int = 1, quiet: bool = False, blas_threads: int = 1) -> list[dict]:
    """:func:`train_one` for each spec, ``jobs`` at a time; summaries in the order of ``specs``.

    Runs train in spawned worker processes whose BLAS uses ``blas_threads`` threads (the
    thread count is read when NumPy loads, so it cannot be changed in this process);
    ``blas_threads=0`` with ``jobs=1`` trains here instead. A progress bar is shown
    when one run trains at a time.
    """
    if jobs <= 1 and blas_threads <= 0:
        results = []
        for spec in specs:
            if not quiet:
                print(f"run {spec['out']}: {spec['batches']} batches", file=sys.stderr, flush=True)
            results.append(train_one({**spec, "progress": not quiet}))
        return results
    import multiprocessing

    progress = jobs <= 1 and not quiet
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    if blas_threads > 0:
        os.environ.update({k: str(blas_threads) for k in THREAD_VARS})  # read by the workers' BLAS at import
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(train_one, {**spec, "progress": progress}) for spec in specs]
            results = []
            for spec, fut in zip(specs, futures):
                results.append(fut.result())
                if not quiet:
                    r = results[-1]
                    print(f"run {spec['out']}: done, {r['step']} batches, {r['open_gates']}/{r['n_latent']} gates "
                          "open", file=sys.stderr, flush=True)
            return results
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_csv(path, rows: list[dict]) -> Path:
    """``rows`` as CSV (columns in order of first appearance), written atomically."""
    path = Path(path)
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
    return path


def write_json(path, data) -> Path:
    path = Path(path)
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))
    return path


def save_figure(fig, path) -> Path:
    """Lay out a matplotlib figure, write it as a 120-dpi PNG atomically, and close it."""
    path = Path(path)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    import matplotlib.pyplot as plt  # installed: the figure was made with it

    plt.close(fig)
    return path


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is not installed (extra ``plots``)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def no_plot_note(path) -> None:
    print(f"matplotlib is not installed (pip install 'refimpl[plots]'): {path} not drawn; the CSV has the numbers",
          file=sys.stderr)


def main_wrapper(run, argv=None, prog: str = "experiment") -> int:
    """Run an experiment's ``run(argv)`` with one-line errors (exit 1, bad values 2) and Ctrl-C (exit 130)."""
    start = time.monotonic()
    try:
        run(argv)
    except TrainingInterrupted as exc:
        print(f"\n{prog}: interrupted: {exc}; run the same command again to continue", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    except (ExperimentError, BackendError, DatasetError, CheckpointError, NonFiniteLoss, OSError) as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"{prog}: finished in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return 0
