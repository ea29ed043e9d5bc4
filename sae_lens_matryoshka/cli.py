"""Command line: ``sae-lens-matryoshka train ...`` and ``sae-lens-matryoshka toy`` (also ``python -m sae_lens_matryoshka``).

``toy`` runs the paper's toy experiment offline (see ``toy_demo``).

``train`` is SAELens's own runner command line with the plugin registered: it
accepts every ``LanguageModelSAERunnerConfig`` flag and, through
``--architecture matryoshka`` (the default here), every
``MatryoshkaTrainingSAEConfig`` field, e.g.::

    sae-lens-matryoshka train --model_name tiny-stories-1M \\
        --hook_name blocks.4.hook_resid_post --dataset_path roneneldan/TinyStories \\
        --is_dataset_tokenized False --d_in 64 --d_sae 1024 --k 16 \\
        --matryoshka_widths 64 256 1024

Under ``torchrun`` the same command trains data-parallel (see ``distributed``)::

    torchrun --nproc_per_node 8 -m sae_lens_matryoshka train ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from sae_lens import LanguageModelSAERunnerConfig

# SAELens's runner command line; importing the package registers "matryoshka" first.
from sae_lens.llm_sae_training_runner import _parse_cfg_args

import sae_lens_matryoshka  # noqa: F401  (registers the architecture)
from sae_lens_matryoshka import distributed
from sae_lens_matryoshka.config import ARCHITECTURE
from sae_lens_matryoshka.toy_demo import run_toy_demo


def parse_train_args(args: Sequence[str]) -> LanguageModelSAERunnerConfig[Any]:
    """Build a runner config from SAELens runner flags, defaulting to ``--architecture matryoshka``."""
    args = list(args)
    if not args:
        args = ["--help"]
    elif not any(a == "--architecture" or a.startswith("--architecture=") for a in args):
        args = ["--architecture", ARCHITECTURE, *args]
    return _parse_cfg_args(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-matryoshka",
        description="Matryoshka sparse autoencoders for SAELens.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "train",
        add_help=False,  # `train --help` shows SAELens's full list of runner flags
        help="train a Matryoshka SAE with SAELens's runner (all runner flags accepted; "
        "`train --help` lists them); data-parallel when launched with torchrun",
    )
    toy = commands.add_parser(
        "toy",
        help="the paper's toy experiment, offline: Matryoshka vs SAELens BatchTopK on a known "
        "feature hierarchy; writes metrics and figures",
    )
    toy.add_argument(
        "--output-dir", default="matryoshka_toy", help="where metrics.json and the PNGs go"
    )
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument(
        "--steps", type=int, default=1500, help="training steps of 512 samples per SAE"
    )
    toy.add_argument(
        "--width",
        type=int,
        default=None,
        help="latents in both SAEs (default: 16, the true features)",
    )
    toy.add_argument(
        "--l0", type=float, default=None, help="BatchTopK k of both SAEs (default: the data's L0)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-lens-matryoshka`` script."""
    parser = _build_parser()
    parsed, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if parsed.command == "train":
        cfg = parse_train_args(rest)
        distributed.run(cfg)  # data-parallel under torchrun, a plain runner run otherwise
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    run_toy_demo(
        output_dir=parsed.output_dir,
        seed=parsed.seed,
        steps=parsed.steps,
        width=parsed.width,
        l0=parsed.l0,
    )
    return 0
