"""The mitigation registry: every entry resolves with its kind, config and entry function; unknown names are clear
errors; the robustness table and MemControl's table take their rows from it; no import circle between the table
and adversarial fine-tuning."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffmem.attack.table import (
    NO_MITIGATION,
    TRAINING_CONTROL,
    RobustnessRun,
    RobustnessSettings,
    ToolkitModels,
    planned_rows,
    run_robustness_table,
)
from diffmem.errors import DiffmemError
from diffmem.mitigations import registry
from diffmem.mitigations.registry import (
    MitigatedModel,
    Mitigation,
    MitigationInputs,
    get_mitigation,
    register_mitigation,
)

SRC = Path(__file__).resolve().parent.parent / "src" / "diffmem"
POST_HOC = {"nemo", "wanda", "baf", "extraction-guided", "caption-readers", "unet-blocks", "adversarial"}
TRAINING = {"memcontrol", "rwa", "threshold"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def base_only(inputs: MitigationInputs, config=None) -> MitigatedModel:
    """A stand-in post-hoc mitigation: drop the LoRA altogether (the world base, which never saw the faces)."""
    return MitigatedModel(inputs.world_base(), "the world base without the LoRA")


DUMMY = Mitigation(name="dummy", kind="post-hoc", label="Dummy", row="dummy (drops the LoRA)",
                   description="a test entry (nobody et al. 2099)", config="diffmem.filters.baf:BAFConfig",
                   apply=base_only, file_option="dummy-file", file_help="a file for the dummy")


def test_every_registered_name_resolves_with_its_kind_config_and_entry_function():
    assert set(registry.MITIGATIONS) == POST_HOC | TRAINING
    for name, mitigation in registry.MITIGATIONS.items():
        assert get_mitigation(name) is mitigation and mitigation.name == name
        assert mitigation.kind == ("post-hoc" if name in POST_HOC else "training"), name
        assert dataclasses.is_dataclass(mitigation.config_class), name
        assert isinstance(mitigation.default_config(), mitigation.config_class), name
        # One entry function per mitigation, the same signature for all (the tables call them alike).
        assert list(inspect.signature(mitigation.apply).parameters) == ["inputs", "config"], name
        # The description cites the paper: a year, or an arXiv number.
        assert re.search(r"\b20\d\d\b|arXiv \d{4}\.\d+", mitigation.description), mitigation.description
    assert registry.registered(kind="post-hoc") == [registry.MITIGATIONS[n] for n in (
        "nemo", "wanda", "baf", "extraction-guided", "caption-readers", "unet-blocks", "adversarial")]
    assert get_mitigation("rwa").default_config().kind == "rwa"
    assert get_mitigation("threshold").default_config().kind == "threshold"


def test_unknown_names_and_bad_entries_are_clear_errors():
    with pytest.raises(DiffmemError, match="unknown mitigation 'dedup'") as error:
        get_mitigation("dedup")
    assert all(name in str(error.value) for name in registry.MITIGATIONS)
    with pytest.raises(ValueError, match="already registered"):
        register_mitigation(get_mitigation("nemo"))
    with pytest.raises(ValueError, match="kind must be one of post-hoc, training"):
        dataclasses.replace(DUMMY, kind="posthoc")
    with pytest.raises(ValueError, match="table_group"):
        dataclasses.replace(DUMMY, table_group="other")
    with pytest.raises(DiffmemError, match=r"needs MitigationInputs\.lora"):
        MitigationInputs().tuned()
    with pytest.raises(DiffmemError, match="kind 'rwa'"):
        get_mitigation("rwa").apply(MitigationInputs(), get_mitigation("threshold").default_config())


def test_memcontrol_table_crosses_the_registered_training_loop_mitigations():
    from diffmem.memcontrol.mitigation import MITIGATIONS as TRAINING_LOOP_KINDS
    from diffmem.memcontrol.table import MITIGATION_LABELS, TableConfig, row_label

    assert [m.name for m in registry.training_loop_mitigations()] == ["rwa", "threshold"]
    # Each must be a kind the training runs, and the table's default is exactly those.
    assert TableConfig().mitigations == TRAINING_LOOP_KINDS == ("none", "rwa", "threshold")
    assert MITIGATION_LABELS == {"none": "", "rwa": " + RWA", "threshold": " + Threshold"}
    assert row_label("full", "threshold", False) == "Full FT + Threshold"


def test_robustness_rows_come_from_the_registry(monkeypatch):
    assert planned_rows() == {
        "posthoc": [NO_MITIGATION, "NeMo (default)", "Wanda (default)", "BAF (default)",
                    "extraction-guided filter (default)", "caption-readers filter (default)",
                    "first-up-block filter (default)"],
        "adversarial": ["adversarial fine-tuning"],
        "training": [TRAINING_CONTROL, "MemControl (SV-DIFF under a mask)", "random word addition (training)",
                     "threshold mitigation (training)"]}
    monkeypatch.setitem(registry.MITIGATIONS, "dummy", DUMMY)
    planned = planned_rows(("posthoc", "training"), done={"NeMo (default)"})
    assert planned["posthoc"] == [NO_MITIGATION, "Wanda (default)", "BAF (default)",
                                  "extraction-guided filter (default)", "caption-readers filter (default)",
                                  "first-up-block filter (default)", DUMMY.row]
    assert "adversarial" not in planned and planned["training"][0] == TRAINING_CONTROL


def test_table_command_options_and_arguments_come_from_the_registry(monkeypatch, capsys):
    """A registered mitigation gets its file option; `diffmem attack table` passes the command line as typed (not
    sys.argv, which is pytest's here) and every file option to `run_robustness_table`."""
    import diffmem.attack.commands as commands
    from diffmem.cli import main

    monkeypatch.setitem(registry.MITIGATIONS, "dummy", DUMMY)
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["attack", "table", "--dummy-file", "d.safetensors", "--nemo-masks", "n.safetensors"])
    assert args.dummy_file == Path("d.safetensors") and args.nemo_masks == Path("n.safetensors")

    calls = []  # the command imports the table's run when it runs (its help loads no model library)
    monkeypatch.setattr("diffmem.attack.table.run_robustness_table",
                        lambda *a, **kw: calls.append((a, kw)) or RobustnessRun([], ToolkitModels()))
    threads = torch.get_num_threads()
    try:
        assert main(["attack", "table", "--faces", "1", "--groups", "posthoc", "--rwa", "my rwa.safetensors"]) == 0
    finally:
        torch.set_num_threads(threads)
    (_, kwargs), = calls
    assert kwargs["command"] == "diffmem attack table --faces 1 --groups posthoc --rwa 'my rwa.safetensors'"
    assert kwargs["files"]["rwa"] == Path("my rwa.safetensors") and kwargs["files"]["dummy"] is None
    assert set(kwargs["files"]) == {"control", "dummy", *registry.MITIGATIONS} - {"baf", "extraction-guided",
                                                                                    "caption-readers", "unet-blocks"}
    assert set(kwargs["groups"]) == {"posthoc"} and kwargs["faces"] == 1
    assert "| model |" in capsys.readouterr().out
    # --json prints the rows and settings on stdout, and nothing else there (the table goes to stderr).
    try:
        assert main(["attack", "table", "--faces", "1", "--groups", "posthoc", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert json.loads(captured.out)["schema_version"] == 1 and "| model |" in captured.err
    assert calls[-1][1]["json_out"] is None


def test_a_registered_mitigation_is_built_measured_and_merged(tmp_path, monkeypatch):
    """With only a dummy post-hoc entry registered, the table measures the LoRA as trained and the dummy's model,
    writes both to the JSON and the page, and a second run merging that JSON measures nothing again."""
    from diffmem.attack.dori import DoriConfig
    from diffmem.world.check import CheckSettings

    monkeypatch.setattr(registry, "MITIGATIONS", {"dummy": DUMMY})
    settings = RobustnessSettings(dori=DoriConfig(steps=2, batch_size=2), starts=("prompt",),
                                  sampling=CheckSettings(generations=1, steps=2), fid=False, timesteps_per_image=1)
    lines = []
    run = run_robustness_table(settings, groups={"posthoc"}, faces=1, json_out=tmp_path / "rows.json",
                               out=tmp_path / "page.md", command="the test", log=lines.append)
    assert [row.model for row in run.rows] == [NO_MITIGATION, DUMMY.row]
    assert run.toolkit.reference_of[DUMMY.row] == NO_MITIGATION
    assert run.toolkit.sources[DUMMY.row] == "the world base without the LoRA"
    assert run.toolkit.notes == {TRAINING_CONTROL: "left out of this run"}
    assert f"measuring {DUMMY.row} ..." in lines
    record = json.loads((tmp_path / "rows.json").read_text())
    assert [row["model"] for row in record["rows"]] == [NO_MITIGATION, DUMMY.row] and record["command"] == "the test"
    page = (tmp_path / "page.md").read_text()
    assert f"| {DUMMY.row} |" in page and "the test" in page
    # The base never saw the faces: dropping the LoRA loses the memorized face (and the LoRA's fit of the data).
    assert run.rows[1].copy_rate_prompt <= run.rows[0].copy_rate_prompt

    again = run_robustness_table(settings, groups={"posthoc"}, faces=1, merge=[tmp_path / "rows.json"],
                                 log=lines.append)
    assert again.rows == run.rows and not again.toolkit.models


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_no_import_circle_between_the_table_and_adversarial_fine_tuning():
    # The table reaches adversarial fine-tuning only through its registry entry; adversarial fine-tuning never
    # reaches the table.
    assert "diffmem.mitigations.adversarial" not in imported_modules(SRC / "attack" / "table.py")
    assert "diffmem.attack.table" not in imported_modules(SRC / "mitigations" / "adversarial.py")
    # In a fresh interpreter each: the first module alone does not load the other, then both import.
    probe = ("import sys, importlib\nfirst, second = sys.argv[1:]\nimportlib.import_module(first)\n"
             "assert second not in sys.modules, second\nimportlib.import_module(second)\nprint('ok')")
    for first, second in (("diffmem.mitigations.adversarial", "diffmem.attack.table"),
                          ("diffmem.attack.table", "diffmem.mitigations.adversarial")):
        done = subprocess.run([sys.executable, "-c", probe, first, second], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_registry_imports_no_torch():
    probe = ("import sys\nimport diffmem.mitigations.registry as r\nassert len(r.MITIGATIONS) >= 7\n"
             "print(sorted({'torch', 'diffusers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_docs_page_lists_every_entry_and_its_example_runs(capsys):
    page = (SRC.parent.parent / "docs" / "mitigations.md").read_text()
    listed = re.findall(r"^\| `([a-z_-]+)` \| (post-hoc|training) \|", page, flags=re.M)
    assert listed == [(name, m.kind) for name, m in registry.MITIGATIONS.items()]
    (example,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    exec(compile(example, "docs/mitigations.md", "exec"), {})
    out = capsys.readouterr().out
    assert all(name in out for name in registry.MITIGATIONS)
    assert "BAFConfig right" in out and "diffmem.pipeline.filter_lora, BAFConfig()" in out
