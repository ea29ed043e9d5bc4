"""Imports from dictionary_learning, sparsify and SAELens releases reproduce their sources.

Every checkpoint here is written in the source's exact format: by the source's
own code where it is installed (sparsify is a dev dependency; dictionary_learning
0.1.0 runs as an oracle when installed), otherwise laid out as its trainer saves
it and compared with the source's inference formulas, transcribed below.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.loading.pretrained_saes_directory import (
    PretrainedSAELookup,
    get_pretrained_saes_directory,
)
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder, SparseCoderConfig

from sae_lens_matryoshka import (
    MatryoshkaSAE,
    SAEFileError,
    from_dictionary_learning,
    from_saelens_release,
    from_sparsify,
)

from .conftest import quick_train
from .test_hub import FakeHub

D_IN, D_SAE, K = 8, 24, 3
GROUP_SIZES = [4, 8, 12]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- dictionary_learning

#: the classes read -> the trainers that write them
TRAINER_CLASSES = {
    "MatryoshkaBatchTopKSAE": "MatryoshkaBatchTopKTrainer",
    "BatchTopKSAE": "BatchTopKTrainer",
    "AutoEncoderTopK": "TopKTrainer",
}


def write_dictionary_learning(
    folder: Path,
    dict_class: str,
    threshold: float = 0.3,
    group_sizes_in_ae: bool = True,
    *,
    d_in: int = D_IN,
    group_sizes: list[int] = GROUP_SIZES,
    k: int = K,
    lm_name: str = "someone/tiny-lm",
    layer: int = 3,
) -> dict[str, torch.Tensor]:
    """A checkpoint as dictionary_learning 0.1.0's ``trainSAE`` saves one.

    ``ae.pt`` is the class's ``state_dict()``: ``MatryoshkaBatchTopKSAE`` holds
    ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec`` and
    ``group_sizes``; ``BatchTopKSAE`` and ``AutoEncoderTopK`` hold nn.Linear
    layers, ``encoder.weight [d_sae, d_in]``, ``encoder.bias``,
    ``decoder.weight [d_in, d_sae]``, and ``b_dec``; all hold the buffers
    ``k`` (int32) and ``threshold`` (a float32 scalar). ``config.json`` is
    ``{"trainer": trainer.config, "buffer": ActivationBuffer.config}``.
    """
    d_sae = sum(group_sizes)
    generator = torch.Generator().manual_seed(3)
    W_enc = torch.randn(d_in, d_sae, generator=generator) * 0.5
    b_enc = torch.randn(d_sae, generator=generator) * 0.1
    W_dec = torch.randn(d_sae, d_in, generator=generator) * 0.5
    b_dec = torch.randn(d_in, generator=generator) * 0.1
    buffers = {"k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(threshold)}
    trainer: dict[str, Any] = {
        "trainer_class": TRAINER_CLASSES.get(dict_class),
        "dict_class": dict_class,
        "lr": 1e-3,
        "steps": 100,
        "auxk_alpha": 1 / 32,
        "warmup_steps": 10,
        "decay_start": None,
        "threshold_beta": 0.999,
        "threshold_start_step": 10,
        "seed": 0,
        "activation_dim": d_in,
        "dict_size": d_sae,
        "k": k,
        "device": "cpu",
        "layer": layer,
        "lm_name": lm_name,
        "wandb_name": dict_class,
        "submodule_name": None,
    }
    if dict_class == "MatryoshkaBatchTopKSAE":
        state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, **buffers}
        if group_sizes_in_ae:
            state["group_sizes"] = torch.tensor(group_sizes)
        trainer |= {
            "group_fractions": [size / d_sae for size in group_sizes],
            "group_weights": [1 / len(group_sizes)] * len(group_sizes),
            "group_sizes": group_sizes,
        }
    else:
        state = {
            "b_dec": b_dec,
            **buffers,
            "decoder.weight": W_dec.T.contiguous(),
            "encoder.weight": W_enc.T.contiguous(),
            "encoder.bias": b_enc,
        }
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ae.pt")
    buffer = {
        "d_submodule": d_in,
        "io": "out",
        "n_ctxs": 64,
        "ctx_len": 16,
        "refresh_batch_size": 8,
        "out_batch_size": 32,
        "device": "cpu",
    }
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": buffer}))
    return state


def dictionary_learning_encode(
    state: dict[str, torch.Tensor], dict_class: str, x: torch.Tensor
) -> torch.Tensor:
    """The source's ``encode`` with its defaults (dictionary_learning 0.1.0).

    ReLU of the encoder applied to ``x - b_dec``; the BatchTopK classes then
    keep what exceeds the learned threshold (``use_threshold=True``),
    ``AutoEncoderTopK`` each token's ``k`` largest (``use_threshold=False``).
    """
    if "W_enc" in state:
        pre = (x - state["b_dec"]) @ state["W_enc"] + state["b_enc"]
    else:
        pre = torch.nn.functional.linear(
            x - state["b_dec"], state["encoder.weight"], state["encoder.bias"]
        )
    acts = torch.relu(pre)
    if dict_class == "AutoEncoderTopK":
        top = acts.topk(int(state["k"]), sorted=False, dim=-1)
        return torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
    return acts * (acts > state["threshold"])


def dictionary_learning_decode(state: dict[str, torch.Tensor], acts: torch.Tensor) -> torch.Tensor:
    """``x @ W_dec + b_dec``, or ``decoder(x) + b_dec`` for the nn.Linear classes."""
    if "W_dec" in state:
        return acts @ state["W_dec"] + state["b_dec"]
    return torch.nn.functional.linear(acts, state["decoder.weight"]) + state["b_dec"]


@pytest.mark.parametrize("dict_class", list(TRAINER_CLASSES))
def test_dictionary_learning_checkpoints_import(tmp_path: Path, dict_class: str) -> None:
    state = write_dictionary_learning(tmp_path / "trainer_0", dict_class)
    sae = from_dictionary_learning(tmp_path / "trainer_0")
    is_matryoshka = dict_class == "MatryoshkaBatchTopKSAE"
    assert sae.matryoshka_widths == ([4, 12, 24] if is_matryoshka else [D_SAE])
    assert sae.cfg.activation == ("topk" if dict_class == "AutoEncoderTopK" else "jumprelu")
    assert sae.cfg.metadata.model_name == "someone/tiny-lm"
    assert sae.cfg.metadata.source_format == f"dictionary_learning {dict_class}"
    x = torch.randn(40, D_IN)
    expected = dictionary_learning_encode(state, dict_class, x)
    assert 0 < int((expected > 0).sum()) < expected.numel()  # the threshold / top-k cuts
    with torch.no_grad():
        _close(sae.encode(x), expected)
        _close(sae.decode(expected), dictionary_learning_decode(state, expected))
        _close(sae(x), dictionary_learning_decode(state, expected))


@pytest.mark.parametrize("dict_class", ["BatchTopKSAE", "AutoEncoderTopK"])
def test_plain_dictionary_learning_checkpoints_with_declared_levels(
    tmp_path: Path, dict_class: str
) -> None:
    state = write_dictionary_learning(tmp_path, dict_class)
    sae = from_dictionary_learning(tmp_path / "ae.pt", matryoshka_widths=[6, 12, D_SAE])
    assert sae.matryoshka_widths == [6, 12, D_SAE]
    x = torch.randn(30, D_IN)
    acts = dictionary_learning_encode(state, dict_class, x)
    first = torch.cat([acts[:, :6], torch.zeros(30, D_SAE - 6)], dim=-1)
    with torch.no_grad():
        _close(sae.encode(x, width=6), acts[:, :6])
        _close(sae.decode(acts, width=6), dictionary_learning_decode(state, first))
        _close(sae.decode_levels(acts)[-1], dictionary_learning_decode(state, acts))


def test_matryoshka_checkpoint_without_group_sizes_buffer_reads_the_config(tmp_path: Path) -> None:
    write_dictionary_learning(tmp_path, "MatryoshkaBatchTopKSAE", group_sizes_in_ae=False)
    assert from_dictionary_learning(tmp_path).matryoshka_widths == [4, 12, 24]


def test_intermediate_checkpoint_finds_the_trainer_config(tmp_path: Path) -> None:
    """trainSAE saves intermediate steps as checkpoints/ae_<step>.pt, its config one level up."""
    state = write_dictionary_learning(tmp_path / "trainer_0", "BatchTopKSAE")
    (tmp_path / "trainer_0" / "checkpoints").mkdir()
    (tmp_path / "trainer_0" / "ae.pt").rename(tmp_path / "trainer_0" / "checkpoints" / "ae_5.pt")
    sae = from_dictionary_learning(tmp_path / "trainer_0" / "checkpoints" / "ae_5.pt")
    x = torch.randn(10, D_IN)
    with torch.no_grad():
        _close(sae.encode(x), dictionary_learning_encode(state, "BatchTopKSAE", x))


def _rewrite(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit ``ae.pt`` of a written checkpoint in place."""
    state = torch.load(folder / "ae.pt", weights_only=True)
    change(state)
    torch.save(state, folder / "ae.pt")


