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
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields
from pathlib import Path

from .. import options
from ..atomic import atomic_write
from ..config import RunConfig, Schedule
from ..exits import ArgumentParser, run_command
from ..optionspec import positive_int
from ..training import open_run

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
CONFIG_FIELDS = tuple(f.name for f in fields(RunConfig) if f.name != "hyper")
CHECKPOINT_EVERY = 500  # the experiments' default: fewer, larger checkpoints than train's


def parser(prog: str, description: str, own=("latent", "tau")) -> argparse.ArgumentParser:
    """The options every experiment takes: the run options of ``refimpl train`` (but ``own``, which the
    script declares with its own meaning), the schedule, and how runs are spread over processes."""
    p = ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the paper's settings (hours to days on a CPU; use a GPU)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: experiments/<name>)")
    options.add_run_options(p, exclude=("baseline", *own), positional=False)
    options.add_options(p, Schedule, title="schedule (per run)")
    options.add_backend_option(p)
    p.add_argument("--jobs", type=positive_int, default=1, metavar="J", help="runs trained at once (processes)")
    p.add_argument("--blas-threads", type=int, default=1, metavar="T",
                   help="BLAS threads per run (default 1: on a busy CPU, one thread per process is several times "
                        "faster); 0 leaves the environment alone and, with --jobs 1, trains in this process")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def settings(args, small: dict, full: dict) -> dict:
    """``full`` or ``small`` (by ``--full``), overridden by every run option given explicitly.

    The result holds RunConfig fields, ``batches``, ``checkpoint_every``, ``hyper`` (the
    Hyper fields given) and the script's own preset keys.
    """
    chosen = {"checkpoint_every": CHECKPOINT_EVERY, **(full if args.full else small)}
    given = options.given_run_options(args)
    chosen["hyper"] = given.pop("hyper", {})
    chosen.update(given)
    chosen.update(options.given(args, Schedule))
    return chosen


def run_spec(out, chosen: dict, *, backend=None, progress=True, **override) -> dict:
    """Everything :func:`train_one` needs, as a picklable dict: run folder ``out`` with the settings
    ``chosen`` (:func:`settings`) and ``override`` (e.g. ``latent``, ``tau``, ``baseline``, ``batches``)."""
    chosen = {**chosen, **override}
    given = {k: chosen[k] for k in CONFIG_FIELDS if k in chosen}
    given["hyper"] = dict(chosen.get("hyper", {}))
    if not chosen.get("baseline"):
        given["hyper"]["tau"] = float(chosen["tau"])
    return {"out": str(out), "given": given, "batches": int(chosen["batches"]),
            "checkpoint_every": int(chosen["checkpoint_every"]), "backend": backend, "progress": progress}


def train_one(spec: dict) -> dict:
    """Create (or resume, or reuse) the run ``spec`` describes and train it to ``spec["batches"]``.

    Returns the run's summary plus ``out``.
    """
    schedule = Schedule(spec["batches"], spec["checkpoint_every"])
    run = open_run(spec["out"], spec["given"], backend=spec["backend"], resume=None, schedule=schedule)
    summary = run.train(schedule.batches, schedule.checkpoint_every, progress=spec["progress"])
    return {**summary, "out": spec["out"]}


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


def main_wrapper(run, argv=None, prog: str = "experiment") -> int:
    """An experiment's ``run(argv)`` as a command: the exit statuses of :mod:`refimpl.exits`."""
    start = time.monotonic()
    code = run_command(lambda: run(argv) and 0, prog)
    if code == 0:
        print(f"{prog}: finished in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return code
