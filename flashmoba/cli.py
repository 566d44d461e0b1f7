"""The ``flashmoba`` command: ``demo | snr | train | eval``.

Each subcommand lives next to the code it drives and exposes ``add_arguments(parser)`` and
``run(args)``; this file only wires them up, importing a subcommand's module when it is chosen.

A bad command line is reported as one line, ``flashmoba <command>: error: <message>``, with exit code 2:
for what argparse parses (it raises ``SystemExit(2)``) and for what a subcommand checks itself (before any
expensive work) and raises as ``UsageError`` (``main`` returns 2). Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from flashmoba._checks import UsageError

__all__ = ["main"]

# name -> (module, one-line help, (extra, modules the extra installs that the subcommand needs) or None)
SUBCOMMANDS = {
    "demo": ("flashmoba.demo", "MoBA forward+backward on the best device: routing, check, timing", None),
    "snr": ("flashmoba.theory.cli", "router signal-to-noise: theory vs Monte-Carlo, table and plot", None),
    "train": (
        "flashmoba.train.cli_train",
        "train a small hybrid MoBA language model",
        ("train", ("transformers", "tokenizers")),
    ),
    "eval": (
        "flashmoba.train.cli_eval",
        "evaluate a trained model: perplexity, needles, router SNR",
        ("train", ("transformers", "tokenizers", "matplotlib")),
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _missing_extra(requirement) -> str | None:
    """The usage message when a module of the subcommand's extra is not installed, else None."""
    if requirement is None:
        return None
    extra, modules = requirement
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"needs {', '.join(missing)} (not installed): pip install 'flashmoba[{extra}]'"


def main(argv: list[str] | None = None) -> int:
    """Run ``flashmoba *argv`` (default: the command line); returns the exit code."""
    parser = _Parser(prog="flashmoba", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text, _) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module_name, help_text, requirement = SUBCOMMANDS[args.command]
    prog = f"flashmoba {args.command}"
    missing = _missing_extra(requirement)
    if missing is not None:
        print(f"{prog}: error: {missing}", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    sub_parser = _Parser(prog=prog, description=help_text)
    module.add_arguments(sub_parser)
    sub_args = sub_parser.parse_args(rest)
    try:
        return int(module.run(sub_args) or 0)
    except UsageError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