def test_dictionary_learning_refusals(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No dictionary_learning checkpoint at"):
        from_dictionary_learning(tmp_path)
    folder = tmp_path / "trainer_0"
    write_dictionary_learning(folder, "BatchTopKSAE")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing: dictionary_learning"):
        from_dictionary_learning(folder)

    write_dictionary_learning(folder, "GatedAutoEncoder")
    with pytest.raises(ValueError, match=r"dict_class 'GatedAutoEncoder' is not one this reads"):
        from_dictionary_learning(folder)

    # the config names a BatchTopKSAE, the weights are in the Matryoshka class's layout
    write_dictionary_learning(folder, "MatryoshkaBatchTopKSAE")
    config = json.loads((folder / "config.json").read_text())
    config["trainer"]["dict_class"] = "BatchTopKSAE"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"ae\.pt lacks \['decoder\.weight', 'encoder\.weight', 'encoder\.bias'\], which "
        r".*config\.json \(BatchTopKSAE, activation_dim=8, dict_size=24\) requires",
    ):
        from_dictionary_learning(folder)

    write_dictionary_learning(folder, "AutoEncoderTopK")
    config = json.loads((folder / "config.json").read_text())
    config["trainer"]["dict_size"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"decoder\.weight has shape \[8, 24\], but .*dict_size=32\) needs \[8, 32\]",
    ):
        from_dictionary_learning(folder)

    write_dictionary_learning(folder, "BatchTopKSAE")
    _rewrite(folder, lambda state: state["decoder.weight"].__setitem__((0, 5), float("nan")))
    with pytest.raises(SAEFileError, match=r"ae\.pt: decoder\.weight holds 1 non-finite value"):
        from_dictionary_learning(folder)

    write_dictionary_learning(folder, "MatryoshkaBatchTopKSAE")
    _rewrite(folder, lambda state: state.__setitem__("group_sizes", torch.tensor([4, 8])))
    with pytest.raises(
        ValueError,
        match=r"ae\.pt: group_sizes \[4, 8\] sum to 12, but .*config\.json has dict_size=24",
    ):
        from_dictionary_learning(folder)


