"""Bad input gets a specific error (which field or tensor, what was expected, what was given).

Booleans that are not booleans, runs that would train nothing, tensors of the
wrong shape or kind, thresholds no training writes, resuming another SAE's
checkpoint, and malformed launcher variables: each is refused before it can
train or load something wrong.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, LanguageModelSAERunnerConfig
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file, save_file

from sae_lens_matryoshka import (
    MatryoshkaSAE,
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
    distributed,
    load_sae,
    to_inference,
)
from sae_lens_matryoshka.toy import short_run_trainer_config

from .conftest import HOOK, step_output, train_step

D_IN, D_SAE = 8, 32
BASE: dict[str, Any] = {"d_in": D_IN, "d_sae": D_SAE, "k": 3, "matryoshka_widths": [4, 12, 32]}
BOOLEAN_FIELDS = [
    "detach_between_levels",
    "use_matryoshka_aux_loss",
    "rescale_acts_by_decoder_norm",
    "apply_b_dec_to_input",
]
NOT_BOOLEANS = ["false", "no", 2, 0, None]


def _training_sae(**fields: Any) -> MatryoshkaTrainingSAE:
    torch.manual_seed(0)
    return MatryoshkaTrainingSAE(MatryoshkaTrainingSAEConfig(**{**BASE, **fields}))


def _inference_sae(tmp_path: Path, **fields: Any) -> MatryoshkaSAE:
    sae = _training_sae(**fields)
    step_output(sae, torch.randn(16, D_IN), l0=0.0)  # learns the threshold
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, MatryoshkaSAE)
    return loaded


@pytest.mark.parametrize("field", BOOLEAN_FIELDS)
@pytest.mark.parametrize("value", NOT_BOOLEANS)
def test_booleans_must_be_booleans_in_configs_and_dicts(field: str, value: Any) -> None:
    message = rf"{field} must be true or false \(a boolean\), got {value!r}"
    with pytest.raises(ValueError, match=message):
        MatryoshkaTrainingSAEConfig(**{**BASE, field: value})
    with pytest.raises(ValueError, match=message):
        MatryoshkaTrainingSAEConfig.from_dict({**BASE, field: value})
    runner = {
        "sae": {"architecture": "matryoshka", **BASE, field: value},
        "hook_name": HOOK,
        "logger": {"log_to_wandb": False},
    }
    with pytest.raises(ValueError, match=message):
        LanguageModelSAERunnerConfig.from_dict(runner)


@pytest.mark.parametrize("field", ["rescale_acts_by_decoder_norm", "apply_b_dec_to_input"])
def test_booleans_must_be_booleans_in_saved_folders_and_checkpoints(
    field: str, tmp_path: Path
) -> None:
    inference, checkpoint = tmp_path / "inference", tmp_path / "checkpoint"
    sae = _training_sae()
    step_output(sae, torch.randn(16, D_IN))
    sae.save_inference_model(inference)
    sae.save_model(checkpoint)
    for folder, loaders in [
        (inference, [load_sae, SAE.load_from_disk]),
        (checkpoint, [MatryoshkaTrainingSAE.load_from_disk]),
    ]:
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "cfg.json").write_text(json.dumps({**cfg, field: "false"}))
        for loader in loaders:
            with pytest.raises(ValueError, match=rf"{field} must be true or false"):
                loader(folder)


@pytest.mark.parametrize("training_path", ["sparse", "dense"])
def test_a_batch_too_small_for_batchtopk_to_keep_anything_is_refused(training_path: str) -> None:
    sae = _training_sae(k=0.5, training_path=training_path)
    with pytest.raises(ValueError, match=r"k \* n_tokens = 0\.5 \* 1 = 0\.5 < 1 .*train nothing"):
        train_step(sae, torch.randn(1, D_IN))
    train_step(sae, torch.randn(2, D_IN))  # one activation: enough to train


def test_saving_a_batchtopk_sae_that_never_trained_warns(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"never took a training step.*saved as 0"):
        _training_sae().save_inference_model(tmp_path)


WRONG_INPUTS = {
    "wrong d_in": (torch.randn(5, D_IN + 1), ValueError, rf"d_in={D_IN}.*got shape \(5, 9\)"),
    "empty batch": (torch.randn(0, D_IN), ValueError, r"batch is empty \(shape \(0, 8\)\)"),
    "token ids": (
        torch.ones(5, D_IN, dtype=torch.long),
        TypeError,
        r"floating point, got torch.int64",
    ),
    "not a tensor": ([[0.0] * D_IN], TypeError, r"a torch.Tensor of activations, got list"),
    "a scalar": (torch.tensor(1.5), ValueError, rf"d_in={D_IN}.*got a scalar \(1.5\)"),
}


@pytest.mark.parametrize("case", list(WRONG_INPUTS))
def test_inputs_an_sae_cannot_read_are_named(case: str, tmp_path: Path) -> None:
    x, error, message = WRONG_INPUTS[case]
    training = _training_sae()
    inference = _inference_sae(tmp_path)
    for call in (training.encode, inference.encode, lambda x: step_output(training, x)):
        with pytest.raises(error, match=message):
            call(x)


def test_decoding_needs_d_sae_or_the_width_latents(tmp_path: Path) -> None:
    inference = _inference_sae(tmp_path)
    training = _training_sae()
    acts = inference.encode(torch.randn(5, D_IN))
    torch.testing.assert_close(inference.decode(acts[:, :12], width=12), inference.decode(acts, 12))
    too_many = torch.zeros(5, D_SAE + 3)
    for call in (
        inference.decode,
        inference.decode_levels,
        training.decode,
        training.decode_levels,
    ):
        with pytest.raises(ValueError, match=rf"expected activations of {D_SAE} latents"):
            call(too_many)
    with pytest.raises(ValueError, match=r"expected activations of 12 or 32 latents.*\(5, 20\)"):
        inference.decode(torch.zeros(5, 20), width=12)
    with pytest.raises(ValueError, match=r"of 32 latents.*\(5, 12\)"):
        inference.decode_levels(acts[:, :12])


def test_a_dead_latent_mask_of_the_wrong_length_is_named() -> None:
    with pytest.raises(ValueError, match=r"dead-latent mask must have shape \(32,\).*got \(31,\)"):
        step_output(
            _training_sae(), torch.randn(16, D_IN), torch.zeros(D_SAE - 1, dtype=torch.bool)
        )


def test_negative_thresholds_in_a_file_are_refused(tmp_path: Path) -> None:
    _inference_sae(tmp_path, activation="jumprelu", k=None)
    weights = load_file(tmp_path / "sae_weights.safetensors")
    weights["threshold"][:3] = -0.5
    save_file(weights, tmp_path / "sae_weights.safetensors")
    for loader in (load_sae, SAE.load_from_disk):
        with pytest.raises(ValueError, match=r"3 JumpReLU thresholds are negative"):
            loader(tmp_path)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            {"matryoshka_widths": [8, 32]},
            r"matryoshka_widths: checkpoint \[4, 12, 32\], this run \[8, 32\]",
        ),
        ({"activation": "topk"}, r"activation: checkpoint 'batchtopk', this run 'topk'"),
        ({"k": 5}, r"k: checkpoint 3, this run 5"),
    ],
)
def test_resuming_another_saes_checkpoint_is_refused(
    change: dict[str, Any], named: str, tmp_path: Path
) -> None:
    sae = _training_sae()
    cfg = short_run_trainer_config(2, batch_size=16, lr=1e-3, dead_feature_window=5)
    batches = iter([torch.randn(16, D_IN) for _ in range(2)])
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches)
    trainer.fit()
    trainer.save_checkpoint("2", base_path=tmp_path)
    other = _training_sae(**change)
    with pytest.raises(
        ValueError, match=rf"cannot resume from .*: it trained another SAE \({named}"
    ):
        other.load_weights_from_checkpoint(tmp_path / "2")
    _training_sae().load_weights_from_checkpoint(tmp_path / "2")  # the same SAE resumes


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "two"}, r"WORLD_SIZE='two' must be a whole number"),
        ({"WORLD_SIZE": "0"}, r"WORLD_SIZE='0' must be >= 1"),
        ({"WORLD_SIZE": "2"}, r"RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "first"}, r"RANK='first' must be a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2 must be below WORLD_SIZE=2"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, r"LOCAL_RANK='-1' must be >= 0"),
        (
            {"WORLD_SIZE": "2", "RANK": "0", distributed.TIMEOUT_ENV: "soon"},
            rf"{distributed.TIMEOUT_ENV}='soon' must be a positive number of seconds",
        ),
        (
            {"WORLD_SIZE": "2", "RANK": "0", distributed.RENDEZVOUS_TIMEOUT_ENV: "0"},
            rf"{distributed.RENDEZVOUS_TIMEOUT_ENV}='0' must be a positive number",
        ),
        ({"WORLD_SIZE": "2", "RANK": "0"}, r"MASTER_ADDR is not set"),
        (
            {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "x"},
            r"MASTER_PORT='x' must be a whole number",
        ),
    ],
)
def test_malformed_launcher_variables_are_named(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.init_from_env()


RANK_ALONE = """
import time
from sae_lens_matryoshka import distributed
start = time.monotonic()
try:
    distributed.init_from_env()
