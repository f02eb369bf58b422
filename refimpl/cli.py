"""The ``refimpl`` command line.

    refimpl train [DATASET] [--tau T] [--latent N] [--batches B] [--out DIR] [--resume] ...
    refimpl train --from RUN [--at STEP] --out NEW [options]   a branch of RUN (refimpl/branch.py)
    refimpl evaluate RUN        held-out error, open gates -> RUN/eval.json
    refimpl export RUN          the pruned plain VAE -> RUN/export/model.{npz,json}
    refimpl reconstruct RUN     originals over reconstructions -> RUN/reconstructions.png
    refimpl plot RUN            Figure 1 of a run, gate by gate -> RUN/plot.png (refimpl/plot.py)
    refimpl factors RUN         which generative factor each kept dimension holds (refimpl/factors.py)
    refimpl milestones RUN      Section 4.1's events (lambda' peak, staircase, reopenings) from log.csv
    refimpl study DIR...        one table over many runs (sweeps), grouped by arm, with each seed's result
    refimpl sweep --grid ...    a grid of runs on Dask, one CSV row per run (refimpl/sweep.py)
    refimpl pack-log RUN...     RUN/log.csv -> RUN/log.csv.gz, reproducibly (to commit a study's logs)
    refimpl trace, compare      golden traces (refimpl/trace.py, refimpl/compare.py)

``train``'s run options are derived from the dataclasses that declare them
(:mod:`refimpl.options`). Errors are one line with the exit statuses of
:mod:`refimpl.exits`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy

from . import __version__, branch, compare, factors, figures, milestones, options, plot, study, sweep, trace
from .config import OUT_PATTERN, Schedule, default_out, new_config
from .exits import ArgumentParser, run_command
from .optionspec import OptionError, index_list, positive_int
from .runfolder import existing_run_path
from .threads import Execution

PROG = "refimpl"
MAX_IMAGES, PER_ROW = 256, 16  # refimpl reconstruct: images in one PNG, and to a row


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Dynamic narrowing of VAE bottlenecks with GECO and L0-ARM "
                                                   "(De Boom et al.): a NumPy/CuPy reference implementation.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # -- train
    p = sub.add_parser("train", help="train a gated VAE with Algorithm 1 (or a plain VAE with --baseline)",
                       description="Train a gated VAE with Algorithm 1. With no DATASET, trains on the built-in "
                                   "synthetic dSprites (no download).")
    options.add_run_options(p)
    options.add_options(p, Schedule)
    options.add_backend_option(p)
    options.add_options(p, Execution, title="execution on this machine (not part of the run; refimpl/threads.py)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"run folder (default: {OUT_PATTERN}, e.g. --image-size 16 --tau 4: "
                        f"{default_out(new_config({'image_size': 16, 'hyper': {'tau': 4.0}}))})")
    branch.add_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that already holds a run (deletes every file of the old run)")
    p.add_argument("--repair-log", action="store_true",
                   help="with --resume: drop damaged lines of log.csv when every row up to the checkpoint is there")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device-step", action="store_true",
                   help="after the first hit, Algorithm 1's step without host reads (refimpl/device_step.py): "
                        "for GPUs; the same numbers up to the last bit of lambda'")
    p.set_defaults(func=cmd_train)

    # -- evaluate
    p = sub.add_parser("evaluate", help="held-out reconstruction error and open gates of a run",
                       description="Held-out reconstruction error (inference gates, and every gate open), open "
                                   "gates and final dimensionality. Prints them and writes JSON.")
    p.add_argument("run", metavar="RUN", help="run folder (or its checkpoint.npz)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N held-out images")
    p.add_argument("--batch-size", type=positive_int, default=250, metavar="B", help="evaluation batch (default: 250)")
    p.add_argument("--out", default=None, metavar="FILE", help="JSON output (default: RUN/eval.json)")
    options.add_backend_option(p)
    p.set_defaults(func=cmd_evaluate)

    # -- export
    p = sub.add_parser("export", help="save the pruned model (closed dimensions removed)",
                       description="Save refimpl.model.prune of the run's model: model.npz and model.safetensors "
                                   "(its state dict) and "
                                   "model.json (config).")
    p.add_argument("run", metavar="RUN", help="run folder (or its checkpoint.npz)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN/export)")
    p.set_defaults(func=cmd_export)

    # -- reconstruct
    p = sub.add_parser("reconstruct", help="PNG grid: held-out originals over their reconstructions",
                       description="A PNG of held-out originals, each row of up to 16 over a row of their "
                                   "reconstructions with the inference gates. With several runs (of one dataset "
                                   "and image size; Figure 3's layout): one row of originals, from the first run's "
                                   "held-out split, then a row of reconstructions per run, in the order given.")
    p.add_argument("run", metavar="RUN", nargs="+", help="run folder (or its checkpoint.npz); several for Figure 3")
    p.add_argument("--count", type=positive_int, default=8, metavar="N",
                   help=f"images (default: 8; at most {MAX_IMAGES}, {PER_ROW} to a row)")
    p.add_argument("--indices", type=index_list, default=None, metavar="I,J,...",
                   help="dataset indices to show instead of held-out ones")
    p.add_argument("--scale", type=positive_int, default=None, metavar="K",
                   help="pixel magnification (default: 2 for 64x64, more for smaller images)")
    p.add_argument("--out", default=None, metavar="FILE", help="PNG output (default: RUN/reconstructions.png)")
    options.add_backend_option(p)
    p.set_defaults(func=cmd_reconstruct)

    # -- pack-log
    p = sub.add_parser("pack-log", help="write RUN/log.csv.gz from RUN/log.csv, reproducibly, for committing",
                       description="Write each RUN/log.csv's complete rows to RUN/log.csv.gz (gzip level 9, no name, "
                                   "no timestamp: the same log gives the same bytes). plot, milestones, evaluate and "
                                   "resume read log.csv.gz where log.csv is absent, so a study commits the .gz and "
                                   "leaves log.csv out of git.")
    p.add_argument("run", metavar="RUN", nargs="+", help="run folder")
    p.set_defaults(func=cmd_pack_log)

    # -- commands whose options and runners live in their own modules
    for name, module in (("plot", plot), ("factors", factors), ("milestones", milestones), ("study", study),
                         ("sweep", sweep), ("trace", trace), ("compare", compare)):
        doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", module.__doc__.strip()).replace("``", "")  # plain text, not reST
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=cmd_trace if module is trace else module.run)
    return parser


# ----------------------------------------------------------------------------------------
# train


def cmd_train(args) -> int:
    from .training import open_run

    if args.resume and args.overwrite:
        raise OptionError("--resume and --overwrite exclude each other")
    if args.repair_log and not args.resume:
        raise OptionError("--repair-log repairs the log of a run being resumed: add --resume")
    branch.check_arguments(args)
    given = options.given_run_options(args)
    source = None
    if args.parent is not None:
        if args.resume or args.out is None:
            raise OptionError("--from starts a new run, a branch: give its folder with --out (and continue it later "
                              "with --out NEW --resume, without --from)")
        source = branch.open_source(args.parent, args.at)
        schedule = branch.branch_schedule(source, options.given(args, Schedule))
    else:
        schedule = options.schedule(args)
    out = Path(args.out) if args.out is not None else default_out(new_config(given))
    run = open_run(out, given, backend=args.backend, resume=args.resume, overwrite=args.overwrite,
                   schedule=schedule, repair_log=args.repair_log, parent=source)
    if run.repaired_lines:
        lines = ", ".join(map(str, run.repaired_lines))
        print(f"repaired {out}/log.csv: dropped line(s) {lines}; it holds rows {run.first_step + 1}-{run.state.step}",
              flush=True)
    batches = getattr(args, "batches", None)  # with --resume, default: the run's own target
    checkpoint_every = getattr(args, "checkpoint_every", None)
    keep_checkpoints = getattr(args, "keep_checkpoints", None)
    if source is not None:
        changed = ", ".join(f"{k}={v}" for k, v in run.parent["changed"].items()) or "nothing changed"
        print(f"branching {source.folder} at batch {source.step} ({changed}) to {run.schedule.batches} batches "
              f"on {run.backend}; run folder {out}", flush=True)
    elif args.resume:
        print(f"resuming {out} at batch {run.state.step} of {run.schedule.batches if batches is None else batches}",
              flush=True)
    else:
        print(f"training {run.config.dataset} {'x'.join(map(str, run.arch.image_shape))}, n={run.config.latent}, "
              f"tau={run.hyper.tau:g}, {run.schedule.batches} batches of {run.config.batch_size} on {run.backend}; "
              f"run folder {out}", flush=True)
    summary = run.train(batches, checkpoint_every, progress=not args.quiet, device_step=args.device_step,
                        keep_checkpoints=keep_checkpoints, execution=Execution(**options.given(args, Execution)))
    print(f"done: {summary['step']} batches in {summary['elapsed_s']:.0f} s; {out}/checkpoint.npz")
    print(f"  open gates: {summary['open_gates']}/{summary['n_latent']} {''.join(map(str, summary['gates']))}")
    if summary.get("E2_ma95") is not None:
        print(f"  E2 (moving average 0.95): {summary['E2_ma95']:.4g} against tau {summary['tau']:g}; "
              f"lambda' {summary['lambda_eff']:.3g}")
    if figures.pyplot() is not None:  # Figure 1 of the run, gate by gate (extra 'plots')
        print(f"  plot: {plot.plot_run(out, backend=args.backend)}")
    return 0


def cmd_pack_log(args) -> int:
    from .runfolder import LOG_FILE
    from .runlog import pack_log

    for folder in args.run:
        log = Path(folder) / LOG_FILE
        before = log.stat().st_size if log.is_file() else 0
        rows, out = pack_log(log)
        print(f"{out}: {rows} rows, {before / 1e6:.1f} MB -> {out.stat().st_size / 1e6:.1f} MB")
    return 0


# ----------------------------------------------------------------------------------------
# evaluate, export, reconstruct


def _load(run_path, backend=None):
    from .training import Run

    return Run.load(existing_run_path(run_path), backend=backend, for_training=False)


def cmd_evaluate(args) -> int:
    from .atomic import write_json
    from .evaluate import evaluate
    from .runfolder import EVAL_FILE

    run = _load(args.run, args.backend)
    result = evaluate(run, limit=args.limit, batch_size=args.batch_size)
    out = Path(args.out) if args.out else run.out / EVAL_FILE
    write_json(out, result)
    print(f"{run.out}: step {result['step']}, {result['heldout_images']} held-out images")
    print(f"  open gates (final dimensionality): {result['open_gates']}/{result['n_latent']} "
          f"{''.join(map(str, result['gates']))}")
    print(f"  held-out error, inference gates:  {result['heldout_sse']:.6g} (tau {result['tau']:g})")
    print(f"  held-out error, all gates open:   {result['heldout_sse_all_gates_open']:.6g}")
    if "train_E2_ma95" in result:
        print(f"  training E2, moving average 0.95: {result['train_E2_ma95']:.6g}")
    print(f"  written to {out}")
    return 0


def cmd_export(args) -> int:
    from .evaluate import export
    from .runfolder import EXPORT_DIR, EXPORT_FILES, check_output_folder

    run = _load(args.run)
    out = Path(args.out) if args.out else run.out / EXPORT_DIR
    check_output_folder(out, EXPORT_FILES)
    npz, safetensors, js = export(run, out)
    print(f"exported {run.model.open_gates()}/{run.config.latent} latent dimensions (step {run.state.step}) "
          f"to {npz}, {safetensors} and {js}")
    return 0


def cmd_reconstruct(args) -> int:
    from .evaluate import heldout_indices, reconstruction_grid, reconstructions, save_image, spread_indices
    from .runfolder import RECONSTRUCTIONS_FILE

    if len(args.run) > 1:
        return _reconstruct_runs(args)
    run = _load(args.run[0], args.backend)
    count = len(args.indices) if args.indices is not None else args.count
    if count > MAX_IMAGES:
        raise OptionError(f"{'--indices' if args.indices is not None else '--count'}: {count} images; at most "
                          f"{MAX_IMAGES} fit one PNG ({PER_ROW} to a row): ask for fewer")
    held = heldout_indices(run)
    if args.indices is not None:
        n = len(run.dataset)
        bad = [i for i in args.indices if i >= n]
        if bad:
            raise OptionError(f"--indices {bad[0]}: the dataset has {n} images")
        indices = list(args.indices)
    else:
        indices = spread_indices(held, args.count)
    size = run.arch.image_shape[1]
    scale = args.scale if args.scale is not None else max(1, 128 // size)
    out = Path(args.out) if args.out else run.out / RECONSTRUCTIONS_FILE
    originals, recons = reconstructions(run, indices)
    gates = f"{run.model.open_gates()}/{run.config.latent} gates open"
    images = ("held-out images (never trained on)" if args.indices is None else
              f"images {','.join(map(str, indices))}" if len(indices) <= 8 else f"{len(indices)} chosen images")
    title = f"{run.out.name}, step {run.state.step}, tau {run.hyper.tau:g}, {gates}: {images}"
    save_image(reconstruction_grid(originals, recons, scale=scale, per_row=PER_ROW, title=title), out)
    rows = f" (rows of {PER_ROW})" if len(indices) > PER_ROW else ""
    print(f"{len(indices)} originals over their reconstructions{rows} with {gates}, step {run.state.step}: {out}")
    if args.indices is not None:
        held_set = set(int(i) for i in held)
        for kind, chosen in (("held out (never trained on)", [i for i in indices if i in held_set]),
                             ("trained on", [i for i in indices if i not in held_set])):
            if chosen:
                print(f"  {kind}: {', '.join(map(str, chosen))}")
    return 0


def _reconstruct_runs(args) -> int:
    """``refimpl reconstruct RUN RUN ...``: originals over one row of reconstructions per run (Figure 3)."""
    from .evaluate import heldout_indices, image_grid, reconstructions, save_image, spread_indices

    if args.out is None:
        raise OptionError("--out: several runs need an output file (each run folder has its own reconstructions.png)")
    runs = [_load(path, args.backend) for path in args.run]
    first = runs[0]
    for path, run in zip(args.run[1:], runs[1:]):
        if (run.config.dataset, run.arch.image_shape) != (first.config.dataset, first.arch.image_shape):
            raise OptionError(f"{path}: dataset {run.config.dataset!r} at {run.arch.image_shape}, but {args.run[0]} "
                              f"has {first.config.dataset!r} at {first.arch.image_shape}: one dataset and size per grid")
    count = len(args.indices) if args.indices is not None else args.count
    if count > PER_ROW:
        raise OptionError(f"{'--indices' if args.indices is not None else '--count'}: {count} images; with several "
                          f"runs one row holds them all, at most {PER_ROW}")
    indices = list(args.indices) if args.indices is not None else spread_indices(heldout_indices(first), count)
    bad = [i for i in indices if i >= len(first.dataset)]
    if bad:
        raise OptionError(f"--indices {bad[0]}: the dataset has {len(first.dataset)} images")
    originals, _ = reconstructions(first, indices)
    rows = [originals] + [reconstructions(run, indices)[1] for run in runs]
    scale = args.scale if args.scale is not None else max(1, 128 // first.arch.image_shape[1])
    labels = ["original"] + [f"tau {run.hyper.tau:g}, {run.model.open_gates()}/{run.config.latent} open" for run in runs]
    save_image(image_grid(rows, scale=scale, row_labels=labels,
                          title=f"reconstructions with each run's inference gates ({first.config.dataset})"), args.out)
    print(f"{len(indices)} originals (top row) over the reconstructions of {len(runs)} runs with their inference "
          f"gates: {args.out}")
    for row, (path, run) in enumerate(zip(args.run, runs), start=2):
        trained_on = sorted(set(map(int, indices)) - set(map(int, heldout_indices(run))))
        note = f"; trained on {', '.join(map(str, trained_on))}" if trained_on else ""
        print(f"  row {row}: {path}: tau {run.hyper.tau:g}, {run.model.open_gates()}/{run.config.latent} gates open, "
              f"step {run.state.step}{note}")
    return 0


# ----------------------------------------------------------------------------------------
# trace


def cmd_trace(args) -> int:
    """``refimpl trace``, after checking that the K steps' trace fits in memory."""
    from . import memory
    from .model import build_architecture

    config = new_config(options.given_run_options(args))
    arch = build_architecture(config.image_shape(), config.channels, config.hidden)
    itemsize = numpy.dtype(config.dtype).itemsize
    memory.check(memory.trace_bytes(arch, config.latent, config.batch_size, itemsize, args.steps),
                 f"a trace of {args.steps} steps (every tensor of every step; batches of {config.batch_size}, "
                 f"n={config.latent}, {config.dtype})", "trace fewer --steps")
    return trace.run(args)


# ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args), f"{PROG} {args.command}",
                       lambda out: f"continue with: refimpl train --out {out} --resume" if out
                       else "run the same command again to continue")


if __name__ == "__main__":
    raise SystemExit(main())
