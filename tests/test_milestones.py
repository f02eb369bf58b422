"""refimpl.milestones: Section 4.1's events read off a log (a constructed one with known events,
and a tiny real run through the command line)."""

import json

import numpy
import pytest

from refimpl import milestones as ms
from refimpl.cli import main as cli_main
from refimpl.config import RunConfig
from refimpl.training import Run


def constructed_log():
    """200 batches with known events: lambda' peaks at batch 40; C_ma < 0 from batch 50, >= 0 again
    over batches 100-159 (lambda' peaks at 130 inside) and over 180-185 (short); gate 1 closes at
    120 and reopens at 170, gate 2 closes at 150; open gates 3 -> 2 (120) -> 1 (150) -> 2 (170)."""
    steps = numpy.arange(1, 201, dtype=float)
    lam = numpy.where(steps <= 40, 1 + steps / 40, 2 - (steps - 40) / 100)
    lam[99:160] += numpy.where(steps[99:160] <= 130, (steps[99:160] - 99) / 50, (160 - steps[99:160]) / 50)
    c_ma = numpy.full(200, 5.0)
    c_ma[49:] = -1.0
    c_ma[99:159] = 0.5
    c_ma[179:185] = 0.0
    g0 = numpy.full(200, 0.4)
    g1 = numpy.where((steps >= 120) & (steps < 170), -0.1, 0.3)
    g2 = numpy.where(steps >= 150, -0.2, 0.2)
    open_gates = (g0 > 0).astype(float) + (g1 > 0) + (g2 > 0)
    e2 = numpy.linspace(30, 10, 200)
    return {"step": steps, "lambda_eff": lam, "C_ma": c_ma, "C": e2 - 20.0, "open_gates": open_gates, "E2": e2,
            "hit_fraction": numpy.linspace(0, 1, 200), "gates_l1": numpy.linspace(3, 1.5, 200),
            "tau": numpy.full(200, 20.0), "gamma_0": g0, "gamma_1": g1, "gamma_2": g2}


def test_events_of_a_constructed_log():
    m = ms.milestones(constructed_log(), tail=50, min_stretch=10)
    assert m["batches"] == 200 and m["tau"] == 20.0
    assert (m["lambda_first"], m["lambda_peak"], m["lambda_peak_batch"]) == (1.025, 2.0, 40)
    assert m["c_ma_below_zero_from"] == 50
    [bump] = m["violated_again"]  # the 6-batch stretch at 180-185 is under min_stretch
    assert (bump["from"], bump["to"], bump["lambda_peak_batch"]) == (100, 159, 130)
    assert m["staircase"] == [(1, 3), (120, 2), (150, 1), (170, 2)]
    assert m["reopenings"] == 1
    assert m["gates"] == {"0": [], "1": [(120, "closed"), (170, "opened")], "2": [(150, "closed")]}
    t = m["tail"]
    assert t["batches"] == 50 and t["open_gates_last"] == 2
    assert t["E2_mean"] == pytest.approx(numpy.linspace(30, 10, 200)[-50:].mean(), rel=1e-12)
    short = ms.milestones(constructed_log(), min_stretch=5)
    assert [s["from"] for s in short["violated_again"]] == [100, 180]
    assert "longest listed" not in ms.to_markdown(short, "x")
    monkey = dict(short, violated_again=short["violated_again"] * 5)  # 10 stretches: the 8 longest are listed
    text = ms.to_markdown(monkey, "x")
    assert "10 time(s) (the 8 longest listed; all in --json)" in text and text.count("batches 180-185") == 3
    text = ms.to_markdown(m, "made-up")
    for words in ("peak 2 at batch 40", "first at batch 50", "batches 100-159", "3 (batch 1) -> 2 (batch 120) -> "
                  "1 (batch 150) -> 2 (batch 170); reopenings: 1", "gate 1: closed at 120, opened at 170",
                  "gate 0: no change"):
        assert words in text


def test_lambda_after_bumps_and_the_constraint_window():
    log = constructed_log()
    m = ms.milestones(log, min_stretch=5, after=100, window=50)
    after = m["lambda_after"]  # lambda' from batch 100: 1.42, peak 1.72 at 130, lowest 0.4 at 200
    assert (after["from"], after["max_batch"], after["min_batch"]) == (100, 130, 200)
    assert after["max"] == pytest.approx(2 - 0.9 + 31 / 50) and after["min"] == pytest.approx(2 - 1.6)
    rises = {s["from"]: s["lambda_rise"] for s in m["violated_again"]}
    assert rises[100] == pytest.approx(log["lambda_eff"][129] - log["lambda_eff"][99])
    assert rises[180] == pytest.approx(0.0)  # lambda' falls inside the short stretch: its peak is its first row
    c = m["constraint"]  # the last 50 batches: C_ma = 0.5 over 151-159, 0.0 (not > 0) over 180-185; E2 < 20 from 101
    assert (c["batches"], c["from"]) == (50, 151) and c["c_ma_positive_fraction"] == pytest.approx(9 / 50)
    assert c["c_positive_fraction"] == 0.0 and c["E2_mean"] == pytest.approx(log["E2"][-50:].mean())
    # lambda' = 2 - (s - 40) / 100 over s = 151..200 (mean s 175.5), plus the bump's tail (160 - s) / 50 over 151-159
    assert c["lambda_mean"] == pytest.approx(2 - 135.5 / 100 + 45 / 50 / 50)
    assert "mean lambda' 0.663" in ms.to_markdown(m, "made-up")
    early = ms.milestones(log, window=150)["constraint"]  # batches 51-200: E2 > 20 up to batch 100 (50 of 150)
    assert early["c_positive_fraction"] == pytest.approx(50 / 150) and early["c_ma_positive_fraction"] == pytest.approx(60 / 150)
    e2_ma = log["E2"][0]
    for v in log["E2"][1:]:
        e2_ma = 0.95 * e2_ma + 0.05 * v
    assert c["E2_ma95_end"] == pytest.approx(e2_ma, rel=1e-12)
    assert ms.milestones(log, after=201)["lambda_after"] is None
    text = ms.to_markdown(m, "x")
    assert "lambda' from batch 100 on: 0.4 (batch 200) to 1.72 (batch 130)" in text
    assert "the largest rises of lambda' in those stretches (the bumps), of 2: +0.3 to 1.72 at batch 130" in text
    assert "last 50 batches (from 151): C_ma > 0 in 18.0% of them, C > 0 (batch E2 over tau) in 0.0%" in text


