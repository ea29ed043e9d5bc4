"""The command line: SAELens's runner flags with the plugin registered."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub.errors import LocalEntryNotFoundError
from sae_lens import SAE, LanguageModelSAERunnerConfig
from sae_lens.config import LoggingConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.standard_sae import StandardTrainingSAEConfig

from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.cli import TRAIN_PROG, TRAIN_USAGE, main, parse_train_args
from sae_lens_matryoshka.io.hub import hub_unreachable

from .conftest import (
    CONTEXT,
    D_MODEL,
    HOOK,
    build_token_dataset,
    run_torchrun,
    save_hf_model_folder,
)
from .test_local_sources import save_long_tokens, save_users_gpt2

SCRIPT = str(Path(sys.executable).parent / "sae-lens-matryoshka")

SAE_FLAGS = [
    "--d_in",
    str(D_MODEL),
    "--d_sae",
    "64",
    "--k",
    "4",
    "--matryoshka_widths",
    "8",
    "24",
    "64",
]


def test_train_flags_build_a_matryoshka_runner_config() -> None:
    cfg = parse_train_args(
        [*SAE_FLAGS, "--use_matryoshka_aux_loss", "true", "--hook_name", HOOK, "--lr", "0.001"]
    )
    assert isinstance(cfg.sae, MatryoshkaTrainingSAEConfig)
    assert cfg.sae.matryoshka_widths == [8, 24, 64]
    assert cfg.sae.k == 4
    assert cfg.sae.use_matryoshka_aux_loss
    assert cfg.hook_name == HOOK
    assert cfg.lr == 0.001
    explicit = parse_train_args(["--architecture", "matryoshka", *SAE_FLAGS])
    assert isinstance(explicit.sae, MatryoshkaTrainingSAEConfig)
    assert explicit.sae.matryoshka_widths == [8, 24, 64]
    assert not explicit.sae.use_matryoshka_aux_loss


def test_other_saelens_architectures_still_parse() -> None:
    cfg = parse_train_args(["--architecture", "standard", "--d_in", "16", "--d_sae", "64"])
    assert isinstance(cfg.sae, StandardTrainingSAEConfig)


def test_d_in_and_d_sae_are_required(capsys) -> None:
    """SAELens's command line would quietly train d_in=512, d_sae=1024."""
    with pytest.raises(SystemExit):
        parse_train_args(["--k", "4", "--matryoshka_widths", "8", "64"])
    assert "the following arguments are required: --d_in, --d_sae" in capsys.readouterr().err


def test_bad_flags_give_the_config_error() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        parse_train_args(
            ["--d_in", "16", "--d_sae", "64", "--k", "4", "--matryoshka_widths", "24", "8", "64"]
        )


