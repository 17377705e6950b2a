"""The command line as a whole: every command and sub-command prints its help (argparse formats help strings with
%, so a stray percent sign breaks `diffmem --help` for every command)."""

from __future__ import annotations

import argparse

from diffmem.cli import build_parser


def command_parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) for the parser and every sub-command below it."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_parsers(sub, (*prefix, name))


def test_every_command_formats_its_help():
    commands = list(command_parsers(build_parser()))
    names = {" ".join(words) for words, _ in commands}
    assert {"filter", "bench", "attack dori", "mitigate nemo", "memcontrol search", "world finetune"} <= names
    for words, parser in commands:
        assert parser.format_help(), words


def test_help_texts_speak_to_users():
    """No help names the project's internal references ("seed 002", "issue 19", "the seed's Table 1"): a table is
    named with its paper."""
    import re

    texts = []
    for words, parser in command_parsers(build_parser()):
        texts.append((words, parser.description or ""))
        for action in parser._actions:
            texts.append((words, action.help or ""))
            texts += [(words, choice.help or "") for choice in getattr(action, "_choices_actions", [])]
    assert len(texts) > 300
    for words, text in texts:
        assert not re.search(r"\bseed 0\d\d|\bissue \d|\bseed's\b", text, re.I), (words, text)
        assert not re.search(r"\bTable[- ]\d", text) or "paper" in text, (words, text)


def test_every_output_takes_o_and_every_seed_says_what_it_seeds():
    """One spelling of the output: every command with `--out` takes `-o` for it too; `--seed` means one thing per
    command and its help says which (not "seed (default 0)")."""
    import re
    from pathlib import Path

    seeds = 0
    for words, parser in command_parsers(build_parser()):
        options = {option: action for action in parser._actions for option in action.option_strings}
        if "--out" in options:
            assert options.get("-o") is options["--out"], words
        if "--seed" in options:
            seeds += 1
            what = re.sub(r"\(default [^)]*\)", "", options["--seed"].help)
            assert len(what.split()) >= 4, (words, options["--seed"].help)
    assert seeds >= 10
    args = build_parser().parse_args(["filter-many", "a.safetensors", "--base", "b", "-o", "many"])
    assert args.out == Path("many")
    assert build_parser().parse_args(["mitigate", "nemo", "-o", "mask.safetensors"]).out == Path("mask.safetensors")


def test_lazy_command_table_matches_what_each_package_registers():
    import importlib

    from diffmem.cli import COMMAND_MODULES, LAZY_COMMANDS

    found = {}
    for module_name in COMMAND_MODULES:
        parser = argparse.ArgumentParser()
        commands = parser.add_subparsers()
        importlib.import_module(module_name).register(commands)
        found.update({action.dest: (module_name, action.help) for action in commands._choices_actions})
    assert found == LAZY_COMMANDS


def test_filter_method_names_match_the_registry():
    from diffmem.cli import FILTER_METHODS
    from diffmem.filters import FILTERS

    assert tuple(sorted(FILTERS)) == FILTER_METHODS


def test_settings_modules_agree_with_the_modules_they_speak_for():
    """The names the settings modules keep for parsing (without importing the model code) are the model code's, and
    the moved configs are the same objects under their old import paths."""
    import diffmem.attack
    import diffmem.locality
    import diffmem.world
    from diffmem.attack import dori, table
    from diffmem.memcontrol import methods, search, settings, train
    from diffmem.mitigations import adversarial, nemo, wanda
    from diffmem.world import data
    from diffmem.world import train as world_train
    from diffmem.world.settings import BUILTIN_FINETUNE_DATA

    assert tuple(methods.METHODS) == settings.METHOD_NAMES
    assert tuple(name for name, m in methods.METHODS.items() if m.masked) == settings.MASKED_METHODS
    assert tuple(data.FINETUNE_SETS) == BUILTIN_FINETUNE_DATA  # every data set checked without importing torch
    assert train.MemControlTrainConfig is settings.MemControlTrainConfig and search.SearchConfig is settings.SearchConfig
    assert dori.DoriConfig is diffmem.attack.DoriConfig and table.TRAINING_RECIPE.method == "full"
    assert nemo.NeMoConfig().generations and wanda.WandaConfig().fraction and adversarial.AdversarialFinetuneConfig()
    assert world_train.FinetuneConfig is diffmem.world.FinetuneConfig
    for package in (diffmem.attack, diffmem.locality, diffmem.world):  # PEP 562: every public name resolves
        assert sorted(package.__all__) == sorted(package.MODULE_OF)
        assert all(getattr(package, name) is not None for name in package.__all__)