except distributed.CollectiveError as error:
    print(f"{time.monotonic() - start:.1f}", error)
"""


@pytest.mark.parametrize(
    ("rank", "message"), [(0, r"ranks \[1\] did not join"), (1, r"could not reach")]
)
def test_a_missing_peer_fails_within_the_rendezvous_timeout(
    rank: int, message: str, unused_port: int
) -> None:
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(unused_port),
        distributed.RENDEZVOUS_TIMEOUT_ENV: "2",
    }
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RANK_ALONE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds, _, error = completed.stdout.strip().partition(" ")
    assert completed.returncode == 0 and error, completed.stderr[-2000:]
    assert float(seconds) < 10  # not the 600 s collective timeout
    assert f"rank {rank} of 2" in error
    assert re.search(message, error), error


def test_decode_takes_what_training_hands_out_and_refuses_integers() -> None:
    """The sparse step's COO activations and any floating dtype decode; token ids do not (issue 25)."""
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(d_in=8, d_sae=32, k=2, matryoshka_widths=[4, 32])
    )
    x = torch.randn(16, 8)
    coo = step_output(sae, x).feature_acts
    assert coo.is_sparse  # what the sparse training path hands SAELens
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(coo), sae.decode(coo.to_dense()))
        inference = to_inference(sae)
        acts = inference.encode(x)
        expected = inference.decode(acts)
        torch.testing.assert_close(inference.decode(acts.to_sparse()), expected)
        torch.testing.assert_close(inference.decode(acts.double()), expected)
        assert inference.decode(acts.double()).dtype == torch.float32
        torch.testing.assert_close(
            inference.decode(acts[:, :4], width=4), inference.decode(acts, 4)
        )
    for bad in (acts.long(), acts > 0):
        with pytest.raises(TypeError, match=rf"must be floating point, got {bad.dtype}"):
            inference.decode(bad)


