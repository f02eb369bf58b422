"""The training run: Algorithm 1's loop (l. 2) over batches, with a log, checkpoints and resume.

A run lives in one folder (``refimpl train --out DIR``):

- ``config.json``: the run's configuration (:class:`refimpl.config.RunConfig`) and architecture;
- ``log.csv``: one row per step (:mod:`refimpl.runlog`; a branch's holds only its own rows,
  :mod:`refimpl.branch`), or ``log.csv.gz`` (``refimpl pack-log``) read in its place;
- ``checkpoint.npz``: the latest good checkpoint (:mod:`refimpl.checkpoint`), written at
  step 0, every ``checkpoint_every`` steps, at the end and on Ctrl-C / SIGTERM;
- ``checkpoints/step-XXXXXXXX.npz``: with ``keep_checkpoints`` N, a copy of the checkpoint of
  every N-th step, kept (a later run can branch there);
- ``summary.json``: written when the run reaches its target: final gates, errors, time.

The folder's rules (where a run may start, what refimpl deletes, the lock that keeps a
second process out while one trains) are in :mod:`refimpl.runfolder`; a Run opened for
training holds the folder's lock until :meth:`Run.train` ends or :meth:`Run.close`.

:meth:`Run.build` makes the run a configuration defines, in memory and at step 0;
:meth:`Run.create` (a new run folder), :meth:`Run.branch` (a new run folder from another
run's checkpoint, :mod:`refimpl.branch`), :meth:`Run.load` (resume) and ``refimpl trace``
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
from . import memory
from .algorithm1 import init_state, train_step
from .atomic import remove_stale_temporaries, write_json
from .branch import Source, branch_config, lineage, open_source, parent_folder, read_history, relative_parent
from .backend import backend_name, get_dtype, get_xp, to_device, to_host
from .config import RunConfig, Schedule, config_differences, new_config, saved_schedule
from .console import Progress, StopOnSignal
from .data import BatchIterator, DatasetError, dataset_info, open_dataset, split_indices
from .data.base import downsample
from .device_step import DeviceStep, applies
from .errors import NonFiniteLoss, RunConflictError, RunExistsError, TrainingInterrupted
from .model import Architecture, GatedVAE, build_architecture, default_fused
from .optionspec import OptionError
from .rng import generator, get_state, set_state
from .runfolder import (CHECKPOINT_FILE, CONFIG_FILE, KEPT_DIR, LOG_FILE, LOG_GZ_FILE, PARENT_KEY, RUN_FILES,
                        SUMMARY_FILE, NoRun, RunLock, check_new_run_folder, kept_checkpoint, kept_names,
                        remove_run_files)
from .runlog import CsvLog, moving_average, verify_log
from .threads import DecoderPasses, Execution, blas_limit, resolve

STREAMS = ("init", "split", "batches", "train", "factors")  # new names go last: the index seeds the stream
META_KEYS = ("step", "adam_t", "hit", "c_ma", "last_constraint_met", "train_rng", "batch_iterator", "config",
             "architecture")


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
        self.parent = None  # a branch's record: {"run": parent folder relative to out, "step", "changed"}
        self._dataset = None
        self._split = None
        self._batch_order = None
        self._batch_state = None  # a loaded run's batch-stream state, until the stream is made
        self._log = None
        self._lock = None  # the folder's RunLock while the run is open for training
        self.repaired_lines = []  # log.csv lines --repair-log dropped when the run was opened

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
        memory.check_training(run.arch, config, run.xp)
        run.model = GatedVAE(run.arch, config.latent, rng=stream(config.seed, "init"), xp=run.xp, dtype=run.dtype,
                             gated=True, gamma_init=run.hyper.gamma_init, fused=config.fused)
        run.state = init_state(run.model, run.hyper)
        return run

    @classmethod
    def create(cls, config: RunConfig, out, backend: str | None = None, overwrite: bool = False,
               schedule: Schedule | None = None) -> "Run":
        """A new run in folder ``out``, open for training (it holds the folder's lock); writes
        config.json and the step-0 checkpoint.

        ``out`` must be new or empty, or hold a run and ``overwrite`` be given, which deletes
        every file of the old run (:mod:`refimpl.runfolder`). ``schedule``: the run's target
        and checkpoint interval, kept with it from this first checkpoint on.
        """
        out = Path(out)
        if "tau" not in config.hyper and not config.baseline:
            raise OptionError("config.hyper needs 'tau' (or baseline=True)")
        _holds_old_run(out, overwrite)
        run = cls.build(config, backend, out=out)
        run.schedule = schedule or Schedule()
        return run._start_folder(overwrite)

    @classmethod
    def branch(cls, parent, out, given: dict, *, at: int | None = None, backend: str | None = None,
               overwrite: bool = False, schedule: Schedule | None = None) -> "Run":
        """A new run in folder ``out`` that starts from run ``parent``'s checkpoint (a folder, or a
        :class:`refimpl.branch.Source`; ``at``: the step of a kept one) with the options ``given``
        changed (RunConfig fields, ``hyper`` a dict; :func:`refimpl.branch.branch_config` says which
        may), open for training; writes config.json with the parent record and the branch's first
        checkpoint, at the parent's step. ``schedule``: default the parent's; its target must lie
        beyond the parent's step. ``out``'s rules are :meth:`create`'s, and it may not be the parent
        or one of its parents.
        """
        source = parent if isinstance(parent, Source) else open_source(parent, at)
        out = Path(out)
        config, changed = branch_config(source, given)
        schedule = schedule or source.schedule
        if schedule.batches <= source.step:
            raise OptionError(f"--batches {schedule.batches}: the branch starts at step {source.step} ({source.path}); "
                              "give a larger target")
        if any(out.resolve() == run.resolve() for run, _ in lineage(source.folder)):
            raise OptionError(f"--out {out}: that is the folder of {source.folder} or of one of its parents; a branch "
                              "needs a folder of its own")
        _holds_old_run(out, overwrite)
        run = cls.build(config, backend, arch=source.arch, out=out)
        run._restore(source.arrays, source.meta, source.path)
        if "seed" in changed:  # the new seed's u, eps and batch order (a new epoch) from here on
            run.train_rng = stream(config.seed, "train")
            run._batch_state = None
        run.parent = {"run": relative_parent(source.folder, out), "step": source.step, "changed": changed}
        run.elapsed = 0.0
        run.schedule = schedule
        return run._start_folder(overwrite)

    def _start_folder(self, overwrite: bool) -> "Run":
        """Make ``out`` this new run's folder (emptied of an old run's files with ``overwrite``), holding
        its lock: config.json and the first checkpoint."""
        out = self.out
        self.batch_order  # opens the dataset and checks the split before anything is written
        out.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(out).acquire()
        try:
            if _holds_old_run(out, overwrite):  # asked again under the lock
                remove_run_files(out)
            remove_stale_temporaries(out, RUN_FILES)
            record = {PARENT_KEY: self.parent} if self.parent is not None else {}
            write_json(out / CONFIG_FILE, {"config": self.config.to_dict(), "architecture": self.arch.to_dict(),
                                           **record})
            self.save_checkpoint()
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def load(cls, path, backend: str | None = None, for_training: bool = True, repair_log: bool = False) -> "Run":
        """The run saved at ``path`` (a run folder or a checkpoint file).

        ``for_training``: take the folder's lock and check ``log.csv`` against the checkpoint
        (:meth:`open_for_training`); otherwise the run is read-only (evaluate, export, ...).
        """
        path = Path(path)
        file = path / CHECKPOINT_FILE if path.is_dir() else path
        if path.is_dir() and not file.exists():
            raise ckpt.CheckpointError(f"{path} holds no {CHECKPOINT_FILE}: not a refimpl run folder")
        if not file.is_file():
            raise ckpt.CheckpointError(f"checkpoint not found: {file}")
        lock = RunLock(file.parent).acquire() if for_training else None
        try:
            run = cls._from_checkpoint(file, backend)
            if for_training:
                run.open_for_training(lock, repair_log)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return run

    @classmethod
    def _from_checkpoint(cls, file: Path, backend) -> "Run":
        arrays, meta = ckpt.load(file)
        ckpt.check_contents(file, arrays, meta, {}, META_KEYS)
        try:
            config = RunConfig.from_dict(meta["config"])
            arch = Architecture.from_dict(meta["architecture"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {file}: its configuration does not load ({exc})") from None
        run = cls.build(config, backend, arch=arch, out=file.parent)
        run._restore(arrays, meta, file)
        return run

    def open_for_training(self, lock: RunLock, repair_log: bool = False) -> None:
        """Hold ``lock`` (the folder's, acquired) and get the folder ready to train on from the
        checkpoint: drop refimpl's stale temporaries and check log.csv (:func:`refimpl.runlog.verify_log`:
        rows after the checkpoint are dropped; a missing or damaged row up to it is refused)."""
        self._lock = lock
        remove_stale_temporaries(self.out, RUN_FILES)
        remove_stale_temporaries(self.out / KEPT_DIR, kept_names(self.out))
        self.repaired_lines = verify_log(self.out / LOG_FILE, self.state.step, repair=repair_log,
                                         first_step=self.first_step)

    @property
    def first_step(self) -> int:
        """The step the run's own log starts after: 0, or a branch's parent step."""
        return self.parent["step"] if self.parent is not None else 0

    def close(self) -> None:
        """Release the folder's lock (if this run holds it); the run stays usable read-only."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

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
            self._split = split_indices(n, int(self.config.holdout), stream(self.config.data_seed(), "split"))
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
        """Write the current state to ``out/checkpoint.npz`` atomically (log synced first), and keep a
        copy in ``out/checkpoints/`` at a step the schedule's ``keep_checkpoints`` names."""
        if self._log is not None:
            self._log.sync()
        state = self.state
        arrays = {f"model/{k}": to_host(v).copy() for k, v in self.model.state_dict().items()}
        arrays["lambda"] = to_host(state.lam).copy()
        adam = state.optimizer.state_dict()
        arrays.update({f"adam/m/{k}": v for k, v in adam["m"].items()})
        arrays.update({f"adam/v/{k}": v for k, v in adam["v"].items()})
        meta = {
            "step": state.step, "adam_t": adam["t"], "adam_steps": adam["steps"],
            "hit": state.hit, "c_ma": state.c_ma, "last_constraint_met": state.last_constraint_met,
            "train_rng": get_state(self.train_rng),
            "batch_iterator": self._batch_order.state_dict() if self._batch_order is not None else self._batch_state,
            "target_batches": self.schedule.batches, "checkpoint_every": self.schedule.checkpoint_every,
            "keep_checkpoints": self.schedule.keep_checkpoints, "parent": self.parent,
            "config": self.config.to_dict(), "architecture": self.arch.to_dict(),
            "timing": {"elapsed_s": self.elapsed, "backend": self.backend},
        }
        ckpt.save(self.checkpoint_path(), arrays, meta)
        if self._keeps(state.step):
            ckpt.save(kept_checkpoint(self.out, state.step), arrays, meta)
        self.checkpoint_step = state.step
        return self.checkpoint_path()

    def _keeps(self, step: int) -> bool:
        """Whether ``step``'s checkpoint is kept: a multiple of ``keep_checkpoints`` the run computed."""
        keep = self.schedule.keep_checkpoints
        return bool(keep) and step % keep == 0 and step > self.first_step

    def _restore(self, arrays: dict, meta: dict, path) -> None:
        state, xp = self.state, self.xp
        shapes = {f"model/{k}": v.shape for k, v in self.model.state_dict().items()}
        shapes.update({f"adam/{m}/{k}": p.shape for m in "mv" for k, p in state.optimizer.params.items()})
        ckpt.check_contents(path, arrays, meta, {**shapes, "lambda": ()}, META_KEYS)
        self.model.load_state_dict({k: to_device(v, xp, self.dtype)
                                    for k, v in ckpt.prefixed(arrays, "model/").items()})
        state.lam[...] = to_device(arrays["lambda"], xp, self.dtype)
        try:
            state.optimizer.load_state_dict({"t": meta["adam_t"], "steps": meta.get("adam_steps"),
                                             "m": ckpt.prefixed(arrays, "adam/m/"),
                                             "v": ckpt.prefixed(arrays, "adam/v/")})
        except (ValueError, TypeError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {path}: {exc}") from None
        state.step, state.hit, state.c_ma = int(meta["step"]), bool(meta["hit"]), meta["c_ma"]
        state.last_constraint_met = bool(meta["last_constraint_met"])
        set_state(self.train_rng, meta["train_rng"])
        self.elapsed = float(meta.get("timing", {}).get("elapsed_s", 0.0))
        self.schedule = saved_schedule(meta)
        self.parent = meta.get("parent")
        self._batch_state = meta["batch_iterator"]
        self.checkpoint_step = state.step

    # -- training

    def train(self, batches: int | None = None, checkpoint_every: int | None = None, progress: bool = True,
              log_interval=10.0, stop=None, device_step: bool = False, keep_checkpoints: int | None = None,
              execution: Execution | None = None) -> dict:
        """Run Algorithm 1 until ``batches`` steps in total (default: the run's target); returns the summary.

        ``checkpoint_every``, ``keep_checkpoints``: default the run's own. All three become the run's schedule.
        ``stop``: a callable asked before every step; when it says True the run stops as on
        SIGTERM (a sweep's workers, which receive no signals, stop this way).
        ``device_step``: from the first hit on, run :class:`refimpl.device_step.DeviceStep` (the
        step without host reads, for GPUs) instead of :func:`refimpl.algorithm1.train_step`.
        ``execution``: BLAS threads and the decoder passes' threads (:mod:`refimpl.threads`;
        default: those the run was built with); never changes a number for a given BLAS thread count.
        Raises :class:`NonFiniteLoss` (no checkpoint written) or :class:`TrainingInterrupted`
        (checkpoint written) instead of finishing. Holds the folder's lock throughout (taking
        it if the run does not hold it yet) and releases it at the end, however it ends.
        Floating-point warnings are silenced: a non-finite loss is caught and reported instead.
        """
        batches = self.schedule.batches if batches is None else batches
        checkpoint_every = self.schedule.checkpoint_every if checkpoint_every is None else checkpoint_every
        if not isinstance(batches, (int, numpy.integer)) or batches < 0:
            raise OptionError(f"batches={batches!r}: expected a non-negative integer")
        if batches < self.state.step:
            raise OptionError(f"batches={batches}: this run has already done {self.state.step} batches")
        if not isinstance(checkpoint_every, (int, numpy.integer)) or checkpoint_every < 1:
            raise OptionError(f"checkpoint_every={checkpoint_every!r}: expected a positive integer")
        keep = self.schedule.keep_checkpoints if keep_checkpoints is None else keep_checkpoints
        if not isinstance(keep, (int, numpy.integer)) or keep < 0:
            raise OptionError(f"keep_checkpoints={keep!r}: expected a non-negative integer")
        if execution is not None:
            self.state.passes = DecoderPasses(self.model, resolve(execution, self.model))
        if self._lock is None:
            self._lock = RunLock(self.out).acquire()
        try:
            return self._train(Schedule(int(batches), int(checkpoint_every), int(keep)), progress, log_interval, stop,
                               device_step)
        finally:
            self.close()

    def _train(self, schedule: Schedule, progress: bool, log_interval, stop, device_step: bool = False) -> dict:
        self.schedule = schedule
        batches, checkpoint_every = schedule.batches, schedule.checkpoint_every
        self.batch_order  # opens the dataset before the log
        state, tau = self.state, self.hyper.tau
        self._log = CsvLog(self.out / LOG_FILE)
        bar = Progress(batches, state.step, self.config.latent, enabled=progress, interval=log_interval)
        fast = None  # the DeviceStep, once it applies
        try:
            with StopOnSignal() as signalled, numpy.errstate(all="ignore"), blas_limit(state.passes.threads.blas):
                while state.step < batches:  # Alg. 1 l. 2: foreach x_i in D
                    if signalled.signum is None and stop is not None and stop():
                        signalled.signum = signal.SIGTERM
                    if signalled.signum is not None:
                        break
                    t0 = time.perf_counter()
                    if device_step and fast is None and applies(state):
                        fast = DeviceStep(state)
                    x = self.next_batch()
                    if fast is None:
                        log = train_step(state, x, self.train_rng)  # l. 3-31
                    else:
                        log = fast.host_log(fast(x, self.train_rng))  # the same, without host reads mid-step
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
                    if state.step % checkpoint_every == 0 or self._keeps(state.step):
                        self.save_checkpoint()
                if signalled.signum is not None:
                    if self.checkpoint_step != state.step:
                        self.save_checkpoint()
                    raise TrainingInterrupted(state.step, signalled.signum, self.checkpoint_path())
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
        if self.has_log():
            columns = read_history(self.out)
            if columns.get("E2"):
                out.update(E2_last=columns["E2"][-1], E2_ma95=moving_average(columns["E2"], 0.95),
                           lambda_eff=columns["lambda_eff"][-1], gates_l1=columns["gates_l1"][-1])
        return out

    def has_log(self) -> bool:
        """Whether the run has logged a step: its own log.csv (or log.csv.gz), or a parent's for a branch."""
        if any((self.out / name).is_file() for name in (LOG_FILE, LOG_GZ_FILE)):
            return True
        return self.parent is not None and (self.out / CONFIG_FILE).is_file()  # not a kept checkpoint read alone

    def write_summary(self) -> dict:
        summary = self.summary()
        write_json(self.out / SUMMARY_FILE, summary)
        return summary


def open_run(out, given: dict, *, backend: str | None = None, resume: bool | None = False, overwrite: bool = False,
             schedule: Schedule | None = None, repair_log: bool = False, parent=None, at: int | None = None) -> Run:
    """The run in folder ``out``, continued or new, open for training (holding the folder's lock
    until it has trained or is closed): the one place train, the experiments and sweeps open runs.

    given: the run options given (RunConfig fields, ``hyper`` a dict). resume=True: continue
    the run in ``out`` (it must exist, and ``given`` must agree with it); False: a new run
    from ``given`` (``overwrite`` replaces one already there); None: continue if ``out``
    holds a run, else start one. ``repair_log``: see :func:`refimpl.runlog.verify_log`.
    ``parent`` (a run folder or a :class:`refimpl.branch.Source`), ``at``: the new run is a
    branch (:meth:`Run.branch`; ``schedule`` default the parent's); a run continued with
    resume=None must then be a branch of that folder.
    """
    out = Path(out)
    exists = (out / CHECKPOINT_FILE).is_file()
    automatic, resume = resume is None, exists if resume is None else resume
    if parent is not None and resume and not automatic:
        raise OptionError("--from starts a new run (a branch): continue a branch with --resume alone")
    if parent is not None and not resume:
        return Run.branch(parent, out, given, at=at, backend=backend, overwrite=overwrite, schedule=schedule)
    if not resume:
        return Run.create(new_config(given), out, backend=backend, overwrite=overwrite, schedule=schedule)
    if not exists:
        raise NoRun(f"nothing to resume: {out} holds no {CHECKPOINT_FILE}")
    given = dict(given)
    if given.get("data") is not None:
        given["data"] = str(Path(given["data"]).resolve())
    lock = RunLock(out).acquire()
    try:
        run = Run.load(out, backend=backend, for_training=False)
        differences = config_differences(run.config, given)
        if parent is not None:
            differences += _other_parent(run, parent, at)
        if differences and automatic:
            raise RunConflictError(f"{out} holds a run with other settings ({'; '.join(differences)}); delete it or "
                                   "choose another --out")
        if differences:
            raise OptionError(f"options differ from the run in {out}: {'; '.join(differences)}; drop them to resume")
        run.open_for_training(lock, repair_log)
    except BaseException:
        lock.release()
        raise
    return run


def _holds_old_run(out: Path, overwrite: bool) -> bool:
    """Whether ``out`` holds a run a new one replaces (with ``overwrite``; RunExistsError without)."""
    held = check_new_run_folder(out, overwrite)
    if held and not overwrite:
        raise RunExistsError(f"{out} already holds a run ({CHECKPOINT_FILE}); continue it with --resume, "
                             f"start afresh with --overwrite, or choose another --out")
    return held


def _other_parent(run: Run, parent, at: int | None) -> list[str]:
    """How ``run`` differs from a branch of ``parent`` (at step ``at``, if given), as :func:`config_differences`
    words it."""
    folder = parent.folder if isinstance(parent, Source) else Path(parent)
    if run.parent is None:
        return [f"a branch of {folder} (the run is not a branch)"]
    theirs = parent_folder(run.out, run.parent)
    if theirs.resolve() != folder.resolve() or at is not None and at != run.parent["step"]:
        return [f"a branch of {folder}{'' if at is None else f' at step {at}'} (the run branches {theirs} at step "
                f"{run.parent['step']})"]
    return []


__all__ = ["CHECKPOINT_FILE", "CONFIG_FILE", "LOG_FILE", "NonFiniteLoss", "Run", "RunConflictError", "RunExistsError", "STREAMS", "SUMMARY_FILE",
           "TrainingInterrupted", "open_run", "stream"]
