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
