"""The training run: Algorithm 1's loop (l. 2) over batches, with a log, checkpoints and resume.

A run lives in one folder (``refimpl train --out DIR``):

- ``config.json``: the run's configuration (:class:`refimpl.config.RunConfig`) and architecture;
- ``log.csv``: one row per step (:mod:`refimpl.runlog`);
- ``checkpoint.npz``: the latest good checkpoint (:mod:`refimpl.checkpoint`), written at
  step 0, every ``checkpoint_every`` steps, at the end and on Ctrl-C / SIGTERM;
- ``summary.json``: written when the run reaches its target: final gates, errors, time.

:meth:`Run.build` makes the run a configuration defines, in memory and at step 0;
:meth:`Run.create` (a new run folder), :meth:`Run.load` (resume) and ``refimpl trace``
all start from it, and :meth:`Run.next_batch` is where both ``train`` and ``trace``
take their batches, so a trace records exactly the steps training takes.

Random streams: four generators derived from the one seed (:func:`stream`): ``init``
(weights), ``split`` (the held-out split), ``batches`` (the batch order) and ``train``
(Algorithm 1's u and eps). The last two are saved in every checkpoint, so a resumed
run draws exactly what an uninterrupted one would: on the NumPy backend its
parameters, Adam state, GECO state and random streams are bit-identical.

A non-finite loss stops the run (:class:`NonFiniteLoss`) without writing a checkpoint,
so the last good one stays on disk.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import numpy

from . import checkpoint as ckpt
from .algorithm1 import init_state, train_step
from .atomic import remove_stale_temporaries, write_json
from .backend import backend_name, get_dtype, get_xp, to_device, to_host
from .config import RunConfig, Schedule, config_differences, new_config
from .console import Progress, StopOnSignal
from .data import BatchIterator, DatasetError, dataset_info, open_dataset, split_indices
from .data.base import downsample
from .model import Architecture, GatedVAE, build_architecture, default_fused
from .optionspec import OptionError
from .rng import generator, get_state, set_state
from .runlog import CsvLog, moving_average, read_log

CONFIG_FILE = "config.json"
LOG_FILE = "log.csv"
CHECKPOINT_FILE = "checkpoint.npz"
SUMMARY_FILE = "summary.json"
STREAMS = ("init", "split", "batches", "train")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the kept checkpoint."""


class RunExistsError(FileExistsError):
    """A new run was asked for in a folder that holds one (a usage error: exit status 2)."""


class RunConflictError(FileExistsError):
    """A folder that should hold this run holds one with other settings (a file problem: exit status 1)."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint."""

    def __init__(self, step: int, signum: int, path: Path):
        self.step, self.signum, self.path = step, signum, path
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}; checkpoint saved to {path}")

    def __reduce__(self):  # picklable, so that it crosses from a worker process
        return (type(self), (self.step, self.signum, self.path))


def stream(seed: int, name: str) -> numpy.random.Generator:
    """The generator for stream ``name`` (one of STREAMS) of run seed ``seed``: independent PCG64 streams."""
    if name not in STREAMS:
        raise ValueError(f"stream {name!r}: expected one of {', '.join(STREAMS)}")
    if not isinstance(seed, (int, numpy.integer)) or seed < 0:
        raise OptionError(f"seed={seed!r}: expected a non-negative integer")
    state = numpy.random.SeedSequence([int(seed), STREAMS.index(name)]).generate_state(1, numpy.uint64)
    return generator(int(state[0]))


