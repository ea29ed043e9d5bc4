"""The Hub round trip: uploads checked at the HfApi boundary, downloads through a real offline cache."""

from __future__ import annotations

import fnmatch
import io
import pickle
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import RepositoryNotFoundError
from sae_lens import SAE, LanguageModelSAETrainingRunner, upload_saes_to_huggingface
from sae_lens.loading.pretrained_saes_directory import (
    PretrainedSAELookup,
    get_pretrained_saes_directory,
)

from sae_lens_matryoshka import (
    MatryoshkaSAE,
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
    upload_to_huggingface,
)
from sae_lens_matryoshka.io.hub import hub_errors_in_one_line, hub_unreachable
from sae_lens_matryoshka.io.hub_misses import HubFileNotCached, hub_misses_named
from sae_lens_matryoshka.io.interop import from_saelens_release, to_inference

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


# ---------------------------------------------------------------- offline misses


def _cache(hub: FakeHub, files: dict[str, bytes]) -> Path:
    """``files`` of REPO in the offline cache, as a download of only those would leave it."""
    hub.repos[REPO] = dict(files)
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    hub.place_in_cache(cache, REPO)
    return cache


def _assert_names_the_miss(message: str, file: str, cache: Path) -> None:
    """One line naming the repo, the file, the cache looked in and the download that brings it."""
    assert "\n" not in message
    named = f"repo '{REPO}' file '{file}' is not in the local Hugging Face cache ({cache})"
    assert named in message
    assert "HF_HUB_OFFLINE=1 is set" in message and "run once with network" in message
    folder = file.rsplit("/", 1)[0]
    assert f"`hf download {REPO} --include '{folder}/*'`" in message
    assert "point HF_HUB_CACHE (or HF_HOME) at a cache that has it" in message
    assert "revision" not in message  # main is not named


@pytest.mark.parametrize("cached", ["nothing", "cfg.json only"])
def test_from_pretrained_offline_names_the_repo_and_the_missing_file(
    hub: FakeHub, tmp_path: Path, cached: str
) -> None:
    """Offline, SAELens's own error names neither; the first file not cached is named here.

    With nothing cached that is ``cfg.json``; with only ``cfg.json`` (a
    download cut short) the weights, which ``SAE.from_pretrained`` asks for next.
    """
    folder = to_inference(_trained("relu")).save_model(tmp_path / "sae")[0].parent
    files = (
        {} if cached == "nothing" else {"layer/relu/cfg.json": (folder / "cfg.json").read_bytes()}
    )
    cache = _cache(hub, files)
    missing = "layer/relu/cfg.json" if cached == "nothing" else "layer/relu/sae_weights.safetensors"
    with pytest.raises(HubFileNotCached) as caught:
        SAE.from_pretrained(REPO, "layer/relu")
    assert isinstance(caught.value, LocalEntryNotFoundError)  # what callers caught before
    _assert_names_the_miss(str(caught.value), missing, cache)
    miss = caught.value.miss
    assert miss is not None and (miss.repo_id, miss.filename) == (REPO, missing)
    copy = pickle.loads(pickle.dumps(caught.value))  # e.g. out of a DataLoader worker
    assert str(copy) == str(caught.value) and copy.miss == miss


