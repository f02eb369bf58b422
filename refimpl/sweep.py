"""Sweeps of independent training runs on Dask: the one runner of ``refimpl sweep`` and the experiments.

A run is a task: its input is a run specification (:func:`run_spec`: the run options and
schedule, and a run folder on a filesystem every worker can see), its result the run's
summary. Where the tasks run:

- ``--jobs J`` (default 1): a Dask ``LocalCluster`` of J single-threaded worker processes,
  each with ``--blas-threads`` BLAS threads (default 1);
- ``--jobs 1 --blas-threads 0``: here, one after another, in this process, with the
  environment's BLAS threads (no Dask);
- ``--scheduler ADDRESS``: an existing Dask cluster (``dask scheduler`` on one machine,
  ``dask worker ADDRESS --nworkers N --nthreads 1`` on each, or dask-jobqueue's
  ``SLURMCluster``); GPU runs (``--backend cupy``) ask for one ``GPU`` resource each
  (``dask worker ... --resources GPU=1``).

Nothing runs twice and nothing is lost: a finished run is reused, an unfinished one
resumes from its checkpoint (:func:`refimpl.runopen.open_run`), and a run folder is
locked while it trains. When a worker dies mid-run, Dask gives the task to another
worker, which resumes from the run's last checkpoint. Ctrl-C, SIGTERM or SIGHUP to the
client writes ``OUT/.stop``; every run in progress sees it between two steps, saves its
checkpoint and stops, and the sweep ends with one line saying how to continue.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from dataclasses import dataclass, fields
from pathlib import Path

from .atomic import write_json
from .config import RunConfig, Schedule
from .errors import RunFolderNotVisible, SchedulerError, SweepInterrupted, SweepSetupError, TrainingInterrupted
from .execution import Execution
from .optionspec import OptionError
from .runfolder import LOG_FILE
from .sweepwatch import LogRows, StatusBoard, SweepWatch
from .runopen import open_run

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
STOP_FILE = ".stop"
POLL_S = 0.5  # how often the client looks at its runs (their futures; their logs at the status board's pace)
MARKER_FILE = "runs/.sweep.json"  # written by the client: a worker that cannot see it cannot see the runs
# Execution's options a sweep passes on to its runs: not --blas-threads, which is the workers' (Cluster's)
EXECUTION_EXCLUDED = ("blas_threads",)


# ----------------------------------------------------------------------------------------
# One run, as a task


def run_spec(out, given: dict, schedule: Schedule, backend: str | None = None, eval_images: int | None = None,
             parent=None, at: int | None = None, config: RunConfig | None = None,
             execution: dict | None = None) -> dict:
    """A picklable task input: run folder ``out``, the run options ``given`` (RunConfig fields,
    ``hyper`` a dict), the schedule, the backend; ``eval_images``: held-out images to evaluate after;
    ``parent``, ``at``: the run is a branch of run folder ``parent`` (at its checkpoint of step ``at``);
    ``config``: ``new_config(given)`` where the caller made it (a new run starts from it, not from a
    second one); ``execution``: the :class:`~refimpl.execution.Execution` fields given."""
    return {"out": str(out), "given": given, "batches": int(schedule.batches),
            "checkpoint_every": int(schedule.checkpoint_every), "keep_checkpoints": int(schedule.keep_checkpoints),
            "backend": backend, "eval_images": eval_images, "parent": None if parent is None else str(parent),
            "at": at, "config": None if config is None else config.to_dict(), "execution": dict(execution or {})}


def with_tau(spec: dict, tau) -> dict:
    """``spec`` with its run's tau set to ``tau`` (Table 1: the baseline's error, known only after it ran)."""
    config = spec.get("config") and {**spec["config"], "hyper": {**spec["config"]["hyper"], "tau": float(tau)}}
    given = {**spec["given"], "hyper": {**spec["given"]["hyper"], "tau": float(tau)}}
    return {**spec, "given": given, "config": config}


def train_one(spec: dict, progress: bool = False, stop=None) -> dict:
    """Create (or resume, or reuse) the run ``spec`` describes, train it to its target; its summary plus ``out``
    (and ``heldout_sse`` on ``spec["eval_images"]`` held-out images when that is set)."""
    schedule = Schedule(spec["batches"], spec["checkpoint_every"], spec.get("keep_checkpoints", 0))
    config = spec.get("config") and RunConfig.from_dict(spec["config"])
    run = open_run(spec["out"], spec["given"], backend=spec["backend"], resume=None, schedule=schedule,
                   parent=spec.get("parent"), at=spec.get("at"), config=config,
                   execution=Execution(**spec.get("execution", {})))
    summary = {**run.train(schedule.batches, schedule.checkpoint_every, progress=progress, stop=stop,
                           keep_checkpoints=schedule.keep_checkpoints), "out": spec["out"]}
    if spec.get("eval_images"):
        from .evaluate import evaluate

        summary["heldout_sse"] = evaluate(run, limit=spec["eval_images"])["heldout_sse"]
    return summary


def _stop_requested(sweep_dir: Path, interval: float = 1.0):
    """A callable telling whether ``sweep_dir/.stop`` exists, looking at most once per ``interval`` seconds."""
    state = {"next": 0.0, "stop": False}

    def check() -> bool:
        now = time.monotonic()
        if not state["stop"] and now >= state["next"]:
            state["next"] = now + interval
            state["stop"] = (sweep_dir / STOP_FILE).exists()
        return state["stop"]

    return check


def worker_task(spec: dict, sweep_dir: str, tau=None) -> dict:
    """:func:`train_one` on a Dask worker. ``tau``: set the run's tau first (a dependency's result, Table 1)."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / MARKER_FILE).is_file():
        from distributed import get_worker

        raise RunFolderNotVisible(f"worker {get_worker().address} cannot see the sweep folder {sweep_dir} "
                                  f"(no {MARKER_FILE}): the runs' folders must be on a filesystem every worker sees")
    if tau is not None:
        spec = with_tau(spec, tau)
    return train_one(spec, stop=_stop_requested(sweep_dir))