def test_unlearned_batchtopk_threshold_warns_and_keeps_every_positive_activation(
    tmp_path: Path,
) -> None:
    state = write_dictionary_learning(tmp_path, "BatchTopKSAE", threshold=-1.0)
    with pytest.warns(UserWarning, match="threshold was never learned"):
        sae = from_dictionary_learning(tmp_path)
    x = torch.randn(10, D_IN)
    with torch.no_grad():
        _close(sae.encode(x), dictionary_learning_encode(state, "BatchTopKSAE", x))


def test_dictionary_learning_loading_never_unpickles_code(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    write_dictionary_learning(tmp_path, "BatchTopKSAE")
    torch.save({"encoder.weight": Payload()}, tmp_path / "ae.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        from_dictionary_learning(tmp_path)


def test_checkpoints_written_by_dictionary_learning_itself(
    dictionary_learning: types.SimpleNamespace, tmp_path: Path
) -> None:
    """trainSAE trains and saves all three classes; each import equals the source's own encode."""
    dl = dictionary_learning
    torch.manual_seed(0)
    data = iter([torch.randn(64, D_IN) * 2 for _ in range(30)])
    common = {
        "steps": 30,
        "activation_dim": D_IN,
        "dict_size": 32,
        "k": K,
        "layer": 2,
        "lm_name": "someone/tiny-lm",
        "warmup_steps": 2,
        "threshold_start_step": 5,
        "device": "cpu",
    }
    trainers = [
        {"trainer": dl.batch_top_k.BatchTopKTrainer, **common},
        {"trainer": dl.top_k.TopKTrainer, **common},
        {
            "trainer": dl.matryoshka_batch_top_k.MatryoshkaBatchTopKTrainer,
            "group_fractions": [0.25, 0.25, 0.5],
            **common,
        },
    ]
    dl.training.trainSAE(
        data, trainers, steps=30, save_steps=[10], save_dir=str(tmp_path), device="cpu"
    )
    x = torch.randn(50, D_IN) * 2
    classes = [
        dl.batch_top_k.BatchTopKSAE,
        dl.top_k.AutoEncoderTopK,
        dl.matryoshka_batch_top_k.MatryoshkaBatchTopKSAE,
    ]
    for index, source_class in enumerate(classes):
        folder = tmp_path / f"trainer_{index}"
        k = json.loads((folder / "config.json").read_text())["trainer"]["k"]
        for weights in (folder / "ae.pt", folder / "checkpoints" / "ae_10.pt"):
            source = source_class.from_pretrained(weights, k=k)
            if source_class is not dl.top_k.AutoEncoderTopK:
                assert float(source.threshold) > 0  # learned, not the -1 of an untrained one
            imported = from_dictionary_learning(weights)
            with torch.no_grad():
                _close(imported.encode(x), source.encode(x))
                _close(imported(x), source(x))

    # a Matryoshka level: the source zeroes the latents of inactive groups
    source = dl.matryoshka_batch_top_k.MatryoshkaBatchTopKSAE.from_pretrained(
        tmp_path / "trainer_2" / "ae.pt"
    )
    imported = from_dictionary_learning(tmp_path / "trainer_2")
    assert imported.matryoshka_widths == [8, 16, 32]
    source.active_groups = 1
    with torch.no_grad():
        _close(imported.encode(x, width=8), source.encode(x)[:, :8])
        _close(imported.decode(imported.encode(x, width=8), width=8), source(x))


# ---------------------------------------------------------------- sparsify


def sparsify_folder(folder: Path, **settings: Any) -> SparseCoder:
    """A SparseCoder with random weights (biases included), saved by sparsify's own save_to_disk."""
    torch.manual_seed(0)
    coder = SparseCoder(D_IN, SparseCoderConfig(**{"num_latents": D_SAE, "k": K, **settings}))
    with torch.no_grad():
        coder.encoder.bias.normal_(0, 0.1)
        coder.b_dec.normal_(0, 0.1)
    coder.save_to_disk(folder)
    return coder


def _dense(top_acts: torch.Tensor, top_indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    """sparsify's top-k values and indices as a dense activation matrix."""
    return torch.zeros(top_acts.shape[0], d_sae).scatter_(-1, top_indices, top_acts)


@pytest.mark.parametrize(
    "settings",
    [{}, {"num_latents": 0, "expansion_factor": 3}, {"multi_topk": True}],
    ids=["num_latents", "expansion_factor", "multi_topk"],
)
def test_sparsify_folder_imports(tmp_path: Path, settings: dict[str, Any]) -> None:
    coder = sparsify_folder(tmp_path / "layers.3", **settings)
    sae = from_sparsify(tmp_path / "layers.3")
    assert isinstance(sae, MatryoshkaSAE)
    assert sae.cfg.activation == "topk" and sae.cfg.k == K
    assert sae.matryoshka_widths == [D_SAE]
    assert sae.cfg.metadata.source_format == "sparsify SparseCoder"
    x = torch.randn(40, D_IN)
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(x)
        acts = _dense(top_acts, top_indices, D_SAE)
        _close(sae.encode(x), acts)
        _close(sae.decode(acts), coder.decode(top_acts, top_indices))
        if not settings.get("multi_topk"):  # then forward returns its 4k-latent training decode
            _close(sae(x), coder(x).sae_out)
        _close(sae(x), coder.decode(top_acts, top_indices))


def test_sparsify_folder_with_declared_levels(tmp_path: Path) -> None:
    coder = sparsify_folder(tmp_path)
    sae = from_sparsify(tmp_path, matryoshka_widths=[6, D_SAE])
    assert sae.matryoshka_widths == [6, D_SAE]
    x = torch.randn(20, D_IN)
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(x)
        kept = top_indices < 6  # the first level decodes only latents below 6
        _close(sae.encode(x, width=6), _dense(top_acts, top_indices, D_SAE)[:, :6])
        _close(sae.decode_levels(sae.encode(x))[0], coder.decode(top_acts * kept, top_indices))


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"transcode": True}, r"it is a transcoder"),
        ({"skip_connection": True}, r"it adds a linear skip connection"),
        ({"activation": "groupmax"}, r"its activation is 'groupmax'"),
    ],
)
def test_sparsify_coders_a_matryoshka_sae_cannot_compute_are_refused(
    tmp_path: Path, settings: dict[str, Any], reason: str
) -> None:
    sparsify_folder(tmp_path, **settings)
    with pytest.raises(ValueError, match=rf"cfg\.json cannot be read as a MatryoshkaSAE: {reason}"):
        from_sparsify(tmp_path)


