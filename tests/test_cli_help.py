"""The CLI teaches: every flag of every verb (and sub-verb) has a help line, and every verb's
`--help` ends with an example command."""
from __future__ import annotations

import argparse

from maskrt.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("maskrt",)):
    """(command path, parser) for the top parser and every verb and sub-verb under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))


def test_every_flag_has_help() -> None:
    missing = []
    for path, parser in _walk(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS or not action.help.strip():
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "flags without help text: " + ", ".join(missing)


def test_every_verb_help_ends_with_an_example() -> None:
    parsers = list(_walk(build_parser()))
    assert len(parsers) > 10
    without = []
    for path, parser in parsers:
        lines = [line.strip() for line in parser.format_help().splitlines() if line.strip()]
        # The last line runs this verb: `maskrt data synth ...` (or `torchrun ... -m maskrt train ...`).
        command = " ".join(path) + " "
        if command not in lines[-1] + " ":
            without.append(" ".join(path))
    assert not without, "verbs whose --help does not end with an example of the verb: " + ", ".join(without)
