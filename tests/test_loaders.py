"""Every loader a user reaches gives the same SAE, and refuses what any one of them refuses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from datasets import Dataset
from sae_lens import SAE, JumpReLUSAE, LanguageModelSAETrainingRunner, StandardSAE
from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader
from transformer_lens import HookedTransformer

import sae_lens_matryoshka
from sae_lens_matryoshka import (
    MatryoshkaSAE,
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
    SAEFileError,
    export_portable,
    from_saelens,
    load_sae,
    to_inference,
)
from sae_lens_matryoshka.io.checkpoints import (
    MARKER,
    ChangedCheckpointError,
    IncompleteCheckpointError,
    mark_complete,
)
from sae_lens_matryoshka.io.loaders import is_training_form

from .conftest import D_MODEL, flip_bytes, quick_train, record_hashed_files

REPO = "someone/matryoshka-loaders"

#: (activation, extra config fields, prefix sampling, dtype), each dimension covered, and
#: whether to load the portable export in a fresh interpreter without the plugin (once per
#: plain SAELens class it exports to: that interpreter's start costs seconds)
CASES = [
    ("batchtopk", {"inference_threshold": "last_batch"}, "fixed", "float32", False),
    ("batchtopk", {"inference_threshold": "ema"}, "fixed", "float32", True),
    ("batchtopk", {"inference_threshold": "ema"}, "pareto", "bfloat16", False),
    ("batchtopk", {"inference_threshold": "last_batch"}, "pareto", "bfloat16", False),
    ("topk", {}, "fixed", "bfloat16", True),
    ("topk", {}, "pareto", "float32", False),
    ("jumprelu", {"l0_coefficient": 0.05}, "fixed", "float32", False),
    ("jumprelu", {"l0_coefficient": 0.05}, "pareto", "bfloat16", False),
    ("relu", {"l1_coefficient": 0.05}, "pareto", "float32", False),
    ("relu", {"l1_coefficient": 0.05}, "fixed", "bfloat16", True),
]


def _place_in_hub_cache(folder: Path, cache: Path, sae_id: str) -> None:
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded repo folder."""
    commit = "b" * 40
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo_dir / "snapshots" / commit / sae_id)
    for optional in ("sparsity.safetensors", "runner_cfg.json"):
        if not (folder / optional).exists():
            marker = repo_dir / ".no_exist" / commit / sae_id / optional
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()


