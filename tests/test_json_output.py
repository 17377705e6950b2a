"""One spelling of JSON output: `--json` prints the result alone on stdout, `--json-out PATH` writes it, and the
old `--json PATH` still writes it with a note; every result carries the diffmem version and its schema."""

from __future__ import annotations

import argparse
import json

import pytest

import builders_base as bb
import builders_lora as bl
from diffmem import __version__
from diffmem.cli import main
from diffmem.json_output import JSON_SCHEMA, add_json_options, emit_json, json_mode


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_json_options(parser)
    return parser.parse_args(list(argv))


def run(args: argparse.Namespace) -> None:
    with json_mode(args):
        print("a line for people")
        emit_json(args, {"answer": 42})


def test_json_alone_on_stdout(capsys):
    run(parse("--json"))
    out, err = capsys.readouterr()
    assert json.loads(out) == {"diffmem_version": __version__, "schema_version": JSON_SCHEMA, "answer": 42}
    assert err == "a line for people\n"


def test_json_out_and_the_old_spelling_write_the_file(tmp_path, capsys):
    run(parse("--json-out", str(tmp_path / "new.json")))
    assert capsys.readouterr().out == "a line for people\n"
    assert json.loads((tmp_path / "new.json").read_text())["answer"] == 42
    run(parse("--json", str(tmp_path / "old.json")))
    out, err = capsys.readouterr()
    assert out == "a line for people\n" and "old spelling of --json-out" in err
    assert json.loads((tmp_path / "old.json").read_text())["schema_version"] == JSON_SCHEMA


def test_nothing_asked_nothing_written(tmp_path, capsys):
    run(parse())
    assert capsys.readouterr().out == "a line for people\n" and not list(tmp_path.iterdir())


def test_audit_prints_its_summary_as_json(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na photo of a cat\n")
    assert main(["audit", "--base", "world", "--prompts", str(prompts), "--generations", "1", "--steps", "2",
                 "--out", str(tmp_path / "out"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 2 and summary["diffmem_version"] == __version__
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["prompts"] == 2


@pytest.mark.parametrize("command", [["wen-eval", "--base", "world"], ["mitigate", "nemo", "--out", "m.st"],
                                     ["world", "check"]])
def test_every_record_command_takes_both_spellings(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert "--json [PATH]" in text and "--json-out PATH" in text


def test_filter_and_inspect_write_json_out(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))
    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    lora = tmp_path / "l.safetensors"
    bl.write_kohya_lora(lora, bb.lora_lookups("sd1", "kohya"), rank=4)
    assert main(["filter", str(lora), "--base", str(base), "-q", "--json-out", str(tmp_path / "f.json")]) == 0
    written = json.loads((tmp_path / "f.json").read_text())
    assert written["schema_version"] == JSON_SCHEMA and written["output"].endswith("l.filtered.safetensors")
    assert main(["inspect", str(lora), "--base", str(base), "--json", "--json-out", str(tmp_path / "i.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "i.json").read_text())["channels_total"] == printed["channels_total"]
