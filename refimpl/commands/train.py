"""train a gated VAE with Algorithm 1 (or a plain VAE with --baseline)

Train a gated VAE with Algorithm 1. With no DATASET, trains on the built-in synthetic
dSprites (no download). With --from RUN [--at STEP] --out NEW: a branch of RUN
(refimpl/branch.py).
"""

from __future__ import annotations

from pathlib import Path

from .. import branch, figures, options, plot
from ..config import OUT_PATTERN, Schedule, default_out, new_config
from ..execution import Execution
from ..optionspec import OptionError


def add_arguments(p) -> None:
    options.add_run_options(p)
    options.add_options(p, Schedule)
    options.add_backend_option(p)
    options.add_options(p, Execution, title="execution on this machine (not part of the run; refimpl/execution.py)")
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


def run(args) -> int:
    from ..runopen import open_run

    if args.resume and args.overwrite:
        raise OptionError("--resume and --overwrite exclude each other")
    if args.repair_log and not args.resume:
        raise OptionError("--repair-log repairs the log of a run being resumed: add --resume")
    branch.check_arguments(args)
    given = options.given_run_options(args)
    execution = Execution(**options.given(args, Execution))  # how this process runs it, not part of the run
    source = None
    if args.parent is not None:
        if args.resume or args.out is None:
            raise OptionError("--from starts a new run, a branch: give its folder with --out (and continue it later "
                              "with --out NEW --resume, without --from)")
        source = branch.open_source(args.parent, args.at)
        schedule = branch.branch_schedule(source, options.given(args, Schedule))
    else:
        schedule = options.schedule(args)
    # the options given as a RunConfig, once: a new run's settings, or where a resumed run is by default
    config = None if source is not None or args.resume and args.out is not None else new_config(given)
    out = Path(args.out) if args.out is not None else default_out(config)
    run_ = open_run(out, given, backend=args.backend, resume=args.resume, overwrite=args.overwrite,
                    schedule=schedule, repair_log=args.repair_log, parent=source, config=config,
                    execution=execution)
    if run_.repaired_lines:
        lines = ", ".join(map(str, run_.repaired_lines))
        print(f"repaired {out}/log.csv: dropped line(s) {lines}; it holds rows {run_.first_step + 1}-{run_.state.step}",
              flush=True)
    batches = getattr(args, "batches", None)  # with --resume, default: the run's own target
    checkpoint_every = getattr(args, "checkpoint_every", None)
    keep_checkpoints = getattr(args, "keep_checkpoints", None)
    if source is not None:
        changed = ", ".join(f"{k}={v}" for k, v in run_.parent["changed"].items()) or "nothing changed"
        print(f"branching {source.folder} at batch {source.step} ({changed}) to {run_.schedule.batches} batches "
              f"on {run_.backend}; run folder {out}", flush=True)
    elif args.resume:
        print(f"resuming {out} at batch {run_.state.step} of {run_.schedule.batches if batches is None else batches}",
              flush=True)
    else:
        print(f"training {run_.config.dataset} {'x'.join(map(str, run_.arch.image_shape))}, n={run_.config.latent}, "
              f"tau={run_.hyper.tau:g}, {run_.schedule.batches} batches of {run_.config.batch_size} on {run_.backend}; "
              f"run folder {out}", flush=True)
    summary = run_.train(batches, checkpoint_every, progress=not args.quiet, keep_checkpoints=keep_checkpoints)
    print(f"done: {summary['step']} batches in {summary['elapsed_s']:.0f} s; {out}/checkpoint.npz")
    print(f"  open gates: {summary['open_gates']}/{summary['n_latent']} {''.join(map(str, summary['gates']))}")
    if summary.get("E2_ma95") is not None:
        print(f"  E2 (moving average 0.95): {summary['E2_ma95']:.4g} against tau {summary['tau']:g}; "
              f"lambda' {summary['lambda_eff']:.3g}")
    if figures.pyplot() is not None:  # Figure 1 of the run, gate by gate (extra 'plots')
        print(f"  plot: {plot.plot_run(out, backend=args.backend, execution=execution)}")
    return 0
