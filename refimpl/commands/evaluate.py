"""held-out reconstruction error and open gates of a run

Held-out reconstruction error (inference gates, and every gate open), open gates and final
dimensionality. Prints them and writes JSON (refimpl/evaluate.py).
"""

from __future__ import annotations

from pathlib import Path

from .. import options
from ..execution import Execution
from ..optionspec import positive_int
from ..runfolder import EVAL_FILE, existing_run_path


EXCLUDED = ("device_step", "decoder_passes", "blas_threads")  # execution options of the training step only


def load(run_path, backend=None, execution: Execution | None = None):
    """The run in ``run_path`` (a folder or its checkpoint.npz), read for evaluation, not training."""
    from ..training import Run

    return Run.load(existing_run_path(run_path), backend=backend, for_training=False, execution=execution)


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", help="run folder (or its checkpoint.npz)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N held-out images")
    p.add_argument("--batch-size", type=positive_int, default=250, metavar="B", help="evaluation batch (default: 250)")
    p.add_argument("--out", default=None, metavar="FILE", help="JSON output (default: RUN/eval.json)")
    options.add_backend_option(p)
    options.add_options(p, Execution, exclude=EXCLUDED, title="execution (not part of the run; refimpl/execution.py)")


def run(args) -> int:
    from ..atomic import write_json
    from ..evaluate import evaluate

    run_ = load(args.run, args.backend, Execution(**options.given(args, Execution)))
    result = evaluate(run_, limit=args.limit, batch_size=args.batch_size)
    out = Path(args.out) if args.out else run_.out / EVAL_FILE
    write_json(out, result)
    print(f"{run_.out}: step {result['step']}, {result['heldout_images']} held-out images")
    print(f"  open gates (final dimensionality): {result['open_gates']}/{result['n_latent']} "
          f"{''.join(map(str, result['gates']))}")
    print(f"  held-out error, inference gates:  {result['heldout_sse']:.6g} (tau {result['tau']:g})")
    print(f"  held-out error, all gates open:   {result['heldout_sse_all_gates_open']:.6g}")
    if "train_E2_ma95" in result:
        print(f"  training E2, moving average 0.95: {result['train_E2_ma95']:.6g}")
    print(f"  written to {out}")
    return 0
