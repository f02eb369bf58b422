"""Figure 1 in numbers: ``refimpl milestones RUN`` reads Section 4.1's events off a run's log.csv.

Section 4.1 tells Figure 1 as a sequence of events: lambda rises until the error dives
below tau, then drops to a small value; after ca. 10K batches the gates close in a
staircase (9 open after 10K, 6 at 20K, 5 at 25K); lambda rises again whenever the error
exceeds tau; late in training a gate closes, the constraint breaks and it reopens. The
claims ledger (docs/claims.md) quotes these events for the 64x64 runs; this module
computes them from ``log.csv`` (or ``log.csv.gz``; a branch's whole history, its parents'
rows first: :func:`refimpl.runread.load_history`), so every number there can be recomputed
with one command:

- lambda': its first value, its peak and the batch of the peak, its last value;
- the first batch with C_ma < 0 (l. 16's moving average of the constraint: E2 < tau on
  average), and every later stretch of at least ``min_stretch`` batches with C_ma >= 0
  again (the constraint violated, lambda' rising: the "bumps" of Figure 1), with
  lambda''s peak in each;
- the staircase: the batch at which the number of open inference gates (``open_gates``,
  1[gamma > 0] after the step) first takes each new value, and how often it went up
  (a closed gate reopening);
- each gate's closings and reopenings: the batches where gamma_j changes sign (from the
  log's ``gamma_j`` columns; logs written before gamma logging have none);
- the upswings of ||sigmoid(k gamma)||_1, the curve Figure 1 plots (its "oscillatory
  behavior of the gates"): every rise of at least ``UPSWING`` (half a gate) above the
  curve's lowest value since the previous upswing, whether or not a gamma_j changes sign;
- the last ``tail`` batches: mean E2 against tau, mean hit fraction, ||sigmoid(k gamma)||_1;
- lambda' from batch ``after`` on (Figure 1's "drops to a small value"): its range, and
  the batches of its smallest and largest values;
- the bumps: the stretches above ranked by how far lambda' rose inside each (peak minus
  its value where the stretch began), so "two visible bumps" is a computed ranking;
- the constraint over the last ``window`` batches (the abstract's "without violating
  the GECO constraints"): the fraction of batches with C_ma > 0 and with C > 0, mean E2,
  and E2's moving average at the end (factor 0.95, Table 1's) against tau, and the largest
  rise of ||sigmoid(k gamma)||_1 above its running low there (a gate's partial reopening);
  and the gamma_j of the gates open at the end (:func:`open_gammas`): their range where the
  window begins and at the end, and the lowest value any of them took there (its gate and
  batch), so a gate on its way down shows before it closes.

Command line: ``refimpl milestones RUN [--tail N] [--min-stretch N] [--after N] [--window N] [--json]
[--out FILE]``
prints a Markdown summary (``--json``: the numbers as JSON) and writes it atomically to
``RUN/milestones.md`` (or FILE).
"""

from __future__ import annotations

import json
import sys

import numpy

from .atomic import atomic_write
from .runread import gamma_columns, load_history, run_folder
from .runfolder import MILESTONES_FILE
from .runlog import moving_average

PROG = "refimpl milestones"
TAIL = 500  # batches averaged at the end of the run
MIN_STRETCH = 50  # shortest stretch of C_ma >= 0 after the first dive that is reported
MAX_LISTED = 8  # stretches listed in the Markdown report (the longest)
AFTER = 12_000  # lambda' range is reported from this batch on (the claims ledger's "from 12K")
WINDOW = 10_000  # batches at the end over which the constraint's violations are counted
BUMPS = 3  # largest rises of lambda' listed in the Markdown report
UPSWING = 0.5  # a rise of ||sigmoid(k gamma)||_1 by this much (half a gate) counts as a gate reopening in Figure 1


def _int(x) -> int:
    return int(round(float(x)))


def staircase(steps, open_gates) -> list[tuple[int, int]]:
    """[(batch, open gates)]: the first row, then every row where the count changes. steps, open_gates: (T,)."""
    change = numpy.flatnonzero(numpy.diff(open_gates) != 0) + 1
    return [(_int(steps[i]), _int(open_gates[i])) for i in (0, *change)]


