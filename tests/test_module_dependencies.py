"""Which modules a module pulls in: the exit rules import no command, and reading a run's log builds no run."""

import subprocess
import sys

import pytest

COMMANDS = ("refimpl.training", "refimpl.sweep", "refimpl.trace", "refimpl.plot", "refimpl.evaluate",
            "refimpl.factors", "refimpl.milestones", "refimpl.study", "refimpl.cli",
            "refimpl.commands.train", "refimpl.commands.evaluate", "refimpl.commands.experiment")


def imported_by(module: str) -> set:
    """The refimpl modules a fresh interpreter has loaded after importing ``module``."""
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('refimpl')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_exit_rules_import_no_command():
    loaded = imported_by("refimpl.exits")
    assert "refimpl.errors" in loaded and not loaded & set(COMMANDS)


@pytest.mark.parametrize("module", ["refimpl.milestones", "refimpl.study", "refimpl.runread"])
def test_log_analysis_does_not_import_the_training_loop(module):
    loaded = imported_by(module)
    assert "refimpl.runread" in loaded and not loaded & {"refimpl.training", "refimpl.plot", "refimpl.device_step"}
