"""mkdocs hook: the CLI reference page is generated from dpcore's argument parsers.

A page containing the marker ``<!-- dpcore-cli-reference -->`` gets, in its place, the
``--help`` of ``dpcore`` and of every subcommand, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- dpcore-cli-reference -->"
WIDTH = "100"


def _help(parser: argparse.ArgumentParser) -> str:
    return parser.format_help().rstrip()


def render() -> str:
    from dpcore.cli import COMMANDS, make_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH  # argparse wraps to $COLUMNS: the page is the same everywhere
    try:
        parser = make_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parts = ["## `dpcore`", "", "```text", _help(parser), "```", ""]
        for name, _module, help_ in COMMANDS:
            parts += [f"## `dpcore {name}`", "", help_[0].upper() + help_[1:] + ".", "", "```text",
                      _help(sub.choices[name]), "```", ""]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


def on_page_markdown(markdown: str, **_kwargs: object) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
