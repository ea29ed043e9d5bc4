"""The command line: SAELens's runner flags with the plugin registered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sae_lens import SAE
from sae_lens.saes.standard_sae import StandardTrainingSAEConfig

from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.cli import main, parse_train_args

from .conftest import CONTEXT, D_MODEL, HOOK, run_torchrun

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


def test_bad_flags_give_the_config_error() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        parse_train_args(
            ["--d_in", "16", "--d_sae", "64", "--k", "4", "--matryoshka_widths", "24", "8", "64"]
        )


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
        "--context_size",
        str(CONTEXT),
        "--prepend_bos",
        "false",
        "--training_tokens",
        "1280",
        "--train_batch_size_tokens",
        "64",
        "--store_batch_size_prompts",
        "4",
        "--n_batches_in_buffer",
        "4",
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


def test_train_under_torchrun_trains_data_parallel(token_dataset, tmp_path: Path) -> None:
    data_dir = tmp_path / "tokens"
    data_dir.mkdir()
    token_dataset.to_parquet(str(data_dir / "train.parquet"))
    entry = tmp_path / "entry.py"
    entry.write_text(TORCHRUN_ENTRY)
    output = tmp_path / "output"
    completed = run_torchrun(
        [str(entry), "train", *_train_flags(data_dir, output, tmp_path / "ckpt")]
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "data-parallel training on 2 ranks, 128 tokens per global batch" in completed.stderr
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
def test_entry_points_run(command: list[str]) -> None:
    top = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True)
    assert "train" in top.stdout
    train = subprocess.run(
        [*command, "train", "--help"], capture_output=True, text=True, check=True
    )
    assert "--matryoshka_widths" in train.stdout
    assert "--use_matryoshka_aux_loss" in train.stdout
