"""Run folders that never lose, mix or orphan a run (issue 11): the batch target from step 0,
log.csv checked against the checkpoint on resume (--repair-log), one process per run (the
lock), --out that is not a run, --overwrite removing every file of the old run, and errors
that name the file."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

from refimpl import checkpoint as ckpt
from refimpl import factors, figures, plot, runfolder
from refimpl.atomic import atomic_write
from refimpl.cli import main
from refimpl.config import RunConfig
from refimpl.runfolder import RUN_FILES, RunLock, RunLocked
from refimpl.runlog import LogError, read_log
from refimpl.runopen import open_run
from refimpl.training import Run

TINY = dict(image_size=8, channels=(2,), batch_size=8, latent=4, holdout=16)
TINY_ARGS = ["--image-size", "8", "--channels", "2", "--batch-size", "8", "--latent", "4", "--holdout", "16",
             "--tau", "40", "--quiet"]
GIVEN = {**TINY, "hyper": {"tau": 40.0}}


def cli(*args, **kw):
    """``python -m refimpl ARGS`` in a subprocess: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "refimpl", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kw)
    return proc.returncode, proc.stdout, proc.stderr


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tiny_run(out, batches=20, checkpoint_every=5) -> Path:
    Run.create(RunConfig(**TINY, hyper={"tau": 40.0}), out).train(batches, checkpoint_every, progress=False)
    return Path(out)


