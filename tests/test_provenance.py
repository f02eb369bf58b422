"""refimpl.provenance: sessions.jsonl says under what each training session of a run ran."""

import json

from refimpl import provenance
from refimpl.cli import main as cli_main
from refimpl.execution import Execution

TINY = ["--image-size", "16", "--latent", "3", "--holdout", "100", "--tau", "1", "--quiet"]


def test_each_session_is_recorded_with_its_steps_and_execution(tmp_path):
    run = tmp_path / "run"
    assert cli_main(["train", "--batches", "3", "--out", str(run), *TINY]) == 0
    assert cli_main(["train", "--batches", "5", "--out", str(run), "--resume", "--reference", "--quiet"]) == 0
    assert cli_main(["train", "--batches", "5", "--out", str(run), "--resume", "--quiet"]) == 0  # nothing to train
    first, second = provenance.read(run)  # the third call trained no batch and records nothing
    assert (first["from_step"], first["target"], second["from_step"], second["target"]) == (0, 3, 3, 5)
    assert first["execution"] == Execution().resolve("numpy").to_dict()
    assert second["execution"] == Execution(reference=True).resolve("numpy").to_dict()
    assert second["execution"]["decoder_passes"] == "sequential" and not second["threads"]["parallel_passes"]
    for s in (first, second):
        assert s["backend"] == "numpy" and s["versions"]["refimpl"] and s["versions"]["numpy"]
        assert all("num_threads" in lib for lib in s["blas"]) and s["started"].endswith("+00:00")
        assert s["git"] is None or (len(s["git"]["commit"]) == 40 and isinstance(s["git"]["dirty"], bool))
    lines = (run / "sessions.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [first, second]


def test_a_branch_records_its_own_sessions_and_overwrite_removes_them(tmp_path):
    parent, child = tmp_path / "parent", tmp_path / "child"
    assert cli_main(["train", "--batches", "2", "--out", str(parent), *TINY]) == 0
    assert cli_main(["train", "--from", str(parent), "--batches", "4", "--out", str(child), "--quiet"]) == 0
    assert [s["from_step"] for s in provenance.read(child)] == [2]
    assert [s["from_step"] for s in provenance.read(parent)] == [0]
    assert cli_main(["train", "--batches", "1", "--out", str(parent), "--overwrite", *TINY]) == 0
    assert [(s["from_step"], s["target"]) for s in provenance.read(parent)] == [(0, 1)]


def test_git_outside_a_checkout_is_none(tmp_path):
    assert provenance.git_commit.__wrapped__(tmp_path) is None
    assert provenance.read(tmp_path) == []
