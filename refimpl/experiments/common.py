"""What the experiment scripts share: options, presets that follow the dataset, and their runs.

Every run of an experiment is an ordinary run folder (see :mod:`refimpl.training`) under
``OUT/runs/``, trained by :mod:`refimpl.sweep` (here, on a local Dask cluster with
``--jobs J``, or on a cluster with ``--scheduler ADDRESS``); running an experiment again
resumes unfinished runs from their checkpoints and reuses finished ones, so an
interrupted experiment loses at most ``checkpoint_every`` batches per run.

Each script has small defaults that show the effect on a 2-core CPU and ``--full`` for
the paper's settings. A preset is stated for one dataset (the small ones for the
built-in synthetic dSprites at 16x16); ``--dataset`` carries it over to another: the
image size becomes the dataset's own (or the preset's pooled size where that divides
it), the channel widths those of that size, and every tau is scaled by the ratio of the
two datasets' default tolerances at their sizes, as ``refimpl train`` scales its
default. One line says what was chosen; any option given explicitly still wins.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

from .. import options
from ..config import RunConfig, Schedule, default_tau, new_config
from ..data import dataset_info
from ..execution import Execution
from ..exits import ArgumentParser, run_command
from ..sweep import EXECUTION_EXCLUDED, Cluster, run_spec

CONFIG_FIELDS = tuple(f.name for f in fields(RunConfig) if f.name != "hyper")
CHECKPOINT_EVERY = 500  # the experiments' default: fewer, larger checkpoints than train's


def parser(prog: str, description: str, own=("tau",), eval_images: int | None = None) -> argparse.ArgumentParser:
    """The options every experiment takes: the run options of ``refimpl train`` (but ``own``, which the
    script declares with its own meaning), the schedule, and where the runs train; ``eval_images``: the
    default of ``--eval-images`` for a script that evaluates its runs."""
    p = ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if eval_images is not None:
        p.add_argument("--eval-images", type=int, default=eval_images,
                       help=f"held-out images for the error (default {eval_images})")
    p.add_argument("--full", action="store_true", help="the paper's settings (hours to days on a CPU; use a GPU)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: experiments/<name>)")
    options.add_run_options(p, exclude=("baseline", *own), positional=False)
    options.add_options(p, Schedule, title="schedule (per run)")
    options.add_backend_option(p)
    options.add_options(p, Execution, exclude=EXECUTION_EXCLUDED, title="execution of every run (not part of it)")
    Cluster.add_arguments(p)
    return p


def image_size_for(dataset: str, preset_size: int | None) -> int | None:
    """The preset's pooled size where it divides ``dataset``'s images, else the dataset's own size (None)."""
    native = dataset_info(dataset).shape[1]
    return preset_size if preset_size and native % preset_size == 0 else None


def settings(args, small: dict, full: dict, prog: str = "experiment") -> dict:
    """``full`` or ``small`` (by ``--full``), carried over to ``--dataset``, then every run option given.

    The result holds RunConfig fields, ``batches``, ``checkpoint_every``, ``hyper`` (the
    Hyper fields given), ``tau_scale`` (for the preset's taus), ``execution`` (the
    :class:`~refimpl.execution.Execution` fields given) and the script's own keys.
    """
    preset = full if args.full else small
    chosen = {"checkpoint_every": CHECKPOINT_EVERY, **preset}
    given = options.given_run_options(args)
    chosen["hyper"] = given.pop("hyper", {})
    dataset = given.get("dataset", preset["dataset"])
    if dataset != preset["dataset"]:
        chosen.update(image_size=image_size_for(dataset, preset["image_size"]), channels=None)
    chosen.update(given)
    chosen.update(options.given(args, Schedule))
    chosen["execution"] = options.given(args, Execution, exclude=EXECUTION_EXCLUDED)
    chosen["tau_scale"] = (default_tau(dataset, chosen["image_size"])
                           / default_tau(preset["dataset"], preset["image_size"]))
    if dataset != preset["dataset"]:
        c, h, _ = dataset_info(dataset).shape
        size = chosen["image_size"] or h
        print(f"{prog}: {dataset}: {c}x{size}x{size} images ({'pooled from ' + str(h) if size != h else 'native size'})"
              f", default channel widths, preset taus x {chosen['tau_scale']:.4g} (the ratio of default tolerances)",
              file=sys.stderr)
    return chosen


def spec(out, chosen: dict, *, backend=None, eval_images=None, **override) -> dict:
    """The task of run folder ``out`` with the settings ``chosen`` (:func:`settings`) and ``override``
    (e.g. ``latent``, ``tau``, ``baseline``, ``batches``); its options are checked now (OptionError)."""
    chosen = {**chosen, **override}
    given = {k: chosen[k] for k in CONFIG_FIELDS if k in chosen}
    given["hyper"] = dict(chosen.get("hyper", {}))
    if not chosen.get("baseline"):
        given["hyper"]["tau"] = float(chosen["tau"])
    config = new_config(given)  # a combination that cannot work is refused before any run starts
    schedule = Schedule(int(chosen["batches"]), int(chosen["checkpoint_every"]), int(chosen.get("keep_checkpoints", 0)))
    return run_spec(out, given, schedule, backend, eval_images, config=config, execution=chosen.get("execution"))


def load(summary: dict, chosen: dict, backend=None):
    """A finished run of the experiment (its ``summary``), read for evaluation under the chosen execution."""
    from ..training import Run

    return Run.load(summary["out"], backend=backend, for_training=False,
                    execution=Execution(**chosen.get("execution", {})))


def report(name: str, written: list) -> list:
    """The last line of every experiment: the files it wrote, and only those."""
    print(f"{name}: wrote " + ", ".join(map(str, written)))
    return written


def main_wrapper(run, argv=None, prog: str = "experiment") -> int:
    """An experiment's ``run(argv, prog)`` as a command, named ``prog`` in its messages (``python -m
    refimpl.experiments.NAME`` or ``refimpl experiment NAME``): the exit statuses of :mod:`refimpl.exits`."""
    start = time.monotonic()
    code = run_command(lambda: run(argv, prog) and 0, prog)
    if code == 0:
        print(f"{prog}: finished in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return code