def sign_changes(steps, gamma) -> list[tuple[int, str]]:
    """[(batch, "closed" | "opened")] where the inference gate 1[gamma > 0] flips. steps, gamma: (T,)."""
    open_ = gamma > 0
    flips = numpy.flatnonzero(open_[1:] != open_[:-1]) + 1
    return [(_int(steps[i]), "opened" if open_[i] else "closed") for i in flips]


def upswings(steps, gates_l1, rise: float = UPSWING) -> list[dict]:
    """Rises of ||sigmoid(k gamma)||_1 by >= ``rise`` above its lowest value since the previous upswing: the
    batch and value of that low, and the batch where the curve first stood ``rise`` above it. (T,) arrays."""
    out, low = [], 0
    for i in range(1, len(gates_l1)):
        if gates_l1[i] < gates_l1[low]:
            low = i
        elif gates_l1[i] - gates_l1[low] >= rise:
            out.append({"low_batch": _int(steps[low]), "low": float(gates_l1[low]), "batch": _int(steps[i]),
                        "value": float(gates_l1[i])})
            low = i
    return out


def violated_stretches(steps, c_ma, lam, start: int, min_len: int) -> list[dict]:
    """Stretches of rows from ``start`` on with C_ma >= 0 lasting >= min_len rows: first and last batch and
    lambda''s peak (and its batch) inside each. steps, c_ma, lam: (T,)."""
    out = []
    violated = numpy.concatenate([[False], c_ma[start:] >= 0, [False]])
    edges = numpy.flatnonzero(violated[1:] != violated[:-1])
    for a, b in zip(edges[::2] + start, edges[1::2] + start):
        if b - a >= min_len:
            peak = a + int(numpy.argmax(lam[a:b]))
            out.append({"from": _int(steps[a]), "to": _int(steps[b - 1]), "lambda_peak": float(lam[peak]),
                        "lambda_peak_batch": _int(steps[peak]), "lambda_rise": float(lam[peak] - lam[a])})
    return out


def extremes_after(steps, lam, after: int) -> dict | None:
    """lambda' over the rows with step >= ``after``: smallest and largest, each with its batch (None when the
    run is shorter). steps, lam: (T,)."""
    rows = numpy.flatnonzero(steps >= after)
    if not rows.size:
        return None
    low, high = rows[int(numpy.argmin(lam[rows]))], rows[int(numpy.argmax(lam[rows]))]
    return {"from": after, "min": float(lam[low]), "min_batch": _int(steps[low]), "max": float(lam[high]),
            "max_batch": _int(steps[high])}


def open_gammas(steps, gammas: dict) -> dict | None:
    """The gamma_j of the gates open at the last row (gamma_j > 0) over ``steps``: their (min, max) at the first
    and the last row, and the lowest value one of them took, with its gate and batch. gammas: name "gamma_j" ->
    (T,). None when no gate is open or the log has no gamma columns."""
    open_ = [name for name, g in gammas.items() if g[-1] > 0]
    if not open_:
        return None
    g = numpy.stack([gammas[name] for name in open_])  # (open gates, T)
    gate, row = numpy.unravel_index(int(numpy.argmin(g)), g.shape)
    return {"gates": [int(name[6:]) for name in open_], "first": (float(g[:, 0].min()), float(g[:, 0].max())),
            "last": (float(g[:, -1].min()), float(g[:, -1].max())), "lowest": float(g[gate, row]),
            "lowest_gate": int(open_[gate][6:]), "lowest_batch": _int(steps[row])}


def constraint_window(log: dict, window: int) -> dict:
    """The constraint over the last ``window`` rows (fewer if the run is shorter): fractions of batches with
    C_ma > 0 and with C > 0, mean E2, and E2's moving average (factor 0.95) at the end against tau; mean
    lambda'; the largest rise of the gate curve and the open gates' gamma_j (:func:`open_gammas`) there."""
    last = slice(max(0, len(log["step"]) - window), None)
    l1 = log["gates_l1"][last]
    return {"batches": len(log["step"][last]), "from": _int(log["step"][last][0]),
            "gates_l1_largest_rise": float((l1 - numpy.minimum.accumulate(l1)).max()),
            "open_gammas": open_gammas(log["step"][last], {name: log[name][last] for name in gamma_columns(log)}),
            "c_ma_positive_fraction": float((log["C_ma"][last] > 0).mean()),
            "c_positive_fraction": float((log["C"][last] > 0).mean()), "E2_mean": float(log["E2"][last].mean()),
            "E2_ma95_end": moving_average(log["E2"], 0.95), "tau": float(log["tau"][-1]),
            "lambda_mean": float(log["lambda_eff"][last].mean())}


