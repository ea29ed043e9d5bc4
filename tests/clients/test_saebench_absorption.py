"""SAEBench's absorption eval (first-letter spelling) runs on a Matryoshka SAE, offline.

The eval needs a model that represents each word's first letter and a
tokenizer whose words are single tokens in its prompt template
(``"{word} has the first letter:"``, the word read 6 tokens from the end).
Nothing like that can be downloaded here, so the model is built: a
word-level tokenizer over 26 x 16 made-up words (plus the template's words
and the capital-letter answers), and a one-layer random model whose blocks
write nothing (attention and MLP outputs zeroed) and whose embedding of each
word is its first letter's direction plus a direction of its own. Its
residual stream then holds the first letter linearly, as large models' do,
and SAEBench's ground-truth probes find it. A Matryoshka SAE is trained on it
by SAELens's runner and loaded from disk, and SAEBench's whole pipeline runs
on it: probe training, k-sparse probing, the absorption calculation.
"""

from __future__ import annotations

import functools
import random
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("sae_bench")

from datasets import Dataset
from sae_bench.evals.absorption import main as absorption_main
from sae_bench.evals.absorption.common import load_or_train_probe
from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
from sae_lens import (
    SAE,
    HookedSAETransformer,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)
from transformer_lens import HookedTransformerConfig

from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.evals import saebench_absorption

TEMPLATE_WORDS = ["has", "the", "first", "letter", ":"]
END = "<|endoftext|>"
D_MODEL = 32
HOOK = "blocks.0.hook_resid_post"
WIDTHS = [32, 96]


def spelling_vocab(per_letter: int = 16) -> list[str]:
    """The end token, the template's words, the answers ``A``..``Z`` and made-up 4-letter words."""
    rng = random.Random(0)
    words: list[str] = []
    for letter in string.ascii_lowercase:
        while len(words) < per_letter * (ord(letter) - ord("a") + 1):
            word = letter + "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
            if word not in words:
                words.append(word)
    return [END, *TEMPLATE_WORDS, *string.ascii_uppercase, *words]


def spelling_model() -> HookedSAETransformer:
    """A one-layer model whose residual stream after block 0 is each token's embedding.

    An alphabetic token's embedding is 5 x its first letter's direction (the
    26 are orthonormal) plus a random part of its own (norm about 1.1).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = spelling_vocab()
    words = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token=END))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # "letter:" -> "letter", ":"
    model = HookedSAETransformer(
        HookedTransformerConfig(
            n_layers=1, d_model=D_MODEL, n_ctx=96, d_head=8, n_heads=4, d_mlp=64,
            d_vocab=len(vocab), act_fn="gelu", normalization_type="LN", seed=0,
            model_name="spelling-toy",
        )
    )  # fmt: skip
    # set directly: HookedTransformer.set_tokenizer reloads the tokenizer by name from the Hub
    model.tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token=END, eos_token=END, pad_token=END, unk_token=END
    )
    model.cfg.tokenizer_prepends_bos = False  # to_tokens prepends the bos token itself
    generator = torch.Generator().manual_seed(0)
    letters = torch.linalg.qr(torch.randn(D_MODEL, 26, generator=generator)).Q.T  # orthonormal
    embedding = 0.2 * torch.randn(len(vocab), D_MODEL, generator=generator)
    for index, token in enumerate(vocab):
        if token.isalpha():
            embedding[index] += 5 * letters[string.ascii_lowercase.index(token[0].lower())]
    with torch.no_grad():
        model.embed.W_E.copy_(embedding)
        model.pos_embed.W_pos.zero_()
        block = model.blocks[0]
        for weight in (block.attn.W_O, block.attn.b_O, block.mlp.W_out, block.mlp.b_out):
            weight.zero_()
    return model


@pytest.fixture(scope="module")
def speller() -> HookedSAETransformer:
    return spelling_model()


@pytest.fixture(scope="module")
def spelling_sae(speller: HookedSAETransformer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BatchTopK Matryoshka SAE (levels 32 / 96) trained by SAELens's runner on the speller, saved."""
    folder = tmp_path_factory.mktemp("spelling_sae")
    tokens = torch.randint(
        0, speller.cfg.d_vocab, (256, 16), generator=torch.Generator().manual_seed(1)
    )
    cfg = LanguageModelSAERunnerConfig(
        sae=MatryoshkaTrainingSAEConfig(
            d_in=D_MODEL, d_sae=WIDTHS[-1], matryoshka_widths=WIDTHS, k=4
        ),
        model_name="spelling-toy",
        hook_name=HOOK,
        dataset_path="",
        is_dataset_tokenized=True,
        context_size=16,
        training_tokens=256 * 16 * 2,
        train_batch_size_tokens=128,
        store_batch_size_prompts=8,
        n_batches_in_buffer=8,
        prepend_bos=False,
        lr=3e-3,
        output_path=str(folder),
        logger=LoggingConfig(log_to_wandb=False),
        device="cpu",
        seed=0,
        verbose=False,
    )
    LanguageModelSAETrainingRunner(
        cfg,
        override_dataset=Dataset.from_dict({"input_ids": tokens.tolist()}),
        override_model=speller,
    ).run()
    return folder