def test_help_imports_neither_torch_nor_diffusers():
    """`diffmem --help` and `diffmem filter --help` start in a tenth of a second because they import no heavy
    package (benchmarks/startup.py times them); a command of another package imports only that package."""
    import subprocess
    import sys

    probe = ("import sys\nfrom diffmem.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)), file=sys.stderr)")
    for argv in (["--help"], ["filter", "--help"], ["filter-many", "--help"], ["inspect", "--help"]):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
        assert done.stderr.strip().splitlines()[-1] == "[]", (argv, done.stderr)
        assert "usage: diffmem" in done.stdout
    # The model commands' help needs torch for its defaults, but no model library (the backends import theirs on
    # first use).
    for argv in (["audit", "--help"], ["wen-eval", "--help"]):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
        assert done.stderr.strip().splitlines()[-1] == "['torch']", (argv, done.stderr)


def test_the_model_commands_help_loads_no_model_library():
    """`world`, `memcontrol`, `attack`, `mitigate`, `locality`, `bench` and `bench-real` take their options' defaults
    from settings modules: none of their helps (each sub-command's too) loads diffusers, transformers or peft, and
    `world` and `memcontrol` load not even torch (benchmarks/startup.py times them)."""
    import json
    import subprocess
    import sys

    probe = ("import json, sys\nfrom diffmem.cli import main\nfor argv in json.loads(sys.argv[1]):\n    try:\n"
             "        main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
             "print(sorted({'torch', 'diffusers', 'transformers', 'peft'} & set(sys.modules)), file=sys.stderr)")
    helps = [list(words) for words, _ in command_parsers(build_parser()) if words]
    for group, loaded in (({"world", "memcontrol"}, "[]"),
                          ({"attack", "mitigate", "locality", "bench", "bench-real"}, "['torch']")):
        argvs = [argv for argv in helps if argv[0] in group]
        assert len(argvs) > len(group)  # the sub-commands too
        done = subprocess.run([sys.executable, "-c", probe, json.dumps(argvs)], capture_output=True, text=True,
                              check=True)
        assert done.stderr.strip().splitlines()[-1] == loaded, (group, done.stderr)
        assert done.stdout.count("usage: diffmem") == len(argvs)


def test_a_lazy_command_is_built_in_full_when_it_is_the_command():
    from diffmem.cli import build_parser, command_modules

    assert command_modules(["--help"]) == () and command_modules(["filter", "x"]) == ()
    assert command_modules(["bench-real", "--base", "b"]) == ("diffmem.bench.commands",)
    argv = ["mitigate", "nemo", "--out", "o", "--ordinary", "o.txt"]
    args = build_parser(load=command_modules(argv)).parse_args(argv)
    assert callable(args.handler) and args.ordinary.name == "o.txt"


def test_usage_errors_the_program_finds_exit_2_and_name_the_flag(capsys):
    from diffmem.cli import main

    for argv, flag in ((["--rule", "fraction", "--keep-fraction", "1.5"], "--keep-fraction"),
                       (["--method", "magnitude", "--side", "left"], "--side"), (["--energy", "0"], "--energy")):
        assert main(["filter", "l.safetensors", "--base", "b", "-o", "o.safetensors", *argv]) == 2
        assert capsys.readouterr().err.startswith(f"diffmem: error: {flag} ")