def milestones(log: dict, tail: int = TAIL, min_stretch: int = MIN_STRETCH, after: int = AFTER,
               window: int = WINDOW) -> dict:
    """The events of Section 4.1 in ``log`` (columns name -> (T,) float arrays, :func:`refimpl.runread.load_history`)."""
    steps, lam, c_ma = log["step"], log["lambda_eff"], log["C_ma"]
    peak = int(numpy.argmax(lam))
    below = numpy.flatnonzero(c_ma < 0)
    first_below = int(below[0]) if below.size else None
    stairs = staircase(steps, log["open_gates"])
    last = slice(max(0, len(steps) - tail), None)
    gammas = gamma_columns(log)
    return {
        "batches": _int(steps[-1]),
        "tau": float(log["tau"][-1]),
        "lambda_first": float(lam[0]),
        "lambda_peak": float(lam[peak]),
        "lambda_peak_batch": _int(steps[peak]),
        "lambda_last": float(lam[-1]),
        "c_ma_below_zero_from": None if first_below is None else _int(steps[first_below]),
        "min_stretch": min_stretch,
        "violated_again": ([] if first_below is None else
                           violated_stretches(steps, c_ma, lam, first_below, min_stretch)),
        "lambda_after": extremes_after(steps, lam, after),
        "constraint": constraint_window(log, window),
        "staircase": stairs,
        "reopenings": sum(1 for (_, a), (_, b) in zip(stairs, stairs[1:]) if b > a),
        "gates": {name[6:]: sign_changes(steps, log[name]) for name in gammas},
        "upswings": upswings(steps, log["gates_l1"]),
        "tail": {"batches": len(steps[last]), "E2_mean": float(log["E2"][last].mean()),
                 "hit_fraction_mean": float(log["hit_fraction"][last].mean()),
                 "gates_l1_last": float(log["gates_l1"][-1]), "open_gates_last": _int(log["open_gates"][-1])},
    }