def test_sparsify_refusals(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cfg\.json is missing: sparsify's"):
        from_sparsify(tmp_path)
    sparsify_folder(tmp_path)
    weights = load_file(tmp_path / "sae.safetensors")

    (tmp_path / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"sae\.safetensors is missing"):
        from_sparsify(tmp_path)

    save_file(
        {**weights, "W_dec": weights["W_dec"].index_fill(0, torch.tensor([2]), torch.inf)},
        tmp_path / "sae.safetensors",
    )
    with pytest.raises(SAEFileError, match=r"sae\.safetensors: W_dec holds 8 non-finite values"):
        from_sparsify(tmp_path)

    save_file(weights, tmp_path / "sae.safetensors")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 32}))
    with pytest.raises(
        ValueError,
        match=r"W_dec has shape \[24, 8\], but .*cfg\.json \(d_in=8, num_latents=32\) "
        r"needs \[32, 8\]",
    ):
        from_sparsify(tmp_path)

    (tmp_path / "cfg.json").write_text(json.dumps({key: cfg[key] for key in cfg if key != "k"}))
    with pytest.raises(ValueError, match=r"cfg\.json lacks \['k'\]"):
        from_sparsify(tmp_path)

    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    data = (tmp_path / "sae.safetensors").read_bytes()
    (tmp_path / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFileError, match=r"sae\.safetensors is truncated"):
        from_sparsify(tmp_path)


