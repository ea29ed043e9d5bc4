"""Portable export, importing SAELens SAEs, and damaged files of other libraries.

Importing other libraries' files that are whole: test_imports.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import (
    SAE,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from safetensors.torch import load_file, save_file

from sae_lens_matryoshka import (
    MatryoshkaSAE,
    MatryoshkaSAEConfig,
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
    SAEFileError,
    export_portable,
    from_dictionary_learning,
    from_saelens,
    from_sparsify,
    to_inference,
)

from .conftest import quick_train
from .test_imports import sparsify_folder, write_dictionary_learning


def _train(sae):
    return quick_train(sae, scale=2.0).eval()


def _ours(activation: str) -> MatryoshkaTrainingSAE:
    torch.manual_seed(0)
    k = 2 if activation in ("batchtopk", "topk") else None
    return _train(
        MatryoshkaTrainingSAE(
            MatryoshkaTrainingSAEConfig(
                d_in=8, d_sae=24, k=k, activation=activation, matryoshka_widths=[4, 12, 24]
            )
        )
    )


LOAD_WITHOUT_PLUGIN = """
import sys, torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
assert "sae_lens_matryoshka" not in sys.modules
sae = SAE.load_from_disk(sys.argv[1])
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    save_file({"out": sae(x)}, sys.argv[3])
print(type(sae).__name__, sae.cfg.metadata.matryoshka_widths)
"""


@pytest.mark.parametrize(
    ("activation", "plain"),
    [
        ("batchtopk", "JumpReLUSAE"),
        ("topk", "TopKSAE"),
        ("jumprelu", "JumpReLUSAE"),
        ("relu", "StandardSAE"),
    ],
)
def test_portable_export_loads_without_the_plugin(
    activation: str, plain: str, tmp_path: Path
) -> None:
    trained = _ours(activation)
    folder = export_portable(trained, tmp_path / "portable")
    x = torch.randn(16, 8)
    save_file({"x": x}, tmp_path / "x.safetensors")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_PLUGIN,
            str(folder),
            str(tmp_path / "x.safetensors"),
            str(tmp_path / "out.safetensors"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split()[0] == plain
    assert "[4, 12, 24]" in result.stdout
    with torch.no_grad():
        torch.testing.assert_close(
            load_file(tmp_path / "out.safetensors")["out"], trained(x), rtol=1e-4, atol=1e-5
        )


def test_portable_round_trip_keeps_the_levels(tmp_path: Path) -> None:
    sae = to_inference(_ours("relu"))
    back = from_saelens(export_portable(sae, tmp_path))
    assert isinstance(back, MatryoshkaSAE) and back.matryoshka_widths == [4, 12, 24]
    x = torch.randn(6, 8)
    torch.testing.assert_close(back(x), sae(x))


def test_rescaled_inference_sae_exports_folded(tmp_path: Path) -> None:
    trained = _ours("relu")
    cfg_dict = {**trained.cfg.get_inference_sae_cfg_dict(), "rescale_acts_by_decoder_norm": True}
    unfolded = MatryoshkaSAE(MatryoshkaSAEConfig.from_dict(cfg_dict))
    unfolded.load_state_dict(trained.state_dict())  # unfolded weights, measured in unit norms
    portable = SAE.load_from_disk(export_portable(unfolded, tmp_path / "portable"))
    assert isinstance(portable, StandardSAE)
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(portable(x), trained(x), rtol=1e-5, atol=1e-5)


def test_saelens_matryoshka_batchtopk_save_imports_with_its_levels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _train(
        MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=8, d_sae=24, k=2, matryoshka_widths=[4, 12, 24]
            )
        )
    )
    source.save_inference_model(tmp_path)
    flat = SAE.load_from_disk(tmp_path)
    assert isinstance(flat, JumpReLUSAE)  # SAELens keeps the levels only in metadata
    imported = from_saelens(tmp_path)
    assert imported.matryoshka_widths == [4, 12, 24]
    assert imported.cfg.activation == "jumprelu"
    x = torch.randn(20, 8)
    with torch.no_grad():
        torch.testing.assert_close(imported(x), flat(x))
        torch.testing.assert_close(
            imported.decode_levels(imported.encode(x))[-1], flat(x), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    "source",
    [
        TopKSAE(TopKSAEConfig(d_in=8, d_sae=24, k=3)),
        StandardSAE(StandardSAEConfig(d_in=8, d_sae=24)),
    ],
    ids=["topk", "standard"],
)
def test_any_saelens_sae_with_given_widths(source: SAE) -> None:
    imported = from_saelens(source, matryoshka_widths=[6, 24])
    assert imported.matryoshka_widths == [6, 24]
    x = torch.randn(10, 8)
    with torch.no_grad():
        torch.testing.assert_close(imported(x), source(x))
    with pytest.raises(
        ValueError,
        match=rf"the given {type(source).__name__} \({type(source).__name__}\) records no "
        r"Matryoshka levels: .*; pass matryoshka_widths=\[\.\.\.\] \(strictly increasing, "
        r"ending at d_sae=24\)",
    ):
        from_saelens(source)
    with pytest.raises(ValueError, match="strictly increasing"):
        from_saelens(source, matryoshka_widths=[12, 6, 24])


def test_unsupported_architectures_are_named() -> None:
    with pytest.raises(
        ValueError,
        match=r"Cannot read a GatedSAE \(architecture 'gated'\).*supported: JumpReLUSAE, TopKSAE, StandardSAE",
    ):
        from_saelens(GatedSAE(GatedSAEConfig(d_in=8, d_sae=24)), matryoshka_widths=[24])


def test_saelens_weights_holding_nan_are_refused() -> None:
    source = StandardSAE(StandardSAEConfig(d_in=8, d_sae=24))
    with torch.no_grad():
        source.W_dec[3, 1] = float("nan")
    with pytest.raises(
        SAEFileError, match=r"the given StandardSAE: W_dec holds 1 non-finite value"
    ):
        from_saelens(source, matryoshka_widths=[24])


# ---------------------------------------------------------------- damaged imports
#
# Each case damages one file of a checkpoint written as its library writes it
# (dictionary_learning 0.1.0's trainSAE: ae.pt + config.json; sparsify's
# SparseCoder.save_to_disk: cfg.json + sae.safetensors), and names a regex of
# what the error must say was found. Every error must also name the file, say
# what belongs there (who writes it) and what to do.

#: what to do, one of which every message gives
REMEDIES = (
    "copy it again",
    "use the pair one run wrote together",
    "Is it the right file?",
    "Put that file at this path",
    "Fix the field",
)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _folder_in_place_of(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _edit_state(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)

    return edit


def _edit_json(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        content = json.loads(path.read_text())
        path.write_text(json.dumps(change(content)))

    return edit


def _edit_safetensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        weights = load_file(path)
        change(weights)
        save_file(weights, path)

    return edit


def _trainer(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], Any]:
    def edit(config: dict[str, Any]) -> dict[str, Any]:
        change(config["trainer"])
        return config

    return edit


#: id -> (dictionary_learning class, damaged file, damage, what the error says was found)
DICTIONARY_LEARNING_DAMAGE: dict[str, tuple[str, str, Callable[[Path], None], str]] = {
    "ae_truncated": (
        "BatchTopKSAE",
        "ae.pt",
        _truncate,
        r"holds \d+ bytes that are not a readable torch\.save checkpoint \(RuntimeError: "
        r"PytorchStreamReader failed reading zip archive",
    ),
    "ae_garbage": (
        "BatchTopKSAE",
        "ae.pt",
        lambda path: path.write_bytes(b"\x00not a checkpoint" * 8),
        r"holds \d+ bytes that are not a readable torch\.save checkpoint \(UnpicklingError",
    ),
    "ae_empty": (
        "BatchTopKSAE",
        "ae.pt",
        lambda path: path.write_bytes(b""),
        r"is empty \(0 bytes\)",
    ),
    "ae_folder": ("BatchTopKSAE", "ae.pt", _folder_in_place_of, r"ae\.pt is a folder"),
    "ae_not_a_state_dict": (
        "BatchTopKSAE",
        "ae.pt",
        lambda path: torch.save(torch.zeros(3), path),
        r"holds a Tensor",
    ),
    "ae_tensor_missing": (
        "BatchTopKSAE",
        "ae.pt",
        _edit_state(lambda state: state.pop("encoder.bias")),
        r"lacks \['encoder\.bias'\], which .*config\.json \(BatchTopKSAE, activation_dim=8, "
        r"dict_size=24\) requires; it holds \['b_dec', 'decoder\.weight', 'encoder\.weight', 'k', "
        r"'threshold'\]",
    ),
    "ae_tensor_shape": (
        "AutoEncoderTopK",
        "ae.pt",
        _edit_state(lambda state: state.__setitem__("decoder.weight", state["decoder.weight"].T)),
        r"decoder\.weight has shape \[24, 8\], but .*config\.json \(AutoEncoderTopK, "
        r"activation_dim=8, dict_size=24\) needs \[8, 24\]",
    ),
    "ae_not_a_tensor": (
        "BatchTopKSAE",
        "ae.pt",
        _edit_state(lambda state: state.__setitem__("encoder.weight", [[0.5] * 8] * 24)),
        r"encoder\.weight is a list, expected a tensor of shape \[24, 8\]",
    ),
    "ae_integer_weights": (
        "BatchTopKSAE",
        "ae.pt",
        _edit_state(lambda state: state.__setitem__("b_dec", state["b_dec"].int())),
        r"b_dec holds torch\.int32 values, expected floating-point weights",
    ),
    "ae_threshold_not_a_tensor": (
        "BatchTopKSAE",
        "ae.pt",
        _edit_state(lambda state: state.__setitem__("threshold", 0.3)),
        r"threshold is a float, expected a tensor",
    ),
    "ae_group_sizes_negative": (
        "MatryoshkaBatchTopKSAE",
        "ae.pt",
        _edit_state(lambda state: state.__setitem__("group_sizes", torch.tensor([-4, 16, 12]))),
        r"group_sizes is a torch\.int64 tensor of shape \[3\] \(\[-4, 16, 12\]\), expected a "
        r"list of positive whole numbers",
    ),
    "config_not_json": (
        "BatchTopKSAE",
        "config.json",
        lambda path: path.write_text(path.read_text()[:40]),
        r"is not valid JSON \(.* at line 1, column \d+; the file is 40 bytes\)",
    ),
    "config_empty": (
        "BatchTopKSAE",
        "config.json",
        lambda path: path.write_text("\n"),
        r"is empty \(1 bytes\)",
    ),
    "config_not_utf8": (
        "BatchTopKSAE",
        "config.json",
        lambda path: path.write_bytes(b"\xff\xfe{}"),
        r"is not UTF-8 text \(byte 0 is 0xff\)",
    ),
    "config_folder": ("BatchTopKSAE", "config.json", _folder_in_place_of, r"is a folder"),
    "config_array": (
        "BatchTopKSAE",
        "config.json",
        lambda path: path.write_text("[]"),
        r"holds a JSON array",
    ),
    "config_without_trainer": (
        "BatchTopKSAE",
        "config.json",
        _edit_json(lambda config: {"buffer": config["buffer"]}),
        r"\['trainer'\] is absent, not an object",
    ),
    "config_trainer_array": (
        "BatchTopKSAE",
        "config.json",
        _edit_json(lambda config: {**config, "trainer": [1]}),
        r"\['trainer'\] is a JSON array, not an object",
    ),
    "config_field_missing": (
        "BatchTopKSAE",
        "config.json",
        _edit_json(_trainer(lambda trainer: trainer.pop("dict_size"))),
        r"\['trainer'\] lacks \['dict_size'\]; it has \['activation_dim', ",
    ),
    "config_field_a_string": (
        "BatchTopKSAE",
        "config.json",
        _edit_json(_trainer(lambda trainer: trainer.__setitem__("dict_size", "24"))),
        r"\['trainer'\]: dict_size is \"24\" \(a JSON string\), expected a whole number",
    ),
    "config_k_fractional": (
        "AutoEncoderTopK",
        "config.json",
        _edit_json(_trainer(lambda trainer: trainer.__setitem__("k", 3.5))),
        r"\['trainer'\]: k is 3\.5 \(a JSON number\), expected a whole number of at least 1",
    ),
}

#: id -> (damaged file, damage, what the error says was found)
SPARSIFY_DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "weights_truncated": ("sae.safetensors", _truncate, r"is truncated: its header describes"),
    "weights_garbage": (
        "sae.safetensors",
        lambda path: path.write_bytes(b"not a safetensors file at all"),
        r"announces a \d+-byte header but holds 29 bytes",
    ),
    "weights_empty": (
        "sae.safetensors",
        lambda path: path.write_bytes(b""),
        r"is 0 bytes long: too short for a safetensors file",
    ),
    "weights_folder": ("sae.safetensors", _folder_in_place_of, r"sae\.safetensors is a folder"),
    "weights_tensor_missing": (
        "sae.safetensors",
        _edit_safetensors(lambda weights: weights.pop("b_dec")),
        r"lacks \['b_dec'\], which .*cfg\.json \(d_in=8, num_latents=24\) requires; it holds "
        r"\['W_dec', 'encoder\.bias', 'encoder\.weight'\]",
    ),
    "weights_tensor_shape": (
        "sae.safetensors",
        _edit_safetensors(
            lambda weights: weights.__setitem__("W_dec", weights["W_dec"].T.contiguous())
        ),
        r"W_dec has shape \[8, 24\], but .*cfg\.json \(d_in=8, num_latents=24\) needs \[24, 8\]",
    ),
    "weights_integer": (
        "sae.safetensors",
        _edit_safetensors(
            lambda weights: weights.__setitem__("encoder.weight", weights["encoder.weight"].int())
        ),
        r"encoder\.weight holds torch\.int32 values, expected floating-point weights",
    ),
    "cfg_not_json": (
        "cfg.json",
        lambda path: path.write_text(path.read_text()[:30]),
        r"is not valid JSON \(.*; the file is 30 bytes\)",
    ),
    "cfg_empty": ("cfg.json", lambda path: path.write_text(""), r"is empty \(0 bytes\)"),
    "cfg_folder": ("cfg.json", _folder_in_place_of, r"cfg\.json is a folder"),
    "cfg_string": ("cfg.json", lambda path: path.write_text('"d_in"'), r"holds a JSON string"),
    "cfg_field_missing": (
        "cfg.json",
        _edit_json(lambda cfg: {name: value for name, value in cfg.items() if name != "d_in"}),
        r"lacks \['d_in'\]; it has \['activation', ",
    ),
    "cfg_field_a_string": (
        "cfg.json",
        _edit_json(lambda cfg: {**cfg, "d_in": "8"}),
        r"d_in is \"8\" \(a JSON string\), expected a whole number of at least 1",
    ),
    "cfg_no_latents": (
        "cfg.json",
        _edit_json(lambda cfg: {**cfg, "num_latents": 0, "expansion_factor": 0}),
        r"num_latents and expansion_factor are both 0, so the coder has no latents; expected ",
    ),
}


def _assert_one_clear_error(message: str, path: Path, found: str, writer: str) -> None:
    """The file, what was found, what belongs there (who writes it) and what to do, on one line."""
    assert "\n" not in message
    assert str(path) in message
    assert re.search(found, message), f"{found!r} not in {message!r}"
    expected = (writer, "expected", "requires", "needs")
    assert any(words in message for words in expected), message
    assert any(remedy in message for remedy in REMEDIES), message


@pytest.mark.parametrize("case", list(DICTIONARY_LEARNING_DAMAGE))
def test_damaged_dictionary_learning_checkpoints_are_one_clear_error(
    tmp_path: Path, case: str
) -> None:
    dict_class, name, damage, found = DICTIONARY_LEARNING_DAMAGE[case]
    folder = tmp_path / "trainer_0"
    write_dictionary_learning(folder, dict_class)
    damage(folder / name)
    with pytest.raises(SAEFileError) as caught:
        from_dictionary_learning(folder)
    _assert_one_clear_error(
        str(caught.value), folder / name, found, "dictionary_learning's trainSAE"
    )


@pytest.mark.parametrize("case", list(SPARSIFY_DAMAGE))
def test_damaged_sparsify_folders_are_one_clear_error(tmp_path: Path, case: str) -> None:
    name, damage, found = SPARSIFY_DAMAGE[case]
    folder = tmp_path / "layers.3"
    sparsify_folder(folder)
    damage(folder / name)
    with pytest.raises(SAEFileError) as caught:
        from_sparsify(folder)
    _assert_one_clear_error(
        str(caught.value), folder / name, found, "sparsify's SparseCoder.save_to_disk"
    )


def test_a_file_or_the_run_folder_given_for_one_checkpoint_says_which_to_give(
    tmp_path: Path,
) -> None:
    """The paths people pass by mistake: the weights file, or the folder of all trainers/hookpoints."""
    sparsify_folder(tmp_path / "run" / "layers.0")
    sparsify_folder(tmp_path / "run" / "layers.3")
    with pytest.raises(
        SAEFileError, match=rf"sae\.safetensors is a file: .*; give {re.escape(str(tmp_path))}"
    ):
        from_sparsify(tmp_path / "run" / "layers.3" / "sae.safetensors")
    with pytest.raises(
        FileNotFoundError,
        match=r"run/cfg\.json is missing: .* holds 2 folders that do \(layers\.0, layers\.3\): "
        r"give one of them",
    ):
        from_sparsify(tmp_path / "run")

    write_dictionary_learning(tmp_path / "save_dir" / "trainer_0", "BatchTopKSAE")
    write_dictionary_learning(tmp_path / "save_dir" / "trainer_1", "AutoEncoderTopK")
    with pytest.raises(
        FileNotFoundError,
        match=r"No dictionary_learning checkpoint at .*save_dir/ae\.pt: .* holds 2 folders that "
        r"do \(trainer_0, trainer_1\): give one of them",
    ):
        from_dictionary_learning(tmp_path / "save_dir")
