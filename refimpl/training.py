"""A training run: its model, Algorithm 1's state, data stream and folder; made, branched, resumed.

A run lives in one folder (``refimpl train --out DIR``); its files and rules (where a run
may start, what refimpl deletes, the lock that keeps a second process out while one
trains) are in :mod:`refimpl.runfolder`. A Run opened for training holds the folder's
lock until :meth:`Run.train` ends or :meth:`Run.close`. The loop itself is in
:mod:`refimpl.loop`, what a checkpoint holds in :mod:`refimpl.runcheckpoint`, and
:func:`refimpl.runopen.open_run` is how commands open a run, new or continued.

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
"""

from __future__ import annotations

from pathlib import Path

import numpy

from . import checkpoint as ckpt
from . import memory, runcheckpoint
from .algorithm1 import init_state
from .atomic import remove_stale_temporaries, write_json
from .branch import Source, branch_config, lineage, open_source, read_history, relative_parent
from .backend import backend_name, get_dtype, get_xp, to_device, to_host
from .config import RunConfig, Schedule
from .data import BatchIterator, DatasetError, dataset_info, open_dataset, split_indices
from .data.base import downsample
from .errors import NonFiniteLoss, RunExistsError, TrainingInterrupted
from .loop import run_loop
from .model import Architecture, GatedVAE, build_architecture
from .optionspec import OptionError
from .rng import generator
from .runfolder import (CHECKPOINT_FILE, CONFIG_FILE, KEPT_DIR, LOG_FILE, LOG_GZ_FILE, PARENT_KEY, RUN_FILES,
                        SUMMARY_FILE, RunLock, check_new_run_folder, kept_checkpoint, kept_names,
                        remove_run_files)
from .runlog import moving_average, verify_log
from .execution import Execution

