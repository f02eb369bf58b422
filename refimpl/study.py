"""``refimpl study DIR...``: one table over many runs, grouped by what differs between them.

A study (``bench/results/study/``) asks why refimpl's runs differ from the paper's: seed
spread, budget, or a reading of the paper. Its runs live in sweep folders (``DIR/runs/*``)
or are given as run folders; a run needs only its ``config.json`` and its log
(``log.csv`` or ``log.csv.gz``; a branch's history includes its parent's rows), so a
finished run's checkpoint need not be kept. For each run this reads the log
(:func:`refimpl.milestones.milestones`) and reports: how far it trained and whether it is
finished (``summary.json`` at the log's last step, or beyond it where the log was packed
before the run went on: then the end state is summary.json's, and the row says which rows
are missing), the open gates at the end, the
staircase of closings, reopenings, the first batch with C_ma < 0, and the constraint over
the last ``window`` batches, with the largest rise of ||sigmoid(k gamma)||_1 there (Figure
1's gate curve: a gate reopening partway shows there before its gamma_j changes sign) and
the lowest gamma_j an open gate took there (a gate closing partway shows there the same way). Runs are grouped by every configuration field that varies
across the given runs except the seed (the *arm*: tau, a reading, the latent size), and
each group lists its seeds' open gates and their range, so the spread is shown and not
just a mean.

Command line: ``refimpl study DIR [DIR ...] [--window N] [--out FILE] [--json]``; the
Markdown table is printed and written atomically to FILE (default ``DIR/study.md`` of the
first DIR).
"""

from __future__ import annotations

import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from .algorithm1 import Hyper
from .atomic import atomic_write
from .config import RunConfig
from .milestones import WINDOW, milestones
from .runread import load_history
from .runfolder import CONFIG_FILE, LOG_FILE, LOG_GZ_FILE, PARENT_KEY, SUMMARY_FILE

STUDY_FILE = "study.md"
IGNORED = ("seed", "split_seed", "data")  # fields that never define an arm


class StudyError(OSError):
    """A folder holds no run the study can read; the message names it (exit status 1)."""


def run_folders(paths) -> list[Path]:
    """The run folders under ``paths``: each path is a run folder or a sweep folder (``runs/*``)."""
    found = []
    for path in map(Path, paths):
        candidates = sorted((path / "runs").iterdir()) if (path / "runs").is_dir() else [path]
        runs = [c for c in candidates if (c / CONFIG_FILE).is_file()]
        if not runs:
            raise StudyError(f"{path}: neither a run folder nor a sweep folder with runs/ (no {CONFIG_FILE})")
        found += runs
    return found


def defaults() -> dict:
    """Every RunConfig and Hyper field that has a default, with it (``hyper`` itself left out)."""
    out = {}
    for cls in (RunConfig, Hyper):
        for f in fields(cls):
            if f.default is not MISSING:
                out[f.name] = f.default
            elif f.default_factory is not MISSING and f.name != "hyper":
                out[f.name] = f.default_factory()
    return out


def flat_config(folder: Path) -> dict:
    """config.json's run configuration as one flat dict: ``hyper`` fields beside the others, and the
    defaults of the fields it does not name."""
    config = json.loads((folder / CONFIG_FILE).read_text())["config"]
    hyper = config.pop("hyper", {})
    known = {f.name for cls in (RunConfig, Hyper) for f in fields(cls)}
    given = {k: v for k, v in {**config, **hyper}.items() if k in known}  # a legacy key ("fused") defines nothing
    return {**defaults(), **{k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items()}}


def logged(folder: Path) -> bool:
    """Whether the run has a log of its own (``log.csv`` or ``log.csv.gz``)."""
    return (folder / LOG_FILE).is_file() or (folder / LOG_GZ_FILE).is_file()


def started(folder: Path) -> bool:
    """Whether the run has trained a batch of its own: a log, or a summary.json whose log was lost (a sweep
    stopped early leaves step-0 folders with neither)."""
    return logged(folder) or (folder / SUMMARY_FILE).is_file()


def branch_step(folder: Path) -> int | None:
    """The step a branch started from (config.json's parent record), None for a run of its own."""
    parent = json.loads((folder / CONFIG_FILE).read_text()).get(PARENT_KEY)
    return None if parent is None else int(parent["step"])