def train_help(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """What ``train [FLAGS] --help`` prints (it exits 0), at the width of the caller's COLUMNS."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        parse_train_args([*flags, "--help"])
    assert raised.value.code == 0
    return capsys.readouterr().out


def help_entries(text: str) -> dict[str, str]:
    """Each spelling of each flag that ``--help`` lists, mapped to its help on one line.

    argparse starts an entry with a line indented two spaces (``  --lr float
    The learning rate.``; the help moves to the next line when the flag is
    long) and continues it on lines indented 24.
    """
    entries: dict[str, list[str]] = {}
    spellings: list[str] = []
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation, _, help_text = line.strip().partition("  ")
            spellings = [word.rstrip(",") for word in invocation.split() if word.startswith("-")]
            for spelling in spellings:
                entries[spelling] = [help_text.strip()] if help_text.strip() else []
        elif line.startswith(" " * 24) and spellings:
            for spelling in spellings:
                entries[spelling].append(line.strip())
        else:
            spellings = []
    return {spelling: " ".join(parts) for spelling, parts in entries.items()}


def expected_train_flags() -> set[str]:
    """Every flag ``train`` accepts, from the config dataclasses' fields rather than the parser.

    The runner's fields, its logger's, the default (Matryoshka) SAE config's
    (``--sae.NAME`` where the runner has a field of the same name), the
    SAE's ``--architecture`` and the command's own ``--latent_shards``.
    """
    runner = {field.name for field in dataclasses.fields(LanguageModelSAERunnerConfig)}
    logger = {field.name for field in dataclasses.fields(LoggingConfig)}
    sae = {field.name for field in dataclasses.fields(MatryoshkaTrainingSAEConfig)}
    runner -= {"sae", "logger"}  # the SAE config's and LoggingConfig's flags come instead
    return (
        {f"--{name}" for name in runner | logger | (sae - runner)}
        | {f"--sae.{name}" for name in sae & runner}
        | {"--architecture", "--latent_shards"}
    )


#: the longest line ``train --help`` may print at COLUMNS=80, the usage line aside: argparse
#: wraps help text and headings to COLUMNS but not a flag's own spelling, the longest of which
#: (--normalize_activations with its four choices) is 89 characters; the class descriptions
#: this help once printed were 367 and 2,237 characters on one line
HELP_LINE_LIMIT = 100


@pytest.mark.parametrize("architecture", sorted(SAE_TRAINING_CLASS_REGISTRY))
def test_train_help_has_no_dataclass_dump_and_no_long_line(
    architecture: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each config's flags under a heading, not under its docstring or its signature."""
    monkeypatch.setenv("COLUMNS", "80")
    text = train_help(capsys, "--architecture", architecture)
    usage, *lines = text.splitlines()
    assert usage == "usage: " + TRAIN_USAGE % {"prog": TRAIN_PROG}
    assert max(len(line) for line in lines) <= HELP_LINE_LIMIT
    sae_config = SAE_TRAINING_CLASS_REGISTRY[architecture][1]
    for config in ("TrainCommandLine", "LanguageModelSAERunnerConfig", "LoggingConfig"):
        assert f"{config}(" not in text
    assert f"{sae_config.__name__}(" not in text
    assert f"SAE flags ({sae_config.__name__}, chosen by --architecture):" in lines
    assert "['cfg" not in text  # simple_parsing's headings name where each config goes


def test_train_help_lists_every_flag_with_a_help_and_its_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked against the config dataclasses' fields, not the parser's own list of flags.

    Comparing the parser with itself would miss a flag it drops or one the
    command reads beside it (``--latent_shards``, once parsed but not listed).
    """
    monkeypatch.setenv("COLUMNS", "80")
    text = train_help(capsys)
    entries = help_entries(text)
    assert sorted(expected_train_flags() - entries.keys()) == []
    for flag, help_text in entries.items():
        if flag in ("-h", "--help"):
            continue
        described, _, default = help_text.partition(" (default: ")
        assert described and not described.startswith("(default"), flag
        if flag in ("--d_in", "--d_sae"):
            assert not default and described.endswith("required by this command"), flag
        else:
            assert default.endswith(")"), flag
    # the first sentence of the config's docstring entry, or the entry that names a field
    # with others, once
    assert entries["--lr"] == "The learning rate. (default: 0.0003)"
    assert entries["--matryoshka_widths"] == (
        "strictly increasing prefix widths; the last is ``d_sae`` (appended with a warning "
        "if missing). (default: [])"
    )
    assert entries["--l1_warm_up_steps"] == "documented with --l1_coefficient (default: 0)"
    assert entries["--latent_shards"].startswith("under torchrun, split the SAE's latents")
    assert entries["--latent_shards"].endswith("(default: 1)")
    assert entries["--architecture"].endswith("(default: matryoshka)")
    assert entries["--d_in"].startswith("width of the hooked activations")
    assert entries["--d_sae"].startswith("latents in the SAE")
    # first sentences: 347 lines at 80 columns; the whole docstrings and the class
    # descriptions made 441
    assert len(text.splitlines()) < 400


def _store_flags(training_tokens: int) -> list[str]:
    """The activation store both CLI runs share: short prompts, batches of 64 tokens."""
    return [
        "--context_size",
        str(CONTEXT),
        "--prepend_bos",
        "false",
        "--training_tokens",
        str(training_tokens),
        "--train_batch_size_tokens",
        "64",
        "--store_batch_size_prompts",
        "4",
        "--n_batches_in_buffer",
        "4",
    ]


def _train_flags(data_dir: Path, output: Path, checkpoints: Path) -> list[str]:
    return [
        *SAE_FLAGS,
        "--model_name",
        "tiny-random",
        "--hook_name",
        HOOK,
        "--dataset_path",
        str(data_dir),
        "--is_dataset_tokenized",
        "true",
        "--streaming",
        "false",
        *_store_flags(training_tokens=1280),
        "--output_path",
        str(output),
        "--checkpoint_path",
        str(checkpoints),
        "--verbose",
        "false",
        "--log_to_wandb",
        "false",
    ]


def test_train_trains_end_to_end(tiny_model, token_dataset, tmp_path: Path, monkeypatch) -> None:
    """`sae-lens-matryoshka train` with a local dataset; only the model download is replaced."""
    data_dir = tmp_path / "tokens"
    data_dir.mkdir()
    token_dataset.to_parquet(str(data_dir / "train.parquet"))
    monkeypatch.setattr("sae_lens.llm_sae_training_runner.load_model", lambda *a, **k: tiny_model)
    output = tmp_path / "output"
    main(["train", *_train_flags(data_dir, output, tmp_path / "ckpt")])
    loaded = SAE.load_from_disk(output)
    assert isinstance(loaded, MatryoshkaSAE)
    assert loaded.matryoshka_widths == [8, 24, 64]


#: torchrun runs this instead of the installed script, to swap the model download
#: for the tiny random model; everything else is the real command line
TORCHRUN_ENTRY = """
import sys
import sae_lens.llm_sae_training_runner as runner_module
from transformer_lens import HookedTransformer, HookedTransformerConfig
from sae_lens_matryoshka.cli import main

def tiny_model(*args, **kwargs):
    return HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=64,
        act_fn="gelu", normalization_type="LN", seed=0))

