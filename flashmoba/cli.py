"""The ``flashmoba`` command: ``demo | snr | train | eval | bench``.

Each subcommand lives next to the code it drives and exposes ``add_arguments(parser)`` and
``run(args)``; this file only wires them up, importing a subcommand's module when it is chosen.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("flashmoba.demo", "MoBA forward+backward on the best device: routing, check, timing"),
    "snr": ("flashmoba.theory.cli", "router signal-to-noise: theory vs Monte-Carlo, table and plot"),
    "train": ("flashmoba.train.cli_train", "train a small hybrid MoBA language model"),
    "eval": ("flashmoba.train.cli_eval", "evaluate a trained model: perplexity, needles, router SNR"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashmoba", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    sub_parser = argparse.ArgumentParser(prog=f"flashmoba {args.command}",
                                         description=SUBCOMMANDS[args.command][1])
    module.add_arguments(sub_parser)
    return int(module.run(sub_parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
