"""One way to make a command: a module with add_arguments(parser) and run(args), listed in
refimpl.cli's table; ``train`` resolves its options to a RunConfig once."""

import pytest

from refimpl import cli, config
from refimpl.cli import main

TINY = ["--image-size", "8", "--channels", "2", "--batch-size", "8", "--latent", "3", "--holdout", "16", "--tau", "40",
        "--quiet"]


def test_every_command_is_a_module_in_the_table():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == [name for name, _ in cli.COMMANDS]
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, module in cli.COMMANDS:
        assert callable(module.add_arguments) and sub.choices[name].get_default("func") is module.run
        assert helps[name]  # the docstring's first line


@pytest.mark.parametrize("extra", [[], ["--out", "run"]], ids=["default --out", "--out"])
def test_train_resolves_its_options_once(extra, tmp_path, monkeypatch):
    from refimpl import runopen
    from refimpl.commands import train

    calls = []

    def counted(given):
        calls.append(given)
        return config.new_config(given)

    monkeypatch.setattr(train, "new_config", counted)
    monkeypatch.setattr(runopen, "new_config", counted)
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--batches", "1", *extra]) == 0
    assert len([given for given in calls if given.get("latent") == 3]) == 1  # not counting --out's help example
