"""Every exit path of every command against the rule of refimpl/exits.py and docs/cli.md:
2 when the command line itself is wrong, 1 when what it points at (a run folder, a file,
a dataset, the backend) is; always one line ``refimpl COMMAND: error: ...``."""

import pytest

from refimpl.cli import main

TINY = ["--image-size", "8", "--channels", "2", "--batch-size", "8", "--latent", "4", "--holdout", "16"]
USAGE, FAILURE = 2, 1


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """RUN: a run of 3 batches; NOTRUN: a folder with a file of the user's; FILE: a text file; TRACE: a trace;
    MISSING: nothing."""
    root = tmp_path_factory.mktemp("exits")
    assert main(["train", *TINY, "--quiet", "--tau", "40", "--batches", "3", "--out", str(root / "run")]) == 0
    assert main(["trace", *TINY, "--tau", "40", "--steps", "1", "--out", str(root / "trace.npz")]) == 0
    (root / "notrun").mkdir()
    (root / "notrun" / "notes.txt").write_text("mine\n")
    (root / "file.txt").write_text("hello\n")
    return {"RUN": root / "run", "NOTRUN": root / "notrun", "FILE": root / "file.txt", "TRACE": root / "trace.npz",
            "MISSING": root / "missing"}


# (argv with placeholders, exit status, a fragment of the one error line); each is run in an empty folder,
# where nothing may be created.
CASES = {
    "train": [
        (["--tua", "3"], USAGE, "refimpl train: error: unrecognized option --tua; did you mean --tau?"),
        (["dsprites", "--tua", "3"], USAGE, "refimpl train: error: unrecognized option --tua; did you mean --tau?"),
        (["--lambda_mx=3"], USAGE, "unrecognized option --lambda_mx; did you mean --lambda-max?"),
        (["dsprites", "extra"], USAGE, "refimpl train: error: unrecognized arguments: extra"),
        (["--batches", "0"], USAGE, "--batches: expected a positive integer, got 0"),
        (["--tau", "-1"], USAGE, "tau=-1.0"),
        (["--alpha", "1.5"], USAGE, "alpha=1.5"),
        (["--error", "mse"], USAGE, "invalid choice: 'mse'"),
        (["--latent", "0"], USAGE, "positive integer"),
        (["--channels", "4,x"], USAGE, "comma-separated integers"),
        (["--image-size", "24"], USAGE, "image_size=24"),
        (["--channels", "4,4"], USAGE, "expected 4 positive widths"),
        (["--data", "somewhere"], USAGE, "takes no path"),
        (["--baseline", "--tau", "3"], USAGE, "--baseline trains with tau=0"),
        (["--resume", "--overwrite"], USAGE, "exclude each other"),
        (["--repair-log"], USAGE, "--repair-log repairs the log of a run being resumed: add --resume"),
        (["--resume", "--out", "RUN", "--tau", "30"], USAGE, "tau=30.0 (the run has 40.0)"),
        (["--resume", "--out", "RUN", "--batches", "2"], USAGE, "this run has already done 3 batches"),
        (["mnist", "--data", "/nonexistent/mnist"], FAILURE, "MNIST file not found"),
        (["--resume"], FAILURE, "nothing to resume"),
        (["--resume", "--out", "NOTRUN"], FAILURE, "nothing to resume"),
        ([*TINY, "--tau", "40", "--out", "RUN"], FAILURE, "already holds a run"),
        ([*TINY, "--out", "NOTRUN"], FAILURE, "holds no refimpl run (notes.txt)"),
        ([*TINY, "--out", "FILE"], FAILURE, "is a file, not a folder"),
    ],
    "evaluate": [
        ([], USAGE, "required: RUN"),
        (["RUN", "--limit", "0"], USAGE, "--limit: expected a positive integer"),
        (["MISSING"], FAILURE, "missing: no such run folder or checkpoint"),
        (["NOTRUN"], FAILURE, "holds no checkpoint.npz"),
        (["FILE"], FAILURE, "not a .npz file (a zip archive of arrays): it holds text ('hello' ...)"),
    ],
    "export": [
        (["MISSING"], FAILURE, "no such run folder or checkpoint"),
        (["RUN", "--out", "FILE"], FAILURE, "is a file, not a folder"),
        (["RUN", "--out", "NOTRUN"], FAILURE, "holds other files (notes.txt)"),
    ],
    "reconstruct": [
        (["RUN", "--count", "300"], USAGE, "--count: 300 images; at most 256"),
        (["RUN", "--indices", "999999999"], USAGE, "--indices 999999999: the dataset has"),
        (["RUN", "RUN"], USAGE, "--out: several runs need an output file"),
        (["RUN", "--scale", "0"], USAGE, "--scale: expected a positive integer"),
        (["MISSING"], FAILURE, "no such run folder or checkpoint"),
    ],
    "plot": [
        (["RUN", "--count", "-1"], USAGE, "--count: expected a non-negative integer"),
        (["MISSING"], FAILURE, "no such run folder"),
        (["NOTRUN"], FAILURE, "not a refimpl run folder"),
    ],
    "factors": [
        (["RUN", "--count", "0"], USAGE, "count=0"),
        (["RUN", "--bins", "1"], USAGE, "bins=1"),
        (["RUN", "--sample", "all"], USAGE, "invalid choice: 'all'"),
        (["MISSING"], FAILURE, "no such run folder"),
        (["FILE"], FAILURE, "not a run folder"),
        (["NOTRUN"], FAILURE, "holds no checkpoint.npz"),
    ],
    "milestones": [
        (["RUN", "--tail", "0"], USAGE, "--tail: expected a positive integer"),
        (["MISSING"], FAILURE, "no such run folder"),
        (["NOTRUN"], FAILURE, "not a refimpl run folder"),
    ],
    "sweep": [
        (["--out", "x"], USAGE, "required: --grid"),
        (["--grid", "tua=1,2", "--out", "x"], USAGE, "expected NAME=V1,V2,... with NAME a run option"),
        (["--grid", "batches=1,2", "--out", "x"], USAGE, "the schedule is the same for every run"),
        (["--grid", "tau=1", "--out", "x", "--batches", "0"], USAGE, "--batches: expected a positive integer"),
        (["--grid", "image_size=24", "--out", "x"], USAGE, "image_size=24"),
        (["--grd", "tau=1", "--out", "x"], USAGE, "unrecognized option --grd; did you mean --grid?"),
        (["--grid", "tau=1", "--out", "FILE", "--batches", "1"], FAILURE, "file.txt is a file, not a folder"),
    ],
    "trace": [
        (["--steps", "0"], USAGE, "--steps: expected a positive integer"),
        (["--tua", "3"], USAGE, "unrecognized option --tua; did you mean --tau?"),
    ],
    "compare": [
        (["TRACE"], USAGE, "required: B"),
        (["TRACE", "TRACE", "--rtol", "-1"], USAGE, "--rtol: expected a finite number >= 0, got -1"),
        (["TRACE", "MISSING"], FAILURE, "missing: no such trace file"),
        (["FILE", "TRACE"], FAILURE, "file.txt: not a .npz file (a zip archive of arrays): it holds text"),
        (["RUN/checkpoint.npz", "TRACE"], FAILURE, "not a refimpl-trace file"),
    ],
    None: [
        (["frobnicate"], USAGE, "refimpl: error: argument COMMAND: invalid choice: 'frobnicate'"),
        ([], USAGE, "the following arguments are required: COMMAND"),
    ],
}