# ---------------------------------------------------------------- SAELens releases

REPO = "someone/matryoshka-saes"


@pytest.fixture
def publish(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[[str, dict[str, Path], str | None], None]:
    """Publish SAE folders as a registered SAELens release, in an offline Hub cache.

    The release is added to SAELens's loaded ``pretrained_saes.yaml`` registry
    and its files are laid out as huggingface_hub's cache holds a download,
    so SAELens's real ``from_pretrained`` (registry lookup, hf_hub_download,
    converter) runs without a network.
    """
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = FakeHub()

    def publish(release: str, folders: dict[str, Path], conversion_func: str | None) -> None:
        hub.repos[REPO] = {
            f"standard/{sae_id}/{file.name}": file.read_bytes()
            for sae_id, folder in folders.items()
            for file in folder.iterdir()
        }
        hub.place_in_cache(Path(huggingface_hub.constants.HF_HUB_CACHE), REPO)
        lookup = PretrainedSAELookup(
            release=release,
            repo_id=REPO,
            model="tiny-lm",
            conversion_func=conversion_func,
            saes_map={sae_id: f"standard/{sae_id}" for sae_id in folders},
            expected_var_explained={},
            expected_l0={},
            neuronpedia_id={},
            norm_scaling_factor={},
            config_overrides=None,
        )
        monkeypatch.setitem(get_pretrained_saes_directory(), release, lookup)

    return publish


def _jumprelu_folder(folder: Path) -> Path:
    """A flat SAELens JumpReLU SAE with random weights and thresholds."""
    torch.manual_seed(1)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, 0.3)
        sae.threshold.abs_()
    sae.save_model(folder)
    return folder


