"""Run branching (refimpl/branch.py): a branch continues bit for bit when nothing changes, records its
parent and changes, re-seeds with --seed, refuses what it cannot change in one line; kept checkpoints
(--keep-checkpoints) and --at; the whole history (a branch's parents' rows, then its own) in plot,
milestones and the summary; log.csv.gz read in place of log.csv, resume from it; sweeps of branches."""

import gzip
import json
import os

import numpy
import pytest

from refimpl import branch, runread
from refimpl import checkpoint as ckpt
from refimpl.cli import main
from refimpl.config import Schedule
from refimpl.factors import sample_indices
from refimpl.runfolder import kept_checkpoints
from refimpl.runlog import LogError, moving_average, pack_log, read_log, verify_log
from refimpl.runopen import open_run
from refimpl.training import Run, stream
from test_training import TINY_ARGS, checkpoint_state, log_without_time, tiny_config

QUIET = [*TINY_ARGS, "--quiet"]


def train_parent(out, batches=30, keep=10, **kw):
    """A tiny run of ``batches`` steps keeping every ``keep``-th checkpoint."""
    run = Run.create(tiny_config(**kw), out)
    run.train(batches, checkpoint_every=7, keep_checkpoints=keep, progress=False)
    return out


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return train_parent(tmp_path_factory.mktemp("branch") / "a")


def rows(path):
    """The log's lines without the wall-time column, header first."""
    return log_without_time(path)