def _encode(sae: SAE[Any], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sae.encode(x.to(sae.W_enc.dtype)).float()


@pytest.mark.parametrize(
    ("activation", "extra", "prefix_sampling", "dtype", "without_plugin"), CASES
)
def test_every_loader_gives_the_same_sae(
    activation: str,
    extra: dict[str, Any],
    prefix_sampling: str,
    dtype: str,
    without_plugin: bool,
    tiny_model: HookedTransformer,
    token_dataset: Dataset,
    runner_cfg: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sae_cfg = MatryoshkaTrainingSAEConfig(
        d_in=D_MODEL,
        d_sae=64,
        k=4 if activation in ("batchtopk", "topk") else None,
        activation=activation,
        prefix_sampling=prefix_sampling,
        matryoshka_widths=[8, 24, 64],
        n_sampled_prefixes=4,
        dtype=dtype,
        **extra,
    )
    cfg = runner_cfg(
        sae=sae_cfg,
        dtype=dtype,
        training_tokens=64 * 12,
        checkpoint_path=str(tmp_path / "checkpoints"),
        n_checkpoints=1,
        save_final_checkpoint=True,
    )
    trained = LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    ).run()
    final = Path(cfg.output_path)
    # the run's last state, the one the final folder saved
    (checkpoint,) = (path.parent for path in Path(cfg.checkpoint_path).glob("**/final_*/cfg.json"))
    assert is_training_form(json.loads((checkpoint / "cfg.json").read_text()))
    assert not is_training_form(json.loads((final / "cfg.json").read_text()))

    cache = tmp_path / "hf-cache"
    _place_in_hub_cache(final, cache, "final")
    _place_in_hub_cache(checkpoint, cache, "checkpoint")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    assert isinstance(trained, MatryoshkaTrainingSAE)
    loaded: dict[str, SAE[Any]] = {
        "to_inference(runner's SAE)": to_inference(trained),
        "SAE.load_from_disk(final)": SAE.load_from_disk(final),
        "SAE.load_from_disk(checkpoint)": SAE.load_from_disk(checkpoint),
        "MatryoshkaSAE.load_from_disk(checkpoint)": MatryoshkaSAE.load_from_disk(checkpoint),
        "load_sae(final)": load_sae(final),
        "load_sae(checkpoint)": load_sae(checkpoint),
        "to_inference(MatryoshkaTrainingSAE.load_from_disk(checkpoint))": to_inference(
            MatryoshkaTrainingSAE.load_from_disk(checkpoint)
        ),
        "SAE.from_pretrained(final)": SAE.from_pretrained(REPO, "final", dtype=dtype),
        "SAE.from_pretrained(checkpoint)": SAE.from_pretrained(REPO, "checkpoint", dtype=dtype),
        "from_saelens(export_portable)": from_saelens(
            export_portable(SAE.load_from_disk(final), tmp_path / "portable")
        ),
    }
    x = torch.randn(48, D_MODEL) * 3
    reference = _encode(loaded["SAE.load_from_disk(final)"], x)
    assert reference.gt(0).any()
    for name, sae in loaded.items():
        assert isinstance(sae, MatryoshkaSAE), name
        assert sae.matryoshka_widths == [8, 24, 64], name
        assert torch.equal(_encode(sae, x), reference), name

    if without_plugin:
        _check_loads_without_the_plugin(tmp_path / "portable", x, reference)


def _check_loads_without_the_plugin(folder: Path, x: torch.Tensor, expected: torch.Tensor) -> None:
    """``folder`` loads as a plain SAELens SAE in a fresh interpreter and encodes ``x`` to ``expected``."""
    tmp_path = folder.parent
    x_path = tmp_path / "x.pt"
    torch.save(x, x_path)
    script = (
        "import sys, torch\n"
        "from sae_lens import SAE\n"
        "sae = SAE.load_from_disk(sys.argv[1])\n"
        "assert 'sae_lens_matryoshka' not in sys.modules\n"
        "x = torch.load(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    torch.save(sae.encode(x.to(sae.W_enc.dtype)).float(), sys.argv[3])\n"
        "print(type(sae).__name__)\n"
    )
    out_path = tmp_path / "portable_acts.pt"
    run = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(x_path), str(out_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() in (JumpReLUSAE.__name__, "TopKSAE", StandardSAE.__name__)
    assert torch.equal(torch.load(out_path), expected)


def test_a_checkpoint_loads_as_the_sae_its_run_saves_with_the_ema_threshold(
    tmp_path: Path,
) -> None:
    """The issue's case: the EMA threshold, not the last batch's cut-off, through every loader."""
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=16, d_sae=64, k=4, matryoshka_widths=[8, 24, 64], inference_threshold="ema"
        )
    )
    quick_train(sae, steps=3)
    ema = float(sae.activation_fn.topk_threshold)
    assert ema != float(sae.activation_fn.last_cutoff)  # the two statistics differ here
    sae.save_model(tmp_path)
    for loader in (SAE.load_from_disk, load_sae):
        loaded = loader(tmp_path)
        assert isinstance(loaded, MatryoshkaSAE)
        assert loaded.activation_fn.threshold.eq(torch.tensor(ema, dtype=torch.float32)).all()


# ----------------------------------------------------------------- the same refusals


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(d_in=8, d_sae=32, k=2, matryoshka_widths=[4, 32])
    )
    quick_train(sae, steps=2)
    sae.save_inference_model(tmp_path / "sae")
    return tmp_path / "sae"


def _loaders() -> list[Callable[[Path], Any]]:
    return [load_sae, SAE.load_from_disk, MatryoshkaSAE.load_from_disk]