def test_open_gammas_over_the_window():
    log = constructed_log()
    log["gamma_0"] = numpy.linspace(0.4, 0.1, 200)  # open throughout, sinking: its lowest is its last value
    g = ms.milestones(log, window=50)["constraint"]["open_gammas"]  # batches 151-200: gates 0 and 1 open at the end
    assert g["gates"] == [0, 1]
    assert g["first"] == (pytest.approx(-0.1), pytest.approx(log["gamma_0"][150]))  # gate 1 is closed at 151
    assert g["last"] == (pytest.approx(0.1), pytest.approx(0.3))
    assert (g["lowest"], g["lowest_gate"], g["lowest_batch"]) == (pytest.approx(-0.1), 1, 151)
    text = ms.to_markdown(ms.milestones(log, window=50), "x")
    assert "the open gates' gamma_j (0, 1) over those batches: -0.1-0.174 at batch 151, 0.1-0.3 at the end; " \
           "lowest -0.1 (gate 1, batch 151)" in text
    late = ms.milestones(log, window=20)["constraint"]["open_gammas"]  # batches 181-200: gate 1 open again
    assert (late["lowest"], late["lowest_gate"], late["lowest_batch"]) == (pytest.approx(0.1), 0, 200)
    assert ms.open_gammas(log["step"], {}) is None  # a log that predates gamma logging
    assert ms.open_gammas(log["step"], {"gamma_0": -numpy.ones(200)}) is None  # no gate open at the end


def test_upswings_of_the_gate_curve_and_its_largest_rise_in_the_window():
    """Figure 1's gate curve ||sigmoid(k gamma)||_1: falls 5 -> 3, rises 0.6 (an upswing) and 0.3 (not one),
    falls to 2, rises 0.5 exactly (an upswing, counted from the new low)."""
    log = constructed_log()
    g = numpy.concatenate([numpy.linspace(5, 3, 50), numpy.linspace(3, 3.6, 30), numpy.linspace(3.6, 3.3, 20),
                           numpy.linspace(3.3, 3.6, 20), numpy.linspace(3.6, 2, 40), numpy.linspace(2, 2.5, 40)])
    log["gates_l1"] = g
    m = ms.milestones(log, window=80)
    ups = m["upswings"]
    assert [(u["low_batch"], u["batch"]) for u in ups] == [(50, 1 + 50 + int(numpy.argmax(g[50:] - 3 >= 0.5))), (160, 200)]
    assert ups[0]["low"] == pytest.approx(3.0) and ups[1]["value"] - ups[1]["low"] == pytest.approx(0.5)
    assert m["constraint"]["gates_l1_largest_rise"] == pytest.approx(0.5)  # batches 121-200: the last rise
    assert ms.milestones(log, window=200)["constraint"]["gates_l1_largest_rise"] == pytest.approx(0.6)
    text = ms.to_markdown(m, "x")
    assert "upswings of ||sigmoid(k gamma)||_1 (Figure 1's gate curve) by 0.5 or more: 2" in text
    assert "from 3.000 (batch 50) to" in text and "rose at most 0.500 above its running low there" in text
    assert ms.upswings(numpy.arange(5.0), numpy.linspace(3, 1, 5)) == []  # a falling curve has none


def test_a_constraint_never_met_and_a_log_without_gamma_columns():
    log = {k: v for k, v in constructed_log().items() if not k.startswith("gamma_")}
    log["C_ma"] = numpy.ones(200)
    m = ms.milestones(log)
    assert m["c_ma_below_zero_from"] is None and m["violated_again"] == [] and m["gates"] == {}
    assert "first at batch (never)" in ms.to_markdown(m, "x") and "gate by gate" not in ms.to_markdown(m, "x")


def test_command_line_on_a_real_run(tmp_path, capsys):
    out = tmp_path / "r"
    config = RunConfig(dataset="synthetic-dsprites", latent=3, image_size=16, holdout=100, hyper={"tau": 1.0})
    Run.create(config, out).train(6, progress=False)
    assert cli_main(["milestones", str(out), "--tail", "4"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Milestones of r") and "batches: 6;" in text and "last 4 batches" in text
    assert (out / "milestones.md").read_text() == text
    assert cli_main(["milestones", str(out / "checkpoint.npz"), "--json", "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["batches"] == 6 and len(m["gates"]) == 3 and m["staircase"][0] == [1, m["staircase"][0][1]]
    assert cli_main(["milestones", str(tmp_path / "nothing")]) == 1
    assert "no such run folder" in capsys.readouterr().err
