"""Run branching: a new run that starts from another run's checkpoint with some options changed.

``refimpl train --from RUN [--at STEP] --out NEW [options]`` (and ``refimpl sweep --from``)
makes NEW a *branch* of RUN (:meth:`refimpl.training.Run.branch`):

- It starts from RUN's ``checkpoint.npz``, or with ``--at STEP`` from the checkpoint RUN
  kept at STEP (``--keep-checkpoints``, :func:`refimpl.runfolder.kept_checkpoint`), or
  from ``checkpoint.npz`` when that is at STEP: parameters and BatchNorm statistics, Adam's
  state, lambda and the GECO state (hit, C_ma, the last step's constraint), the step, and
  the random streams (Algorithm 1's u and eps, the batch order). A branch that changes
  nothing continues bit for bit as RUN would have (NumPy).
- Only Algorithm 1's options (:class:`refimpl.algorithm1.Hyper`, tau included) and
  ``--seed`` may change (and the schedule, which is not part of a run). Anything else that
  differs from RUN (dataset, sizes, architecture, dtype, ...) is refused in one line
  (:func:`branch_config`), as are :data:`INIT_ONLY` (they set step 0 only).
- ``--seed S`` re-seeds what is drawn from the branch step on: Algorithm 1's u and eps
  (the ``train`` stream of seed S) and the batch order (the ``batches`` stream of seed S,
  from a new epoch). The weights are RUN's, and so is the held-out split (the config's
  ``split_seed`` keeps RUN's seed for it and for factors' sample).
- ``config.json`` records ``"parent": {"run": RUN relative to NEW, "step": STEP,
  "changed": {field: new value}}``; the checkpoints hold the same record. The relative
  path keeps resolving in a clone of a repository holding both folders.
- NEW's ``log.csv`` holds only its own rows, STEP + 1 on (resume checks that,
  :func:`refimpl.runlog.verify_log`); :func:`read_history` gives the whole history, RUN's
  rows 1..STEP (recursively, for a branch of a branch) then NEW's, which ``plot``,
  ``milestones``, ``evaluate`` and the run's summary read.
- The schedule defaults to RUN's (its target, checkpoint interval and kept checkpoints);
  options given override it (:func:`branch_schedule`). ``summary.json``'s ``elapsed_s`` is
  the branch's own time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from . import checkpoint as ckpt
from .algorithm1 import Hyper
from .config import RunConfig, Schedule, changed_fields, saved_schedule
from .model import Architecture
from .optionspec import OptionError, nonnegative_int
from .runfolder import CHECKPOINT_FILE, CONFIG_FILE, KEPT_DIR, LOG_FILE, PARENT_KEY, holds_run, kept_checkpoints
from .runlog import LogError, gz_path, read_log

INIT_ONLY = ("gamma_init", "lambda_init", "lambda_init_on")  # Hyper fields read only at step 0
MAX_DEPTH = 100  # parents followed at most (a loop of folders is refused before that)


@dataclasses.dataclass
class Source:
    """The checkpoint a branch starts from: run folder ``folder``, checkpoint file ``path`` at ``step``,
    its ``arrays`` and ``meta`` (:func:`refimpl.checkpoint.load`), the run's config, architecture and schedule."""

    folder: Path
    path: Path
    step: int
    arrays: dict
    meta: dict
    config: RunConfig
    arch: Architecture
    schedule: Schedule


