"""Figure 2: the information-bottleneck front, final ||nu||_0 against the GECO tolerance tau.

One run per tau (same seed, same data order); after training, the number of open gates
(gamma > 0), the held-out error with those gates and a reconstruction of one fixed
held-out image. Writes ``figure2.csv`` (tau, open gates, gates, held-out error, training
E2 moving average), ``figure2.png`` (||nu||_0 against tau with the reconstructions under
it) and ``figure2_reconstructions.png`` (the fixed image, then its reconstruction at each
tau, left to right, each labelled with tau and its open gates; Pillow only).

Default (small): built-in synthetic dSprites pooled to 16x16 (paper pattern, convs 32, 64),
n = 10, tau in {0.5, 1, 2, 4, 8} (summed squared error of a 16x16 image; the sprites'
own ink is about 5-10), 5,000 batches each, two runs at a time (``--jobs 2``). Measured
(seed 0): 10, 6, 5, 4 and 1 open gates: more tolerance, fewer dimensions. The
reconstructions keep position and size up to tau = 4 (the square's corners are rounded
off already at this resolution, an ellipse's orientation goes between tau = 0.5 and 4);
at tau = 8 one dimension is left and every image becomes the same grey average. The
front is that of this budget: at tau = 0.5, E2 still hovers around tau with lambda'
rising, so no gate has closed yet.
About 18 minutes on 2 busy CPU cores.

``--full``: the paper's setting, MNIST (28x28, ``--data`` or $REFIMPL_DATA), n = 32,
tau in {3, 4, 6, 8, 10, 14, 18, 22, 26, 30}, 2,000 epochs (about 1.9M batches of 64) per
tau. On a GPU: ``--full --backend cupy --jobs 1`` (the runs are independent: several
machines can each take ``--taus`` of their own into the same ``--out``).
"""

from __future__ import annotations

from pathlib import Path

import numpy

from ..atomic import write_csv
from ..evaluate import evaluate, image_grid, reconstructions, save_image
from ..sweep import Cluster, Sweep
from ..optionspec import comma_list
from .. import figures
from . import common

PROG = "python -m refimpl.experiments.figure2"
SMALL = {"dataset": "synthetic-dsprites", "data": None, "batches": 5000, "batch_size": 64, "image_size": 16,
         "channels": None, "latent": 10, "taus": (0.5, 1.0, 2.0, 4.0, 8.0), "jobs": 2}
FULL = {"dataset": "mnist", "data": None, "batches": None, "batch_size": 64, "image_size": None, "channels": None,
        "latent": 32, "taus": (3.0, 4.0, 6.0, 8.0, 10.0, 14.0, 18.0, 22.0, 26.0, 30.0), "epochs": 2000, "jobs": 1}


def build_parser(prog: str = PROG):
    p = common.parser(prog, __doc__, eval_images=500)
    p.add_argument("--taus", type=comma_list(float, 0.0, "numbers"), default=None, metavar="T1,T2,...",
                   help="the GECO tolerances to sweep")
    p.add_argument("--image-index", type=int, default=None,
                   help="dataset index of the image to reconstruct (default: of 64 held-out images, "
                        "the one with the largest pixel sum)")
    return p


def run(argv=None, prog: str = PROG) -> dict:
    args = build_parser(prog).parse_args(argv)
    s = common.settings(args, SMALL, FULL, prog)
    latent = s["latent"]
    taus = args.taus or tuple(tau * s["tau_scale"] for tau in s["taus"])
    out = Path(args.out or "experiments/figure2")
    batches = s["batches"]
    if batches is None:  # --full: epochs of the training split
        from ..data import open_dataset

        n_train = len(open_dataset(s["dataset"], s["data"])) - s.get("holdout", 1000)
        batches = s["epochs"] * (n_train // s["batch_size"])
    specs = [common.spec(out / "runs" / f"tau{tau:g}", s, tau=tau, batches=batches, backend=args.backend)
             for tau in taus]
    with Sweep(out, Cluster.from_args(args, jobs=s["jobs"]), backend=args.backend) as sweep:
        summaries = sweep.gather([sweep.submit(spec) for spec in specs])

    rows, recons, original = [], [], None
    for tau, summary in zip(taus, summaries):
        r = common.load(summary, s, args.backend)
        ev = evaluate(r, limit=args.eval_images)
        index = args.image_index if args.image_index is not None else fixed_image(r)
        original, x_rec = reconstructions(r, [index])
        recons.append(x_rec)
        rows.append({"tau": tau, "open_gates": ev["open_gates"], "n_latent": latent,
                     "gates": "".join(map(str, ev["gates"])), "heldout_sse": ev["heldout_sse"],
                     "train_E2_ma95": ev.get("train_E2_ma95"), "batches": summary["step"], "image_index": index})
    written = [write_csv(out / "figure2.csv", rows)]
    labels = ["original"] + [f"tau {r['tau']:g}\n{r['open_gates']} open" for r in rows]  # one per column
    grid = image_grid([numpy.concatenate([original] + recons)], scale=max(1, 96 // original.shape[-1]), labels=labels)
    written.append(save_image(grid, out / "figure2_reconstructions.png"))
    png = plot(rows, original, recons, out / "figure2.png")
    written += [png] if png else []
    front = ", ".join(f"tau {r['tau']:g}: {r['open_gates']}" for r in rows)
    print(f"figure2: open gates of {latent} after {batches} batches: {front}")
    common.report("figure2", written)
    return {"files": written, "rows": rows}


def fixed_image(run) -> int:
    """The dataset index of the image to reconstruct: of 64 held-out images spread over the
    held-out set, the one with the most ink (largest pixel sum; a large sprite shows more)."""
    from ..evaluate import spread_indices

    candidates = spread_indices(run.split[1], 64)
    ink = run.dataset.get(candidates).reshape(candidates.size, -1).sum(axis=1)
    return int(candidates[int(ink.argmax())])


def plot(rows, original, recons, path):
    """The front with the reconstructions under it; the path written, or None without matplotlib."""
    plt = figures.pyplot()
    if plt is None:
        figures.no_plot_note(path)
        return None
    k = len(rows)
    fig = plt.figure(figsize=(max(6.0, 1.3 * (k + 1)), 6.0))
    grid = fig.add_gridspec(2, k + 1, height_ratios=(3, 1))
    ax = fig.add_subplot(grid[0, :])
    taus = [r["tau"] for r in rows]
    ax.plot(taus, [r["open_gates"] for r in rows], "o-")
    ax.set_xlabel(r"GECO tolerance $\tau$")
    ax.set_ylabel(r"$\|\nu\|_0$ (open gates)")
    ax.set_ylim(0, rows[0]["n_latent"] + 0.5)
    ax.grid(alpha=0.3)
    images = [(original[0], "original")] + [(rec[0], f"tau {r['tau']:g}\n{r['open_gates']} dims")
                                            for rec, r in zip(recons, rows)]
    for i, (img, title) in enumerate(images):
        a = fig.add_subplot(grid[1, i])
        a.imshow(img.transpose(1, 2, 0).squeeze(), cmap="gray", vmin=0, vmax=1)
        a.set_title(title, fontsize=8)
        a.axis("off")
    return figures.save_figure(fig, path)


def main(argv=None, prog: str = PROG) -> int:
    return common.main_wrapper(run, argv, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
