"""Command line: ``sae-lens-matryoshka train ...`` and ``sae-lens-matryoshka toy`` (also ``python -m sae_lens_matryoshka``).

``toy`` runs the paper's toy experiment offline (see ``toy.demo``).

``train`` is SAELens's runner command line with the plugin registered: it
accepts every ``LanguageModelSAERunnerConfig`` flag and, through
``--architecture matryoshka`` (the default here), every
``MatryoshkaTrainingSAEConfig`` field, e.g.::

    sae-lens-matryoshka train --model_name tiny-stories-1M \\
        --hook_name blocks.4.hook_resid_post --dataset_path roneneldan/TinyStories \\
        --is_dataset_tokenized False --d_in 64 --d_sae 1024 --k 16 \\
        --matryoshka_widths 64 256 1024

Beyond SAELens's own command line it

- requires ``--d_in`` and ``--d_sae`` (SAELens would quietly use 512 and 1024);
- lists every flag in ``train --help``, ``--latent_shards`` included, each
  with a short help (the first sentence of its config's docstring entry, or
  ``FLAG_HELP``) and its default, under one heading per config (not the
  config classes' docstrings and signatures simple_parsing would print);
- checks wandb's credentials before loading anything when ``--log_to_wandb``
  is on (SAELens's default), rather than failing after the model has loaded;
- trains from local folders (``--model_name`` a ``save_pretrained`` folder,
  ``--dataset_path`` a ``save_to_disk`` or data-file folder: see
  ``local_sources``), and says in one line when the Hub cannot be reached;
- refuses what it can before anything loads, as argparse refuses a bad flag
  (the usage line, then one ``error:`` line, exit status 2, no traceback): a
  config field the SAE or runner config rejects, a path that leads nowhere, a
  count a run cannot use, a setting ``run_checks`` or ``save_paths`` refuses;
- prints where the SAE was saved and each level's explained variance, L0 and
  dead latents (for a Matryoshka SAE the run itself prints them, from Python
  too, and leaves ``training_log.jsonl`` and ``loss_curve.png`` beside the
  SAE: see ``run_record``).

Under ``torchrun`` the same command trains data-parallel (see ``distributed``);
``--training_tokens`` and ``--train_batch_size_tokens`` are then per rank::

    torchrun --nproc_per_node 8 -m sae_lens_matryoshka train ...
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import simple_parsing
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAEConfig
from simple_parsing.docstring import AttributeDocString, dp_parse
from simple_parsing.wrappers import DataclassWrapper, FieldWrapper

import sae_lens_matryoshka  # noqa: F401  (registers the architecture)
from sae_lens_matryoshka import distributed
from sae_lens_matryoshka.config import ARCHITECTURE, is_matryoshka
from sae_lens_matryoshka.io.hub import OFFLINE_HINT, hub_errors_in_one_line
from sae_lens_matryoshka.io.local_sources import (
    local_overrides,
    looks_like_a_path,
    overrides_named_by_config,
)
from sae_lens_matryoshka.io.save_paths import check_runner_paths
from sae_lens_matryoshka.run_checks import check_settings
from sae_lens_matryoshka.toy import ToyHierarchy
from sae_lens_matryoshka.toy import demo as toy_demo
from sae_lens_matryoshka_cli import command_parser

TRAIN_PROG = "sae-lens-matryoshka train"
LOCAL_FOLDERS_HINT = (
    f"{OFFLINE_HINT}, or train from local folders: --model_name /path/to/model "
    "(save_pretrained) and --dataset_path /path/to/tokens (Dataset.save_to_disk)"
)
#: ``train``'s usage line, in its help and above each error: argparse's own lists every
#: runner flag, 90 lines that buried the one line saying what was wrong
TRAIN_USAGE = (
    "%(prog)s --d_in N --d_sae N --model_name NAME_OR_FOLDER --hook_name HOOK "
    "--dataset_path NAME_OR_FOLDER [FLAG VALUE ...]  (--help lists every flag)"
)


def usage_error(message: str) -> NoReturn:
    """Stop ``train`` as argparse stops on a bad flag: the usage line, ``prog: error: message``, exit 2.

    ``message`` is put on one line (a config's message may span several).
    """
    parser = argparse.ArgumentParser(prog=TRAIN_PROG, usage=TRAIN_USAGE, add_help=False)
    parser.error(" ".join(line.strip() for line in message.splitlines() if line.strip()))


#: help for the flags that no config's docstring documents (SAELens's SAE config and
#: logging fields), and for those this command line reads differently (local folders), by
#: the flag as ``train --help`` shows it; the other flags' help is their config's docstring
FLAG_HELP = {
    "--d_in": "width of the hooked activations (d_model for a residual stream hook); "
    "required by this command",
    "--d_sae": "latents in the SAE, its full width; required by this command",
    "--model_name": "a model TransformerLens knows (e.g. gpt2), or a folder written by "
    "model.save_pretrained and tokenizer.save_pretrained",
    "--dataset_path": "a Hub dataset id (owner/name), or a folder written by "
    "Dataset.save_to_disk or holding parquet / JSON / arrow files",
    "--sae.dtype": "dtype of the SAE's weights",
    "--sae.device": "where the SAE is built, before the runner moves it to --device",
    "--apply_b_dec_to_input": "subtract the decoder bias from the input before encoding",
    "--normalize_activations": "how activations are normalized before the SAE sees them",
    "--reshape_activations": "hook_z: flatten an attention hook's heads into one vector",
    "--metadata": "filled in by the runner from the model, hook and dataset flags",
    "--log_to_wandb": "log the run to Weights & Biases (its credentials are checked first)",
    "--log_activations_store_to_wandb": "not used by SAELens's runner",
    "--log_optimizer_state_to_wandb": "not used by SAELens's runner",
    "--log_weights_to_wandb": "upload the SAE's weights with its config to wandb",
    "--wandb_project": "the wandb project",
    "--wandb_id": "the wandb run's id, also the checkpoint folder's name (None: a random one)",
    "--run_name": "the wandb run's name (None: architecture, d_sae, lr and training tokens)",
    "--wandb_entity": "the wandb user or team (None: wandb's default)",
    "--wandb_log_frequency": "log the training metrics to wandb every this many steps",
    "--eval_every_n_wandb_logs": "run the evals every this many wandb logs",
}
#: the heading of each config's flags in ``train --help``, by the field that holds the config
#: (``cfg``: the runner config itself). simple_parsing's own heading is the class name and
#: its docstring, which for a dataclass without one is its signature: over 2,000 characters
#: on one line for the runner config, nearly 400 for ``LoggingConfig``
GROUP_HEADINGS = {
    "cfg": "runner flags (SAELens's LanguageModelSAERunnerConfig)",
    "logger": "wandb flags (SAELens's LoggingConfig)",
    "sae": "SAE flags ({config}, chosen by --architecture)",
}


def _first_sentence(text: str) -> str:
    """``text`` up to its first full stop, on one line.

    ``train --help`` lists about 110 flags, and the configs' docstrings say
    up to sixteen lines about one; whole, they made the help 440 lines long
    at 80 columns.
    A full stop inside a sentence (``e.g.``, ``0.5``, ``v7.0.0``) is not
    followed by a space and a capital, quote, backquote or parenthesis, or is
    ``e.g.``.
    """
    text = " ".join(text.split())
    end = re.search(r"(?<!e\.g)(?<!i\.e)\.\s(?=[A-Z`\"(])", text)
    return text if end is None else text[: end.start() + 1]


def _docstring_entry(config: type, name: str) -> tuple[list[str], str]:
    """The ``Args:`` entry of ``config``'s docstring, or a base's, that documents field ``name``.

    Returns the fields the entry names and its text. simple_parsing finds an
    entry only under the field's own name; our configs document some fields
    in pairs (``l1_coefficient, l1_warm_up_steps: ...``).
    """
    for cls in inspect.getmro(config):
        for param in dp_parse(inspect.getdoc(cls) or "").params:
            names = [documented.strip() for documented in param.arg_name.split(",")]
            if name in names:
                return names, param.description or ""
    return [name], ""


def _flag_help(wrapper: DataclassWrapper[Any], field: FieldWrapper) -> str:
    """One flag's help: ``FLAG_HELP``'s, else the first sentence of its config's docstring entry.

    Never a comment beside the field: SAELens keeps section headings there,
    which simple_parsing would otherwise show as help (``--lr float  #
    Learning Rate Schedule``). An entry that documents several fields is
    shown under the first, and the others point to it, rather than the same
    paragraph twice. (``--architecture``'s help, given where
    ``parse_train_args`` declares the field, takes precedence over this.)
    """
    if field.option_strings[0] in FLAG_HELP:
        return FLAG_HELP[field.option_strings[0]]
    names, text = _docstring_entry(wrapper.dataclass, field.name)
    if names[0] != field.name:
        return f"documented with --{names[0]}"
    return _first_sentence(text).replace("%", "%%")  # argparse %-formats each help


class _HelpFormatter(simple_parsing.SimpleHelpFormatter):
    """simple_parsing's help format, without ``(default: None)`` after a required flag."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.required else super()._get_help_string(action)


class _RunnerFlagParser(simple_parsing.ArgumentParser):
    """simple_parsing's parser, with a short help for every flag and a heading for each config.

    The help comes from ``_flag_help``; each config's flags come under a
    ``GROUP_HEADINGS`` heading, without simple_parsing's description of the
    group (the config's docstring, or the dataclass's signature where it has
    none).
    """

    def _resolve_subgroups(self, wrappers: Any, args: Any, namespace: Any = None) -> Any:
        resolved, chosen = super()._resolve_subgroups(wrappers, args, namespace)
        for root in resolved:
            for wrapper in [root, *root.descendants]:
                for field in wrapper.fields:
                    field._docstring = AttributeDocString()  # an undocumented field: no help
                    field.help = _flag_help(wrapper, field)
        return resolved, chosen

    def _preprocessing(self, args: Sequence[str] = (), namespace: Any = None) -> None:
        super()._preprocessing(args, namespace)  # adds one argument group per config
        headings = {
            wrapper.title: GROUP_HEADINGS.get(wrapper.name, "{config} flags").format(
                config=wrapper.dataclass.__name__
            )
            for wrapper in self._wrappers
        }
        for group in self._action_groups:
            if group.title in headings:
                group.title, group.description = headings[group.title], None


def parse_train_args(args: Sequence[str]) -> LanguageModelSAERunnerConfig[Any]:
    """A runner config from SAELens's runner flags; ``--architecture`` defaults to matryoshka.

    Any registered architecture may be chosen; ``--d_in`` and ``--d_sae`` are
    required (every SAE config needs them, and a guess would train the wrong
    shape). No flags at all shows the help. ``--latent_shards`` is accepted
    so that the help lists it with the others, but ``train`` reads it (and
    takes it out) before this parser sees the flags.
    """
    sae_configs = {name: config for name, (_, config) in SAE_TRAINING_CLASS_REGISTRY.items()}
    command_line = dataclasses.make_dataclass(
        "TrainCommandLine",
        [
            (
                "sae",
                TrainingSAEConfig,
                simple_parsing.subgroups(
                    sae_configs,
                    default=ARCHITECTURE,
                    alias="--architecture",
                    metavar="NAME",
                    help="the SAE's architecture, one of: %(choices)s. The SAE flags below are "
                    "its config's (--architecture NAME --help lists another's)",
                ),
            )
        ],
        bases=(LanguageModelSAERunnerConfig,),
    )
    parser = _RunnerFlagParser(
        prog=TRAIN_PROG,
        usage=TRAIN_USAGE,
        description="Train an SAE with SAELens's runner: a Matryoshka SAE unless --architecture\n"
        "says otherwise. Under torchrun it trains data-parallel (see --latent_shards).",
        epilog="Most flags' help is the first sentence of their config class's docstring;\n"
        "Python's help() on the class (the headings name it) shows the rest.",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    _add_latent_shards(parser)
    parser.add_arguments(command_line, dest="cfg")
    cfg: LanguageModelSAERunnerConfig[Any] = parser.parse_args(list(args) or ["--help"]).cfg
    return cfg


def check_wandb_login() -> None:
    """Stop now, before a model loads, if wandb has no credentials to log with.

    With a terminal, wandb asks for a key here; without one it has none to
    ask for, and SAELens's runner would fail only after loading the model and
    the data.
    """
    import wandb

    try:
        wandb.login(verify=False)
    except wandb.errors.UsageError as error:
        raise SystemExit(
            f"{TRAIN_PROG}: --log_to_wandb is on (SAELens's default) but wandb has no API key "
            f"({error}). Run `wandb login` or set WANDB_API_KEY; or log offline "
            "(WANDB_MODE=offline); or pass --log_to_wandb false."
        ) from error


def report(run: distributed.TrainingRun) -> None:
    """Print where the trained SAE went, where the run did not print it itself.

    A Matryoshka run prints where its SAE, checkpoints and record went and
    each level's evals (``run_record``). Left to say here: the same paths for
    other architectures, and for a latent-sharded run, whose SAE is gathered
    and saved whole after its runner has finished.
    """
    cfg = run.cfg
    sharded = run.mesh is not None and run.mesh.n_shards > 1
    if is_matryoshka(cfg.sae) and not sharded:
        return
    if cfg.output_path is None:
        print(f"{TRAIN_PROG}: not saved (--output_path is None).")
    else:
        print(f"{TRAIN_PROG}: saved to {Path(cfg.output_path).resolve()}")
    if cfg.checkpoint_path is not None and cfg.n_checkpoints + cfg.save_final_checkpoint > 0:
        print(f"{TRAIN_PROG}: checkpoints in {Path(cfg.checkpoint_path).resolve()}")


def _add_latent_shards(parser: argparse.ArgumentParser) -> None:
    """Add ``--latent_shards``, ``train``'s one flag that is no config's field, to ``parser``.

    ``train`` reads it before the runner flags (``_latent_shards``);
    ``parse_train_args``'s parser has it too, so that ``--help`` lists it.
    """
    parser.add_argument(
        "--latent_shards",
        type=_positive(int),
        default=1,
        help="under torchrun, split the SAE's latents over this many ranks; the other ranks "
        "are data-parallel replicas, and --training_tokens and --train_batch_size_tokens are "
        "per replica",
    )


def _latent_shards(args: Sequence[str]) -> tuple[list[str], int]:
    """``--latent_shards N`` taken out of the runner flags (default 1)."""
    parser = argparse.ArgumentParser(
        prog=TRAIN_PROG, usage=TRAIN_USAGE, add_help=False, allow_abbrev=False
    )
    _add_latent_shards(parser)
    parsed, rest = parser.parse_known_args(list(args))
    return rest, parsed.latent_shards


#: the runner's counts, and the least each can be: SAELens accepts a negative or zero one
#: and fails on it later (a ZeroDivisionError, an empty run, a crash after saving)
RUN_COUNTS = {
    "training_tokens": 1,
    "train_batch_size_tokens": 1,
    "context_size": 1,
    "store_batch_size_prompts": 1,
    "n_batches_in_buffer": 1,
    "n_checkpoints": 0,
    "n_eval_batches": 1,
}


def check_run_counts(args: Sequence[str]) -> None:
    """Refuse, naming the flag, a count below what a run needs, as given on the command line.

    Read from the flags themselves, before SAELens builds its config (which
    divides by ``--train_batch_size_tokens`` as it does); a value that is not
    an integer is left to the parser's own message.
    """
    for position, arg in enumerate(args):
        name, equals, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or name not in RUN_COUNTS:
            continue
        text = text if equals else (args[position + 1] if position + 1 < len(args) else "")
        try:
            value = int(text)
        except ValueError:
            continue
        if value < RUN_COUNTS[name]:
            usage_error(f"--{name} must be at least {RUN_COUNTS[name]}, got {value}.")


#: what each flag that may name a local folder expects there, for the error when it does not
LOCAL_PATH_FLAGS = {
    "model_name": "a folder written by model.save_pretrained (and tokenizer.save_pretrained), "
    "or a model name TransformerLens knows, such as gpt2",
    "dataset_path": "a folder written by Dataset.save_to_disk or holding parquet / JSON / arrow "
    "files, or a Hub dataset id (owner/name)",
}


def check_local_paths(cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    """Refuse a ``--model_name`` or ``--dataset_path`` that is a path to nothing, before anything loads.

    Only what can only be a path (``./``, ``/``, ``~``, two or more ``/``:
    ``local_sources.looks_like_a_path``): SAELens would take it for a Hub
    name and fail after the model has loaded (the dataset) or list every
    model TransformerLens knows (the model). A model folder without
    ``config.json`` is refused too: nothing could load it.
    """
    for field, expected in LOCAL_PATH_FLAGS.items():
        name = getattr(cfg, field)
        path = Path(name).expanduser()
        if looks_like_a_path(name) and not path.exists():
            usage_error(
                f"--{field} {name}: no such file or folder ({path.absolute()}). Give {expected}."
            )
    model = Path(cfg.model_name).expanduser()
    if model.is_dir() and not (model / "config.json").is_file():
        usage_error(
            f"--model_name {cfg.model_name}: the folder has no config.json. Write the model "
            "there with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)."
        )


def train(args: Sequence[str]) -> None:
    """``sae-lens-matryoshka train ARGS``: check, load (local folders too), train, report."""
    args, latent_shards = _latent_shards(args)
    check_run_counts(args)
    try:
        cfg = parse_train_args(args)
    except ValueError as error:  # a field the SAE or runner config refuses, named by it
        usage_error(str(error))
    check_local_paths(cfg)
    launched_rank = os.environ.get("RANK", "0")  # under torchrun, before the ranks meet
    if cfg.logger.log_to_wandb and launched_rank == "0":
        check_wandb_login()
    with hub_errors_in_one_line(LOCAL_FOLDERS_HINT), overrides_named_by_config():
        try:
            if is_matryoshka(cfg.sae):
                # the runner checks these before it loads a model, but local_overrides
                # loads a model folder before the runner is built
                check_settings(cfg)
                check_runner_paths(cfg)
            run = distributed.build_runner(cfg, latent_shards, **local_overrides(cfg))
        except ValueError as error:  # a setting the run cannot use, named by its check
            usage_error(str(error))
    distributed.train(run)
    if distributed.rank() == 0:
        report(run)


#: what a positive-number option parses to
Number = TypeVar("Number", int, float)


def _positive(kind: Callable[[str], Number]) -> Callable[[str], Number]:
    """An argparse type: ``kind`` of the text, refused unless it is above zero."""

    def parse(text: str) -> Number:
        value = kind(text)  # a ValueError becomes argparse's "invalid int value: 'x'"
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _build_parser() -> argparse.ArgumentParser:
    """The script's parser (``sae_lens_matryoshka_cli``) with ``toy``'s options added."""
    parser, commands = command_parser()
    toy = commands["toy"]
    toy.add_argument(
        "--output-dir",
        default="matryoshka_toy",
        help="where metrics.json, the PNGs and the saved SAEs go",
    )
    toy.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    toy.add_argument(
        "--seeds",
        type=_positive(int),
        default=toy_demo.DEFAULT_SEEDS,
        help=f"how many seeds, from --seed on (default {toy_demo.DEFAULT_SEEDS})",
    )
    toy.add_argument(
        "--steps",
        type=_positive(int),
        default=toy_demo.DEFAULT_STEPS,
        help=f"training steps of {toy_demo.BATCH_SIZE} samples per SAE "
        f"(default {toy_demo.DEFAULT_STEPS})",
    )
    toy.add_argument(
        "--width",
        type=_positive(int),
        default=None,
        help="latents in both SAEs (default: 40, twice the true features; more than 3, the "
        "first level)",
    )
    toy.add_argument(
        "--activation",
        choices=["relu", "batchtopk"],
        default=None,
        help="relu: ReLU + L1 for both SAEs (the default); batchtopk: the paper's BatchTopK "
        "against SAELens's (implied by --l0)",
    )
    toy.add_argument(
        "--l1",
        type=_positive(float),
        default=None,
        help=f"L1 coefficient of both ReLU SAEs (default {toy_demo.DEFAULT_L1})",
    )
    toy.add_argument(
        "--l0",
        type=_positive(float),
        default=None,
        help="BatchTopK k of both SAEs (default: the data's L0); implies --activation batchtopk",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-lens-matryoshka`` script."""
    parser = _build_parser()
    parsed, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if parsed.command == "train":
        train(rest)  # data-parallel under torchrun, a plain runner run otherwise
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    activation: toy_demo.Activation = parsed.activation or (
        "batchtopk" if parsed.l0 is not None else "relu"
    )
    try:  # the options' combination, checked before any training
        toy_demo.demo_settings(
            ToyHierarchy.nabeshima(),
            parsed.width,
            activation,
            parsed.l1,
            parsed.l0,
            parsed.steps,
        )
    except ValueError as error:
        parser.error(f"toy: {error}")
    toy_demo.run_toy_demo(
        output_dir=parsed.output_dir,
        seed=parsed.seed,
        seeds=parsed.seeds,
        steps=parsed.steps,
        width=parsed.width,
        activation=activation,
        l1=parsed.l1,
        l0=parsed.l0,
    )
    return 0