STREAMS = ("init", "split", "batches", "train", "factors")  # new names go last: the index seeds the stream


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

    def __init__(self, config: RunConfig, out=None, backend: str | None = None, execution: Execution | None = None):
        self.config = config
        self.out = Path(out) if out is not None else None
        self.backend = backend_name(backend)
        self.xp = get_xp(self.backend)
        self.paths = (execution or Execution()).resolve(self.backend)  # how it executes: not part of the run
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
        self.csv_log = None  # log.csv (a CsvLog) while the loop runs (refimpl/loop.py)
        self._lock = None  # the folder's RunLock while the run is open for training
        self.repaired_lines = []  # log.csv lines --repair-log dropped when the run was opened

    # -- construction

    @classmethod
    def build(cls, config: RunConfig, backend: str | None = None, *, arch: Architecture | None = None,
              out=None, execution: Execution | None = None) -> "Run":
        """The run ``config`` defines, at step 0, in memory; touches no disk (the dataset opens on first use).

        ``arch``: the architecture (a loaded run's); default: the one ``config`` scales to.
        ``execution``: the fast paths and threads (refimpl/execution.py), resolved here once.
        """
        run = cls(config, out, backend, execution)
        run.arch = arch or build_architecture(config.image_shape(), config.channels, config.hidden)
        memory.check_training(run.arch, config, run.xp, run.paths)
        run.model = GatedVAE(run.arch, config.latent, rng=stream(config.seed, "init"), xp=run.xp, dtype=run.dtype,
                             gated=True, gamma_init=run.hyper.gamma_init, paths=run.paths)
        run.state = init_state(run.model, run.hyper)
        return run

    @classmethod
    def create(cls, config: RunConfig, out, backend: str | None = None, overwrite: bool = False,
               schedule: Schedule | None = None, execution: Execution | None = None) -> "Run":
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
        run = cls.build(config, backend, out=out, execution=execution)
        run.schedule = schedule or Schedule()
        return run._start_folder(overwrite)

    @classmethod
    def branch(cls, parent, out, given: dict, *, at: int | None = None, backend: str | None = None,
               overwrite: bool = False, schedule: Schedule | None = None, execution: Execution | None = None) -> "Run":
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
        run = cls.build(config, backend, arch=source.arch, out=out, execution=execution)
        runcheckpoint.restore(run, source.arrays, source.meta, source.path)
        if "seed" in changed:  # the new seed's u, eps and batch order (a new epoch) from here on
            run.train_rng = stream(config.seed, "train")
            run.batch_state = None
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
    def load(cls, path, backend: str | None = None, for_training: bool = True, repair_log: bool = False,
             execution: Execution | None = None) -> "Run":
        """The run saved at ``path`` (a run folder or a checkpoint file).

        ``for_training``: take the folder's lock and check ``log.csv`` against the checkpoint
        (:meth:`open_for_training`); otherwise the run is read-only (evaluate, export, ...).
        ``execution``: how it runs here (:meth:`build`); any setting continues any run.
        """
        path = Path(path)
        file = path / CHECKPOINT_FILE if path.is_dir() else path
        if path.is_dir() and not file.exists():
            raise ckpt.CheckpointError(f"{path} holds no {CHECKPOINT_FILE}: not a refimpl run folder")
        if not file.is_file():
            raise ckpt.CheckpointError(f"checkpoint not found: {file}")
        lock = RunLock(file.parent).acquire() if for_training else None
        try:
            run = cls._from_checkpoint(file, backend, execution)
            if for_training:
                run.open_for_training(lock, repair_log)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return run

    @classmethod
    def _from_checkpoint(cls, file: Path, backend, execution=None) -> "Run":
        arrays, meta = ckpt.load(file)
        ckpt.check_contents(file, arrays, meta, {}, runcheckpoint.META_KEYS)
        try:
            config = RunConfig.from_dict(meta["config"])
            arch = Architecture.from_dict(meta["architecture"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {file}: its configuration does not load ({exc})") from None
        run = cls.build(config, backend, arch=arch, out=file.parent, execution=execution)
        runcheckpoint.restore(run, arrays, meta, file)
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

    @property
    def batch_state(self):
        """Where the batch order stands (a checkpoint's ``batch_iterator``); None: at its start."""
        return self._batch_order.state_dict() if self._batch_order is not None else self._batch_state

    @batch_state.setter
    def batch_state(self, saved) -> None:
        self._batch_state, self._batch_order = saved, None

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
        if self.csv_log is not None:
            self.csv_log.sync()
        arrays, meta = runcheckpoint.contents(self)
        ckpt.save(self.checkpoint_path(), arrays, meta)
        if self.keeps(self.state.step):
            ckpt.save(kept_checkpoint(self.out, self.state.step), arrays, meta)
        self.checkpoint_step = self.state.step
        return self.checkpoint_path()

    def keeps(self, step: int) -> bool:
        """Whether ``step``'s checkpoint is kept: a multiple of ``keep_checkpoints`` the run computed."""
        keep = self.schedule.keep_checkpoints
        return bool(keep) and step % keep == 0 and step > self.first_step

    # -- training

    def train(self, batches: int | None = None, checkpoint_every: int | None = None, progress: bool = True,
              log_interval=10.0, stop=None, keep_checkpoints: int | None = None) -> dict:
        """Run Algorithm 1 until ``batches`` steps in total (default: the run's target); returns the summary.

        ``checkpoint_every``, ``keep_checkpoints``: default the run's own. All three become the run's schedule.
        ``stop``: a callable asked before every step; when it says True the run stops as on
        SIGTERM (a sweep's workers, which receive no signals, stop this way).
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
        if self._lock is None:
            self._lock = RunLock(self.out).acquire()
        try:
            self.schedule = Schedule(int(batches), int(checkpoint_every), int(keep))
            run_loop(self, progress, log_interval, stop)
            return self.write_summary()
        finally:
            self.close()

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


def _holds_old_run(out: Path, overwrite: bool) -> bool:
    """Whether ``out`` holds a run a new one replaces (with ``overwrite``; RunExistsError without)."""
    held = check_new_run_folder(out, overwrite)
    if held and not overwrite:
        raise RunExistsError(f"{out} already holds a run ({CHECKPOINT_FILE}); continue it with --resume, "
                             f"start afresh with --overwrite, or choose another --out")
    return held


__all__ = ["CHECKPOINT_FILE", "CONFIG_FILE", "LOG_FILE", "NonFiniteLoss", "Run", "RunExistsError", "STREAMS", "SUMMARY_FILE",
           "TrainingInterrupted", "stream"]