runner_module.load_model = tiny_model
sys.exit(main())
"""


@pytest.mark.slow
def test_train_under_torchrun_shards_the_latents(token_dataset, tmp_path: Path) -> None:
    """Two ranks hold half the latents each (data parallelism is the same path, one shard)."""
    data_dir = tmp_path / "tokens"
    data_dir.mkdir()
    token_dataset.to_parquet(str(data_dir / "train.parquet"))
    entry = tmp_path / "entry.py"
    entry.write_text(TORCHRUN_ENTRY)
    output = tmp_path / "output"
    flags = [*_train_flags(data_dir, output, tmp_path / "ckpt"), "--latent_shards", "2"]
    completed = run_torchrun([str(entry), "train", *flags])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (
        "distributed training on 1 replica(s) x 2 latent shards, 64 tokens per global batch, "
        "1280 tokens in all" in completed.stderr
    )
    assert "this rank holds one latent shard" in completed.stdout
    # rank 0 alone shows the bar (it starts once) and warnings (each rank warns once)
    assert completed.stderr.count("Training Matryoshka SAE:   0%") == 1
    assert completed.stderr.count("ShortDatasetWarning: the dataset holds 1,024 tokens") == 1
    assert "Training Matryoshka SAE: 100%" in completed.stderr
    assert completed.stdout.count("saved to") == 1
    loaded = SAE.load_from_disk(output)
    assert isinstance(loaded, MatryoshkaSAE)
    assert loaded.matryoshka_widths == [8, 24, 64]


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "sae_lens_matryoshka"],
        [str(Path(sys.executable).parent / "sae-lens-matryoshka")],
    ],
)
@pytest.mark.slow
def test_entry_points_run(command: list[str]) -> None:
    top = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True)
    assert "train" in top.stdout
    train = subprocess.run(
        [*command, "train", "--help"], capture_output=True, text=True, check=True
    )
    assert train.stdout.startswith("usage: sae-lens-matryoshka train ")
    entries = help_entries(train.stdout)
    assert "--matryoshka_widths" in entries
    assert "--use_matryoshka_aux_loss" in entries
    assert entries["--architecture"].endswith("(default: matryoshka)")
    assert entries["--lr"].startswith("The learning rate.")  # docstrings, not comments


#: the script's front door answering: what it printed, its exit status, the modules it loaded
FRONT_DOOR = """
import sys
import sae_lens_matryoshka_cli
try:
    sae_lens_matryoshka_cli.main(sys.argv[1:])
except SystemExit as exit:
    print("exit", exit.code)