def run_row(folder: Path, window: int = WINDOW) -> dict:
    """One run's row: its configuration and what its log shows. A branch's constraint window covers at most its
    own rows, so an arm is judged on the batches it trained under its reading."""
    start = branch_step(folder)
    summary = json.loads((folder / SUMMARY_FILE).read_text()) if (folder / SUMMARY_FILE).is_file() else {}
    if not logged(folder):  # only summary.json survives: the end state, nothing about the way there
        return {"run": str(folder), "config": flat_config(folder), "batches": start or 0, "branched_at": start,
                "finished": True, "reached": summary["step"], "open_gates": summary["open_gates"], "closings": None,
                "reopenings": None, "first_dive": None, "constraint": None}
    log = load_history(folder)
    if start is not None:
        window = max(1, min(window, int(log["step"][-1]) - start))
    m = milestones(log, window=window)
    # a log packed before its run went on (a session cut off) ends before summary.json's step: the end state
    # is summary.json's, what happened in between is not recorded (the row says so)
    beyond = summary if summary.get("step", 0) > m["batches"] else None
    closings = [step for (step, count), (_, before) in zip(m["staircase"][1:], m["staircase"]) if count < before]
    return {"run": str(folder), "config": flat_config(folder), "batches": m["batches"], "branched_at": start,
            "finished": summary.get("step") == m["batches"] or beyond is not None,
            "reached": beyond["step"] if beyond else m["batches"],
            "open_gates": beyond["open_gates"] if beyond else m["tail"]["open_gates_last"],
            "closings": closings, "reopenings": m["reopenings"],
            "first_dive": m["c_ma_below_zero_from"], "constraint": m["constraint"]}


def arm_fields(rows: list[dict]) -> list[str]:
    """The configuration fields whose values differ between ``rows`` (the seed and data path excepted)."""
    names = sorted({k for r in rows for k in r["config"]} - set(IGNORED))
    return [k for k in names if len({repr(r["config"].get(k)) for r in rows}) > 1]


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def study(rows: list[dict], waiting=()) -> dict:
    """The groups of ``rows`` by arm: {arm label: {"rows": [...], "open_gates": [...], "range": (lo, hi)}}; a
    label names the varying fields whose value is not the default ("defaults" for none). ``waiting``: the
    names of runs that have not trained a batch yet, listed as such."""
    varying, default = arm_fields(rows), defaults()
    groups = {}
    for r in sorted(rows, key=lambda r: ([repr(r["config"].get(k)) for k in varying], r["config"].get("seed", 0))):
        changed = [k for k in varying if k not in default or r["config"].get(k) != default[k]]
        label = " ".join(f"{k}={_value(r['config'].get(k))}" for k in changed) or ("defaults" if varying else "all runs")
        groups.setdefault(label, {"rows": []})["rows"].append(r)
    for g in groups.values():
        gates = [r["open_gates"] for r in g["rows"]]
        g["open_gates"], g["range"] = gates, (min(gates), max(gates))
    return {"fields": varying, "groups": groups, "waiting": list(waiting)}