def assert_same_state(a, b):
    """Every array bit for bit and the meta, but timing, the parent record and the schedule."""
    (arrays_a, meta_a), (arrays_b, meta_b) = checkpoint_state(a), checkpoint_state(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        assert arrays_a[name].tobytes() == arrays_b[name].tobytes(), name
    for meta in (meta_a, meta_b):
        for key in ("parent", "target_batches", "keep_checkpoints", "checkpoint_every"):
            meta.pop(key)
    assert meta_a == meta_b


# ----------------------------------------------------------------------------------------
# Kept checkpoints


def test_kept_checkpoints_every_n_batches(parent):
    kept = sorted(p.name for p in (parent / "checkpoints").iterdir())
    assert kept == ["step-00000010.npz", "step-00000020.npz", "step-00000030.npz"]  # not step 0
    assert ckpt.load(parent / "checkpoints" / "step-00000020.npz")[1]["step"] == 20
    assert_same_state(parent / "checkpoints" / "step-00000030.npz", parent / "checkpoint.npz")
    assert ckpt.load(parent / "checkpoint.npz")[1]["keep_checkpoints"] == 10


def test_overwrite_and_resume_clean_kept_checkpoints(tmp_path):
    out = train_parent(tmp_path / "a", batches=12, keep=5)
    stale = out / "checkpoints" / ".tmp-step-00000015.npz.abcd_123"
    stale.write_bytes(b"torn")
    mine = out / "checkpoints" / "notes.txt"
    mine.write_text("mine")
    run = open_run(out, {}, resume=True)
    run.train(15, progress=False)
    assert not stale.exists() and (out / "checkpoints" / "step-00000015.npz").is_file()
    assert main(["train", *QUIET, "--tau", "40", "--batches", "2", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["notes.txt"]  # only the user's file stays
    mine.unlink()
    assert main(["train", *QUIET, "--tau", "40", "--batches", "2", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "checkpoints").exists()


def test_experiments_keep_checkpoints(tmp_path):
    from refimpl.experiments import figure1

    figure1.run([*QUIET, "--batches", "6", "--checkpoint-every", "4", "--keep-checkpoints", "3", "--tau", "40",
                 "--out", str(tmp_path / "f1")])
    assert sorted(kept_checkpoints(tmp_path / "f1" / "runs" / "run")) == [3, 6]


# ----------------------------------------------------------------------------------------
# A branch continues as its parent would


def test_branch_without_changes_continues_bit_for_bit(parent, tmp_path):
    for at in (20, None):  # a kept checkpoint; the latest (of a parent stopped at 20)
        source = parent if at else train_parent(tmp_path / "short", batches=20)
        out = tmp_path / f"b{at}"
        run = Run.branch(source, out, {}, at=at, schedule=None if at else Run.load(parent, for_training=False).schedule)
        assert run.state.step == 20 and run.parent == {"run": os.path.relpath(source.resolve(), out.resolve()),
                                                        "step": 20, "changed": {}}
        run.train(progress=False)
        assert_same_state(out / "checkpoint.npz", parent / "checkpoint.npz")
        assert rows(out / "log.csv") == rows(parent / "log.csv")[:1] + rows(parent / "log.csv")[21:]


def test_branch_records_parent_and_changed_options(parent, tmp_path):
    out = tmp_path / "b"
    assert main(["train", "--from", str(parent), "--at", "20", "--out", str(out), "--gate-samples", "per_example",
                 "--latent", "4", "--quiet"]) == 0  # --latent 4 is the parent's own: no change
    record = json.loads((out / "config.json").read_text())
    assert record["parent"] == {"run": os.path.relpath(parent, out), "step": 20,
                                "changed": {"gate_samples": "per_example"}}
    assert record["config"]["hyper"] == {"tau": 40.0, "gate_samples": "per_example"}
    meta = ckpt.load(out / "checkpoint.npz")[1]
    assert meta["parent"] == record["parent"] and meta["step"] == 30 and meta["target_batches"] == 30
    assert read_log(out / "log.csv")["step"] == list(range(21, 31))
    assert rows(out / "log.csv")[1:] != rows(parent / "log.csv")[21:]  # the switch changed the steps
    assert Run.load(out, for_training=False).hyper.gate_samples == "per_example"
    summary = json.loads((out / "summary.json").read_text())
    full = runread.load_history(out)["E2"]
    assert summary["E2_ma95"] == moving_average(full) != moving_average(read_log(out / "log.csv")["E2"])


def test_branch_seed_reseeds_draws_but_keeps_split_and_weights(parent, tmp_path):
    run = Run.branch(parent, tmp_path / "s", {"seed": 3}, at=20)
    parent_run = Run.load(parent / "checkpoints" / "step-00000020.npz", for_training=False)
    assert run.config.seed == 3 and run.config.split_seed == 0 and run.parent["changed"] == {"seed": 3}
    assert all(numpy.array_equal(a, b) for a, b in zip(run.split, parent_run.split))
    for name, value in run.model.state_dict().items():
        assert numpy.array_equal(value, parent_run.model.state_dict()[name]), name
    assert run.train_rng.bit_generator.state == stream(3, "train").bit_generator.state
    order = run.batch_order.state_dict()
    assert order["position"] == 0 and order["epoch_rng_state"] != parent_run.batch_order.state_dict()["epoch_rng_state"]
    run.train(progress=False)
    reloaded = Run.load(tmp_path / "s", for_training=False)
    assert all(numpy.array_equal(a, b) for a, b in zip(reloaded.split, parent_run.split))
    assert numpy.array_equal(sample_indices(reloaded, 8), sample_indices(parent_run, 8))  # factors' sample too


def test_branch_changes_tau_and_estimator(parent, tmp_path):
    run = Run.branch(parent, tmp_path / "t", {"hyper": {"tau": 10.0, "estimator": "disarm", "hit": "per_step"}},
                     at=10)
    run.train(12, progress=False)
    assert run.parent["changed"] == {"tau": 10.0, "estimator": "disarm", "hit": "per_step"}
    assert read_log(tmp_path / "t" / "log.csv")["tau"] == [10.0, 10.0]


# ----------------------------------------------------------------------------------------
# Refusals and their exit statuses


@pytest.mark.parametrize("args, status, message", [
    (["--latent", "5"], 2, "--latent 5: {a} has latent=4; a branch keeps its parent's dataset, architecture and sizes"),
    (["mnist"], 2, "--dataset mnist: {a} has dataset=synthetic-dsprites; a branch keeps"),
    (["--channels", "3"], 2, "--channels 3: {a} has channels=2;"),
    (["--dtype", "float64"], 2, "--dtype float64: {a} has dtype=float32;"),
    (["--lambda-init", "2"], 2, "--lambda-init 2.0: sets step 0 only; a branch starts from {a}'s state at step 30"),
    (["--at", "15"], 2, "--at 15: {a} has no checkpoint at step 15; kept (checkpoints/): 10, 20, 30; latest "
                        "(checkpoint.npz): 30"),
    (["--batches", "30"], 2, "--batches 30: the branch starts at step 30"),
    (["--resume"], 2, "--from starts a new run, a branch: give its folder with --out"),
])
def test_refused_branches(parent, tmp_path, capsys, args, status, message):
    out = tmp_path / "b"
    assert main(["train", "--from", str(parent), "--out", str(out), "--quiet", *args]) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(a=parent) in err, err
    assert not out.exists()


def test_refused_branch_arguments(parent, tmp_path, capsys):
    cases = [
        (["train", "--at", "10", "--out", str(tmp_path / "x")], 2, "--at picks the checkpoint of the run to branch "
                                                                     "from: give --from RUN"),
        (["train", "--from", str(parent)], 2, "--from starts a new run, a branch: give its folder with --out"),
        (["train", "--from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], 2, "no such run folder"),
        (["train", "--from", str(tmp_path), "--out", str(tmp_path / "x")], 1, "not a refimpl run folder"),
        (["train", "--from", str(parent), "--out", str(parent), "--batches", "40"], 2, "that is the folder of"),
        (["sweep", "--at", "10", "--grid", "seed=0,1", "--out", str(tmp_path / "x")], 2, "--at picks"),
    ]
    for args, status, message in cases:
        assert main(args) == status, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x").exists()
    # a branch's folder already holding a run: a run-folder problem (exit 1); continue it with --resume
    assert main(["train", "--from", str(parent), "--at", "20", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert main(["train", "--from", str(parent), "--at", "20", "--out", str(tmp_path / "b"), "--quiet"]) == 1
    assert "already holds a run" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# History: the parent's rows 1..STEP, then the branch's own


def test_history_of_a_branch_of_a_branch(parent, tmp_path):
    b = Run.branch(parent, tmp_path / "b", {"hyper": {"gate_samples": "per_example"}}, at=20)
    b.train(progress=False)  # 21..30, keeping 30 (the parent's keep_checkpoints)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000030.npz"]
    c = Run.branch(tmp_path / "b", tmp_path / "c", {"seed": 1}, at=30, schedule=Schedule(34))
    assert [(p.name, s) for p, s in branch.lineage(tmp_path / "c")] == [("a", 20), ("b", 30), ("c", None)]
    history = runread.load_history(tmp_path / "c")
    assert history["step"].tolist() == list(range(1, 31))  # c has no rows yet
    c.train(progress=False)
    history = runread.load_history(tmp_path / "c")
    assert history["step"].tolist() == list(range(1, 35))
    expected = (rows(parent / "log.csv")[1:21] + rows(tmp_path / "b" / "log.csv")[1:]
                + rows(tmp_path / "c" / "log.csv")[1:])
    header = rows(parent / "log.csv")[0].split(",")
    got = [",".join(str(v) for v in values) for values in zip(*(history[c] for c in header))]
    assert got == [",".join(str(float(v)) for v in line.split(",")) for line in expected]


def test_history_errors(parent, tmp_path):
    b = Run.branch(parent, tmp_path / "b", {}, at=20)
    b.train(22, progress=False)
    # the parent's log cut short before the branch step
    short = tmp_path / "short"
    short.mkdir()
    for name in ("config.json", "checkpoint.npz"):
        (short / name).write_bytes((parent / name).read_bytes())
    (short / "log.csv").write_text("\n".join((parent / "log.csv").read_text().splitlines()[:16]) + "\n")
    record = json.loads((tmp_path / "b" / "config.json").read_text())
    record["parent"]["run"] = "../short"
    (tmp_path / "b" / "config.json").write_text(json.dumps(record))
    with pytest.raises(LogError, match=r"short/log.csv: rows 1-20 belong to the history of .*b, but the log ends at "
                                       r"step 15 before it"):
        branch.read_history(tmp_path / "b")
    record["parent"]["run"] = "../gone"
    (tmp_path / "b" / "config.json").write_text(json.dumps(record))
    with pytest.raises(FileNotFoundError, match=r"b is a branch of .*gone at step 20, which is not there"):
        runread.load_history(tmp_path / "b")
    record["parent"]["run"] = "."
    (tmp_path / "b" / "config.json").write_text(json.dumps(record))
    with pytest.raises(LogError, match="its parents loop back"):
        branch.read_history(tmp_path / "b")


def test_milestones_and_plot_of_a_branch(parent, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["train", "--from", str(parent), "--at", "20", "--out", str(out), "--quiet", "--hit", "per_step",
                 "--tau", "30"]) == 0
    assert main(["milestones", str(out), "--json", "--tail", "5"]) == 0
    m = json.loads((out / "milestones.md").read_text())
    history = runread.load_history(out)
    assert m["batches"] == 30 and m["tau"] == 30
    assert m["lambda_first"] == history["lambda_eff"][0] == read_log(parent / "log.csv")["lambda_eff"][0]
    assert m["tail"]["E2_mean"] == pytest.approx(numpy.mean(read_log(out / "log.csv")["E2"][-5:]))
    pytest.importorskip("matplotlib")
    assert main(["plot", str(out), "--count", "0"]) == 0 and (out / "plot.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------
# log.csv.gz


def test_pack_log_is_reproducible_and_read_in_place_of_log_csv(parent, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    for name in ("config.json", "checkpoint.npz", "log.csv"):
        (out / name).write_bytes((parent / name).read_bytes())
    with open(out / "log.csv", "a") as f:
        f.write("31,1.5")  # a torn row being written: left out
    assert main(["pack-log", str(out)]) == 0
    assert f"{out / 'log.csv.gz'}: 30 rows" in capsys.readouterr().out
    packed = (out / "log.csv.gz").read_bytes()
    assert packed[4:8] == b"\0\0\0\0" and not packed[3] & 0x08  # mtime 0, no file name
    assert gzip.decompress(packed) == (parent / "log.csv").read_bytes()
    pack_log(out / "log.csv")
    assert (out / "log.csv.gz").read_bytes() == packed
    (out / "log.csv").unlink()
    assert read_log(out / "log.csv") == read_log(parent / "log.csv")
    assert main(["milestones", str(out), "--json"]) == 0
    assert json.loads((out / "milestones.md").read_text())["batches"] == 30
    assert main(["pack-log", str(tmp_path / "nothing")]) == 1
    assert "no such file; nothing to pack" in capsys.readouterr().err
    (out / "log.csv.gz").write_bytes(b"not gzip")
    with pytest.raises(LogError, match=r"log.csv.gz: not a readable gzip file"):
        read_log(out / "log.csv")


def test_resume_from_log_csv_gz_alone(tmp_path):
    """A fresh clone holds log.csv.gz but no log.csv: resume restores it, cuts it to the checkpoint, trains on."""
    reference = train_parent(tmp_path / "ref", batches=20, keep=0)
    out = train_parent(tmp_path / "r", batches=10, keep=0)
    with open(out / "log.csv", "a") as f:
        f.write("11,2.0,3.0\n")  # a row after the checkpoint (a killed run's), packed with the rest
    pack_log(out / "log.csv")
    (out / "log.csv").unlink()
    run = open_run(out, {}, resume=True)
    assert read_log(out / "log.csv")["step"] == list(range(1, 11))  # restored, then cut back to the checkpoint
    run.train(20, progress=False)
    assert_same_state(out / "checkpoint.npz", reference / "checkpoint.npz")
    assert rows(out / "log.csv") == rows(reference / "log.csv")


def test_resume_of_a_branch_from_its_gz_log(parent, tmp_path):
    """A branch stopped at 25, committed as log.csv.gz, resumed to 30: as if never stopped; its log keeps 21..30."""
    whole = Run.branch(parent, tmp_path / "whole", {"hyper": {"e1_batchnorm": "running"}}, at=20)
    whole.train(progress=False)
    cut = Run.branch(parent, tmp_path / "cut", {"hyper": {"e1_batchnorm": "running"}}, at=20)
    cut.train(25, progress=False)
    pack_log(tmp_path / "cut" / "log.csv")
    (tmp_path / "cut" / "log.csv").unlink()
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume", "--batches", "30", "--quiet"]) == 0
    assert_same_state(tmp_path / "cut" / "checkpoint.npz", tmp_path / "whole" / "checkpoint.npz")
    assert rows(tmp_path / "cut" / "log.csv") == rows(tmp_path / "whole" / "log.csv")
    assert read_log(tmp_path / "cut" / "log.csv")["step"] == list(range(21, 31))


def test_verify_log_of_a_branch(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("step,E2\n" + "".join(f"{s},1.0\n" for s in (21, 22, 24, 25)))
    with pytest.raises(LogError, match=r"line 4: step 24 where step 23 belongs; the checkpoint is at step 25, so "
                                       r"rows 21-25 must be there, but row 23 is missing"):
        verify_log(path, 25, first_step=20)
    assert verify_log(path, 22, first_step=20) == [] and read_log(path)["step"] == [21, 22]
    assert verify_log(path, 20, first_step=20) == [] and path.read_text() == "step,E2\n"


# ----------------------------------------------------------------------------------------
# A sweep of branches


def test_sweep_of_branches(parent, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--from", str(parent), "--at", "20", "--grid", "gate_samples=batch,per_example", "--batches", "24",
            "--eval-images", "8", "--blas-threads", "0", "--quiet", "--out", str(out)]
    assert main(args) == 0
    runs = {name: out / "runs" / f"gate_samples{name}" for name in ("batch", "per_example")}
    for name, folder in runs.items():
        record = json.loads((folder / "config.json").read_text())["parent"]
        changed = {} if name == "batch" else {"gate_samples": "per_example"}
        assert branch.parent_folder(folder, record).resolve() == parent.resolve()
        assert (record["step"], record["changed"]) == (20, changed)
        assert read_log(folder / "log.csv")["step"] == [21, 22, 23, 24]
    assert rows(runs["batch"] / "log.csv")[1:] == rows(parent / "log.csv")[21:25]  # no change: the parent's steps
    before = {name: (folder / "log.csv").read_text() for name, folder in runs.items()}
    assert main(args) == 0  # again: reused, nothing retrained
    assert {name: (folder / "log.csv").read_text() for name, folder in runs.items()} == before
    # a grid point's folder holding a branch of another step is a conflict (exit 1), not reused
    capsys.readouterr()
    assert main([*args[:3], "--at", "10", *args[5:]]) == 1
    assert "holds a run with other settings (a branch of" in capsys.readouterr().err
    # every point is checked before any run starts
    assert main(["sweep", "--from", str(parent), "--grid", "latent=4,5", "--batches", "40", "--blas-threads", "0",
                 "--quiet", "--out", str(tmp_path / "bad")]) == 2
    assert "--latent 5: " in capsys.readouterr().err and not (tmp_path / "bad" / "runs").exists()
