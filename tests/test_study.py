"""refimpl.study: runs of sweep folders grouped by arm, with every seed's result and the range."""

import json

import numpy
import pytest

from refimpl import study as st
from refimpl.cli import main as cli_main
from refimpl.config import RunConfig
from refimpl.training import Run


def tiny_run(folder, seed: int, tau: float, batches: int = 4, finish: bool = True):
    config = RunConfig(dataset="synthetic-dsprites", latent=3, image_size=16, holdout=100, seed=seed,
                       hyper={"tau": tau})
    Run.create(config, folder).train(batches, progress=False)
    if not finish:  # as if interrupted: a log and checkpoint but no summary at the log's last step
        (folder / "summary.json").unlink()
    return folder


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for seed in (0, 1):
        for tau in (1.0, 500.0):
            tiny_run(root / "runs" / f"tau{tau:g}-seed{seed}", seed, tau, finish=(seed, tau) != (1, 500.0))
    return root


def test_rows_groups_and_ranges(sweep):
    rows = [st.run_row(f, window=3) for f in st.run_folders([sweep])]
    assert len(rows) == 4 and st.arm_fields(rows) == ["tau"]  # seed varies too, but never defines an arm
    s = st.study(rows)
    assert list(s["groups"]) == ["tau=1", "tau=500"]
    for g in s["groups"].values():
        assert [r["config"]["seed"] for r in g["rows"]] == [0, 1]
        assert g["open_gates"] == [r["open_gates"] for r in g["rows"]]
        assert g["range"] == (min(g["open_gates"]), max(g["open_gates"]))
    by_name = {r["run"].split("/")[-1]: r for r in rows}
    assert not by_name["tau500-seed1"]["finished"] and by_name["tau1-seed0"]["finished"]
    r = by_name["tau500-seed0"]  # tau = 500 at 16x16 (at most 256): the error is under tau from the first batch
    assert r["batches"] == 4 and r["first_dive"] == 1 and r["constraint"]["batches"] == 3
    assert r["constraint"]["c_ma_positive_fraction"] == 0.0
    log = numpy.genfromtxt(sweep / "runs" / "tau500-seed0" / "log.csv", delimiter=",", names=True)
    assert r["constraint"]["E2_mean"] == pytest.approx(log["E2"][-3:].mean(), rel=1e-12)
    assert r["open_gates"] == int(log["open_gates"][-1])
    l1 = log["gates_l1"][-3:]
    assert r["constraint"]["gates_l1_largest_rise"] == pytest.approx((l1 - numpy.minimum.accumulate(l1)).max())
    g = r["constraint"]["open_gammas"]  # the gates open at the end, over the last 3 batches
    gammas = numpy.stack([log[f"gamma_{j}"][-3:] for j in range(3)])
    assert g["gates"] == [j for j in range(3) if gammas[j, -1] > 0] and g["lowest"] == gammas[g["gates"]].min()
    assert r["constraint"]["lambda_mean"] == pytest.approx(log["lambda_eff"][-3:].mean())
    text = st.to_markdown(s, 3)
    assert text.count(f"| {log['lambda_eff'][-3:].mean():.3g} | {r['constraint']['gates_l1_largest_rise']:.3f} | {g['lowest']:.3g} (gate {g['lowest_gate']}, "
                      f"{g['lowest_batch']:,}); {g['last'][0]:.3g}-{g['last'][1]:.3g} |") == 1
    assert "| tau=1 | 2 (0, 1) | 4 (2 finished) |" in text and "| tau=500 | 2 (0, 1) | 4 (1 finished) |" in text
    assert "| tau500-seed1 | 1 | 4 (running) |" in text and "| tau500-seed0 | 0 | 4 | " in text


def test_a_run_folder_and_a_sweep_together_and_the_command(sweep, tmp_path, capsys):
    single = tiny_run(tmp_path / "other", 0, 1.0, batches=5)
    rows = [st.run_row(f) for f in st.run_folders([sweep, single])]
    assert len(rows) == 5 and st.arm_fields(rows) == ["tau"]  # the 5-batch run differs in batches, not config
    assert cli_main(["study", str(sweep), str(single), "--window", "2", "--out", str(tmp_path / "t.md")]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "t.md").read_text() == text and "| tau=1 | 3 (0, 0, 1) | 4-5 (3 finished) |" in text
    assert cli_main(["study", str(sweep), "--json", "--out", str(tmp_path / "t.json")]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["fields"] == ["tau"] and len(data["groups"]["tau=500"]["rows"]) == 2


def test_folders_without_runs_are_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["study", str(tmp_path / "empty")]) == 1
    assert "neither a run folder nor a sweep folder" in capsys.readouterr().err
    assert cli_main(["study", str(tmp_path / "missing")]) == 1


