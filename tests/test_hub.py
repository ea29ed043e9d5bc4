"""The Hub round trip: uploads checked at the HfApi boundary, downloads through a real offline cache."""

from __future__ import annotations

import fnmatch
import io
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub.constants
import pytest
import torch
from huggingface_hub.utils import RepositoryNotFoundError
from sae_lens import SAE, LanguageModelSAETrainingRunner, upload_saes_to_huggingface

from sae_lens_matryoshka import (
    MatryoshkaSAE,
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
    upload_to_huggingface,
)
from sae_lens_matryoshka.io.interop import to_inference

from .conftest import HOOK, quick_train

REPO = "someone/matryoshka-test"


class FakeHub:
    """What would be sent to the Hub: repo id -> {path in repo: bytes}."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[str] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        self.repos[repo_id] = {}

    def api(self) -> Any:
        hub = self

        class FakeHfApi:
            def repo_info(self, repo_id: str, **kwargs: Any) -> None:
                if repo_id not in hub.repos:
                    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
                    raise RepositoryNotFoundError(
                        "missing", response=httpx2.Response(404, request=request)
                    )

            def upload_folder(
                self,
                folder_path: Any,
                path_in_repo: str,
                repo_id: str,
                allow_patterns: list[str],
                commit_message: str,
                **kwargs: Any,
            ) -> None:
                for file in Path(folder_path).iterdir():
                    if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                        hub.repos[repo_id][f"{path_in_repo}/{file.name}"] = file.read_bytes()
                hub.commits.append(commit_message)

            def upload_file(
                self,
                path_or_fileobj: io.BytesIO,
                path_in_repo: str,
                repo_id: str,
                commit_message: str,
                **kwargs: Any,
            ) -> None:
                hub.repos[repo_id][path_in_repo] = path_or_fileobj.read()
                hub.commits.append(commit_message)

        return FakeHfApi

    def place_in_cache(self, cache: Path, repo_id: str) -> None:
        """Lay the repo out as huggingface_hub's cache does after a download, 404s included."""
        commit = "a" * 40
        repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
        folders = set()
        for path, data in self.repos[repo_id].items():
            target = repo_dir / "snapshots" / commit / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            folders.add(str(Path(path).parent))
        for folder in folders - {"."}:
            for optional in ("sparsity.safetensors", "runner_cfg.json"):
                if f"{folder}/{optional}" not in self.repos[repo_id]:
                    marker = repo_dir / ".no_exist" / commit / folder / optional
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.touch()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr("sae_lens.training.upload_saes_to_huggingface.HfApi", fake.api())
    monkeypatch.setattr(
        "sae_lens.training.upload_saes_to_huggingface.create_repo", fake.create_repo
    )
    monkeypatch.setattr("sae_lens_matryoshka.io.hub.HfApi", fake.api())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return fake


def _download(hub: FakeHub, sae_id: str) -> SAE:
    hub.place_in_cache(Path(huggingface_hub.constants.HF_HUB_CACHE), REPO)
    return SAE.from_pretrained(REPO, sae_id)


def test_runner_output_goes_up_and_comes_back(
    hub, tiny_model, token_dataset, runner_cfg, tmp_path: Path
) -> None:
    cfg = runner_cfg()
    trained = LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    ).run()
    level_rows = [
        {"width": w, "explained_variance": 0.5 + i / 10} for i, w in enumerate([8, 24, 64])
    ]
    card = upload_to_huggingface(
        {HOOK: trained, "from-folder": cfg.output_path},
        REPO,
        level_metrics={HOOK: level_rows},
        show_progress=False,
    )
    files = set(hub.repos[REPO])
    assert files == {
        f"{HOOK}/cfg.json",
        f"{HOOK}/sae_weights.safetensors",
        "from-folder/cfg.json",
        "from-folder/sae_weights.safetensors",
        "from-folder/sparsity.safetensors",
        "from-folder/runner_cfg.json",
        "README.md",
    }
    assert hub.repos[REPO]["README.md"].decode() == card
    assert "levels (prefix widths): [8, 24, 64]" in card
    assert f"- hook_name: `{HOOK}`" in card
    assert '"activation": "batchtopk"' in card  # the training configuration
    assert "| width | explained_variance |" in card and "| 24 | 0.6 |" in card
    assert f'SAE.from_pretrained("{REPO}", "{HOOK}")' in card

    x = torch.randn(12, 16)
    trained.eval()
    for sae_id in (HOOK, "from-folder"):
        loaded = _download(hub, sae_id)
        assert isinstance(loaded, MatryoshkaSAE)
        assert loaded.matryoshka_widths == [8, 24, 64]
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), trained(x), rtol=1e-4, atol=1e-5)


def _trained(activation: str = "batchtopk") -> MatryoshkaTrainingSAE:
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=8,
            d_sae=24,
            k=2 if activation == "batchtopk" else None,
            activation=activation,
            matryoshka_widths=[4, 12, 24],
        )
    )
    return quick_train(sae).eval()


def test_inference_sae_object_uploads(hub, tmp_path: Path) -> None:
    sae = to_inference(_trained("relu"))
    upload_to_huggingface({"layer/relu": sae}, REPO, show_progress=False)
    assert set(hub.repos[REPO]) == {
        "layer/relu/cfg.json",
        "layer/relu/sae_weights.safetensors",
        "README.md",
    }
    loaded = _download(hub, "layer/relu")
    assert isinstance(loaded, MatryoshkaSAE) and loaded.cfg.activation == "relu"
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded(x), sae(x))


def test_saelens_own_upload_of_a_training_sae_loads_as_matryoshka(hub, tmp_path: Path) -> None:
    """SAELens's uploader saves training SAEs with save_model; that checkpoint form loads too."""
    trained = _trained("batchtopk")
    upload_saes_to_huggingface(
        {"ckpt": trained}, hf_repo_id=REPO, show_progress=False, add_default_readme=False
    )
    loaded = _download(hub, "ckpt")
    assert isinstance(loaded, MatryoshkaSAE) and loaded.cfg.activation == "jumprelu"
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=1e-5, atol=1e-5)


def test_uploading_a_missing_folder_fails_before_sending_anything(hub, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cfg\.json does not exist"):
        upload_to_huggingface({"x": tmp_path / "nowhere"}, REPO, show_progress=False)
    assert hub.repos == {}
