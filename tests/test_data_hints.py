"""Every loader's "file not found" hint, followed literally, puts the files where that loader looks."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from refimpl.data import DATA_ENV, DATASETS, DatasetError, DatasetNotFoundError, open_dataset

ROOT = Path(__file__).resolve().parents[1]
FETCHED = [row.name for row in DATASETS.values() if row.script]


def script_module(name: str):
    """data_scripts/<name> imported as a module (its build_parser and outputs)."""
    spec = importlib.util.spec_from_file_location(f"data_script_{Path(name).stem}", ROOT / "data_scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def follow_hint(message: str, script: str, cwd: Path) -> list[Path]:
    """The files the command in ``message`` writes, run from ``cwd``, by the script's own --out semantics."""
    match = re.search(r"download it with: python data_scripts/(\S+) (.*)$", message)
    assert match, message
    assert match.group(1) == script
    module = script_module(script)
    args = module.build_parser().parse_args(shlex.split(match.group(2)))
    return [cwd / p for p in module.outputs(args.out)]


def test_every_fetched_dataset_has_a_script():
    assert set(FETCHED) == {"dsprites", "shapes3d", "cars3d", "mnist", "cifar100"}
    for name in FETCHED:
        assert (ROOT / "data_scripts" / DATASETS[name].script).is_file()


@pytest.mark.parametrize("name", FETCHED)
@pytest.mark.parametrize("where", ["default", "data folder", "spaced folder"])
def test_the_hint_puts_the_files_where_the_loader_looks(name, where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_ENV, "data")
    path = {"default": None, "data folder": f"elsewhere/{name}", "spaced folder": f"my data/{name}"}[where]
    with pytest.raises(DatasetNotFoundError) as info:
        open_dataset(name, path)
    written = follow_hint(str(info.value), DATASETS[name].script, tmp_path)
    looked_for = Path(str(info.value).split(" file not found: ")[1].split("; download it with")[0])
    assert tmp_path / looked_for in written
    for file in written:  # as the script would leave them (content aside)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"not really the data")
    with pytest.raises(DatasetError) as found:
        open_dataset(name, path)
    assert not isinstance(found.value, DatasetNotFoundError), found.value  # the files were found, and read