def open_source(parent, at: int | None = None) -> Source:
    """The checkpoint of run folder ``parent`` to branch from: its latest, or the one at step ``at``.

    OptionError (exit 2) for a path that does not exist or no checkpoint at ``at`` (the message
    lists the steps there are); CheckpointError (exit 1) for a folder that holds no run or an
    unreadable checkpoint.
    """
    folder = Path(parent)
    if not folder.exists():
        raise OptionError(f"--from {parent}: no such run folder")
    if not holds_run(folder):
        raise ckpt.CheckpointError(f"--from {parent}: not a refimpl run folder (no {CHECKPOINT_FILE} and "
                                   f"{CONFIG_FILE} written by refimpl)")
    latest = folder / CHECKPOINT_FILE
    path = latest
    if at is not None:
        kept = kept_checkpoints(folder)
        path = kept.get(at)
        if path is None:
            latest_step = int(ckpt.load(latest)[1].get("step", -1))
            if latest_step != at:
                steps = ", ".join(map(str, kept)) or "none"
                raise OptionError(f"--at {at}: {parent} has no checkpoint at step {at}; kept ({KEPT_DIR}/): {steps}; "
                                  f"latest ({CHECKPOINT_FILE}): {latest_step}")
            path = latest
    arrays, meta = ckpt.load(path)
    ckpt.check_contents(path, arrays, meta, {}, ("step", "config", "architecture"))
    try:
        config = RunConfig.from_dict(meta["config"])
        arch = Architecture.from_dict(meta["architecture"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ckpt.CheckpointError(f"checkpoint {path}: its configuration does not load ({exc})") from None
    return Source(folder, path, int(meta["step"]), arrays, meta, config, arch, saved_schedule(meta))


def branch_config(source: Source, given: dict) -> tuple[RunConfig, dict]:
    """The branch's config: ``source``'s with the options ``given`` (RunConfig fields, ``hyper`` a
    dict) applied, and the changed fields (field -> new value, JSON-able).

    OptionError (one line, exit 2) for a change other than a Hyper field or ``seed``, or of a
    field in :data:`INIT_ONLY`. Options given with the parent's own value are no change.
    """
    given = dict(given)
    if given.get("data") is not None:
        given["data"] = str(Path(given["data"]).resolve())
    parent = source.config
    changed = {}
    hyper_names = {f.name for f in dataclasses.fields(Hyper)}
    for key, (value, old) in changed_fields(parent, given).items():
        flag = f"--{key.replace('_', '-')}"
        if key in INIT_ONLY:
            raise OptionError(f"{flag} {value}: sets step 0 only; a branch starts from {source.folder}'s state at "
                              f"step {source.step}: drop it")
        if key not in hyper_names and key != "seed":
            raise OptionError(f"{flag} {_text(value)}: {source.folder} has {key}={_text(old)}; a branch keeps its "
                              "parent's dataset, architecture and sizes (only Algorithm 1's options and --seed may "
                              "change): drop it, or start a new run")
        changed[key] = list(value) if isinstance(value, tuple) else value
    d = parent.to_dict()
    hyper = {**d["hyper"], **{k: v for k, v in changed.items() if k in hyper_names}}
    seed = {"seed": changed["seed"], "split_seed": parent.data_seed()} if "seed" in changed else {}
    return RunConfig.from_dict({**d, **seed, "hyper": hyper}), changed


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def branch_schedule(source: Source, given: dict) -> Schedule:
    """The branch's schedule: ``source``'s (its run's target, interval, kept checkpoints), with the
    Schedule fields ``given`` over it."""
    return Schedule(**{**dataclasses.asdict(source.schedule), **given})


def parent_record(folder) -> dict | None:
    """The ``parent`` entry of run folder ``folder``'s config.json (None for a run that is no branch)."""
    path = Path(folder) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LogError(f"{path}: not readable ({type(exc).__name__}: {exc})") from None
    return data.get(PARENT_KEY) if isinstance(data, dict) else None


def relative_parent(parent, branch) -> str:
    """How a branch at ``branch`` names its parent folder ``parent``: the path relative to it."""
    return os.path.relpath(Path(parent).resolve(), Path(branch).resolve())


def parent_folder(folder, record: dict) -> Path:
    """The parent run folder ``record`` (:func:`parent_record`) names, resolved against branch ``folder``."""
    return Path(os.path.normpath(Path(folder) / record["run"]))


def lineage(folder) -> list[tuple[Path, int | None]]:
    """[(run folder, the last step of its log that belongs to the history)] from the first run to
    ``folder`` (whose own entry is None: all its rows). FileNotFoundError when a parent is missing,
    LogError for a loop of folders."""
    chain = [(Path(folder), None)]
    seen = {Path(folder).resolve()}
    while (record := parent_record(chain[0][0])) is not None:
        child, parent = chain[0][0], parent_folder(chain[0][0], record)
        if parent.resolve() in seen or len(chain) > MAX_DEPTH:
            raise LogError(f"{child}: its parents loop back to {parent}")
        if not parent.is_dir():
            raise FileNotFoundError(f"{child} is a branch of {parent} at step {record['step']}, which is not there; "
                                    f"its history needs that run's {LOG_FILE} (or {gz_path(LOG_FILE)})")
        seen.add(parent.resolve())
        chain.insert(0, (parent, int(record["step"])))
    return chain


def read_history(folder) -> dict:
    """The whole log of run folder ``folder``: columns name -> list of floats, its parents' rows
    1..STEP (:func:`lineage`) followed by its own (``log.csv`` or ``log.csv.gz`` each).

    A column missing from part of the history (an older log) reads NaN there. LogError when a
    parent's log does not end at the step the branch starts from, or the branch's log does not
    start right after it; FileNotFoundError for a missing log (a branch may have none yet).
    """
    chain = lineage(folder)
    parts, start = [], 0
    for i, (run, last) in enumerate(chain):
        log = run / LOG_FILE
        if i and i == len(chain) - 1 and not (log.is_file() or gz_path(log).is_file()):
            break  # a branch that has not trained a batch yet
        columns = read_log(log)
        steps = columns.get("step", [])
        if steps and steps[0] != start + 1:
            raise LogError(f"{log}: rows start at step {steps[0]:g}, but the run starts after step {start}")
        if last is not None:
            keep = sum(1 for s in steps if s <= last)
            if keep != last - start or (keep and steps[keep - 1] != last):
                raise LogError(f"{log}: rows {start + 1}-{last} belong to the history of {chain[i + 1][0]}, "
                               f"but the log ends at step {steps[keep - 1] if keep else start:g} before it")
            columns = {name: values[:keep] for name, values in columns.items()}
            start = last
        parts.append(columns)
    names = list(dict.fromkeys(name for part in parts for name in part))
    out = {name: [] for name in names}
    for part in parts:
        rows = len(part.get("step", []))
        for name in names:
            out[name] += part.get(name, [float("nan")] * rows)
    return out


def add_arguments(parser) -> None:
    """``--from RUN`` and ``--at STEP``, for train and sweep."""
    parser.add_argument("--from", dest="parent", default=None, metavar="RUN",
                        help="branch: start from run folder RUN's checkpoint (parameters, Adam, GECO state, random "
                             "streams) with the Algorithm 1 options and --seed given changed; needs --out")
    parser.add_argument("--at", type=nonnegative_int, default=None, metavar="STEP",
                        help="with --from: the checkpoint RUN kept at STEP (--keep-checkpoints), not its latest")


def check_arguments(args) -> None:
    """OptionError for ``--at`` without ``--from``."""
    if args.at is not None and args.parent is None:
        raise OptionError("--at picks the checkpoint of the run to branch from: give --from RUN")