def test_the_model_commands_usage_errors_exit_2_and_name_the_flag(tmp_path, capsys):
    """A value a config refuses, or options that do not go together, exit 2 with one line naming the flag the user
    typed (not the config's field), before any model is loaded; `usage_error` maps the fields to the flags."""
    from diffmem.cli import main, usage_error
    from diffmem.errors import DiffmemError

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    out = ["--out", str(tmp_path / "out")]
    dori = ["attack", "dori", "--target", "t.png", "--prompt", "p"]
    mitigate = ["--prompts", str(prompts), *out]
    for argv, message in (
        ([*dori, "--steps", "0"], "--steps and --batch-size must be >= 1"),
        ([*dori, "--start-noise", "-1"], "--start-noise must be >= 0"),
        ([*dori, "--generations", "0"], "--generations and --sample-steps must be at least 1"),
        (["attack", "table", "--dori-steps", "0"], "--dori-steps and batch_size must be >= 1"),
        (["attack", "table", "--adv-rounds", "0"], "--adv-rounds and batch_size must be >= 1"),
        (["attack", "table", "--starts", "prompt,sideways"], "--starts must be a non-empty choice"),
        (["attack", "table", "--groups", "posthoc,most"], "--groups takes"),
        (["mitigate", "wanda", *mitigate, "--fraction", "1.5"], "--fraction must lie in (0, 1]"),
        (["mitigate", "nemo", *mitigate, "--generations", "0"], "need --generations >= 1"),
        (["mitigate", "nemo", *out], "give the memorized prompts"),
        (["mitigate", "adversarial", *out, "--adversarial-share", "2"], "--adversarial-share must be in (0, 1]"),
        (["mitigate", "adversarial", *out, "--search-steps", "0"], "--search-steps and batch_size must be >= 1"),
        (["world", "finetune", *out, "--duplicate", "5:0"], "--duplicate must be N:K"),
        (["world", "finetune", *out, "--steps", "0"], "--rank, --steps, --batch-size and --threads"),
        (["world", "check", "--generations", "0"], "--generations and --steps must be at least 1"),
        (["memcontrol", "train", *out, "--rest-share", "2"], "--rest-share must be in [0, 1]"),
        (["memcontrol", "train", *out, "--mitigation", "threshold", "--threshold", "0"], "--threshold must be"),
        (["memcontrol", "search", *out, "--population", "1"], "a search needs --trials >= 1 and --population >= 2"),
        (["memcontrol", "table", *out, "--mitigations", "none,prayer"], "--mitigations takes"),
        (["memcontrol", "table", *out, "--lr-scale", "0"], "--lr-scale must be positive"),
        (["bench", "--generations", "0"], "--generations, --steps, --seeds and --variation-seeds"),
        (["bench", "--grid", "evidence", "--seeds", "0"], "--generations, --steps, --seeds and --variation-seeds"),
        (["bench", "--quick", "--grid", "evidence"], "--quick runs the example LoRA alone; it takes no --grid"),
        (["bench-real", "--base", "b", "--lora", "l", "--probe", "p", "--steps", "0"], "--generations, --heldout"),
        (["audit", "--base", "world", "--prompts", str(prompts), "--generations", "0"], "--generations and --steps"),
    ):
        assert main(argv) == 2, (argv, capsys.readouterr().err)
        err = capsys.readouterr().err
        assert err.startswith(f"diffmem: error: {message}") and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "out").exists()
    # The mapping: whole field names only, the longest first, and a DiffmemError's problem without its path.
    error = usage_error(ValueError("steps_per_round and steps must be >= 1"), {"steps": "--dori-steps"})
    assert str(error) == "steps_per_round and --dori-steps must be >= 1"
    assert str(usage_error(DiffmemError("rest_share must be in [0, 1]", "x.json"), ["rest_share"])).startswith("--rest")

