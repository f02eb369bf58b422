"""Opening a run folder for training: the one place ``refimpl train``, the experiments and
sweeps open runs (:func:`open_run`), continued or new, a branch or not.

A new run is :meth:`refimpl.training.Run.create` (or :meth:`~refimpl.training.Run.branch`);
a continued one is :meth:`~refimpl.training.Run.load`, after checking that the options
given agree with the run's own.
"""

from __future__ import annotations

from pathlib import Path

from .branch import Source, parent_folder
from .config import RunConfig, Schedule, config_differences, new_config
from .errors import RunConflictError
from .execution import Execution
from .optionspec import OptionError
from .runfolder import CHECKPOINT_FILE, NoRun, RunLock
from .training import Run


def open_run(out, given: dict, *, backend: str | None = None, resume: bool | None = False, overwrite: bool = False,
             schedule: Schedule | None = None, repair_log: bool = False, parent=None, at: int | None = None,
             config: RunConfig | None = None, execution: Execution | None = None) -> Run:
    """The run in folder ``out``, continued or new, open for training (holding the folder's lock
    until it has trained or is closed): the one place train, the experiments and sweeps open runs.

    given: the run options given (RunConfig fields, ``hyper`` a dict). resume=True: continue
    the run in ``out`` (it must exist, and ``given`` must agree with it); False: a new run
    from ``given`` (``overwrite`` replaces one already there); None: continue if ``out``
    holds a run, else start one. ``repair_log``: see :func:`refimpl.runlog.verify_log`.
    ``parent`` (a run folder or a :class:`refimpl.branch.Source`), ``at``: the new run is a
    branch (:meth:`Run.branch`; ``schedule`` default the parent's); a run continued with
    resume=None must then be a branch of that folder. ``config``: ``new_config(given)``, where
    the caller has made it already (a new run's settings are resolved once). ``execution``: how the run
    executes here (refimpl/execution.py), whatever setting made it.
    """
    out = Path(out)
    exists = (out / CHECKPOINT_FILE).is_file()
    automatic, resume = resume is None, exists if resume is None else resume
    if parent is not None and resume and not automatic:
        raise OptionError("--from starts a new run (a branch): continue a branch with --resume alone")
    if parent is not None and not resume:
        return Run.branch(parent, out, given, at=at, backend=backend, overwrite=overwrite, schedule=schedule,
                          execution=execution)
    if not resume:
        config = config if config is not None else new_config(given)
        return Run.create(config, out, backend=backend, overwrite=overwrite, schedule=schedule, execution=execution)
    if not exists:
        raise NoRun(f"nothing to resume: {out} holds no {CHECKPOINT_FILE}")
    given = dict(given)
    if given.get("data") is not None:
        given["data"] = str(Path(given["data"]).resolve())
    lock = RunLock(out).acquire()
    try:
        run = Run.load(out, backend=backend, for_training=False, execution=execution)
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