EXPERIMENT_CASES = [  # the experiment scripts end through the same parser and run_command
    ("figure2", ["--tua", "3"], USAGE, "unrecognized option --tua"),
    ("figure2", ["--batches", "0"], USAGE, "--batches: expected a positive integer, got 0"),
    ("figure1", ["--tua", "3"], USAGE, "unrecognized option --tua; did you mean --tau?"),
    ("table1", ["--latents", "x"], USAGE, "--latents"),
    ("figure3", ["--out", "FILE", "--batches", "1"], FAILURE, "file.txt is a file, not a folder"),
]


def _fill(argv, places):
    out = []
    for a in argv:
        head, sep, tail = a.partition("/")
        out.append(str(places[head]) + sep + tail if head in places else a)
    return out


@pytest.mark.parametrize("command,argv,code,fragment",
                         [(c, *case) for c, cases in CASES.items() for case in cases],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_every_exit_path_follows_the_rule(command, argv, code, fragment, places, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {p: p.read_bytes() for p in places["RUN"].iterdir()}
    full = ([command] if command else []) + _fill(argv, places)
    if command == "train" and "--batches" not in argv:
        full += ["--batches", "1"]
    try:
        result = main(full)
    except SystemExit as exc:  # argparse
        result = exc.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"refimpl {command}: error: " if command else "refimpl: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert result == code, lines[0]
    assert not list(tmp_path.iterdir())  # nothing was created here
    assert {p: p.read_bytes() for p in places["RUN"].iterdir()} == before  # nor changed in the run


def test_the_docs_state_the_rule():
    from pathlib import Path

    cli = " ".join((Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text().split())
    assert "exits 2 when the command line itself is wrong" in cli
    assert "and 1 when what it points at is wrong" in cli


@pytest.mark.parametrize("script,argv,code,fragment", EXPERIMENT_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_the_experiment_scripts_follow_the_rule(script, argv, code, fragment, places, tmp_path, capsys, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    try:
        result = importlib.import_module(f"refimpl.experiments.{script}").main(_fill(argv, places))
    except SystemExit as exc:  # argparse
        result = exc.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m refimpl.experiments.{script}: error: "), lines
    assert fragment in lines[0] and result == code, lines[0]
    assert not list(tmp_path.iterdir())
