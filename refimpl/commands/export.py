"""save the pruned model (closed dimensions removed)

Save refimpl.model.prune of the run's model: model.npz and model.safetensors (its state
dict) and model.json (config).
"""

from __future__ import annotations

from pathlib import Path

from ..runfolder import EXPORT_DIR, EXPORT_FILES, check_output_folder
from .evaluate import load


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", help="run folder (or its checkpoint.npz)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN/export)")


def run(args) -> int:
    from ..evaluate import export

    run_ = load(args.run)
    out = Path(args.out) if args.out else run_.out / EXPORT_DIR
    check_output_folder(out, EXPORT_FILES)
    npz, safetensors, js = export(run_, out)
    print(f"exported {run_.model.open_gates()}/{run_.config.latent} latent dimensions (step {run_.state.step}) "
          f"to {npz}, {safetensors} and {js}")
    return 0
