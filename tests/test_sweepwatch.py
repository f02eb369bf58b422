"""The sweep's status board (refimpl/sweepwatch.py) on fake logs and a fake clock: row counting,
done / running / waiting, speeds and ETAs, and what a terminal and a log file receive."""

import io
import math

from refimpl.sweepwatch import LogRows, StatusBoard, SweepWatch


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_log_rows_counts_what_was_added_and_starts_over_when_cut(tmp_path):
    path = tmp_path / "log.csv"
    rows = LogRows(path)
    assert rows() == 0  # no log yet
    path.write_text("step,E2\n")
    assert rows() == 0
    with open(path, "a") as f:
        f.write("1,0.5\n2,0.4\n3,0.3")  # a row being written: not counted until its newline
    assert rows() == 2
    with open(path, "a") as f:
        f.write("\n4,0.2\n")
    assert rows() == 4
    path.write_text("step,E2\n1,0.5\n")  # cut back (a resume) or rewritten
    assert rows() == 1


def test_log_rows_of_a_branch_count_from_its_parents_step(tmp_path):
    """A branch's log holds only its own rows, from the parent's step + 1: the count is the batches done."""
    path = tmp_path / "log.csv"
    rows = LogRows(path)
    path.write_text("step,E2\n500")  # the first row (5001), still being written
    assert rows() == 0
    with open(path, "a") as f:
        f.write("1,0.5\n5002,0.4\n")
    assert rows() == 5002
    with open(path, "a") as f:
        f.write("5003,0.3\n")
    assert rows() == 5003


def fake_runs(clock, targets, start=None):
    """A watch over runs whose row counts are set by hand: (watch, counts)."""
    watch, counts = SweepWatch(clock=clock), {}
    for i, target in enumerate(targets):
        key = f"run{i}"
        counts[key] = (start or {}).get(key, 0)
        watch.add(key, f"tau{i}", target, lambda key=key: counts[key])
    return watch, counts


def test_runs_are_waiting_until_their_log_moves_then_running_with_a_speed_and_eta():
    clock = Clock()
    watch, counts = fake_runs(clock, [100, 100, 100], start={"run2": 40})  # run2 resumes at 40
    watch.poll()
    assert watch.counts() == (0, 0, 3) and math.isnan(watch.eta())
    clock.now, counts["run0"], counts["run1"] = 10.0, 5, 2
    watch.poll()
    assert watch.counts() == (0, 2, 1)  # run2's old rows are not progress
    assert math.isnan(watch.runs["run0"].rate)  # one sighting of movement: no speed yet
    clock.now, counts["run0"], counts["run1"] = 20.0, 25, 12
    watch.poll()
    assert watch.runs["run0"].rate == 2.0 and watch.runs["run0"].eta == 75 / 2.0
    assert watch.runs["run1"].rate == 1.0 and watch.runs["run1"].eta == 88.0
    assert watch.eta() == (75 + 88 + 60) / 3.0  # every batch left, at the running runs' summed speed
    watch.finished("run0")
    counts["run0"] = 0  # a finished run is no longer read
    watch.poll()
    assert watch.counts() == (1, 1, 1)
    assert watch.summary() == "sweep: 1/3 runs done, 1 running, 1 waiting; 152/300 batches; ETA 0:02:28"
    assert watch.lines()[1:] == ["  tau1  12/100 batches  1.0 batch/s  ETA 0:01:28"]
    for key in ("run1", "run2"):
        watch.finished(key)
    assert watch.eta() == 0.0 and watch.counts() == (3, 0, 0)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_the_block_redrawn_in_place_and_finished_runs_above_it():
    clock = Clock()
    watch, counts = fake_runs(clock, [10, 10])
    screen = Terminal()
    board = StatusBoard(watch, stream=screen, redraw=1.0)
    board.update(force=True)
    assert screen.getvalue() == "sweep: 0/2 runs done, 0 running, 2 waiting; 0/20 batches; ETA ?\n"
    clock.now, counts["run0"] = 0.5, 3
    board.update()  # too soon: nothing drawn
    assert screen.getvalue().count("\n") == 1
    clock.now = 1.0
    board.update()
    clock.now, counts["run0"] = 2.0, 5
    board.update()
    text = screen.getvalue()
    assert text.endswith("\x1b[2F\x1b[Jsweep: 0/2 runs done, 1 running, 1 waiting; 5/20 batches; ETA 0:00:08\n"
                         "  tau0  5/10 batches  2.0 batch/s  ETA 0:00:02\n")
    board.say("done tau0")
    assert screen.getvalue().endswith("\x1b[2F\x1b[Jdone tau0\n")  # the block erased, the line kept
    board.close()
    assert screen.getvalue().endswith("done tau0\n")  # nothing left to erase


def test_a_log_file_gets_a_summary_line_every_interval_and_quiet_gets_nothing():
    clock = Clock()
    watch, counts = fake_runs(clock, [10])
    out = io.StringIO()
    board = StatusBoard(watch, stream=out, interval=30.0)
    board.update(force=True)
    clock.now, counts["run0"] = 20.0, 4
    board.update()
    clock.now = 30.0
    board.update()
    board.say("done tau0")
    assert "\x1b" not in out.getvalue()
    assert out.getvalue().splitlines() == ["sweep: 0/1 runs done, 0 running, 1 waiting; 0/10 batches; ETA ?",
                                           "sweep: 0/1 runs done, 1 running, 0 waiting; 4/10 batches; ETA ?",
                                           "done tau0"]
    quiet = io.StringIO()
    board = StatusBoard(watch, stream=quiet, enabled=False)
    board.update(force=True)
    board.say("done")
    assert quiet.getvalue() == ""