def to_markdown(s: dict, window: int) -> str:
    """The study as Markdown: one summary row per arm, then one row per run."""
    lines = ["| arm | runs (seeds) | batches | open gates at the end, by seed | range |", "|---|---|---|---|---|"]
    for label, g in s["groups"].items():
        seeds = ", ".join(str(r["config"].get("seed")) for r in g["rows"])
        batches = sorted({r["reached"] for r in g["rows"]})
        done = sum(r["finished"] for r in g["rows"])
        lines.append(f"| {label} | {len(g['rows'])} ({seeds}) | {batches[0]:,}" + (f"-{batches[-1]:,}" if len(batches) > 1
                     else "") + f" ({done} finished) | {', '.join(map(str, g['open_gates']))} | "
                     f"{g['range'][0]}-{g['range'][1]} |")
    lines += ["", f"| run | seed | batches | open gates | closings at batch | reopenings | C_ma < 0 first at | "
                  f"C_ma > 0 in the last batches (at most {window:,}; a branch's own) | mean E2 / tau there | "
                  f"mean lambda' there | largest rise of the gate curve there | open gates' gamma_j there: lowest (gate, batch); at the end |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = _names([r["run"] for g in s["groups"].values() for r in g["rows"]])
    for label, g in s["groups"].items():
        lines += [_run_line(r, names) for r in g["rows"]]
    short = [r for g in s["groups"].values() for r in g["rows"] if r["reached"] > r["batches"]]
    if short:
        lines += ["", "Logs shorter than their runs (packed before the run went on, or lost; the rows after them are "
                  "not recorded): " + "; ".join(f"{names[r['run']]}, rows {r['batches'] + 1:,}-{r['reached']:,}"
                                                for r in short)
                  + ". Their open gates are summary.json's at the run's end; their closings, reopenings and constraint "
                    "columns end where the log ends."]
    if s["waiting"]:
        lines += ["", f"Not started yet: {', '.join(s['waiting'])}."]
    return "\n".join(lines) + "\n"


def _names(runs: list[str]) -> dict:
    """Each run folder's name in the table: its own name, or sweep/name where two runs share one."""
    own = [Path(r).name for r in runs]
    return {r: (n if own.count(n) == 1 else f"{Path(r).parent.parent.name}/{n}") for r, n in zip(runs, own)}


def _run_line(r: dict, names: dict) -> str:
    """One run's row of the Markdown table."""
    name = names[r["run"]]
    since = "" if r["branched_at"] is None else f", branched at {r['branched_at']:,}"
    if r["constraint"] is None:
        return (f"| {name} | {r['config'].get('seed')} | {r['reached']:,} (no log){since} | "
                f"{r['open_gates']} |" + " not recorded |" * 8)
    c = r["constraint"]
    short = f" (logged to {r['batches']:,})" if r["reached"] > r["batches"] else ""
    return (f"| {name} | {r['config'].get('seed')} | {r['reached']:,}{short}"
            f"{'' if r['finished'] else ' (running)'}{since} | {r['open_gates']} | "
            f"{', '.join(f'{b:,}' for b in r['closings']) or '-'} | {r['reopenings']} | "
            + ("never" if r["first_dive"] is None else f"{r['first_dive']:,}")
            + f" | {100 * c['c_ma_positive_fraction']:.1f}% of {c['batches']:,} | "
            f"{c['E2_mean']:.4g} / {c['tau']:g} | {c['lambda_mean']:.3g} | {c['gates_l1_largest_rise']:.3f} | {_gammas(c['open_gammas'])} |")


def _gammas(g: dict | None) -> str:
    """The open gates' gamma_j cell: the lowest one took over the window, with its gate and batch, and their
    range at the end ("-" for a log without gamma columns or no open gate)."""
    if g is None:
        return "-"
    return f"{g['lowest']:.3g} (gate {g['lowest_gate']}, {g['lowest_batch']:,}); {g['last'][0]:.3g}-{g['last'][1]:.3g}"


def add_arguments(parser) -> None:
    """The options of ``refimpl study``."""
    from .optionspec import positive_int

    parser.add_argument("dirs", nargs="+", metavar="DIR", help="sweep folders (with runs/) or run folders")
    parser.add_argument("--window", type=positive_int, default=WINDOW, metavar="N",
                        help=f"count the constraint's violations over each run's last N batches (default: {WINDOW:,})")
    parser.add_argument("--json", action="store_true", help="JSON instead of Markdown")
    parser.add_argument("--out", default=None, metavar="FILE", help=f"output file (default: DIR/{STUDY_FILE})")


def run(args) -> int:
    """``refimpl study``: print the table and write it."""
    folders = run_folders(args.dirs)
    begun = {f: started(f) for f in folders}
    s = study([run_row(f, args.window) for f in folders if begun[f]], [f.name for f in folders if not begun[f]])
    text = json.dumps(s, indent=1, default=list) + "\n" if args.json else to_markdown(s, args.window)
    out = Path(args.out) if args.out else Path(args.dirs[0]) / STUDY_FILE
    atomic_write(out, lambda f: f.write(text.encode()))
    sys.stdout.write(text)
    return 0