def snapshot(folder) -> dict:
    """Every file's bytes but the lock's (which records its last holder)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != runfolder.LOCK_FILE}


def wait_for(predicate, proc=None, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc is None or proc.poll() is None, proc.stderr.read() if proc.stderr else "process ended"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


# ----------------------------------------------------------------------------------------
# 1. the batch target is kept from the step-0 checkpoint on


def test_a_run_killed_before_its_first_periodic_checkpoint_resumes_to_its_target(tmp_path):
    out = tmp_path / "R"
    proc = subprocess.Popen([sys.executable, "-m", "refimpl", "train", *TINY_ARGS, "--batches", "600",
                             "--checkpoint-every", "50", "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "checkpoint.npz").exists(), proc)
        proc.send_signal(signal.SIGKILL)  # right after the first checkpoint appears
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    meta = ckpt.load(out / "checkpoint.npz")[1]
    assert meta["step"] < 50 and meta["target_batches"] == 600 and meta["checkpoint_every"] == 50
    code, printed, err = cli("train", "--out", out, "--resume", "--quiet")
    assert code == 0, err
    assert f"at batch {meta['step']} of 600" in printed
    meta = ckpt.load(out / "checkpoint.npz")[1]
    assert (meta["step"], meta["target_batches"], meta["checkpoint_every"]) == (600, 600, 50)
    assert read_log(out / "log.csv")["step"] == list(range(1, 601))


# ----------------------------------------------------------------------------------------
# 2. log.csv must hold every row up to the checkpoint


def test_an_emptied_log_is_refused_and_nothing_changes(tmp_path):
    out = tiny_run(tmp_path / "R")
    (out / "log.csv").write_bytes(b"")
    before = snapshot(out)
    code, _, err = cli("train", "--out", out, "--resume", "--batches", "25")
    line = one_error_line(err)
    assert code == 1 and f"{out / 'log.csv'}: empty" in line and "row 1 is missing" in line and "--overwrite" in line
    code, _, err = cli("train", "--out", out, "--resume", "--batches", "25", "--repair-log")
    assert code == 1 and "cannot be rebuilt (not even by --repair-log)" in one_error_line(err)
    assert snapshot(out) == before  # the checkpoint and the (empty) log are as they were
    (out / "log.csv").unlink()
    with pytest.raises(LogError, match="log.csv: no such file"):
        open_run(out, {}, resume=True)


def test_a_damaged_row_is_refused_with_its_line_number(tmp_path):
    out = tiny_run(tmp_path / "R")
    lines = (out / "log.csv").read_text().splitlines(keepends=True)
    lines[7] = "garbage\n"  # row 7 (line 8) replaced: it cannot be rebuilt
    (out / "log.csv").write_text("".join(lines))
    before = snapshot(out)
    for repair in (False, True):
        with pytest.raises(LogError) as info:
            open_run(out, {}, resume=True, repair_log=repair)
        message = str(info.value)
        assert message.startswith(f"{out / 'log.csv'} line 8: 1 field, expected ") and "row 7 is missing" in message
        assert "--overwrite" in message and len(message.splitlines()) == 1
    assert snapshot(out) == before
    run = open_run(out, GIVEN, overwrite=True)  # what the message offers: start afresh
    assert run.state.step == 0 and not (out / "log.csv").exists()
    run.close()


def test_an_extra_garbage_line_needs_repair_log_which_keeps_every_row(tmp_path):
    reference = tiny_run(tmp_path / "reference", batches=30)
    out = tiny_run(tmp_path / "R")
    lines = (out / "log.csv").read_text().splitlines(keepends=True)
    lines[5:5] = ["1,2,oops\n"]  # inserted before row 5: every row is still there
    lines[12:12] = [lines[11]]  # and row 10 twice
    (out / "log.csv").write_text("".join(lines))
    code, _, err = cli("train", "--out", out, "--resume", "--batches", "30")
    line = one_error_line(err)
    assert code == 1 and f"{out / 'log.csv'} line 6: 3 fields" in line and "--repair-log to drop lines 6, 13" in line
    code, printed, err = cli("train", "--out", out, "--resume", "--batches", "30", "--repair-log")
    assert code == 0, err
    assert "repaired" in printed and "dropped line(s) 6, 13" in printed
    repaired, expected = read_log(out / "log.csv"), read_log(reference / "log.csv")
    assert repaired["step"] == list(range(1, 31))
    repaired.pop("seconds"), expected.pop("seconds")
    assert repaired == expected


def test_rows_after_the_checkpoint_and_a_torn_line_are_still_dropped_silently(tmp_path):
    out = tiny_run(tmp_path / "R", batches=12, checkpoint_every=12)
    arrays, meta = ckpt.load(out / "checkpoint.npz")
    ckpt.save(out / "checkpoint.npz", arrays, {**meta, "step": 9})  # as if killed 3 rows after step 9's checkpoint
    with open(out / "log.csv", "a") as f:
        f.write("13,0.5,")  # torn
    run = open_run(out, {}, resume=True)
    assert read_log(out / "log.csv")["step"] == list(range(1, 10)) and run.repaired_lines == []
    run.close()


# ----------------------------------------------------------------------------------------
# 3. one process per run folder


def test_a_second_process_is_refused_while_read_only_commands_work(tmp_path, capsys):
    out = tmp_path / "R"
    proc = subprocess.Popen([sys.executable, "-m", "refimpl", "train", *TINY_ARGS, "--batches", "100000",
                             "--checkpoint-every", "7", "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "log.csv").is_file() and len((out / "log.csv").read_text().splitlines()) > 10, proc)
        assert (out / ".lock").read_text().strip() == str(proc.pid)
        for argv in (["train", "--out", str(out), "--resume"], ["train", *TINY_ARGS, "--out", str(out), "--overwrite"]):
            assert main(argv) == 1
            line = one_error_line(capsys.readouterr().err)
            assert f"{out} is in use by another refimpl process (PID {proc.pid})" in line
        assert (out / "checkpoint.npz").is_file() and (out / "log.csv").is_file()  # --overwrite deleted nothing
        for argv in (["evaluate", str(out), "--limit", "4"], ["export", str(out)],
                     ["reconstruct", str(out), "--count", "3"], ["plot", str(out)]):
            if argv[0] != "plot" or figures.pyplot() is not None:
                assert main(argv) == 0, argv  # read-only commands read the last complete checkpoint
        with pytest.raises(RunLocked):
            open_run(out, {}, resume=None)  # the experiments' and sweeps' way in
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        step = ckpt.load(out / "checkpoint.npz")[1]["step"]
        run = open_run(out, {}, resume=True)  # no stale lock after a SIGKILL
        run.train(step + 2, progress=False)
        assert read_log(out / "log.csv")["step"] == list(range(1, step + 3))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()


def holds_lock_elsewhere(folder) -> bool:
    """Whether another process could take ``folder``'s lock now."""
    code = ("import sys; from refimpl.runfolder import RunLock, RunLocked\n"
            f"try: RunLock({str(folder)!r}).acquire()\nexcept RunLocked: sys.exit(3)")
    return subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 3