# ----------------------------------------------------------------------------------------
# Where the tasks run


@dataclass
class Cluster:
    """How a sweep's runs are spread: ``jobs`` local workers or the Dask ``scheduler`` at an address."""

    jobs: int = 1
    scheduler: str | None = None
    blas_threads: int = 1
    quiet: bool = False

    @property
    def local(self) -> bool:
        """The runs train here, one after another (no Dask)."""
        return self.scheduler is None and self.jobs <= 1 and self.blas_threads <= 0

    def add_arguments(parser) -> None:  # noqa: N805 (called on the class: Cluster.add_arguments(parser))
        from .optionspec import positive_int

        parser.add_argument("--jobs", type=positive_int, default=None, metavar="J",
                            help="runs trained at once: a Dask LocalCluster of J single-threaded worker processes")
        parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                            help="send the runs to the Dask scheduler at ADDRESS (tcp://host:8786) instead")
        parser.add_argument("--blas-threads", type=int, default=1, metavar="T",
                            help="BLAS threads per local worker (default 1: on a busy CPU, one thread per process is "
                                 "several times faster); 0 leaves the environment alone and, with --jobs 1, trains "
                                 "in this process")
        parser.add_argument("--quiet", action="store_true", help="no progress bars")

    @classmethod
    def from_args(cls, args, jobs: int = 1) -> "Cluster":
        return cls(args.jobs or jobs, args.scheduler, args.blas_threads, args.quiet)


