"""PNG grid: held-out originals over their reconstructions

A PNG of held-out originals, each row of up to 16 over a row of their reconstructions with
the inference gates. With several runs (of one dataset and image size; Figure 3's layout):
one row of originals, from the first run's held-out split, then a row of reconstructions
per run, in the order given.
"""

from __future__ import annotations

from pathlib import Path

from .. import options
from ..optionspec import OptionError, index_list, positive_int
from ..runfolder import RECONSTRUCTIONS_FILE
from .evaluate import load

MAX_IMAGES, PER_ROW = 256, 16  # images in one PNG, and to a row


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", nargs="+", help="run folder (or its checkpoint.npz); several for Figure 3")
    p.add_argument("--count", type=positive_int, default=8, metavar="N",
                   help=f"images (default: 8; at most {MAX_IMAGES}, {PER_ROW} to a row)")
    p.add_argument("--indices", type=index_list, default=None, metavar="I,J,...",
                   help="dataset indices to show instead of held-out ones")
    p.add_argument("--scale", type=positive_int, default=None, metavar="K",
                   help="pixel magnification (default: 2 for 64x64, more for smaller images)")
    p.add_argument("--out", default=None, metavar="FILE", help="PNG output (default: RUN/reconstructions.png)")
    options.add_backend_option(p)


def run(args) -> int:
    from ..evaluate import heldout_indices, reconstruction_grid, reconstructions, save_image, spread_indices

    if len(args.run) > 1:
        return _reconstruct_runs(args)
    run_ = load(args.run[0], args.backend)
    count = len(args.indices) if args.indices is not None else args.count
    if count > MAX_IMAGES:
        raise OptionError(f"{'--indices' if args.indices is not None else '--count'}: {count} images; at most "
                          f"{MAX_IMAGES} fit one PNG ({PER_ROW} to a row): ask for fewer")
    held = heldout_indices(run_)
    if args.indices is not None:
        n = len(run_.dataset)
        bad = [i for i in args.indices if i >= n]
        if bad:
            raise OptionError(f"--indices {bad[0]}: the dataset has {n} images")
        indices = list(args.indices)
    else:
        indices = spread_indices(held, args.count)
    size = run_.arch.image_shape[1]
    scale = args.scale if args.scale is not None else max(1, 128 // size)
    out = Path(args.out) if args.out else run_.out / RECONSTRUCTIONS_FILE
    originals, recons = reconstructions(run_, indices)
    gates = f"{run_.model.open_gates()}/{run_.config.latent} gates open"
    images = ("held-out images (never trained on)" if args.indices is None else
              f"images {','.join(map(str, indices))}" if len(indices) <= 8 else f"{len(indices)} chosen images")
    title = f"{run_.out.name}, step {run_.state.step}, tau {run_.hyper.tau:g}, {gates}: {images}"
    save_image(reconstruction_grid(originals, recons, scale=scale, per_row=PER_ROW, title=title), out)
    rows = f" (rows of {PER_ROW})" if len(indices) > PER_ROW else ""
    print(f"{len(indices)} originals over their reconstructions{rows} with {gates}, step {run_.state.step}: {out}")
    if args.indices is not None:
        held_set = set(int(i) for i in held)
        for kind, chosen in (("held out (never trained on)", [i for i in indices if i in held_set]),
                             ("trained on", [i for i in indices if i not in held_set])):
            if chosen:
                print(f"  {kind}: {', '.join(map(str, chosen))}")
    return 0


def _reconstruct_runs(args) -> int:
    """``refimpl reconstruct RUN RUN ...``: originals over one row of reconstructions per run (Figure 3)."""
    from ..evaluate import heldout_indices, image_grid, reconstructions, save_image, spread_indices

    if args.out is None:
        raise OptionError("--out: several runs need an output file (each run folder has its own reconstructions.png)")
    runs = [load(path, args.backend) for path in args.run]
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