def test_from_saelens_release_offline_names_the_call_the_repo_and_the_file(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub repo id, and a registered release whatever SAELens converter it uses."""
    cache = _cache(hub, {})
    with pytest.raises(HubFileNotCached) as caught:
        from_saelens_release(REPO, "layer/relu")
    message = str(caught.value)
    assert message.startswith(f"from_saelens_release('{REPO}', 'layer/relu'): ")
    _assert_names_the_miss(message, "layer/relu/cfg.json", cache)

    lookup = PretrainedSAELookup(
        release="tiny-dictionary-learning",
        repo_id=REPO,
        model="tiny-lm",
        conversion_func="dictionary_learning_1",  # not the loader the plugin wraps
        saes_map={"trainer_0": "layer/trainer_0"},
        expected_var_explained={},
        expected_l0={},
        neuronpedia_id={},
        norm_scaling_factor={},
        config_overrides=None,
    )
    monkeypatch.setitem(get_pretrained_saes_directory(), lookup.release, lookup)
    with pytest.raises(HubFileNotCached) as caught:
        from_saelens_release(lookup.release, "trainer_0", matryoshka_widths=[24])
    message = str(caught.value)
    assert message.startswith("from_saelens_release('tiny-dictionary-learning', 'trainer_0'): ")
    _assert_names_the_miss(message, "layer/trainer_0/config.json", cache)


@pytest.mark.parametrize(
    ("kwargs", "named", "command"),
    [
        (
            {"revision": "v1.0"},
            f"repo '{REPO}' file 'a/b.json' at revision 'v1.0'",
            "--revision v1.0",
        ),
        ({"repo_type": "dataset"}, f"dataset repo '{REPO}' file 'a/b.json'", "--repo-type dataset"),
    ],
    ids=["revision", "dataset"],
)
def test_a_miss_names_a_revision_other_than_main_and_a_repo_type(
    hub: FakeHub, kwargs: dict[str, str], named: str, command: str
) -> None:
    _cache(hub, {})
    with pytest.raises(HubFileNotCached) as caught, hub_misses_named():
        hf_hub_download(REPO, "a/b.json", **kwargs)
    assert named in str(caught.value)
    assert f"`hf download {REPO} {command} --include 'a/*'`" in str(caught.value)


def test_a_miss_without_network_says_the_hub_could_not_be_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not offline mode: the connection failed (built here: a real one retries for 20 s)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    url = f"https://huggingface.co/{REPO}/resolve/main/layer/cfg.json"
    refused = httpx2.ConnectError(
        "[Errno 111] Connection refused", request=httpx2.Request("HEAD", url)
    )
    with pytest.raises(HubFileNotCached) as caught, hub_misses_named():
        try:
            raise refused
        except httpx2.ConnectError as error:
            raise LocalEntryNotFoundError(
                "An error happened while trying to locate the file"
            ) from error
    message = str(caught.value)
    assert f"repo '{REPO}' file 'layer/cfg.json' is not in the local Hugging Face cache" in message
    reached = "could not be reached (ConnectError: [Errno 111] Connection refused)"
    assert f"the Hub (https://huggingface.co) {reached}" in message
    assert "check the network, proxy and HF_ENDPOINT" in message
    assert "HF_HUB_OFFLINE" not in message


def test_errors_not_about_the_hub_pass_through_unchanged(hub: FakeHub) -> None:
    with pytest.raises(FileNotFoundError, match=r"^/data/tokens$"), hub_misses_named(repo_id=REPO):
        raise FileNotFoundError("/data/tokens")


def test_the_one_line_of_scripts_names_the_repo_and_file(hub: FakeHub) -> None:
    """What the CLI and the examples print (``hub_errors_in_one_line``), for a Hub SAE."""
    cache = _cache(hub, {})
    with pytest.raises(SystemExit) as caught, hub_errors_in_one_line("or use a local folder"):
        SAE.from_pretrained(REPO, "layer/relu")
    line = str(caught.value.code)
    assert line.startswith("Could not reach the Hugging Face Hub (")
    assert line.endswith("; or use a local folder.")
    _assert_names_the_miss(line, "layer/relu/cfg.json", cache)
    # a miss whose chain records no repo keeps the error's own first line
    assert hub_unreachable(LocalEntryNotFoundError("not in the cache")) == (
        "Could not reach the Hugging Face Hub (not in the cache); without network, download "
        "once where there is one (HF_HUB_OFFLINE=1 then reads the cache)."
    )


@pytest.mark.parametrize("revision", ["main", "dev"])
def test_an_offline_upload_names_the_repo_and_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, revision: str
) -> None:
    """Through the real HfApi (no fake): offline, SAELens's uploader's first request fails."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    sae = to_inference(_trained("relu"))
    with pytest.raises(ConnectionError) as caught:
        upload_to_huggingface({"layer/relu": sae}, REPO, revision=revision, show_progress=False)
    message = str(caught.value)
    at = "" if revision == "main" else " (revision 'dev')"
    assert message.startswith(
        f"Could not upload to the Hub repo '{REPO}'{at}: HF_HUB_OFFLINE=1 is set."
    )
    assert "unset HF_HUB_OFFLINE and run upload_to_huggingface again" in message
    assert "upload_to_huggingface takes those folders" in message


def test_the_model_card_holds_what_neuronpedia_asks_and_the_runner_command() -> None:
    """The fields SAEDashboard's NeuronpediaRunner reads, an empty neuronpedia_id, the command."""
    from sae_lens_matryoshka.io.hub import model_card

    metadata = {
        "model_name": "gemma-2-2b",
        "hook_name": HOOK,
        "dataset_path": "someone/tokens",
        "context_size": 1024,
        "prepend_bos": True,
    }
    cfg = {"architecture": "matryoshka", "matryoshka_widths": [8, 24, 64], "metadata": metadata}
    card = model_card(REPO, {HOOK: cfg}, {})
    for line in (
        "- model_name: `gemma-2-2b`",
        f"- hook_name: `{HOOK}`",
        "- dataset_path: `someone/tokens`",
        "- context_size: `1024`",
        "- prepend_bos: `True`",
        "- levels (prefix widths): [8, 24, 64]",
        "- neuronpedia_id: (empty: not on Neuronpedia yet)",
        f"  --sae-set {REPO} --sae-path {HOOK} --np-set-name <neuronpedia-set-name> \\",
        "  --dataset-path someone/tokens --n-tokens-in-prompt 1024 --output-dir neuronpedia_outputs",
    ):
        assert line in card.splitlines(), line
    assert "import sae_lens_matryoshka, runpy" in card  # the runner loads the architecture
    hosted = model_card(
        REPO, {HOOK: {**cfg, "metadata": {**metadata, "neuronpedia_id": "x/0-m"}}}, {}
    )
    assert "- neuronpedia_id: `x/0-m`" in hosted
