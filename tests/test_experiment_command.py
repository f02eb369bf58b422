"""``refimpl experiment NAME [ARGS...]``: the same run, files and exit statuses as
``python -m refimpl.experiments.NAME [ARGS...]``, its messages named ``refimpl experiment NAME``."""

import pytest

from refimpl.cli import main
from refimpl.experiments import figure1

from test_exits import EXPERIMENT_CASES
from test_experiments import TINY


def _exit(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return exc.code


@pytest.mark.parametrize("script,argv,code,fragment", EXPERIMENT_CASES,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_the_exit_statuses_are_those_of_the_scripts(script, argv, code, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path.parent / "file.txt").write_text("hello\n")
    full = [str(tmp_path.parent / "file.txt") if a == "FILE" else a for a in argv]
    result = _exit(["experiment", script, *full])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"refimpl experiment {script}: error: "), lines
    assert fragment in lines[0] and result == code, lines[0]
    assert not list(tmp_path.iterdir())


def test_an_unknown_experiment_is_a_usage_error(capsys):
    assert _exit(["experiment", "figure9"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refimpl experiment: error: argument NAME: invalid choice: "
                                                   "'figure9'"), lines


def test_its_options_are_the_experiments(capsys):
    assert _exit(["experiment", "figure1", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: refimpl experiment figure1 ") and "--tau" in out


def test_it_writes_what_the_script_writes(tmp_path):
    argv = [*TINY, "--batches", "4", "--latent", "3", "--tau", "40"]
    assert main(["experiment", "figure1", *argv, "--out", str(tmp_path / "command")]) == 0
    assert figure1.main([*argv, "--out", str(tmp_path / "script")]) == 0
    csv = (tmp_path / "command" / "figure1.csv").read_text()  # per step: E2, gates, lambda', open gates
    assert csv == (tmp_path / "script" / "figure1.csv").read_text() and len(csv.splitlines()) == 5