class Run:
    """One training run: model, Algorithm 1's state, data stream, and its folder ``out``.

    Make one with :meth:`build` (in memory), :meth:`create` (a new run folder) or
    :meth:`load` (from ``out/checkpoint.npz``); then :meth:`train` to a total number of batches.
    """

    def __init__(self, config: RunConfig, out=None, backend: str | None = None):
        self.config = config
        self.out = Path(out) if out is not None else None
        self.backend = backend_name(backend)
        self.xp = get_xp(self.backend)
        self.dtype = get_dtype(config.dtype)
        self.hyper = config.make_hyper()
        self.schedule = Schedule()
        self.arch = None
        self.model = None
        self.state = None
        self.train_rng = stream(config.seed, "train")
        self.elapsed = 0.0
        self.checkpoint_step = None
        self._dataset = None
        self._split = None
        self._batch_order = None
        self._batch_state = None  # a loaded run's batch-stream state, until the stream is made
        self._log = None

    # -- construction

    @classmethod
    def build(cls, config: RunConfig, backend: str | None = None, *, arch: Architecture | None = None,
              out=None) -> "Run":
        """The run ``config`` defines, at step 0, in memory; touches no disk (the dataset opens on first use).

        ``arch``: the architecture (a loaded run's); default: the one ``config`` scales to.
        """
        run = cls(config, out, backend)
        if config.fused is None:
            config.fused = default_fused(run.xp)
        run.arch = arch or build_architecture(config.image_shape(), config.channels, config.hidden)
        run.model = GatedVAE(run.arch, config.latent, rng=stream(config.seed, "init"), xp=run.xp, dtype=run.dtype,
                             gated=True, gamma_init=run.hyper.gamma_init, fused=config.fused)
        run.state = init_state(run.model, run.hyper)
        return run

    @classmethod
    def create(cls, config: RunConfig, out, backend: str | None = None, overwrite: bool = False,
               schedule: Schedule | None = None) -> "Run":
        """A new run in folder ``out`` (created); writes config.json and the step-0 checkpoint.

        ``schedule``: the run's target and checkpoint interval, kept with it from this first checkpoint on.
        """
        out = Path(out)
        if (out / CHECKPOINT_FILE).exists() and not overwrite:
            raise RunExistsError(f"{out} already holds a run ({CHECKPOINT_FILE}); continue it with --resume, "
                              f"start afresh with --overwrite, or choose another --out")
        if "tau" not in config.hyper and not config.baseline:
            raise OptionError("config.hyper needs 'tau' (or baseline=True)")
        run = cls.build(config, backend, out=out)
        run.schedule = schedule or Schedule()
        run.batch_order  # opens the dataset and checks the split before anything is written
        out.mkdir(parents=True, exist_ok=True)
        for name in (LOG_FILE, SUMMARY_FILE):
            (out / name).unlink(missing_ok=True)
        remove_stale_temporaries(out)
        write_json(out / CONFIG_FILE, {"config": config.to_dict(), "architecture": run.arch.to_dict()})
        run.save_checkpoint()
        return run

    @classmethod
    def load(cls, path, backend: str | None = None, for_training: bool = True) -> "Run":
        """The run saved at ``path`` (a run folder or a checkpoint file).

        ``for_training``: also cut ``log.csv`` back to the checkpoint's step (the batch
        stream continues where the checkpoint left it when first used).
        """
        path = Path(path)
        file = path / CHECKPOINT_FILE if path.is_dir() else path
        if path.is_dir() and not file.exists():
            raise ckpt.CheckpointError(f"{path} holds no {CHECKPOINT_FILE}: not a refimpl run folder")
        arrays, meta = ckpt.load(file)
        config = RunConfig.from_dict(meta["config"])
        run = cls.build(config, backend, arch=Architecture.from_dict(meta["architecture"]), out=file.parent)
        run._restore(arrays, meta)
        if for_training:
            run._prepare_to_continue()
        return run

    def _prepare_to_continue(self) -> None:
        """Before training on from the checkpoint: drop stale temporaries and log rows after it."""
        remove_stale_temporaries(self.out)
        CsvLog.truncate(self.out / LOG_FILE, self.state.step)

    # -- data

    @property
    def dataset(self):
        if self._dataset is None:
            dataset = open_dataset(self.config.dataset, self.config.data)
            expected = dataset_info(self.config.dataset).shape
            if tuple(dataset.shape) != expected:
                raise DatasetError(f"{self.config.dataset} ({self.config.data or 'default path'}): images of "
                                   f"shape {tuple(dataset.shape)}, expected {expected}")
            self._dataset = dataset
        return self._dataset

    @property
    def split(self):
        """(train indices, held-out indices), from the ``split`` stream."""
        if self._split is None:
            n = len(self.dataset)
            if self.config.holdout >= n:
                raise OptionError(f"holdout={self.config.holdout}: the dataset has only {n} images")
            self._split = split_indices(n, int(self.config.holdout), stream(self.config.seed, "split"))
        return self._split

    @property
    def batch_order(self) -> BatchIterator:
        """The training indices, batch by batch, in the ``batches`` stream's order (a loaded run continues its own)."""
        if self._batch_order is None:
            train_indices = self.split[0]
            if self.config.batch_size > train_indices.size:
                raise OptionError(f"batch_size={self.config.batch_size} exceeds the {train_indices.size} training "
                                  "images")
            order = BatchIterator(train_indices, self.config.batch_size, stream(self.config.seed, "batches"))
            if self._batch_state is not None:
                order.load_state_dict(self._batch_state)
            self._batch_order = order
        return self._batch_order

    def images(self, indices):
        """Images x: (B, C, S, S) on the backend, in the run's dtype, pooled to ``image_size``."""
        x = to_device(self.dataset.get(indices, self.dtype), self.xp, self.dtype)
        return downsample(x, self.config.pool_factor())

    def next_batch(self):
        """Alg. 1 l. 2: the next batch x_i: (B, C, S, S), for ``train`` and ``trace`` alike."""
        return self.images(next(self.batch_order))

    # -- checkpoints

    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_FILE

    def save_checkpoint(self) -> Path:
        """Write the current state to ``out/checkpoint.npz`` atomically (log synced first)."""
        if self._log is not None:
            self._log.sync()
        state = self.state
        arrays = {f"model/{k}": to_host(v).copy() for k, v in self.model.state_dict().items()}
        arrays["lambda"] = to_host(state.lam).copy()
        adam = state.optimizer.state_dict()
        arrays.update({f"adam/m/{k}": v for k, v in adam["m"].items()})
        arrays.update({f"adam/v/{k}": v for k, v in adam["v"].items()})
        meta = {
            "step": state.step, "adam_t": adam["t"], "hit": state.hit, "c_ma": state.c_ma,
            "last_constraint_met": state.last_constraint_met,
            "train_rng": get_state(self.train_rng),
            "batch_iterator": self._batch_order.state_dict() if self._batch_order is not None else self._batch_state,
            "target_batches": self.schedule.batches, "checkpoint_every": self.schedule.checkpoint_every,
            "config": self.config.to_dict(), "architecture": self.arch.to_dict(),
            "timing": {"elapsed_s": self.elapsed, "backend": self.backend},
        }
        ckpt.save(self.checkpoint_path(), arrays, meta)
        self.checkpoint_step = state.step
        return self.checkpoint_path()

    def _restore(self, arrays: dict, meta: dict) -> None:
        state, xp = self.state, self.xp
        self.model.load_state_dict({k: to_device(v, xp, self.dtype) for k, v in ckpt.prefixed(arrays, "model/").items()})
        state.lam[...] = to_device(arrays["lambda"], xp, self.dtype)
        state.optimizer.load_state_dict({"t": meta["adam_t"], "m": ckpt.prefixed(arrays, "adam/m/"),
                                         "v": ckpt.prefixed(arrays, "adam/v/")})
        state.step, state.hit, state.c_ma = int(meta["step"]), bool(meta["hit"]), meta["c_ma"]
        state.last_constraint_met = bool(meta["last_constraint_met"])
        set_state(self.train_rng, meta["train_rng"])
        self.elapsed = float(meta.get("timing", {}).get("elapsed_s", 0.0))
        defaults = Schedule()
        self.schedule = Schedule(meta.get("target_batches") or defaults.batches,
                                 meta.get("checkpoint_every") or defaults.checkpoint_every)
        self._batch_state = meta["batch_iterator"]
        self.checkpoint_step = state.step

    # -- training

    def train(self, batches: int | None = None, checkpoint_every: int | None = None, progress: bool = True,
              log_interval=10.0) -> dict:
        """Run Algorithm 1 until ``batches`` steps in total (default: the run's target); returns the summary.

        ``checkpoint_every``: default the run's own. Both become the run's schedule.
        Raises :class:`NonFiniteLoss` (no checkpoint written) or :class:`TrainingInterrupted`
        (checkpoint written) instead of finishing.
        """
        batches = self.schedule.batches if batches is None else batches
        checkpoint_every = self.schedule.checkpoint_every if checkpoint_every is None else checkpoint_every
        if not isinstance(batches, (int, numpy.integer)) or batches < 0:
            raise OptionError(f"batches={batches!r}: expected a non-negative integer")
        if batches < self.state.step:
            raise OptionError(f"batches={batches}: this run has already done {self.state.step} batches")
        if not isinstance(checkpoint_every, (int, numpy.integer)) or checkpoint_every < 1:
            raise OptionError(f"checkpoint_every={checkpoint_every!r}: expected a positive integer")
        self.schedule = Schedule(int(batches), int(checkpoint_every))
        self.batch_order  # opens the dataset before the log
        state, tau = self.state, self.hyper.tau
        self._log = CsvLog(self.out / LOG_FILE)
        bar = Progress(batches, state.step, self.config.latent, enabled=progress, interval=log_interval)
        try:
            with StopOnSignal() as stop:
                while state.step < batches and stop.signum is None:  # Alg. 1 l. 2: foreach x_i in D
                    t0 = time.perf_counter()
                    log = train_step(state, self.next_batch(), self.train_rng)  # l. 3-31
                    seconds = time.perf_counter() - t0
                    self.elapsed += seconds
                    gamma = to_host(self.model.params["gamma"])  # after l. 31: the gates' state for the plot
                    self._log.write({**log, "tau": tau, "seconds": seconds,
                                     **{f"gamma_{j}": g for j, g in enumerate(gamma)}})
                    if not all(math.isfinite(log[k]) for k in ("loss", "E2", "lambda_raw", "gates_l1")):
                        self._log.sync()
                        kept = (f"the last good checkpoint (step {self.checkpoint_step}) is kept at "
                                f"{self.checkpoint_path()}")
                        raise NonFiniteLoss(f"non-finite loss at step {state.step} (loss={log['loss']}, "
                                            f"E2={log['E2']}, lambda={log['lambda_raw']}); stopped; {kept}")
                    bar.update(log, tau)
                    if state.step % checkpoint_every == 0:
                        self.save_checkpoint()
                if stop.signum is not None:
                    if self.checkpoint_step != state.step:
                        self.save_checkpoint()
                    raise TrainingInterrupted(state.step, stop.signum, self.checkpoint_path())
            if self.checkpoint_step != state.step:
                self.save_checkpoint()
        finally:
            bar.close()
            self._log.close()
            self._log = None
        return self.write_summary()

    def summary(self) -> dict:
        """Final gates and errors of the run so far (from the model and log.csv)."""
        gamma = to_host(self.model.params["gamma"]).astype(float)
        gates = to_host(self.model.inference_gates()).astype(int)
        out = {"step": self.state.step, "n_latent": self.config.latent, "open_gates": int(gates.sum()),
               "gates": gates.tolist(), "gamma": gamma.tolist(), "tau": self.hyper.tau,
               "lambda_eff": None, "hit": self.state.hit, "elapsed_s": self.elapsed, "backend": self.backend}
        log_path = self.out / LOG_FILE
        if log_path.is_file():
            columns = read_log(log_path)
            if columns.get("E2"):
                out.update(E2_last=columns["E2"][-1], E2_ma95=moving_average(columns["E2"], 0.95),
                           lambda_eff=columns["lambda_eff"][-1], gates_l1=columns["gates_l1"][-1])
        return out

    def write_summary(self) -> dict:
        summary = self.summary()
        write_json(self.out / SUMMARY_FILE, summary)
        return summary


