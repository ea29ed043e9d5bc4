"""The ``sae-lens-matryoshka`` script's front door: its commands, answered without loading SAELens.

Importing the ``sae_lens_matryoshka`` package registers the architecture with
SAELens, which imports SAELens, TransformerLens and transformers: 7 to 11 s
on a 2-core machine before a word is printed. This module sits outside the
package so that the script's top-level help and usage errors come from
argparse alone (about 0.1 s); any command goes on to
``sae_lens_matryoshka.cli``, which adds each command's own options to the
parser made here and runs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PROG = "sae-lens-matryoshka"
#: what each command does, as the top-level help lists it
COMMANDS = {
    "train": "train a Matryoshka SAE with SAELens's runner (all runner flags accepted; "
    "`train --help` lists them); data-parallel when launched with torchrun",
    "toy": "the paper's toy experiment, offline: a Matryoshka SAE against SAELens's plain SAE "
    "on Nabeshima's feature hierarchy, over several seeds; writes metrics and figures",
}


def command_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The script's parser and one sub-parser per command, without the commands' own options.

    ``train``'s sub-parser has no help of its own: ``train --help`` shows
    SAELens's runner flags, which ``sae_lens_matryoshka.cli`` lists.
    """
    parser = argparse.ArgumentParser(
        prog=PROG, description="Matryoshka sparse autoencoders for SAELens."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {
        name: commands.add_parser(name, help=text, add_help=name != "train")
        for name, text in COMMANDS.items()
    }
    return parser, parsers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-lens-matryoshka`` script.

    No command, ``--help`` or an unknown command is answered here; anything
    else is the command's, in ``sae_lens_matryoshka.cli``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        parser, _ = command_parser()
        parser.parse_args(args)  # prints the help or the usage error, and exits
    from sae_lens_matryoshka.cli import main as run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
