"""SAEDashboard's ``NeuronpediaRunner`` reads a saved Matryoshka SAE folder and writes its batches.

What ``NeuronpediaRunner`` (sae-dashboard 0.8.0) reads from an SAE, and from where:

- ``SAE.load_from_pretrained(path=...)`` with ``from_local_sae``: the folder
  loads as a ``MatryoshkaSAE`` (the plugin imported first);
- ``cfg.metadata.model_name``: the model it loads, and the ``model_id`` of
  every batch;
- ``cfg.metadata.hook_name``: the hook it reads, and the ``layer`` (parsed
  from ``blocks.<layer>.``; SAELens 6 configs have no ``hook_layer``);
- ``cfg.dtype`` (unless ``sae_dtype`` is given), ``cfg.d_sae`` (the features
  it renders), ``cfg.metadata.prepend_bos`` and ``context_size`` (its
  activation store, the latter replaced by ``n_tokens_in_prompt``),
  ``cfg.dataset_path`` (only when ``huggingface_dataset_path`` is not given:
  SAELens 6 keeps it in ``metadata``, so give it, as its command line requires);
- ``fold_W_dec_norm()``, then SAEDashboard's feature computation (the
  plugin's adapter lets its architecture check accept the SAE).

The model and the dataset come from the Hub in ``NeuronpediaRunner``; here
the tiny model and the in-memory token dataset stand in at exactly those two
calls (``HookedSAETransformer.from_pretrained``, ``ActivationsStore.from_sae``),
and everything else runs as it would.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("sae_dashboard")

from datasets import Dataset
from sae_dashboard.neuronpedia import neuronpedia_runner
from sae_dashboard.neuronpedia.neuronpedia_runner import NeuronpediaRunner
from sae_dashboard.neuronpedia.neuronpedia_runner_config import NeuronpediaRunnerConfig
from sae_lens import SAE, ActivationsStore, HookedSAETransformer

from sae_lens_matryoshka import MatryoshkaSAE

from .conftest import CONTEXT, HOOK, WIDTHS, hook_activations

DATASET = "someone/tiny-tokens"  # the name the runner is given; the in-memory dataset serves it


def _offline(
    monkeypatch: pytest.MonkeyPatch, model: HookedSAETransformer, dataset: Dataset
) -> dict[str, Any]:
    """Serve ``model`` and ``dataset`` where NeuronpediaRunner downloads them; record what it asks."""
    asked: dict[str, Any] = {}

    class _Model:
        @staticmethod
        def from_pretrained(model_name: str, **kwargs: Any) -> HookedSAETransformer:
            asked["model_name"], asked["model_kwargs"] = model_name, kwargs
            return model

    class _Store:
        @staticmethod
        def from_sae(*, dataset: str, **kwargs: Any) -> ActivationsStore:
            asked["dataset"] = dataset
            return ActivationsStore.from_sae(dataset=_dataset, **kwargs)

    _dataset = dataset
    monkeypatch.setattr(neuronpedia_runner, "HookedSAETransformer", _Model)
    monkeypatch.setattr(neuronpedia_runner, "ActivationsStore", _Store)
    return asked


def _config(folder: Path, outputs: Path, **fields: Any) -> NeuronpediaRunnerConfig:
    return NeuronpediaRunnerConfig(
        sae_set="matryoshka-tiny",
        sae_path=str(folder),
        from_local_sae=True,
        np_set_name="matryoshka-tiny",
        huggingface_dataset_path=DATASET,
        outputs_dir=str(outputs),
        n_prompts_total=32,
        n_tokens_in_prompt=CONTEXT,
        n_prompts_in_forward_pass=8,
        n_features_at_a_time=2,
        end_batch=0,  # the first two features only
        shuffle_tokens=False,
        **fields,
    )


def test_the_saved_folder_holds_what_neuronpedias_runner_reads(sae_folder: Path) -> None:
    """``cfg.json`` carries, from the runner config that trained it, all the runner reads."""
    cfg = json.loads((sae_folder / "cfg.json").read_text())
    runner_cfg = json.loads((sae_folder / "runner_cfg.json").read_text())
    metadata = cfg["metadata"]
    for key in ("model_name", "hook_name", "dataset_path", "context_size", "prepend_bos"):
        assert metadata[key] == runner_cfg[key], key
    assert metadata["hook_name"] == HOOK and metadata["model_name"] == "tiny-random"
    assert cfg["dtype"] == "float32" and cfg["d_sae"] == WIDTHS[-1]
    assert cfg["matryoshka_widths"] == WIDTHS  # the levels, for the model card and readers
    # what SAELens's Neuronpedia helpers read: empty until the SAE is on Neuronpedia
    assert SAE.load_from_disk(sae_folder).cfg.metadata.neuronpedia_id is None


def test_the_saved_folder_names_an_empty_neuronpedia_id(sae_folder: Path) -> None:
    metadata = json.loads((sae_folder / "cfg.json").read_text())["metadata"]
    assert "neuronpedia_id" in metadata and metadata["neuronpedia_id"] is None


def test_neuronpedia_runner_reads_the_folder_and_writes_a_batch(
    sae_folder: Path,
    model: HookedSAETransformer,
    token_dataset: Dataset,
    tokens: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = _offline(monkeypatch, model, token_dataset)
    monkeypatch.chdir(tmp_path)  # its activation cache goes to ./cached_activations
    runner = NeuronpediaRunner(_config(sae_folder, tmp_path / "outputs"))
    # what it read from the SAE
    assert isinstance(runner.sae, MatryoshkaSAE)
    assert asked["model_name"] == runner.model_id == "tiny-random"
    assert runner.layer == 0 and runner.hook_name == HOOK
    assert runner.cfg.sae_dtype == "float32"
    assert asked["dataset"] == DATASET
    runner.run()
    outputs = Path(runner.cfg.outputs_dir)
    assert outputs.name == f"tiny-random_matryoshka-tiny_{HOOK}_{WIDTHS[-1]}"
    batch = json.loads((outputs / "batch-0.json").read_text())
    assert (batch["model_id"], batch["layer"], batch["sae_set"]) == (
        "tiny-random",
        0,
        "matryoshka-tiny",
    )
    assert [feature["feature_index"] for feature in batch["features"]] == [0, 1]
    # each feature's top activation is the loaded SAE's (decoder norms folded, as the
    # runner folds them), over the runner's 32 prompts, its end-of-text tokens ignored
    sae = SAE.load_from_disk(sae_folder)
    sae.fold_W_dec_norm()
    prompts = tokens[:32]
    with torch.no_grad():
        acts = sae.encode(hook_activations(model, prompts))
    acts[prompts == model.tokenizer.eos_token_id] = 0
    expected = acts.flatten(0, 1).max(dim=0).values
    for feature in batch["features"]:
        shown = max(max(example["values"]) for example in feature["activations"])
        assert shown == pytest.approx(expected[feature["feature_index"]].item(), abs=1e-3)
        assert feature["dataset"] == DATASET and feature["n_tokens_in_prompt"] == CONTEXT


def test_the_readmes_command_starts_the_runner_with_the_plugin_imported() -> None:
    """The README's command, with ``--help``: the runner's own parser knows each of its flags."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = readme.split("```bash")[1:]
    (block,) = [b.split("```")[0] for b in blocks if "neuronpedia_runner" in b]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:2] == ["python", "-c"] and "import sae_lens_matryoshka" in words[2]
    result = subprocess.run(
        [sys.executable, "-c", words[2], "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "Run Neuronpedia feature generation" in result.stdout
    for flag in (word for word in words[3:] if word.startswith("--")):
        assert flag in result.stdout, flag
