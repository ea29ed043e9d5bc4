"""A run whose SAE cannot be saved fails before it loads anything; one whose final save fails keeps it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, LanguageModelSAETrainingRunner

from sae_lens_matryoshka import MatryoshkaTrainingSAE, to_inference
from sae_lens_matryoshka.config import is_matryoshka
from sae_lens_matryoshka.io import save_paths

from .conftest import small_sae_cfg, tiny_runner_cfg

#: a model SAELens cannot load here: reaching it would fail with another error
UNLOADABLE = {"model_name": "no-such-model-anywhere"}


def test_an_output_path_that_is_a_file_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    target = tmp_path / "results"
    target.write_text("not a folder")
    cfg = tiny_runner_cfg(output_path=str(target), **UNLOADABLE)
    with pytest.raises(
        ValueError, match=r"output_path='.*results' is an existing file.*Nothing was"
    ):
        LanguageModelSAETrainingRunner(cfg)


def test_a_checkpoint_path_below_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    cfg = tiny_runner_cfg(
        checkpoint_path=str(tmp_path / "blocker" / "ckpt"), n_checkpoints=2, **UNLOADABLE
    )
    with pytest.raises(
        ValueError, match=r"checkpoint_path=.*cannot be created: .*blocker' is a file"
    ):
        LanguageModelSAETrainingRunner(cfg)


def test_a_path_without_room_for_the_sae_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_runner_cfg(output_path=str(tmp_path / "out"), **UNLOADABLE)
    needed = save_paths.sae_bytes(cfg.sae)
    assert needed == (2 * cfg.sae.d_in * cfg.sae.d_sae + 2 * cfg.sae.d_sae + cfg.sae.d_in) * 4
    real = save_paths.shutil.disk_usage
    monkeypatch.setattr(
        save_paths.shutil, "disk_usage", lambda path: real(path)._replace(free=needed - 1)
    )
    with pytest.raises(ValueError, match=r"output_path=.*has 0 MiB free, and what is saved there"):
        LanguageModelSAETrainingRunner(cfg)


def test_a_writable_new_folder_passes_and_other_architectures_are_not_checked(
    tmp_path: Path,
) -> None:
    save_paths.check_save_path(tmp_path / "a" / "b", "output_path", 1)  # created later: fine
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError):
        save_paths.check_save_path(tmp_path / "file", "output_path", 1)
    assert not is_matryoshka(
        tiny_runner_cfg(sae=_standard_sae_cfg(), output_path=str(tmp_path / "file")).sae
    )


def _standard_sae_cfg() -> Any:
    from sae_lens import StandardTrainingSAEConfig

    return StandardTrainingSAEConfig(d_in=small_sae_cfg().d_in, d_sae=16)


def test_a_failed_final_save_keeps_the_trained_sae_in_a_named_folder(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_model: Any,
    token_dataset: Any,
) -> None:
    output = tmp_path / "output"
    monkeypatch.setattr(save_paths.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    save = MatryoshkaTrainingSAE.save_inference_model

    def disk_full_at_output(self: MatryoshkaTrainingSAE, path: str) -> Any:
        if Path(path) == output:
            raise OSError(28, "No space left on device")
        return save(self, path)

    monkeypatch.setattr(MatryoshkaTrainingSAE, "save_inference_model", disk_full_at_output)
    cfg = tiny_runner_cfg(output_path=str(output))
    runner = LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    )
    with pytest.raises(OSError, match=r"No space left.*It was saved to '(.*)' instead") as raised:
        runner.run()
    kept = Path(str(raised.value).split("It was saved to '")[1].split("'")[0])
    assert kept.parent == tmp_path / "tmp" and kept.name.startswith("output.unsaved-")
    loaded = SAE.load_from_disk(kept)
    expected = to_inference(runner.sae)
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