def _config() -> AbsorptionEvalConfig:
    """SAEBench's defaults (its template, probe F1 > 0.6), but 10 letters and k up to 3.

    SAEBench asks for 20 letters whose ground-truth probe reaches F1 0.6 on
    held-out words. Its probes are class-balanced one-vs-rest logistic
    regressions: on this vocabulary (about 12 training words a letter) every
    word's letter ranks first, but a few words of other letters also score
    above 0, so some letters' F1 lands near 0.6, on either side depending on
    torch's thread count; between 20 and 26 letters pass. 10 keeps the test
    away from that edge.
    """
    return AbsorptionEvalConfig(
        model_name="spelling-toy",
        random_seed=0,
        max_k_value=3,
        k_sparse_probe_num_epochs=10,
        min_feats_for_eval=10,
    )


@pytest.fixture(scope="module")
def artifacts(speller: HookedSAETransformer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SAEBench's first-letter probe for the speller, trained once, where both runs below read it."""
    folder = tmp_path_factory.mktemp("absorption")
    config = _config()
    random.seed(0)
    torch.manual_seed(0)
    load_or_train_probe(
        speller,
        config.prompt_template,
        config.prompt_token_pos,
        layer=0,
        probes_dir=folder / "probes",
        device="cpu",
    )
    return folder


def _saebench_run_eval(
    sae: SAE,
    model: HookedSAETransformer,
    probes: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    """SAEBench's own ``run_eval``, the oracle: given this model instead of one from the Hub.

    Its artifacts go under ``tmp_path`` rather than into SAEBench's package
    folder, and it reads the probe from ``probes``.
    """

    class _Loader:
        @staticmethod
        def from_pretrained_no_processing(*args: Any, **kwargs: Any) -> HookedSAETransformer:
            return model

    oracle = tmp_path / "oracle"
    monkeypatch.setattr(absorption_main, "HookedTransformer", _Loader)
    monkeypatch.setattr(
        absorption_main,
        "run_k_sparse_probing_experiment",
        functools.partial(
            absorption_main.run_k_sparse_probing_experiment,
            experiment_dir=oracle / "k_sparse_probing",
            probes_dir=probes,
        ),
    )
    monkeypatch.setattr(
        absorption_main,
        "run_feature_absortion_experiment",
        functools.partial(
            absorption_main.run_feature_absortion_experiment,
            experiment_dir=oracle / "feature_absorption",
            sparse_probing_experiment_dir=oracle / "k_sparse_probing",
            probes_dir=probes,
        ),
    )
    monkeypatch.chdir(tmp_path)  # run_eval also writes ./artifacts/absorption
    (tmp_path / "out").mkdir()  # its result JSON goes here; its caller makes the folder
    grad = torch.is_grad_enabled()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    try:
        results = absorption_main.run_eval(
            _config(), [("matryoshka", sae)], "cpu", str(tmp_path / "out"), force_rerun=True
        )
    finally:
        torch.set_grad_enabled(grad)  # run_eval turns gradients on for the whole process
    (result,) = results.values()
    return result


def test_absorption_eval_runs_and_equals_saebenchs_run_eval(
    speller: HookedSAETransformer,
    spelling_sae: Path,
    artifacts: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sae = SAE.load_from_disk(spelling_sae)
    assert isinstance(sae, MatryoshkaSAE)
    ours = saebench_absorption(sae, speller, _config(), artifacts_dir=artifacts)
    theirs = _saebench_run_eval(
        SAE.load_from_disk(spelling_sae), speller, artifacts / "probes", tmp_path, monkeypatch
    )
    # the toy represents first letters: SAEBench's probes find them (see _config)
    assert len(ours["letters"]) >= 10
    mean = theirs["eval_result_metrics"]["mean"]
    for name, value in mean.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    details = {d["first_letter"]: d for d in theirs["eval_result_details"]}
    assert [letter["first_letter"] for letter in ours["letters"]] == list(details)
    for letter in ours["letters"]:
        for name, value in letter.items():
            assert value == pytest.approx(details[letter["first_letter"]][name]), name
    assert 0.0 <= ours["mean_absorption_fraction_score"] <= 1.0
    assert 0.0 <= ours["mean_full_absorption_score"] <= 1.0
    assert sae.cfg.architecture() == "matryoshka"
    assert "hook_layer" not in sae.cfg.metadata  # SAEBench's formatting went to a copy


def test_absorption_refuses_an_sae_off_the_residual_stream(
    speller: HookedSAETransformer, spelling_sae: Path, tmp_path: Path
) -> None:
    sae = SAE.load_from_disk(spelling_sae)
    sae.cfg.metadata.hook_name = "blocks.0.hook_mlp_out"
    with pytest.raises(ValueError, match=r"probes blocks\.0\.hook_resid_post"):
        saebench_absorption(sae, speller, _config(), artifacts_dir=tmp_path)