print("loaded", sorted({name.split(".")[0] for name in sys.modules}))
"""


@pytest.mark.parametrize(
    ("args", "expected", "code"),
    [
        (["--help"], "train     train a Matryoshka SAE", 0),
        ([], "error: the following arguments are required: COMMAND", 2),
        (["trian"], "invalid choice: 'trian' (choose from 'train', 'toy')", 2),
    ],
)
def test_the_scripts_help_and_usage_errors_load_no_saelens(
    args: list[str], expected: str, code: int
) -> None:
    """Importing the package imports SAELens and torch (7-11 s here): ``--help`` must not."""
    done = subprocess.run(
        [sys.executable, "-c", FRONT_DOOR, *args], capture_output=True, text=True, check=True
    )
    assert expected in done.stdout + done.stderr
    assert f"exit {code}" in done.stdout
    loaded = done.stdout.rsplit("loaded", 1)[1]
    for heavy in ("sae_lens", "sae_lens_matryoshka", "torch", "transformer_lens"):
        assert f"'{heavy}'" not in loaded, heavy


def test_the_scripts_commands_go_on_to_the_package(capsys: pytest.CaptureFixture[str]) -> None:
    """A command passes the front door with its own options (``toy``'s are checked there)."""
    import sae_lens_matryoshka_cli

    with pytest.raises(SystemExit) as exit_info:
        sae_lens_matryoshka_cli.main(["toy", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "argument --steps: must be positive, got 0" in capsys.readouterr().err


def _offline_flags(model: Path, tokens: Path, output: Path) -> list[str]:
    """A run from local folders: a ``save_pretrained`` model and a ``save_to_disk`` dataset."""
    return [
        *SAE_FLAGS,
        "--model_name",
        str(model),
        "--hook_name",
        HOOK,
        "--dataset_path",
        str(tokens),
        "--is_dataset_tokenized",
        "true",
        # 21 steps: not a multiple of the 100 steps SAELens's bar advances by
        *_store_flags(training_tokens=64 * 21),
        "--n_eval_batches",
        "2",
        "--output_path",
        str(output),
        "--checkpoint_path",
        str(output.parent / "checkpoints"),
    ]


def test_train_offline_from_local_folders_reports_the_levels(tmp_path: Path, capfd) -> None:
    """No Hub: the model and tokens are folders; SAELens's Hub-only checks never run."""
    model = save_hf_model_folder(tmp_path / "model")
    build_token_dataset().save_to_disk(tmp_path / "tokens")
    output = tmp_path / "output"
    main(["train", *_offline_flags(model, tmp_path / "tokens", output), "--log_to_wandb", "false"])
    out, err = capfd.readouterr()
    assert f"saved to {output.resolve()}" in out
    table = out[out.index("width  explained variance") :].splitlines()
    assert [int(line.split()[0]) for line in table[1:]] == [8, 24, 64]
    l0 = [float(line.split()[2]) for line in table[1:]]
    assert 0 < l0[0] <= l0[1] <= l0[2]  # nested levels fire nested latents
    assert "Training Matryoshka SAE: 100%" in err
    assert "will override the one specified in your configuration" not in err
    loaded = SAE.load_from_disk(output)
    assert isinstance(loaded, MatryoshkaSAE)
    assert loaded.cfg.metadata.model_name == str(model)


def _bare_environment(tmp_path: Path) -> dict[str, str]:
    """No wandb credentials or mode, an empty Hub cache, no network for the Hub."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("WANDB_", "HF_HOME", "HF_HUB_CACHE"))
    }
    return env | {"HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


def test_wandb_without_credentials_fails_before_the_model_loads(tmp_path: Path) -> None:
    """Logging to wandb is SAELens's default; the Hub model here would fail if loading began."""
    flags = [*SAE_FLAGS, "--model_name", "tiny-stories-1M", "--hook_name", HOOK]
    completed = subprocess.run(
        [SCRIPT, "train", *flags],
        capture_output=True,
        text=True,
        env=_bare_environment(tmp_path),
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert completed.returncode == 1
    assert "--log_to_wandb is on (SAELens's default) but wandb has no API key" in completed.stderr
    assert "--log_to_wandb false" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert "Hugging Face Hub" not in completed.stderr


def test_a_model_the_hub_cannot_give_is_one_line(tmp_path: Path) -> None:
    flags = [*SAE_FLAGS, "--model_name", "tiny-stories-1M", "--hook_name", HOOK]
    flags += ["--n_batches_in_buffer", "32"]  # SAELens's default buffer is refused first
    start = time.perf_counter()
    completed = subprocess.run(
        [SCRIPT, "train", *flags, "--log_to_wandb", "false"],
        capture_output=True,
        text=True,
        env=_bare_environment(tmp_path),
        timeout=120,
    )
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    (line,) = [line for line in completed.stderr.splitlines() if "Hugging Face Hub" in line]
    assert line.startswith("Could not reach the Hugging Face Hub (")
    assert "HF_HUB_OFFLINE=1" in line and "--model_name /path/to/model" in line
    assert time.perf_counter() - start < 60


def test_hub_failures_are_told_apart_from_other_errors() -> None:
    try:
        try:
            raise LocalEntryNotFoundError("not in the cache")
        except LocalEntryNotFoundError as cause:
            raise OSError("We couldn't connect to 'https://huggingface.co'\nmore") from cause
    except OSError as error:
        line = hub_unreachable(error)
    assert line is not None
    assert line.startswith("Could not reach the Hugging Face Hub (We couldn't connect")
    assert "\n" not in line
    assert hub_unreachable(ConnectionError("Couldn't reach 'a/b' on the Hub")) is not None
    assert hub_unreachable(ValueError("d_in must be positive")) is None
    assert hub_unreachable(FileNotFoundError("/data/tokens")) is None


@pytest.mark.parametrize(
    ("flag", "value", "least"),
    [
        ("--training_tokens", "-5", 1),
        ("--train_batch_size_tokens", "0", 1),
        ("--n_checkpoints", "-1", 0),
        ("--n_eval_batches", "0", 1),
    ],
)
def test_a_count_a_run_cannot_use_is_one_line_before_anything_loads(
    flag: str, value: str, least: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """SAELens takes these and fails later (ZeroDivisionError, a crash after saving)."""
    flags = [*SAE_FLAGS, "--model_name", "no-such-model", "--hook_name", HOOK]
    error = usage_error_of(["train", *flags, "--log_to_wandb", "false", flag, value], capsys)
    assert error == f"{flag} must be at least {least}, got {value}."


def test_a_buffer_smaller_than_a_batch_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """SAELens's own defaults (20 batches of 128 tokens < 4,096) fail at 0%; here, before loading."""
    flags = [*SAE_FLAGS, "--model_name", "no-such-model", "--hook_name", HOOK]
    error = usage_error_of(["train", *flags, "--log_to_wandb", "false"], capsys)
    assert error.startswith("n_batches_in_buffer * context_size = 20 * 128 = 2560")


USAGE = "usage: sae-lens-matryoshka train --d_in N --d_sae N --model_name NAME_OR_FOLDER "


def usage_error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The error ``main(argv)`` stops with, after checking its form: argparse's, two lines, exit 2.

    The usage line (not the 90 lines argparse would make of SAELens's runner
    flags), then ``sae-lens-matryoshka train: error: ...``; returns what follows ``error: ``.
    """
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    usage, error = capsys.readouterr().err.splitlines()
    assert usage.startswith(USAGE)
    prefix = "sae-lens-matryoshka train: error: "
    assert error.startswith(prefix)
    return error.removeprefix(prefix)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (  # the SAE config's own check
            ["--matryoshka_widths", "24", "8", "64"],
            "MatryoshkaTrainingSAEConfig.matryoshka_widths must be strictly increasing",
        ),
        (  # the runner config's own check
            ["--use_chat_formatting", "true", "--is_dataset_tokenized", "true"],
            "use_chat_formatting and is_dataset_tokenized cannot both be True",
        ),
        (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
    ],
)
def test_a_config_error_is_the_usage_line_and_one_error_line(
    flags: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a traceback from the config, nor a 90-line usage before argparse's own errors."""
    widths = ["--d_in", str(D_MODEL), "--d_sae", "64", "--k", "4"]
    if "--matryoshka_widths" not in flags:
        widths += ["--matryoshka_widths", "8", "24", "64"]
    argv = ["train", *widths, "--model_name", "no-such-model", "--hook_name", HOOK, *flags]
    assert expected in usage_error_of(argv, capsys)


@pytest.mark.parametrize(
    ("flag", "path", "expected"),
    [
        ("--dataset_path", "./no/such/tokens", "no/such/tokens"),
        ("--dataset_path", "~/no-such-tokens", "no-such-tokens"),
        ("--dataset_path", "data/no/such-tokens", "data/no/such-tokens"),
        ("--model_name", "./no-such-model", "no-such-model"),
    ],
)
def test_a_path_to_nothing_is_one_line_before_anything_loads(
    flag: str, path: str, expected: str, capsys: pytest.CaptureFixture[str], monkeypatch, tmp_path
) -> None:
    """SAELens takes a missing dataset folder for a Hub id and fails after the model has loaded."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("sae_lens_matryoshka.cli.local_overrides", _nothing_may_load)
    flags = {"--model_name": "tiny-random", "--dataset_path": "owner/tokens", flag: path}
    argv = ["train", *SAE_FLAGS, "--hook_name", HOOK, *(x for pair in flags.items() for x in pair)]
    error = usage_error_of([*argv, "--n_batches_in_buffer", "32"], capsys)
    assert error.startswith(f"{flag} {path}: no such file or folder ({tmp_path}/")
    assert expected in error
    what = "Dataset.save_to_disk" if flag == "--dataset_path" else "model.save_pretrained"
    assert what in error


def test_a_model_folder_without_a_config_is_one_line(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("sae_lens_matryoshka.cli.local_overrides", _nothing_may_load)
    argv = ["train", *SAE_FLAGS, "--hook_name", HOOK, "--model_name", str(tmp_path)]
    error = usage_error_of(argv, capsys)
    assert error.startswith(f"--model_name {tmp_path}: the folder has no config.json.")


def test_settings_are_checked_before_a_local_model_folder_loads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch
) -> None:
    """The runner checks the buffer before it loads a model; a local folder loads before the runner."""
    model = save_hf_model_folder(tmp_path / "model")
    monkeypatch.setattr("sae_lens_matryoshka.cli.local_overrides", _nothing_may_load)
    argv = ["train", *SAE_FLAGS, "--hook_name", HOOK, "--model_name", str(model)]
    error = usage_error_of([*argv, "--log_to_wandb", "false"], capsys)
    assert error.startswith("n_batches_in_buffer * context_size = 20 * 128 = 2560")


def _nothing_may_load(*args: object, **kwargs: object) -> None:
    pytest.fail("a local folder was loaded before the checks")


@pytest.mark.slow  # a fresh process imports everything: 10-40 s
def test_the_installed_script_says_a_missing_dataset_in_two_lines(tmp_path: Path) -> None:
    """As a user sees it: the real script's whole stderr and exit status, from a fresh process."""
    flags = [*SAE_FLAGS, "--model_name", "tiny-stories-1M", "--hook_name", HOOK]
    completed = subprocess.run(
        [SCRIPT, "train", *flags, "--dataset_path", "./my-tokens", "--log_to_wandb", "false"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_bare_environment(tmp_path),
        timeout=120,
    )
    assert completed.returncode == 2
    usage, error = completed.stderr.splitlines()
    assert usage.startswith(USAGE)
    assert error.startswith(
        f"sae-lens-matryoshka train: error: --dataset_path ./my-tokens: no such file or folder "
        f"({tmp_path}/my-tokens). Give a folder written by Dataset.save_to_disk"
    )


def test_train_from_a_gpt2_folder_saved_by_todays_transformers(tmp_path: Path, capfd) -> None:
    """``GPT2Config(...)`` + ``save_pretrained`` with the installed transformers writes no n_ctx."""
    model = save_users_gpt2(tmp_path / "my-gpt2")
    tokens = save_long_tokens(tmp_path / "tokens")
    output = tmp_path / "output"
    flags = ["--d_in", "64", "--d_sae", "64", "--k", "4", "--matryoshka_widths", "16", "64"]
    flags += ["--model_name", str(model), "--hook_name", "blocks.1.hook_resid_post"]
    flags += ["--dataset_path", str(tokens), "--is_dataset_tokenized", "true"]
    flags += ["--context_size", "128", "--training_tokens", "512"]
    flags += ["--train_batch_size_tokens", "128", "--store_batch_size_prompts", "4"]
    flags += ["--n_batches_in_buffer", "4", "--n_eval_batches", "1"]
    flags += ["--output_path", str(output), "--checkpoint_path", str(tmp_path / "ckpt")]
    main(["train", *flags, "--log_to_wandb", "false"])
    out, err = capfd.readouterr()
    assert f"saved to {output.resolve()}" in out
    assert "Training Matryoshka SAE: 100%" in err
    loaded = SAE.load_from_disk(output)
    assert isinstance(loaded, MatryoshkaSAE) and loaded.matryoshka_widths == [16, 64]