def to_markdown(m: dict, title: str) -> str:
    """The milestones as a short Markdown report."""
    t = m["tail"]
    lines = [f"# Milestones of {title}", "",
             f"- batches: {m['batches']:,}; tau = {m['tau']:g}",
             f"- lambda': {m['lambda_first']:.3g} at the start, peak {m['lambda_peak']:.3g} at batch "
             f"{m['lambda_peak_batch']:,}, {m['lambda_last']:.3g} at the end",
             "- C_ma < 0 (E2 under tau on average) first at batch "
             + ("(never)" if m["c_ma_below_zero_from"] is None else f"{m['c_ma_below_zero_from']:,}")]
    stretches = m["violated_again"]
    shown = sorted(sorted(stretches, key=lambda s: s["from"] - s["to"])[:MAX_LISTED], key=lambda s: s["from"])
    lines.append(f"- C_ma >= 0 again after that, for {m['min_stretch']} batches or more: {len(stretches)} time(s)"
                 + (f" (the {MAX_LISTED} longest listed; all in --json)" if len(shown) < len(stretches) else "")
                 + "".join(f"\n  - batches {s['from']:,}-{s['to']:,}: lambda' up to {s['lambda_peak']:.3g} "
                           f"(batch {s['lambda_peak_batch']:,})" for s in shown))
    if stretches:
        bumps = sorted(stretches, key=lambda s: -s["lambda_rise"])[:BUMPS]
        lines.append(f"- the largest rises of lambda' in those stretches (the bumps), of {len(stretches)}: "
                     + "; ".join(f"+{s['lambda_rise']:.3g} to {s['lambda_peak']:.3g} at batch {s['lambda_peak_batch']:,}"
                                 for s in bumps))
    after = m["lambda_after"]
    if after is not None:
        lines.append(f"- lambda' from batch {after['from']:,} on: {after['min']:.3g} (batch {after['min_batch']:,}) to "
                     f"{after['max']:.3g} (batch {after['max_batch']:,})")
    lines.append("- open gates (staircase): " + " -> ".join(f"{count} (batch {step:,})" for step, count in m["staircase"])
                 + f"; reopenings: {m['reopenings']}")
    if m["gates"]:
        lines.append("- gate by gate (sign changes of gamma_j):")
        for j, events in m["gates"].items():
            text = ", ".join(f"{what} at {step:,}" for step, what in events) or "no change"
            lines.append(f"  - gate {j}: {text}")
    ups = m["upswings"]
    lines.append(f"- upswings of ||sigmoid(k gamma)||_1 (Figure 1's gate curve) by {UPSWING:g} or more: {len(ups)}"
                 + "".join(f"\n  - from {u['low']:.3f} (batch {u['low_batch']:,}) to {u['value']:.3f} (batch "
                           f"{u['batch']:,})" for u in ups[:MAX_LISTED])
                 + (f"\n  - ... ({len(ups) - MAX_LISTED} more in --json)" if len(ups) > MAX_LISTED else ""))
    lines.append(f"- last {t['batches']:,} batches: mean E2 {t['E2_mean']:.4g} against tau {m['tau']:g}, mean hit "
                 f"fraction {t['hit_fraction_mean']:.3f}; at the end ||sigmoid(k gamma)||_1 = {t['gates_l1_last']:.3f}, "
                 f"{t['open_gates_last']} gate(s) open")
    c = m["constraint"]
    lines.append(f"- last {c['batches']:,} batches (from {c['from']:,}): C_ma > 0 in {100 * c['c_ma_positive_fraction']:.1f}% "
                 f"of them, C > 0 (batch E2 over tau) in {100 * c['c_positive_fraction']:.1f}%; mean E2 {c['E2_mean']:.4g}, "
                 f"E2's moving average (0.95) at the end {c['E2_ma95_end']:.4g}, against tau {c['tau']:g}; mean "
                 f"lambda' {c['lambda_mean']:.3g}; "
                 f"||sigmoid(k gamma)||_1 rose at most {c['gates_l1_largest_rise']:.3f} above its running low there")
    g = c["open_gammas"]
    if g is not None:
        lines.append(f"- the open gates' gamma_j ({', '.join(map(str, g['gates']))}) over those batches: "
                     f"{g['first'][0]:.3g}-{g['first'][1]:.3g} at batch {c['from']:,}, {g['last'][0]:.3g}-"
                     f"{g['last'][1]:.3g} at the end; lowest {g['lowest']:.3g} (gate {g['lowest_gate']}, batch "
                     f"{g['lowest_batch']:,})")
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    """The options of ``refimpl milestones``."""
    from .optionspec import positive_int

    parser.add_argument("run", metavar="RUN", help="run folder (or its checkpoint.npz)")
    parser.add_argument("--tail", type=positive_int, default=TAIL, metavar="N",
                        help=f"batches averaged at the end (default: {TAIL})")
    parser.add_argument("--min-stretch", type=positive_int, default=MIN_STRETCH, metavar="N",
                        help=f"shortest stretch of C_ma >= 0 after the first dive that is listed (default: {MIN_STRETCH})")
    parser.add_argument("--after", type=positive_int, default=AFTER, metavar="N",
                        help=f"report lambda' range from batch N on (default: {AFTER:,})")
    parser.add_argument("--window", type=positive_int, default=WINDOW, metavar="N",
                        help=f"count the constraint's violations over the last N batches (default: {WINDOW:,})")
    parser.add_argument("--json", action="store_true", help="JSON instead of Markdown")
    parser.add_argument("--out", default=None, metavar="FILE", help=f"output file (default: RUN/{MILESTONES_FILE})")


def run(args) -> int:
    """``refimpl milestones``: print the report and write it."""
    folder = run_folder(args.run)
    m = milestones(load_history(folder), tail=args.tail, min_stretch=args.min_stretch, after=args.after,
                   window=args.window)
    text = json.dumps(m, indent=1) + "\n" if args.json else to_markdown(m, folder.name)
    out = args.out or folder / MILESTONES_FILE
    atomic_write(out, lambda f: f.write(text.encode()))
    sys.stdout.write(text)
    return 0

