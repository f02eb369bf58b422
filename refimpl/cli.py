"""The ``refimpl`` command line: train, evaluate, export, reconstruct.

    refimpl train [DATASET] [--tau T] [--latent N] [--batches B] [--out DIR] [--resume] ...
    refimpl evaluate RUN        held-out error, open gates -> RUN/eval.json
    refimpl export RUN          the pruned plain VAE -> RUN/export/model.{npz,json}
    refimpl reconstruct RUN     originals over reconstructions -> RUN/reconstructions.png

``train`` has one option per field of :class:`refimpl.algorithm1.Hyper`, generated from
the dataclass (choices from ``algorithm1.OPTIONS``), spelled with dashes or underscores
(``--lambda-max`` or ``--lambda_max``). Errors are one line: bad arguments exit 2,
backend, dataset and checkpoint problems and a non-finite loss exit 1, Ctrl-C exits 130
after saving a checkpoint (SIGTERM: 143).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from . import __version__
from .algorithm1 import OPTIONS, Hyper
from .backend import BACKENDS, DTYPES, BackendError
from .checkpoint import CheckpointError
from .data import DATASET_NAMES, DEFAULT_DATASET, DatasetError

PROG = "refimpl"


class UsageError(Exception):
    """A bad combination of arguments found after parsing (exit 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``refimpl train: error: ...`` and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def comma_list(cast, minimum, kind: str):
    """An argparse type: comma-separated ``cast`` values, each >= ``minimum`` (e.g. "32,32,64")."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(cast(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind} >= {minimum}, got {text!r}")
        return values

    return parse


_int_list = comma_list(int, 1, "integers")
_index_list = comma_list(int, 0, "integers")


def _float_pair(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


S = argparse.SUPPRESS

# RunConfig fields that train's options set, and their defaults (options default to
# SUPPRESS, so that resume can tell given options from defaults).
CONFIG_DEFAULTS = {"dataset": DEFAULT_DATASET, "data": None, "latent": 10, "batch_size": 64, "dtype": "float32",
                   "seed": 0, "image_size": None, "channels": None, "hidden": 128, "holdout": 1000, "baseline": False,
                   "fused": None}
DEFAULT_BATCHES = 5000
DEFAULT_CHECKPOINT_EVERY = 100


def add_hyper_options(parser) -> list[str]:
    """One option per :class:`Hyper` field except tau; returns the field names."""
    group = parser.add_argument_group("Algorithm 1 (refimpl.algorithm1.Hyper; see refimpl/INTERPRETATIONS.md)")
    # "(a) error: ..." lines of Hyper's docstring name each switch's letter in INTERPRETATIONS.md
    letters = {name: letter for letter, name in re.findall(r"\(([a-z])\) (\w+):", Hyper.__doc__ or "")}
    names = []
    for f in dataclasses.fields(Hyper):
        if f.name == "tau":
            continue
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        default = f.default
        kw = {"dest": f.name, "default": S}
        if f.name in OPTIONS:
            letter = letters.get(f.name)
            where = f"interpretation ({letter}); " if letter else ""
            kw.update(choices=OPTIONS[f.name], help=f"{where}default: {default}")
        elif f.name == "betas":
            kw.update(type=_float_pair, metavar="B1,B2", help=f"Adam betas (default: {default[0]},{default[1]})")
        else:
            kw.update(type=float, metavar="X", help=f"default: {default:g}")
        group.add_argument(*flags, **kw)
        names.append(f.name)
    return names


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Dynamic narrowing of VAE bottlenecks with GECO and L0-ARM "
                                                   "(De Boom et al.): a NumPy/CuPy reference implementation.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # -- train
    p = sub.add_parser("train", help="train a gated VAE with Algorithm 1 (or a plain VAE with --baseline)",
                       description="Train a gated VAE with Algorithm 1. With no DATASET, trains on the built-in "
                                   "synthetic dSprites (no download).")
    p.add_argument("dataset", nargs="?", choices=DATASET_NAMES, default=None, metavar="DATASET",
                   help=f"one of {', '.join(DATASET_NAMES)} (default: {DEFAULT_DATASET})")
    p.add_argument("--data", default=S, metavar="PATH", help="dataset file or folder (default: under $REFIMPL_DATA)")
    p.add_argument("--latent", type=_positive_int, default=S, metavar="N", help="latent dimensions n (default: 10)")
    p.add_argument("--tau", type=float, default=S, metavar="T",
                   help="GECO tolerance: summed squared error per image (default: per dataset, 30 for dSprites, "
                        "scaled by the pixel ratio with --image-size)")
    p.add_argument("--batches", type=_nonnegative_int, default=None, metavar="B",
                   help=f"total number of batches (default: {DEFAULT_BATCHES}; with --resume: the run's target)")
    p.add_argument("--batch-size", type=_positive_int, default=S, metavar="B", help="batch size (default: 64)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="array backend (default: $REFIMPL_BACKEND or numpy)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=S, help="computation dtype (default: float32)")
    p.add_argument("--seed", type=_nonnegative_int, default=S, help="seed of every random stream (default: 0)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run folder (default: runs/<dataset>-n<latent>-tau<tau>-seed<seed>)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=DEFAULT_CHECKPOINT_EVERY, metavar="N",
                   help=f"write a checkpoint every N batches (default: {DEFAULT_CHECKPOINT_EVERY}); "
                        "also at the end and on Ctrl-C")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that already holds a run")
    p.add_argument("--baseline", action="store_true", default=S,
                   help="a plain VAE (Table 1 step one): tau = 0, so gates are never sampled and all n stay open")
    p.add_argument("--image-size", type=_positive_int, default=S, metavar="S",
                   help="average-pool images to SxS (e.g. 32 or 16 for 64x64 data) with a matching smaller network")
    p.add_argument("--channels", type=_int_list, default=S, metavar="C1,C2,...",
                   help="encoder conv widths, mirrored in the decoder (default: 32,32,64,64 for 64x64)")
    p.add_argument("--hidden", type=_positive_int, default=S, metavar="H", help="hidden linear units (default: 128)")
    p.add_argument("--holdout", type=_positive_int, default=S, metavar="N",
                   help="held-out images for evaluate/reconstruct (default: 1000)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=S,
                   help="decoder blocks as one fused upsample+conv layer, or as upsample then conv (same "
                        "numbers; default: fused on numpy, the pair on cupy, the faster on each)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    hyper_names = add_hyper_options(p)
    p.set_defaults(func=cmd_train, hyper_names=hyper_names)

    # -- evaluate
    p = sub.add_parser("evaluate", help="held-out reconstruction error and open gates of a run",
                       description="Held-out reconstruction error (inference gates, and every gate open), open "
                                   "gates and final dimensionality. Prints them and writes JSON.")
    p.add_argument("run", metavar="RUN", help="run folder (or its checkpoint.npz)")
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="only the first N held-out images")
    p.add_argument("--batch-size", type=_positive_int, default=250, metavar="B", help="evaluation batch (default: 250)")
    p.add_argument("--out", default=None, metavar="FILE", help="JSON output (default: RUN/eval.json)")
    p.add_argument("--backend", choices=BACKENDS, default=None)
    p.set_defaults(func=cmd_evaluate)

    # -- export
    p = sub.add_parser("export", help="save the pruned model (closed dimensions removed)",
                       description="Save refimpl.model.prune of the run's model: model.npz (state dict) and "
                                   "model.json (config).")
    p.add_argument("run", metavar="RUN", help="run folder (or its checkpoint.npz)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN/export)")
    p.set_defaults(func=cmd_export)

    # -- reconstruct
    p = sub.add_parser("reconstruct", help="PNG grid: held-out originals (top) and reconstructions (bottom)",
                       description="A PNG of held-out originals (top row) and their reconstructions with the "
                                   "inference gates (bottom row).")
    p.add_argument("run", metavar="RUN", help="run folder (or its checkpoint.npz)")
    p.add_argument("--count", type=_positive_int, default=8, metavar="N", help="images (default: 8)")
    p.add_argument("--indices", type=_index_list, default=None, metavar="I,J,...",
                   help="dataset indices to show instead of held-out ones")
    p.add_argument("--scale", type=_positive_int, default=None, metavar="K",
                   help="pixel magnification (default: 2 for 64x64, more for smaller images)")
    p.add_argument("--out", default=None, metavar="FILE", help="PNG output (default: RUN/reconstructions.png)")
    p.add_argument("--backend", choices=BACKENDS, default=None)
    p.set_defaults(func=cmd_reconstruct)

    _add_trace_commands(sub)
    return parser


def _add_trace_commands(sub) -> None:
    """``trace`` and ``compare``: their options and runners live in refimpl/trace.py and refimpl/compare.py."""
    from . import compare, trace

    for name, module in (("trace", trace), ("compare", compare)):
        doc = module.__doc__.strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)


# ----------------------------------------------------------------------------------------
# train


def _given_config(args) -> dict:
    """The RunConfig entries given on the command line (hyper as a dict)."""
    given = {k: getattr(args, k) for k in CONFIG_DEFAULTS if getattr(args, k, None) is not None}
    hyper = {k: getattr(args, k) for k in args.hyper_names if hasattr(args, k)}
    if hasattr(args, "tau"):
        hyper["tau"] = args.tau
    if hyper:
        given["hyper"] = hyper
    return given


def default_out(config) -> Path:
    tau = "baseline" if config.baseline else f"tau{config.hyper['tau']:g}"
    size = f"-s{config.image_size}" if config.image_size else ""
    return Path("runs") / f"{config.dataset}{size}-n{config.latent}-{tau}-seed{config.seed}"


def _new_config(given: dict):
    from .data import open_dataset
    from .training import RunConfig, default_tau

    kw = {**CONFIG_DEFAULTS, **{k: v for k, v in given.items() if k != "hyper"}}
    hyper = dict(given.get("hyper", {}))
    if kw["baseline"]:
        if hyper.get("tau", 0.0) != 0.0:
            raise UsageError(f"--baseline trains with tau=0; drop --tau {hyper['tau']:g}")
        hyper["tau"] = 0.0
    elif "tau" not in hyper:
        if kw["dataset"] == "synthetic-dsprites":
            native = (1, 64, 64)
        else:
            native = open_dataset(kw["dataset"], kw["data"]).shape
        hyper["tau"] = default_tau(kw["dataset"], native, kw["image_size"])
    if kw["data"] is not None:
        kw["data"] = str(Path(kw["data"]).resolve())
    config = RunConfig(**kw, hyper=hyper)
    config.make_hyper()  # validates every Hyper field now
    return config


def cmd_train(args) -> int:
    from .training import Run, config_differences

    given = _given_config(args)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if args.resume:
        if args.out is None:
            out = default_out(_new_config(given))
        else:
            out = Path(args.out)
        if not (out / "checkpoint.npz").is_file():
            raise UsageError(f"nothing to resume: {out} holds no checkpoint.npz")
        if "data" in given:
            given["data"] = str(Path(given["data"]).resolve())
        diffs = config_differences(Run.load(out, backend=args.backend, for_training=False).config, given)
        if diffs:
            raise UsageError(f"options differ from the run in {out}: {'; '.join(diffs)}; drop them to resume")
        run = Run.load(out, backend=args.backend)  # cuts log.csv back to the checkpoint's step
        batches = args.batches if args.batches is not None else (run.target or DEFAULT_BATCHES)
        print(f"resuming {out} at batch {run.state.step} of {batches}", flush=True)
    else:
        config = _new_config(given)
        out = Path(args.out) if args.out is not None else default_out(config)
        batches = args.batches if args.batches is not None else DEFAULT_BATCHES
        run = Run.create(config, out, backend=args.backend, overwrite=args.overwrite)
        print(f"training {config.dataset} {'x'.join(map(str, run.arch.image_shape))}, n={config.latent}, "
              f"tau={run.hyper.tau:g}, {batches} batches of {config.batch_size} on {run.backend}; run folder {out}",
              flush=True)
    summary = run.train(batches, args.checkpoint_every, progress=not args.quiet)
    e2 = summary.get("E2_ma95")
    print(f"done: {summary['step']} batches, {summary['open_gates']}/{summary['n_latent']} gates open"
          + (f", E2 moving average {e2:.4g} (tau {summary['tau']:g})" if e2 is not None else "")
          + f"; {out}/checkpoint.npz", flush=True)
    return 0


# ----------------------------------------------------------------------------------------
# evaluate, export, reconstruct


def _load(run_path, backend=None):
    from .training import Run

    path = Path(run_path)
    if not path.exists():
        raise UsageError(f"{path}: no such run folder or checkpoint")
    return Run.load(path, backend=backend, for_training=False)


def cmd_evaluate(args) -> int:
    from .evaluate import EVAL_FILE, evaluate, write_json

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

    run = _load(args.run)
    out = Path(args.out) if args.out else run.out / "export"
    npz, js = export(run, out)
    print(f"exported {run.model.open_gates()}/{run.config.latent} latent dimensions (step {run.state.step}) "
          f"to {npz} and {js}")
    return 0


def cmd_reconstruct(args) -> int:
    from .evaluate import heldout_indices, image_grid, reconstructions, save_image, spread_indices

    run = _load(args.run, args.backend)
    if args.indices is not None:
        n = len(run.dataset)
        bad = [i for i in args.indices if i >= n]
        if bad:
            raise UsageError(f"--indices {bad[0]}: the dataset has {n} images")
        indices = list(args.indices)
    else:
        indices = spread_indices(heldout_indices(run), args.count)
    originals, recons = reconstructions(run, indices)
    size = run.arch.image_shape[1]
    scale = args.scale if args.scale is not None else max(1, 128 // size)
    out = Path(args.out) if args.out else run.out / "reconstructions.png"
    save_image(image_grid([originals, recons], scale=scale), out)
    print(f"{len(indices)} originals (top) and reconstructions with {run.model.open_gates()}/{run.config.latent} "
          f"gates open (bottom), step {run.state.step}: {out}")
    return 0


# ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    from .training import NonFiniteLoss, TrainingInterrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{PROG} {args.command}"
    try:
        return args.func(args) or 0
    except TrainingInterrupted as exc:
        out = exc.path.parent
        print(f"\n{prog}: interrupted: {exc}; continue with: refimpl train --out {out} --resume", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, FileExistsError) as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (BackendError, DatasetError, CheckpointError, NonFiniteLoss, OSError, *_module_errors()) as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _module_errors() -> tuple:
    """File-format errors of the optional commands (refimpl.trace.TraceError, refimpl.compare's), exit 1."""
    errors = []
    for module_name, error_names in (("trace", ("TraceError",)), ("compare", ("CompareError", "TraceError"))):
        module = sys.modules.get(f"refimpl.{module_name}")
        errors += [getattr(module, e) for e in error_names if module is not None and hasattr(module, e)]
    return tuple(e for e in errors if isinstance(e, type) and issubclass(e, Exception))


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    raise SystemExit(main())