def test_arms_are_labelled_by_what_differs_from_the_defaults(tmp_path):
    for name, hyper in (("plain", {"tau": 1.0}), ("per-step", {"tau": 1.0, "hit": "per_step"}),
                        ("sticky", {"tau": 1.0, "hit": "sticky"})):
        config = RunConfig(dataset="synthetic-dsprites", latent=3, image_size=16, holdout=100, hyper=hyper)
        Run.create(config, tmp_path / "runs" / name).train(2, progress=False)
    rows = [st.run_row(f) for f in st.run_folders([tmp_path])]
    assert st.arm_fields(rows) == ["hit"]  # a default given explicitly is the same arm as one left out
    s = st.study(rows)
    assert {label: len(g["rows"]) for label, g in s["groups"].items()} == {"hit=per_step": 1, "defaults": 2}


def test_runs_without_a_batch_are_listed_as_not_started(sweep, tmp_path, capsys):
    idle = tmp_path / "idle"
    config = RunConfig(dataset="synthetic-dsprites", latent=3, image_size=16, holdout=100, hyper={"tau": 1.0})
    Run.create(config, idle).close()  # step 0: a config and a checkpoint, no log
    assert not st.started(idle) and st.started(sweep / "runs" / "tau1-seed0")
    assert cli_main(["study", str(sweep), str(idle), "--out", str(tmp_path / "t.md")]) == 0
    text = capsys.readouterr().out
    assert text.rstrip().endswith("Not started yet: idle.") and "| tau=1 | 2 (0, 1) |" in text


def test_a_branch_is_judged_on_its_own_rows(tmp_path):
    parent, child = tmp_path / "parent", tmp_path / "child"
    assert cli_main(["train", "--tau", "1", "--batches", "4", "--out", str(parent), "--image-size", "16", "--latent",
                     "3", "--holdout", "100", "--quiet"]) == 0
    assert cli_main(["train", "--from", str(parent), "--hit", "per_step", "--batches", "7", "--out", str(child),
                     "--quiet"]) == 0
    row = st.run_row(child, window=100)
    assert (row["batches"], row["branched_at"], row["constraint"]["batches"], row["constraint"]["from"]) == (7, 4, 3, 5)
    assert st.run_row(parent, window=100)["branched_at"] is None
    assert "| child | 0 | 7, branched at 4 |" in st.to_markdown(st.study([row]), 100)


def test_a_log_shorter_than_its_run_and_a_run_without_a_log(tmp_path):
    """A log packed before its run went on, and a run whose log was lost: the end state is summary.json's,
    the rows say which batches are not recorded, and nothing is computed from rows that are not there."""
    short, lost = tiny_run(tmp_path / "short", 0, 1.0, batches=6), tiny_run(tmp_path / "lost", 1, 1.0, batches=6)
    lines = (short / "log.csv").read_text().splitlines(keepends=True)
    (short / "log.csv").write_text("".join(lines[:5]))  # header + rows 1-4
    summary = json.loads((short / "summary.json").read_text())
    (lost / "log.csv").unlink()
    assert st.started(lost) and not st.logged(lost)
    r, q = st.run_row(short, window=100), st.run_row(lost, window=100)
    assert (r["batches"], r["reached"], r["finished"], r["open_gates"]) == (4, 6, True, summary["open_gates"])
    assert r["constraint"]["batches"] == 4  # the window ends where the log ends
    assert (q["reached"], q["open_gates"], q["closings"], q["constraint"]) == (6, json.loads(
        (lost / "summary.json").read_text())["open_gates"], None, None)
    text = st.to_markdown(st.study([r, q]), 100)
    assert "| short | 0 | 6 (logged to 4) |" in text and "| lost | 1 | 6 (no log) |" in text
    header, lost_row = (next(line for line in text.splitlines() if line.startswith(start)) for start in ("| run |", "| lost |"))
    assert lost_row.count("|") == header.count("|") and lost_row.count("not recorded") == 8  # one cell per column
    assert "short, rows 5-6; lost, rows 1-6" in text and "(2 finished)" in text


def test_a_legacy_key_defines_no_arm_and_runs_of_one_name_are_told_apart(tmp_path):
    """config.json of runs made before the execution setting holds "fused": it is not an arm; two runs named alike
    in two sweeps are shown as sweep/name."""
    a, b = tiny_run(tmp_path / "one" / "runs" / "r", 0, 1.0), tiny_run(tmp_path / "two" / "runs" / "r", 1, 1.0)
    config = json.loads((a / "config.json").read_text())
    config["config"]["fused"] = True
    (a / "config.json").write_text(json.dumps(config))
    rows = [st.run_row(f) for f in (a, b)]
    assert st.arm_fields(rows) == [] and list(st.study(rows)["groups"]) == ["all runs"]
    text = st.to_markdown(st.study(rows), 100)
    assert "| one/r | 0 |" in text and "| two/r | 1 |" in text