def test_the_lock_is_reentrant_in_one_process_and_released_after_training(tmp_path):
    out = tmp_path / "R"
    run = Run.create(RunConfig(**TINY, hyper={"tau": 40.0}), out)
    assert holds_lock_elsewhere(out)
    again = open_run(out, {}, resume=True)  # the same process: no deadlock, no refusal
    again.close()
    assert holds_lock_elsewhere(out)  # still held by `run`
    run.train(3, progress=False)
    assert not holds_lock_elsewhere(out)  # released at the end of train
    with Run.load(out) as loaded:  # opened for training: held until closed
        assert holds_lock_elsewhere(out)
        assert loaded.state.step == 3
    assert not holds_lock_elsewhere(out)


# ----------------------------------------------------------------------------------------
# 4. --out that is not a run; refimpl deletes only its own files


def test_a_folder_that_is_not_a_run_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "log.csv").write_text("my own log")
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        code, _, err = cli("train", *TINY_ARGS, "--batches", "2", "--out", out, *extra)
        line = one_error_line(err)
        assert code == 1 and f"{out} is not empty and holds no refimpl run (log.csv, notes.txt)" in line
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["log.csv", "notes.txt"]
    file = tmp_path / "file"
    file.write_text("data")
    code, _, err = cli("train", *TINY_ARGS, "--batches", "2", "--out", file)
    assert code == 1 and f"{file} is a file, not a folder" in one_error_line(err)
    assert file.read_text() == "data"


def test_leftovers_of_a_cut_short_creation_are_reused_and_foreign_temporaries_kept(tmp_path):
    out = tmp_path / "R"
    out.mkdir()
    # killed before step 0's checkpoint: refimpl's config.json, the lock file and a temporary
    (out / "config.json").write_text(json.dumps({"config": {}, "architecture": {}}))
    (out / ".lock").write_text("12345\n")
    (out / ".tmp-checkpoint.npz.abcd1234").write_bytes(b"half")
    run = open_run(out, GIVEN, resume=None)
    assert not (out / ".tmp-checkpoint.npz.abcd1234").exists()
    run.train(3, progress=False)
    foreign = [".tmp-notes.txt.abcd1234", ".tmp-checkpoint.npz.mine", ".tmp-mine"]
    for name in foreign:
        (out / name).write_text("not refimpl's")
    (out / ".tmp-log.csv.zz99_x0q").write_text("refimpl's")
    open_run(out, {}, resume=True).train(4, progress=False)
    assert all((out / name).exists() for name in foreign) and not (out / ".tmp-log.csv.zz99_x0q").exists()


# ----------------------------------------------------------------------------------------
# 5. --overwrite removes every file of the old run, and only those


