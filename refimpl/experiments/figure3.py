"""Figure 3: held-out dSprites originals (top row) and their reconstructions by a model
trained with a low tau (middle row) and a high tau (bottom row).

Writes ``figure3.png`` (Pillow) and ``figure3.csv`` (tau, open gates, which gates,
held-out error, for both runs).

Default (small): built-in synthetic dSprites pooled to 16x16 (paper pattern, convs 32, 64),
n = 10, tau = 0.5 and tau = 4, 5,000 batches each, both at once (``--jobs 2``). Measured
(seed 0): tau = 0.5 keeps 10 dimensions and reconstructs position, size and the
elongation and orientation of ellipses; tau = 4 keeps 4 and draws round blurred blobs of
the right size at the right places, as in the paper's bottom row. At 16x16 pixels the
shapes themselves (square, ellipse, heart) are hard to tell apart even in the originals;
``--image-size 32`` (and more batches) shows them better. About 7 minutes on 2 busy CPU
cores. The runs are the same as figure2's for those taus: ``--out experiments/figure2``
reuses them.

``--full``: dSprites (official file), 64x64, the paper's network, n = 10, tau = 25 and
tau = 35 (the paper: 5 and 3 dimensions), 50,000 batches each.
"""

from __future__ import annotations

from pathlib import Path

from ..evaluate import evaluate, heldout_indices, image_grid, reconstructions, save_image, spread_indices
from ..atomic import write_csv
from ..sweep import Cluster, Sweep
from . import common

PROG = "python -m refimpl.experiments.figure3"
SMALL = {"dataset": "synthetic-dsprites", "data": None, "batches": 5000, "batch_size": 64, "image_size": 16,
         "channels": None, "latent": 10, "taus": (0.5, 4.0), "jobs": 2}
FULL = {"dataset": "dsprites", "data": None, "batches": 50000, "batch_size": 64, "image_size": None,
        "channels": None, "latent": 10, "taus": (25.0, 35.0), "jobs": 1}


def build_parser(prog: str = PROG):
    p = common.parser(prog, __doc__, eval_images=500)
    p.add_argument("--low-tau", type=float, default=None, help="the low tolerance (default: 0.5 small, 25 full)")
    p.add_argument("--high-tau", type=float, default=None, help="the high tolerance (default: 4 small, 35 full)")
    p.add_argument("--count", type=int, default=8, help="images shown (default 8)")
    return p


def run(argv=None, prog: str = PROG) -> dict:
    args = build_parser(prog).parse_args(argv)
    s = common.settings(args, SMALL, FULL, prog)
    latent = s["latent"]
    taus = (args.low_tau if args.low_tau is not None else s["taus"][0] * s["tau_scale"],
            args.high_tau if args.high_tau is not None else s["taus"][1] * s["tau_scale"])
    out = Path(args.out or "experiments/figure3")
    specs = [common.spec(out / "runs" / f"tau{tau:g}", s, tau=tau, backend=args.backend) for tau in taus]
    with Sweep(out, Cluster.from_args(args, jobs=s["jobs"]), backend=args.backend) as sweep:
        summaries = sweep.gather([sweep.submit(spec) for spec in specs])
    rows, image_rows = [], []
    for tau, summary in zip(taus, summaries):
        r = common.load(summary, s, args.backend)
        ev = evaluate(r, limit=args.eval_images)
        x, x_rec = reconstructions(r, spread_indices(heldout_indices(r), args.count))
        if not image_rows:
            image_rows.append(x)
        image_rows.append(x_rec)
        rows.append({"tau": tau, "open_gates": ev["open_gates"], "n_latent": latent,
                     "gates": "".join(map(str, ev["gates"])), "heldout_sse": ev["heldout_sse"],
                     "batches": summary["step"]})
    csv_path = write_csv(out / "figure3.csv", rows)
    png = out / "figure3.png"
    save_image(image_grid(image_rows, scale=max(1, 128 // image_rows[0].shape[-1])), png)
    print(f"figure3: originals (top), tau {taus[0]:g} with {rows[0]['open_gates']} dims (middle), "
          f"tau {taus[1]:g} with {rows[1]['open_gates']} dims (bottom)")
    common.report("figure3", [csv_path, png])
    return {"files": [csv_path, png], "rows": rows}


def main(argv=None, prog: str = PROG) -> int:
    return common.main_wrapper(run, argv, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main())