class Sweep:
    """A set of runs under ``out/runs/``, trained where ``cluster`` says; use as a context manager.

    :meth:`submit` a run (optionally after a future whose result is its tau), then
    :meth:`gather` the summaries. While they train on Dask, a status board shows the runs
    done, running and waiting, each running run's batches and ETA (:mod:`refimpl.sweepwatch`);
    each finished run prints one line and gets its ``plot.png`` (as ``refimpl train`` draws
    it, when matplotlib is installed).
    """

    def __init__(self, out, cluster: Cluster, backend: str | None = None):
        self.out, self.cluster, self.backend = Path(out), cluster, backend
        self.client = None
        self._local_cluster = None
        self._futures = []
        self._signum = None
        self._old_handlers = {}
        self.watch = SweepWatch()
        self.board = StatusBoard(self.watch, enabled=not cluster.quiet)

    # -- lifetime

    def __enter__(self) -> "Sweep":
        if self.out.exists() and not self.out.is_dir():
            raise SweepSetupError(f"{self.out} is a file, not a folder: choose another --out")
        (self.out / "runs").mkdir(parents=True, exist_ok=True)
        (self.out / STOP_FILE).unlink(missing_ok=True)
        write_json(self.out / MARKER_FILE, {"client_pid": os.getpid()})
        if not self.cluster.local:
            self.client = self._connect()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> bool:
        self.board.close()
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            if self._local_cluster is not None:
                with contextlib.suppress(Exception):
                    self._local_cluster.close()
        (self.out / STOP_FILE).unlink(missing_ok=True)
        return False

    def _connect(self):
        try:
            import dask
            from distributed import Client, LocalCluster
        except ImportError:
            raise SweepSetupError("runs on several processes or machines need Dask: pip install 'refimpl[sweep]' "
                                  "(or --jobs 1 --blas-threads 0 to train here, one run after another)") from None

        if self.cluster.scheduler is not None:
            try:
                return Client(self.cluster.scheduler, timeout="10s")
            except (OSError, TimeoutError) as exc:
                raise SchedulerError(f"cannot reach the Dask scheduler at {self.cluster.scheduler}: "
                                     f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
        env = ({k: str(self.cluster.blas_threads) for k in THREAD_VARS} if self.cluster.blas_threads > 0 else {})
        resources = {"GPU": 1} if self.backend == "cupy" else None
        # a sweep paused with kill -STOP for more than Dask's worker-ttl (5 minutes), as one is to time
        # something beside it, would have its workers restarted on -CONT and lose each run's batches since
        # its checkpoint (seen 2026-12-07 after a 400 s pause); without a TTL the workers just go on
        with dask.config.set({"distributed.scheduler.worker-ttl": None}):
            self._local_cluster = LocalCluster(n_workers=self.cluster.jobs, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", env=env, resources=resources,
                                               silence_logs=50)
        return Client(self._local_cluster)

    def _on_signal(self, signum, frame):
        if self._signum is not None:
            raise KeyboardInterrupt
        self._signum = signum
        (self.out / STOP_FILE).touch()  # every run in progress stops after its current step

    # -- runs

    def submit(self, spec: dict, tau=None):
        """Train the run ``spec`` (:func:`run_spec`); ``tau``: a future (or value) giving its tau. A future."""
        if self.cluster.local:
            if tau is not None:
                spec = with_tau(spec, tau.result() if isinstance(tau, _Done) else tau)
            self._say(f"run {spec['out']}: {spec['batches']} batches")
            return _Done(self._finished(train_one(spec, progress=not self.cluster.quiet)))
        resources = {"GPU": 1} if spec["backend"] == "cupy" else None
        key = f"train-{spec['out']}"
        future = self.client.submit(worker_task, spec, str(self.out), tau, key=key, resources=resources, pure=False)
        self._futures.append(future)
        self.watch.add(key, Path(spec["out"]).name, spec["batches"], LogRows(Path(spec["out"]) / LOG_FILE))
        return future

    def submit_function(self, function, *args):
        """``function(*args)`` as a task (args may be futures); here at once without Dask."""
        if self.cluster.local:
            return _Done(function(*[a.result() if isinstance(a, _Done) else a for a in args]))
        return self.client.submit(function, *args, pure=False)

    def gather(self, futures) -> list:
        """The results of ``futures`` in their order; a progress line per finished run as it finishes."""
        if self.cluster.local:
            return [f.result() for f in futures]
        results, pending = {}, list(futures)
        self.board.update(force=True)
        try:
            while pending:
                for future in [f for f in pending if f.done()]:
                    pending.remove(future)
                    results[future.key] = future.result()
                    if future.key in self.watch.runs:
                        self.watch.finished(future.key)
                    if isinstance(results[future.key], dict) and "open_gates" in results[future.key]:
                        self._finished(results[future.key])
                self.board.update()
                if pending:
                    time.sleep(POLL_S)
        except Exception as exc:  # a run failed, or a signal stopped the runs: the others save and stop
            stopped = self._stop_all()
            if self._signum is not None:
                raise SweepInterrupted(self._signum, self.out, stopped) from None
            raise exc
        if self._signum is not None:
            raise SweepInterrupted(self._signum, self.out, self._stop_all())
        return [results[f.key] for f in futures]

    def _stop_all(self) -> int:
        """Every run in progress saves its checkpoint and stops (a run not yet started stops before its first
        step); returns how many stopped that way."""
        (self.out / STOP_FILE).touch()
        deadline = time.monotonic() + 600
        while any(not f.done() for f in self._futures) and time.monotonic() < deadline:
            time.sleep(0.2)
        return sum(1 for f in self._futures if f.status == "error" and isinstance(f.exception(), TrainingInterrupted))

    def _finished(self, summary: dict) -> dict:
        e2 = summary.get("E2_ma95")
        self._say(f"done {summary['out']}: {summary['step']} batches, {summary['open_gates']}/{summary['n_latent']} "
                  f"gates open" + (f", E2 moving average {e2:.4g} (tau {summary['tau']:g})" if e2 is not None else "")
                  + f", {summary['elapsed_s']:.0f} s" + self._plot(summary["out"]))
        return summary

    def _plot(self, out) -> str:
        """Draw the finished run's plot.png as ``refimpl train`` does (when matplotlib is installed); a note."""
        from . import figures, plot

        if figures.pyplot() is None:
            return ""
        try:
            return f"; plot {plot.plot_run(out, backend=self.backend, notes=[])}"
        except OSError as exc:  # a log without rows (a run reused at step 0): the summary line says enough
            return f"; no plot ({' '.join(str(exc).split())})"

    def _say(self, text: str) -> None:
        self.board.say(text)


class _Done:
    """A result computed at once, with the ``result()`` of a future (runs trained here, without Dask)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


# ----------------------------------------------------------------------------------------
# refimpl sweep


def parse_grid(text: str) -> tuple:
    """``NAME=V1,V2,...`` -> (name, values) with each value parsed as that option parses it."""
    from . import options

    name, sep, values = text.partition("=")
    name = name.strip().replace("-", "_")
    parse = options.parser_of(name)
    if not sep or parse is None:
        raise OptionError(f"--grid {text!r}: expected NAME=V1,V2,... with NAME a run option (e.g. tau=3,6,10)")
    try:  # values with commas of their own (channels=4,8;8,16) are separated by semicolons
        return name, tuple(parse(v) for v in values.split(";" if ";" in values else ","))
    except Exception as exc:  # argparse.ArgumentTypeError, ValueError
        raise OptionError(f"--grid {text!r}: {exc}") from None


def grid_runs(grids: list[tuple]) -> list[dict]:
    """Every combination of the grids' values, as dicts name -> value (the last grid varies fastest)."""
    names = [name for name, _ in grids]
    return [dict(zip(names, combo)) for combo in itertools.product(*(values for _, values in grids))]


def run_name(point: dict) -> str:
    """The run folder's name for a grid point: ``tau3-seed0``."""
    def text(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else str(v)
    return "-".join(f"{k}{text(v)}" for k, v in point.items()).replace("/", "_")


def add_arguments(parser) -> None:
    """The options of ``refimpl sweep``: the run options of ``refimpl train`` (the fixed part of every run),
    the grid, the schedule, and where the runs train; ``--from RUN [--at STEP]`` makes every run a
    branch of RUN (:mod:`refimpl.branch`)."""
    from . import branch, options

    parser.add_argument("--grid", action="append", required=True, metavar="NAME=V1,V2,...",
                        help="a run option and its values (repeat for a product grid: --grid tau=3,6,10 --grid seed=0,1,2)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the sweep's folder: runs in DIR/runs/, DIR/sweep.csv")
    parser.add_argument("--eval-images", type=int, default=1000, metavar="N",
                        help="held-out images for each run's error in sweep.csv (default: 1000, at most the holdout)")
    branch.add_arguments(parser)
    options.add_run_options(parser, positional=False)
    options.add_options(parser, Schedule, title="schedule (per run)")
    options.add_backend_option(parser)
    options.add_options(parser, Execution, exclude=EXECUTION_EXCLUDED, title="execution of every run (not part of it)")
    Cluster.add_arguments(parser)


def run(args) -> int:
    """``refimpl sweep``: every grid point's run, then ``OUT/sweep.csv`` (one row per run)."""
    from . import branch, options
    from .algorithm1 import Hyper
    from .config import new_config
    from .atomic import write_csv

    branch.check_arguments(args)
    grids = [parse_grid(text) for text in args.grid]
    hyper_names = {f.name for f in fields(Hyper)}
    base = options.given_run_options(args)
    source = None if args.parent is None else branch.open_source(args.parent, args.at)
    schedule = options.schedule(args) if source is None else branch.branch_schedule(source, options.given(args, Schedule))
    out = Path(args.out)
    specs, points = [], grid_runs(grids)
    for point in points:
        given = {**base, "hyper": dict(base.get("hyper", {}))}
        for name, value in point.items():
            if name in hyper_names:
                given["hyper"][name] = value
            elif name in {f.name for f in fields(Schedule)}:
                raise OptionError(f"--grid {name}: the schedule is the same for every run; give --{name.replace('_', '-')}")
            else:
                given[name] = value
        if source is None:
            config = new_config(given)  # every run's options checked before any run starts
            given["hyper"].setdefault("tau", config.hyper["tau"])
        else:
            config = branch.branch_config(source, given)[0]  # a branch: tau and the rest are the parent's
        eval_images = min(args.eval_images, config.holdout) if args.eval_images > 0 else None
        specs.append(run_spec(out / "runs" / run_name(point), given, schedule, args.backend, eval_images,
                              None if source is None else source.folder, None if source is None else source.step,
                              config if source is None else None,
                              options.given(args, Execution, exclude=EXECUTION_EXCLUDED)))
    start = time.monotonic()
    with Sweep(out, Cluster.from_args(args), backend=args.backend) as sweep:
        summaries = sweep.gather([sweep.submit(spec) for spec in specs])
    rows = [{**point, "open_gates": s["open_gates"], "n_latent": s["n_latent"], "gates": "".join(map(str, s["gates"])),
             "E2_ma95": s.get("E2_ma95"), "tau": s["tau"], "heldout_sse": s.get("heldout_sse"), "batches": s["step"],
             "wall_s": round(s["elapsed_s"], 1), "run": s["out"]} for point, s in zip(points, summaries)]
    csv_path = write_csv(out / "sweep.csv", rows)
    print(f"sweep: {len(rows)} runs in {time.monotonic() - start:.0f} s; {csv_path}")
    return 0