def test_overwrite_removes_the_old_runs_derived_files_and_only_those(tmp_path, capsys):
    if figures.pyplot() is None:
        pytest.skip("needs matplotlib (refimpl plot)")
    out = tiny_run(tmp_path / "R")
    for argv in (["evaluate", out, "--limit", "4"], ["export", out], ["reconstruct", out, "--count", "2"],
                 ["plot", out], ["factors", out, "--count", "16"]):
        assert main([str(a) for a in argv]) == 0, argv
    (out / "notes.txt").write_text("mine")
    made = {p.name for p in out.iterdir()}
    assert {"eval.json", "export", "reconstructions.png", "plot.png", "factors.json", "summary.json"} <= made
    assert main(["train", *TINY_ARGS, "--batches", "2", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["checkpoint.npz", "config.json", "log.csv", "notes.txt",
                                                            "plot.png", "sessions.jsonl", "summary.json"])
    assert ckpt.load(out / "checkpoint.npz")[1]["step"] == 2 and read_log(out / "log.csv")["step"] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine"
    # export/ holding a file of the user's: refimpl's files go, the user's stays
    assert main(["export", str(out)]) == 0
    (out / "export" / "README").write_text("mine")
    assert main(["train", *TINY_ARGS, "--batches", "1", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "export").iterdir()) == ["README"]


def test_run_files_name_every_file_the_commands_write():
    assert {plot.PLOT_FILE, factors.JSON_FILE, factors.PNG_FILE} <= set(RUN_FILES)
    assert RUN_FILES[-2:] == ("checkpoint.npz", "config.json")  # removed last: a cut-short overwrite still reads right


def test_export_writes_only_into_its_own_folder(tmp_path, capsys):
    out = tiny_run(tmp_path / "R", batches=2)
    target = tmp_path / "models"
    target.mkdir()
    (target / "model.npz").write_bytes(b"my model")
    (target / "other.txt").write_text("mine")
    assert main(["export", str(out), "--out", str(target)]) == 1
    assert "holds other files (other.txt)" in one_error_line(capsys.readouterr().err)
    assert (target / "model.npz").read_bytes() == b"my model"
    assert main(["export", str(out), "--out", str(tmp_path / "new")]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "new")]) == 0  # its own files: replaced


# ----------------------------------------------------------------------------------------
# 10. errors name the file, with exit status 1


def test_a_full_disk_names_the_target_and_leaves_no_temporary(tmp_path):
    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as file.write raises it: no file name

    target = tmp_path / "checkpoint.npz"
    with pytest.raises(OSError) as info:
        atomic_write(target, full)
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == f"[Errno {errno.ENOSPC}] cannot write {target}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def read_only_folder(tmp_path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    return Path("/sys/kernel")  # root writes anywhere but into sysfs


def test_a_read_only_folder_names_the_target_not_the_temporary(tmp_path):
    folder = read_only_folder(tmp_path)
    with pytest.raises(PermissionError) as info:
        atomic_write(folder / "eval.json", lambda f: f.write(b"{}"))
    assert str(info.value) == f"[Errno {errno.EACCES}] cannot write {folder / 'eval.json'}: Permission denied"


def test_a_misshapen_checkpoint_exits_1_naming_the_file_and_array(tmp_path, capsys):
    out = tiny_run(tmp_path / "R", batches=2)
    arrays, meta = ckpt.load(out / "checkpoint.npz")
    bad = {**arrays, "model/encoder.conv1.weight": numpy.zeros((3, 3))}
    ckpt.save(out / "checkpoint.npz", bad, meta)
    expected = (f"checkpoint {out / 'checkpoint.npz'}: 'model/encoder.conv1.weight' is float64 of shape (3, 3), "
                "the run's model needs floats of shape (2, 1, 4, 4)")
    for argv in (["evaluate", str(out)], ["train", "--out", str(out), "--resume", "--batches", "3"]):
        assert main(argv) == 1
        assert one_error_line(capsys.readouterr().err).endswith(expected)
    ckpt.save(out / "checkpoint.npz", {k: v for k, v in arrays.items() if k != "adam/v/gamma"}, meta)
    assert main(["evaluate", str(out)]) == 1
    assert "no array 'adam/v/gamma', which the run's model needs" in capsys.readouterr().err
    ckpt.save(out / "checkpoint.npz", arrays, {k: v for k, v in meta.items() if k != "train_rng"})
    assert main(["evaluate", str(out)]) == 1
    assert "meta has no 'train_rng'" in capsys.readouterr().err


def test_lock_file_records_the_holder_and_releases_on_close(tmp_path):
    lock = RunLock(tmp_path).acquire()
    assert (tmp_path / runfolder.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert holds_lock_elsewhere(tmp_path)
    lock.release()
    lock.release()  # idempotent
    assert not holds_lock_elsewhere(tmp_path) and not (tmp_path / runfolder.LOCK_FILE).exists()