def open_run(out, given: dict, *, backend: str | None = None, resume: bool | None = False, overwrite: bool = False,
             schedule: Schedule | None = None) -> Run:
    """The run in folder ``out``, continued or new: the one place train, the experiments and sweeps open runs.

    given: the run options given (RunConfig fields, ``hyper`` a dict). resume=True: continue
    the run in ``out`` (it must exist, and ``given`` must agree with it); False: a new run
    from ``given`` (``overwrite`` replaces one already there); None: continue if ``out``
    holds a run, else start one.
    """
    out = Path(out)
    exists = (out / CHECKPOINT_FILE).is_file()
    automatic, resume = resume is None, exists if resume is None else resume
    if not resume:
        return Run.create(new_config(given), out, backend=backend, overwrite=overwrite, schedule=schedule)
    if not exists:
        raise OptionError(f"nothing to resume: {out} holds no {CHECKPOINT_FILE}")
    given = dict(given)
    if given.get("data") is not None:
        given["data"] = str(Path(given["data"]).resolve())
    run = Run.load(out, backend=backend, for_training=False)
    differences = config_differences(run.config, given)
    if differences and automatic:
        raise RunConflictError(f"{out} holds a run with other settings ({'; '.join(differences)}); delete it or "
                               "choose another --out")
    if differences:
        raise OptionError(f"options differ from the run in {out}: {'; '.join(differences)}; drop them to resume")
    run._prepare_to_continue()
    return run


__all__ = ["CHECKPOINT_FILE", "CONFIG_FILE", "LOG_FILE", "NonFiniteLoss", "Run", "RunConflictError", "RunExistsError", "STREAMS", "SUMMARY_FILE",
           "TrainingInterrupted", "open_run", "stream"]