def test_a_dead_latent_mask_of_floats_is_refused() -> None:
    """A float mask would count 0.5 as dead (issue 25)."""
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(d_in=8, d_sae=32, k=2, matryoshka_widths=[4, 32])
    )
    with pytest.raises(TypeError, match=r"dead-latent mask must be boolean .*got torch.float32"):
        step_output(sae, torch.randn(16, 8), torch.full((32,), 0.5))


def test_non_finite_inference_input_is_warned_with_its_count(tmp_path: Path) -> None:
    """SAELens encodes and decodes NaN silently; the count comes with a warning (issue 25)."""
    inference = _inference_sae(tmp_path)
    training = _training_sae()
    x = torch.randn(6, D_IN)
    x[1, 2] = float("nan")
    x[4, 0] = float("inf")
    with pytest.warns(UserWarning, match=r"activations to encode of shape \(6, 8\) holds 2 NaN"):
        acts = inference.encode(x)
    assert not torch.isfinite(acts[1]).all()  # what is warned about: a token's latents spoilt
    bad_acts = inference.encode(torch.randn(6, D_IN))
    bad_acts[0, 0] = float("nan")
    for decode in (inference.decode, inference.decode_levels, training.decode):
        with pytest.warns(UserWarning, match=r"latent activations to decode .* holds 1 NaN"):
            decode(bad_acts)
    with pytest.warns(UserWarning, match=r"holds 1 NaN"):
        inference.decode(bad_acts.to_sparse())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inference.decode(inference.encode(torch.randn(6, D_IN)))