def _outcome_within(load: Callable[[], Any], seconds: float) -> BaseException | None:
    """What ``load()`` raised (None if nothing) within ``seconds``; fails the test if it blocks."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            load()
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    if not outcome:
        pytest.fail(f"loading blocked for {seconds} s")
    return outcome[0]


def test_a_fifo_in_place_of_the_weights_is_refused_at_once_by_every_loader(saved: Path) -> None:
    weights = saved / "sae_weights.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    for loader in _loaders():
        error = _outcome_within(lambda loader=loader: loader(saved), seconds=20)
        assert isinstance(error, SAEFileError), loader
        assert "not a regular file" in str(error)


def test_a_truncated_weights_file_is_a_specific_error_from_every_loader(saved: Path) -> None:
    weights = saved / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    for loader in _loaders():
        with pytest.raises(SAEFileError, match="is truncated"):
            loader(saved)


def test_a_torn_checkpoint_is_refused_by_every_loader_naming_the_latest_complete(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(d_in=8, d_sae=32, k=2, matryoshka_widths=[4, 32])
    )
    quick_train(sae, steps=2)
    complete, torn = tmp_path / "checkpoints" / "100", tmp_path / "checkpoints" / "200"
    sae.save_model(complete)
    (complete / "trainer_state.pt").write_bytes(b"state")
    sae_lens_matryoshka.io.checkpoints.mark_complete(complete)
    sae.save_model(torn)
    (torn / "trainer_state.pt").write_bytes(b"")  # killed while writing
    for loader in [*_loaders(), MatryoshkaTrainingSAE.load_from_disk]:
        with pytest.raises(IncompleteCheckpointError, match=f"latest complete.*{complete}"):
            loader(torn)
    assert isinstance(SAE.load_from_disk(complete), MatryoshkaSAE)


@pytest.fixture
def checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two complete checkpoints (100 and 200 samples), marked as the trainer marks them.

    Also in a Hub cache (offline), as folders uploaded whole: ``SAE.from_pretrained(REPO, "200")``.
    """
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(d_in=8, d_sae=32, k=2, matryoshka_widths=[4, 32])
    )
    quick_train(sae, steps=2)
    for samples in ("100", "200"):
        folder = tmp_path / "checkpoints" / samples
        sae.save_model(folder)
        torch.save({"n_training_samples": int(samples)}, folder / "trainer_state.pt")
        mark_complete(folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "checkpoints"


def _checkpoint_loaders() -> dict[str, Callable[[Path], Any]]:
    """Every loader, by name: each reads a checkpoint folder (from_pretrained: its Hub copy)."""
    return {
        "load_sae": load_sae,
        "SAE.load_from_disk": SAE.load_from_disk,
        "MatryoshkaSAE.load_from_disk": MatryoshkaSAE.load_from_disk,
        "MatryoshkaTrainingSAE.load_from_disk": MatryoshkaTrainingSAE.load_from_disk,
        "SAE.from_pretrained": lambda folder: SAE.from_pretrained(REPO, folder.name),
    }


def test_a_checkpoint_whose_weights_changed_is_refused_by_every_loader_naming_the_file(
    checkpoints: Path,
) -> None:
    """Bytes flipped inside the weights (size unchanged) used to load as other weights."""
    folder = checkpoints / "200"
    flip_bytes(folder / "sae_weights.safetensors")
    _place_in_hub_cache(folder, Path(huggingface_hub.constants.HF_HUB_CACHE), "200")
    changed = "changed after it was written: sae_weights.safetensors's sha256 is "
    for name, loader in _checkpoint_loaders().items():
        with pytest.raises(ChangedCheckpointError) as error:
            loader(folder)
        message = str(error.value)
        where = f"{REPO}/200" if name == "SAE.from_pretrained" else str(folder)
        assert message.startswith(f"{where} {changed}"), name
        assert "... was written" in message and "mark_complete(folder)" in message, name
        if name != "SAE.from_pretrained":
            latest = f"The latest complete checkpoint beside it is {checkpoints / '100'}."
            assert latest in message, name


@pytest.mark.parametrize("marker", ["sizes and digests", "sizes only (an earlier version)"])
def test_an_untouched_checkpoint_loads_through_every_loader_hashing_what_it_reads_once(
    checkpoints: Path, marker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = checkpoints / "200"
    if marker.startswith("sizes only"):
        record = json.loads((folder / MARKER).read_text())
        (folder / MARKER).write_text(json.dumps({"files": record["files"]}))
    _place_in_hub_cache(folder, Path(huggingface_hub.constants.HF_HUB_CACHE), "200")
    hashed = record_hashed_files(monkeypatch)
    for name, loader in _checkpoint_loaders().items():
        hashed.clear()
        loaded = loader(folder)
        training = name.startswith("MatryoshkaTraining")
        assert isinstance(loaded, MatryoshkaTrainingSAE if training else MatryoshkaSAE), name
        if marker.startswith("sizes only"):
            assert hashed == [], name
        else:  # the files it reads, each once; not the trainer's state
            read = ["cfg.json", "sae_weights.safetensors"]
            assert sorted(path.name for path in hashed) == read, name


def test_other_architectures_keep_saelens_behaviour(tmp_path: Path) -> None:
    """A plain SAELens folder reaches SAELens's own loader, with the arguments it was given."""
    torch.manual_seed(0)
    sae = to_inference(
        quick_train(
            MatryoshkaTrainingSAE(
                MatryoshkaTrainingSAEConfig(
                    d_in=8, d_sae=32, activation="relu", matryoshka_widths=[4, 32]
                )
            ),
            steps=2,
        )
    )
    folder = export_portable(sae, tmp_path / "standard")
    calls: list[tuple[Any, ...]] = []

    def converter(path: Any, device: str = "cpu", cfg_overrides: Any = None) -> Any:
        calls.append((path, device, cfg_overrides))
        return sae_lens_disk_loader(path, device, cfg_overrides)

    loaded = SAE.load_from_disk(folder, dtype="float64", converter=converter)
    assert isinstance(loaded, StandardSAE) and loaded.W_enc.dtype == torch.float64
    assert calls == [(folder, "cpu", {"dtype": "float64"})]  # the caller's converter, untouched
    # a damaged plain folder fails in SAELens's own code, not with the plugin's error
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(Exception) as raised:
        SAE.load_from_disk(folder)
    assert not isinstance(raised.value, SAEFileError)
    with pytest.raises(SAEFileError, match="is truncated"):
        load_sae(folder)  # the plugin's explicit loader checks every architecture