def test_configs_validate_their_fields():
    import pytest

    from diffmem.filters import BAFConfig

    for bad in ({"side": "rigth"}, {"combine": "max"}, {"energy": 1.5}, {"energy": 0.0}, {"anchor_rank": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BAFConfig(**bad)
    assert BAFConfig(side="both", combine="min", energy=1.0, anchor_rank=3).anchor_rank == 3


def test_reports_and_files_have_short_reprs(tmp_path):
    import builders_base as bb
    import builders_lora as bl
    from diffmem.formats.lora import read_lora
    from diffmem.pipeline import filter_lora

    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    bl.write_kohya_lora(tmp_path / "l.safetensors", bb.lora_lookups("sd1", "kohya"), rank=4)
    result = filter_lora(tmp_path / "l.safetensors", base, cache_dir=tmp_path / "cache")
    lora = read_lora(tmp_path / "l.safetensors")
    for obj in (result, result.report, lora, next(iter(lora.modules.values()))):
        assert len(repr(obj)) < 400, repr(obj)[:500]
    assert "channels_kept=" in repr(result.report) and "format='kohya'" in repr(lora)


def test_package_lists_its_public_names_and_json_reports_carry_versions(tmp_path, capsys):
    import json

    import builders_base as bb
    import builders_lora as bl
    import diffmem
    from diffmem.cli import main

    assert {"filter_lora", "filter_file", "inspect_lora"} <= set(dir(diffmem))
    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    bl.write_kohya_lora(tmp_path / "l.safetensors", bb.lora_lookups("sd1", "kohya"), rank=4)
    assert main(["inspect", str(tmp_path / "l.safetensors"), "--base", str(base), "--json",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["diffmem_version"] == diffmem.__version__ and report["schema_version"] == 1


def test_filter_names_its_output_and_replaces_one_only_with_force(tmp_path, capsys):
    import builders_base as bb
    import builders_lora as bl
    from diffmem.cli import main
    from diffmem.formats.lora import read_lora

    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    lora = tmp_path / "style.safetensors"
    bl.write_kohya_lora(lora, bb.lora_lookups("sd1", "kohya"), rank=4)
    common = ["--base", str(base), "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert main(["filter", str(lora), *common]) == 0  # no -o: beside the input
    default = tmp_path / "style.filtered.safetensors"
    assert read_lora(default).metadata["diffmem.method"] == "baf"
    before = default.read_bytes()
    assert main(["filter", str(lora), *common, "--method", "magnitude"]) == 1
    assert "the output exists; pass --force" in capsys.readouterr().err
    assert default.read_bytes() == before
    assert main(["filter", str(lora), *common, "--method", "magnitude", "--force"]) == 0
    assert read_lora(default).metadata["diffmem.method"] == "magnitude"
    for spelling in ("-o", "--out", "--output"):  # one spelling for every command, the old one still accepted
        out = tmp_path / f"{spelling.strip('-')}.safetensors"
        assert main(["filter", str(lora), *common, spelling, str(out)]) == 0 and out.is_file()


def test_anchors_takes_base_as_every_command_does(tmp_path, capsys):
    import json

    import builders_base as bb
    from diffmem.cli import main

    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    cache = ["--cache-dir", str(tmp_path / "cache"), "--json", "--only", "unet"]
    assert main(["anchors", "--base", str(base), *cache]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["anchors", str(base), *cache]) == 0  # the positional spelling still works: all cached now
    assert json.loads(capsys.readouterr().out)["computed"] == 0 < first["computed"]
    assert main(["anchors", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert main(["anchors", "--base", str(base), str(tmp_path / "other.safetensors")]) == 2
    assert "--base BASE" in capsys.readouterr().err


def test_base_world_names_the_committed_world_base_in_the_filter_commands(tmp_path, capsys):
    import json

    from diffmem.cli import main
    from diffmem.world.settings import BASE_FILE, assets_dir

    lora = assets_dir() / "example_lora.safetensors"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["inspect", str(lora), "--base", "world", "--json", *cache]) == 0
    by_name = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(lora), "--base", str(assets_dir() / BASE_FILE), "--json", *cache]) == 0
    by_path = json.loads(capsys.readouterr().out)
    assert by_name["channels_kept"] == by_path["channels_kept"] and by_name["base"] == by_path["base"]
    out = tmp_path / "filtered.safetensors"
    assert main(["filter", str(lora), "--base", "world", "-o", str(out), "-q", *cache]) == 0 and out.is_file()


def test_every_command_takes_quiet_and_no_progress(tmp_path, capsys):
    import builders_base as bb
    import builders_lora as bl
    from diffmem.cli import main, wants_progress

    for words, parser in command_parsers(build_parser()):
        if words and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            options = {option for action in parser._actions for option in action.option_strings}
            assert {"-q", "--quiet", "--no-progress"} <= options, words
    assert not wants_progress(["filter", "x", "--no-progress"]) and not wants_progress(["scan", "x", "-q"])
    import io

    from diffmem.progress import progress_bar, set_bars

    set_bars(False)  # what main does off a terminal: a caller's own progress=True no longer shows a bar
    assert progress_bar(range(3), file=io.StringIO()).disable
    set_bars(True)
    assert not progress_bar(range(3), file=io.StringIO()).disable and progress_bar(range(3), disable=True).disable
    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    lora = tmp_path / "lora.safetensors"
    bl.write_kohya_lora(lora, bb.lora_lookups("sd1", "kohya"), rank=4)
    options = ["--base", str(base), "--no-cache", "--json"]
    assert main(["inspect", str(lora), *options]) == 0 and capsys.readouterr().out.startswith("{")
    assert main(["inspect", str(lora), *options, "-q"]) == 0 and capsys.readouterr().out == ""
    # -q silences standard output only: an error is still its one line on standard error
    assert main(["inspect", str(tmp_path / "missing.safetensors"), *options, "-q"]) == 1
    assert "missing.safetensors" in capsys.readouterr().err


LEAN_HOOK = """
import sys
from importlib.abc import MetaPathFinder

from diffmem.cli import EXTRA_PACKAGES


class NoExtras(MetaPathFinder):
    '''The core install: every package of an extra is missing.'''

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRA_PACKAGES:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoExtras())  # in filter-many's spawned workers too: they import this file as __mp_main__

if __name__ == "__main__":
    from diffmem.cli import main

    sys.exit(main(sys.argv[1:]))
"""


def test_the_core_install_filters_and_a_command_needing_an_extra_names_it(tmp_path):
    import os
    import subprocess
    import sys

    import builders_base as bb
    import builders_lora as bl

    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    lora = tmp_path / "lora.safetensors"
    bl.write_kohya_lora(lora, bb.lora_lookups("sd1", "kohya"), rank=4)
    hook = tmp_path / "lean.py"
    hook.write_text(LEAN_HOOK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def lean(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(hook), *argv], capture_output=True, text=True, env=env, timeout=300)

    for argv in (["filter", str(lora), "--base", str(base), "--no-cache", "-q"],
                 ["inspect", str(lora), "--base", str(base), "--no-cache", "--json"],
                 ["filter-many", str(lora), "--base", str(base), "--out", str(tmp_path / "many"), "--no-cache"]):
        done = lean(*argv)
        assert done.returncode == 0, (argv, done.stderr)
    assert (tmp_path / "lora.filtered.safetensors").is_file()
    for command, extra in (("scan", "world"),):
        done = lean(command, "--help")
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert f"pip install 'diffmem[{extra}]'" in done.stderr and f"`diffmem {command}`" in done.stderr
    # `world`, `memcontrol` and `audit` parse with nothing but the core install (their options' defaults come from
    # settings modules), so their help shows; running one names the extra it needs.
    for argv in (["world", "sample", "--out", str(tmp_path / "grid.png")],
                 ["memcontrol", "mask", "--out", str(tmp_path / "mask.json")],
                 ["audit", "--base", "world", "--out", str(tmp_path / "audit")]):
        assert lean(argv[0], "--help").returncode == 0
        if not argv[1].startswith("-"):  # a subcommand's help too
            assert lean(*argv[:2], "--help").returncode == 0
        done = lean(*argv)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "pip install 'diffmem[world]'" in done.stderr and f"`diffmem {argv[0]}`" in done.stderr


def test_every_extra_package_is_in_its_extra():
    import re
    from pathlib import Path

    import pytest

    from diffmem.cli import EXTRA_PACKAGES

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(extra: str) -> set[str]:
        found = set()
        for requirement in extras[extra]:
            name = re.split(r"[<>=\[ ]", requirement)[0]
            if name == "diffmem":  # diffmem[world,...]: the extras it names
                for inner in requirement.split("[")[1].rstrip("]").split(","):
                    found |= names(inner)
            else:
                found.add(name)
        return found

    core = {re.split(r"[<>= ]", r)[0] for r in project["dependencies"]}
    assert core == {"torch", "safetensors", "numpy", "scipy", "tqdm", "threadpoolctl"}
    for distribution, extra in EXTRA_PACKAGES.values():
        assert distribution in names(extra) and distribution in names("all"), distribution