def _matryoshka_batchtopk_folder(folder: Path) -> Path:
    """What SAELens's own matryoshka_batchtopk training saves: a flat JumpReLU SAE."""
    torch.manual_seed(0)
    source = MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=2, matryoshka_widths=[4, 12, D_SAE]
        )
    )
    quick_train(source, scale=2.0).eval().save_inference_model(folder)
    return folder


def _assert_same_outputs(imported: MatryoshkaSAE, release: str, sae_id: str) -> None:
    """The import computes what SAELens's own from_pretrained SAE computes."""
    own = SAE.from_pretrained(release, sae_id)
    assert isinstance(own, JumpReLUSAE)
    x = torch.randn(30, D_IN) * 2
    with torch.no_grad():
        acts = own.encode(x)
        assert int((acts > 0).sum()) > 0
        _close(imported.encode(x), acts)
        _close(imported(x), own(x))


def test_release_levels_come_from_its_metadata_or_cfg(publish, tmp_path: Path) -> None:
    with_top_level = _jumprelu_folder(tmp_path / "top-level")
    cfg = json.loads((with_top_level / "cfg.json").read_text())
    (with_top_level / "cfg.json").write_text(json.dumps({**cfg, "matryoshka_widths": [6, 24]}))
    publish(
        "tiny-res-matryoshka",
        {
            "blocks.0.hook_resid_post": _matryoshka_batchtopk_folder(tmp_path / "saelens"),
            "blocks.1.hook_resid_post": with_top_level,
        },
        None,
    )
    imported = from_saelens_release("tiny-res-matryoshka", "blocks.0.hook_resid_post")
    assert imported.matryoshka_widths == [4, 12, D_SAE]
    assert imported.cfg.activation == "jumprelu"
    _assert_same_outputs(imported, "tiny-res-matryoshka", "blocks.0.hook_resid_post")

    imported = from_saelens_release("tiny-res-matryoshka", "blocks.1.hook_resid_post")
    assert imported.matryoshka_widths == [6, D_SAE]
    _assert_same_outputs(imported, "tiny-res-matryoshka", "blocks.1.hook_resid_post")


def test_release_without_recorded_levels_needs_them_given(publish, tmp_path: Path) -> None:
    publish(
        "tiny-res-flat", {"blocks.0.hook_resid_post": _jumprelu_folder(tmp_path / "flat")}, None
    )
    with pytest.raises(
        ValueError,
        match=r"SAELens release 'tiny-res-flat', sae_id 'blocks\.0\.hook_resid_post' "
        r"\(JumpReLUSAE\) records no Matryoshka levels.*pass matryoshka_widths=\[\.\.\.\]",
    ):
        from_saelens_release("tiny-res-flat", "blocks.0.hook_resid_post")
    imported = from_saelens_release(
        "tiny-res-flat", "blocks.0.hook_resid_post", matryoshka_widths=[8, 16, D_SAE]
    )
    assert imported.matryoshka_widths == [8, 16, D_SAE]
    _assert_same_outputs(imported, "tiny-res-flat", "blocks.0.hook_resid_post")


def test_release_converted_from_dictionary_learning(publish, tmp_path: Path) -> None:
    """SAEBench releases go through SAELens's dictionary_learning_1 converter, which drops the levels."""
    folder = tmp_path / "trainer_0"
    write_dictionary_learning(folder, "MatryoshkaBatchTopKSAE")
    publish("tiny-saebench", {"trainer_0": folder}, "dictionary_learning_1")
    imported = from_saelens_release("tiny-saebench", "trainer_0", matryoshka_widths=[4, 12, 24])
    _assert_same_outputs(imported, "tiny-saebench", "trainer_0")
    x = torch.randn(10, D_IN)
    with torch.no_grad():
        _close(imported(x), from_dictionary_learning(folder)(x))
