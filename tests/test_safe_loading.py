"""Damaged and hostile saved SAE folders fail with errors naming the file and the problem."""

from __future__ import annotations

import json
import os
import pickle
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file

from sae_lens_matryoshka import (
    MatryoshkaSAE,
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
    SAEFileError,
    check_sae_folder,
    load_sae,
)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A trained-looking Matryoshka SAE saved for inference."""
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(d_in=8, d_sae=32, k=3, matryoshka_widths=[4, 12, 32])
    )
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn_like(param))
        sae.activation_fn.last_cutoff.fill_(0.2)
    folder = tmp_path / "sae"
    sae.save_inference_model(folder)
    return folder


def _edit_cfg(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "cfg.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def _weights(folder: Path) -> Path:
    return folder / "sae_weights.safetensors"


def test_an_intact_folder_loads_with_equal_outputs(saved: Path) -> None:
    checked = load_sae(saved)
    plain = SAE.load_from_disk(saved)
    assert isinstance(checked, MatryoshkaSAE)
    x = torch.randn(5, 8)
    torch.testing.assert_close(checked.decode(checked.encode(x)), plain.decode(plain.encode(x)))


@pytest.mark.parametrize("keep", [0, 5, 20, -1, -100])
def test_a_truncated_weights_file_is_named_as_truncated(saved: Path, keep: int) -> None:
    data = _weights(saved).read_bytes()
    _weights(saved).write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])
    with pytest.raises(SAEFileError, match=r"sae_weights\.safetensors.*(truncated|too short)"):
        load_sae(saved)


def test_a_truncated_cfg_json_is_reported_with_its_position(saved: Path) -> None:
    path = saved / "cfg.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(SAEFileError, match=r"cfg\.json is not valid JSON .*line 1"):
        load_sae(saved)


def test_missing_files_and_folders_are_named(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(SAEFileError, match="is not a directory"):
        load_sae(tmp_path / "nowhere")
    _weights(saved).unlink()
    with pytest.raises(SAEFileError, match=r"sae_weights\.safetensors is missing"):
        load_sae(saved)
    (saved / "cfg.json").unlink()
    with pytest.raises(SAEFileError, match=r"cfg\.json is missing"):
        load_sae(saved)


def test_an_unknown_architecture_is_named(saved: Path) -> None:
    _edit_cfg(saved, lambda cfg: cfg.update(architecture="matryoshka_v9"))
    with pytest.raises(SAEFileError, match=r"architecture 'matryoshka_v9'.*known: .*matryoshka"):
        load_sae(saved)
    # what SAELens alone gives, and why load_sae exists
    with pytest.raises(KeyError):
        SAE.load_from_disk(saved)


#: damage -> (what cfg.json becomes, given its intact content; the error expected)
CFG_DAMAGE: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "not-an-object": (lambda cfg: [1, 2, 3], "must hold a JSON object, got list"),
    "unknown-dtype": (lambda cfg: {**cfg, "dtype": "float13"}, r"dtype 'float13'"),
    "metadata-not-object": (lambda cfg: {**cfg, "metadata": [1, 2]}, r"'metadata' must be"),
}


@pytest.mark.parametrize("damage", list(CFG_DAMAGE))
def test_malformed_cfg_entries_are_named(saved: Path, damage: str) -> None:
    damaged, message = CFG_DAMAGE[damage]
    path = saved / "cfg.json"
    path.write_text(json.dumps(damaged(json.loads(path.read_text()))))
    with pytest.raises(SAEFileError, match=message):
        load_sae(saved)


WRONG_VALUES = {
    "d_sae": ("32", r"d_sae must be a positive integer, got '32'"),
    "matryoshka_widths": ([4, "twelve", 32], r"matryoshka_widths\[1\] must be an integer"),
    "activation": (3, r"activation must be one of"),
    "k": ("three", r"k is only used by activation batchtopk / topk"),
}


@pytest.mark.parametrize("field", list(WRONG_VALUES))
@pytest.mark.parametrize("loader", [load_sae, SAE.load_from_disk])
def test_wrong_value_types_name_the_field(saved: Path, field: str, loader: Callable) -> None:
    value, message = WRONG_VALUES[field]
    _edit_cfg(saved, lambda cfg: cfg.update({field: value}))
    with pytest.raises(ValueError, match=message):
        loader(saved)


def test_a_misspelt_field_is_an_error_and_other_unknown_fields_a_warning(saved: Path) -> None:
    _edit_cfg(saved, lambda cfg: cfg.update(matryoshka_width=[4, 32]))
    # SAELens's own loader alone would drop unknown fields silently: the plugin checks first
    for loader in (load_sae, SAE.load_from_disk):
        with pytest.raises(ValueError, match="unknown field 'matryoshka_width'; did you mean"):
            loader(saved)
    _edit_cfg(saved, lambda cfg: (cfg.pop("matryoshka_width"), cfg.update(note="from v2")))
    with pytest.warns(UserWarning, match=r"ignores fields it does not know: \['note'\]"):
        assert isinstance(load_sae(saved), MatryoshkaSAE)


@pytest.mark.parametrize("loader", [load_sae, SAE.load_from_disk])
def test_widths_inconsistent_with_the_weights_are_reported(saved: Path, loader: Callable) -> None:
    _edit_cfg(saved, lambda cfg: cfg.update(d_sae=16, matryoshka_widths=[4, 16]))
    with pytest.raises(ValueError, match=r"does not match cfg\.json: W_\w+ has shape .*32.*16"):
        loader(saved)
    _edit_cfg(saved, lambda cfg: cfg.update(d_sae=32, matryoshka_widths=[4, 12, 30]))
    with pytest.raises(ValueError, match=r"must end at d_sae=32"):
        loader(saved)


def test_integer_weights_and_broken_headers_are_refused(saved: Path) -> None:
    weights = load_file(_weights(saved))
    weights["W_dec"] = weights["W_dec"].to(torch.int32)
    save_file(weights, _weights(saved))
    with pytest.raises(
        SAEFileError, match=r"'W_dec' is stored as I32; SAE weights must be floating"
    ):
        load_sae(saved)
    data = _weights(saved).read_bytes()
    header_bytes = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_bytes])
    header["W_enc"]["shape"] = [8, 33]  # claims more bytes than its range holds
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= header_bytes
    raw = raw.ljust(header_bytes)
    _weights(saved).write_bytes(data[:8] + raw + data[8 + header_bytes :])
    with pytest.raises(SAEFileError, match=r"'W_enc' \(F32, shape \[8, 33\]\) needs 1056 bytes"):
        check_sae_folder(saved)


@pytest.mark.parametrize("loader", [load_sae, SAE.load_from_disk])
def test_non_finite_weights_are_refused(saved: Path, loader: Callable) -> None:
    weights = load_file(_weights(saved))
    weights["W_dec"][3, 2] = float("nan")
    weights["b_enc"][0] = float("inf")
    save_file(weights, _weights(saved))
    with pytest.raises(SAEFileError, match=r"W_dec holds 1 non-finite values"):
        loader(saved)


def test_loading_never_unpickles(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only JSON and safetensors are read: no pickle, hence no code from the files."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a loader tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(load_sae(saved), MatryoshkaSAE)


def test_a_cfg_without_architecture_is_refused(saved: Path) -> None:
    """SAELens would take it as a 'standard' SAE and drop the levels without a word."""
    _edit_cfg(saved, lambda cfg: cfg.pop("architecture"))
    with pytest.raises(SAEFileError, match=r"no 'architecture' field.*'standard' SAE"):
        load_sae(saved)


def test_overlapping_tensor_bytes_are_refused(saved: Path) -> None:
    data = _weights(saved).read_bytes()
    header_bytes = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_bytes])
    names = sorted(
        (name for name in header if name != "__metadata__"),
        key=lambda name: header[name]["data_offsets"][0],
    )
    first, second = header[names[0]], header[names[1]]
    shift = first["data_offsets"][1] - second["data_offsets"][0] + 4
    assert shift > 0 and second["data_offsets"][0] - shift >= 0
    second["data_offsets"] = [offset - shift for offset in second["data_offsets"]]
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= header_bytes
    _weights(saved).write_bytes(data[:8] + raw.ljust(header_bytes) + data[8 + header_bytes :])
    with pytest.raises(SAEFileError, match=rf"bytes of tensor '{names[1]}'.*overlap"):
        check_sae_folder(saved)


@pytest.mark.parametrize("name", ["sae_weights.safetensors", "cfg.json"])
def test_a_fifo_in_place_of_a_file_is_refused_at_once(saved: Path, name: str) -> None:
    """Reading a FIFO nobody writes to would block forever."""
    (saved / name).unlink()
    os.mkfifo(saved / name)
    start = time.monotonic()
    with pytest.raises(SAEFileError, match=rf"{name} is not a regular file"):
        load_sae(saved)
    assert time.monotonic() - start < 5
