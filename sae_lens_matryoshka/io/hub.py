"""Sharing Matryoshka SAEs on the Hugging Face Hub, in SAELens's format.

``upload_to_huggingface`` sends each SAE through SAELens's own
``upload_saes_to_huggingface`` (one folder per SAE id: ``cfg.json``,
``sae_weights.safetensors`` and, when present, ``sparsity.safetensors`` and
``runner_cfg.json``), then adds a model card listing each SAE's levels, its
training configuration and, when given, its per-level metrics. Anything
uploaded loads back with ``SAE.from_pretrained(repo_id, sae_id)`` as a
``MatryoshkaSAE`` once ``sae_lens_matryoshka`` is imported.

``hub_errors_in_one_line`` turns a download that fails for want of the Hub
(no network, or ``HF_HUB_OFFLINE=1`` and nothing cached) into one line saying
so, naming the repo and file where the error's chain records them (see
``hub_misses``), and what to do, instead of a chain of tracebacks through four
libraries. An upload that cannot reach the Hub names the repo and revision.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from huggingface_hub import HfApi
from sae_lens import SAE, upload_saes_to_huggingface
from sae_lens.constants import SAE_CFG_FILENAME

from sae_lens_matryoshka.config import ARCHITECTURE
from sae_lens_matryoshka.io.hub_misses import HUB_UNREACHABLE, find_hub_miss
from sae_lens_matryoshka.io.loaders import to_inference
from sae_lens_matryoshka.training_sae import MatryoshkaTrainingSAE

SaeRef: TypeAlias = "SAE[Any] | Path | str"

#: what to do without network, wherever a download fails
OFFLINE_HINT = (
    "without network, download once where there is one (HF_HUB_OFFLINE=1 then reads the cache)"
)


def hub_unreachable(error: BaseException, hint: str = OFFLINE_HINT) -> str | None:
    """One line saying the Hub could not be reached and ``hint``, if that is why ``error`` was raised.

    When the error's chain records the repo and file (``find_hub_miss``), the
    line names them and the download that brings them; otherwise it quotes
    the error's first line.
    """
    miss = find_hub_miss(error)
    if miss is not None:
        return f"Could not reach the Hugging Face Hub ({miss.what()}); {miss.remedy()}; {hint}."
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, HUB_UNREACHABLE):
            message = str(error).strip()
            what = message.splitlines()[0][:200] if message else type(error).__name__
            return f"Could not reach the Hugging Face Hub ({what}); {hint}."
        cause = cause.__cause__ or cause.__context__
    return None


@contextlib.contextmanager
def hub_errors_in_one_line(hint: str = OFFLINE_HINT) -> Iterator[None]:
    """Exit with one line, not a traceback, when a download inside fails for want of the Hub.

    ``hint`` says what to do instead (the caller knows its own options).
    """
    try:
        yield
    except Exception as error:
        line = hub_unreachable(error, hint)
        if line is None:
            raise
        raise SystemExit(line) from error


def upload_to_huggingface(
    saes: Mapping[str, SaeRef],
    repo_id: str,
    revision: str = "main",
    level_metrics: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    show_progress: bool = True,
) -> str:
    """Upload Matryoshka SAEs (objects or saved folders) and a model card; return the card.

    Args:
        saes: SAE id (the folder in the repo, e.g. the hook name) -> a
            ``MatryoshkaTrainingSAE`` (as the runner returns it: uploaded in
            its saved, inference form), a ``MatryoshkaSAE``, or a saved folder.
        repo_id: the Hub repository, created if missing.
        revision: the branch to upload to.
        level_metrics: optional SAE id -> one row per level (e.g. what the
            per-level evals return), shown as a table in the card.
        show_progress: show SAELens's upload progress bar.
    """
    # a training SAE goes up in the form it is saved in, converted once here
    prepared = {
        sae_id: to_inference(ref) if isinstance(ref, MatryoshkaTrainingSAE) else ref
        for sae_id, ref in saes.items()
    }
    cards = {sae_id: _read_cfg(ref) for sae_id, ref in prepared.items()}
    card = model_card(repo_id, cards, level_metrics or {})
    with _upload_errors_named(repo_id, revision):
        upload_saes_to_huggingface(
            dict(prepared),
            hf_repo_id=repo_id,
            hf_revision=revision,
            show_progress=show_progress,
            add_default_readme=False,
        )
        HfApi().upload_file(
            path_or_fileobj=io.BytesIO(card.encode("utf-8")),
            path_in_repo="README.md",
            repo_id=repo_id,
            revision=revision,
            commit_message="Add Matryoshka SAE model card",
        )
    return card


@contextlib.contextmanager
def _upload_errors_named(repo_id: str, revision: str) -> Iterator[None]:
    """Say which repo an upload that cannot reach the Hub was for, and what to do.

    Offline, huggingface_hub's error is ``Cannot reach
    https://huggingface.co/api/models/<repo>: offline mode is enabled`` (and
    without network a connection error naming no repo at all), from the first
    request SAELens's uploader makes; neither says that nothing of the upload
    needs the Hub until then, nor that it can simply be run again.
    """
    try:
        yield
    except Exception as error:
        miss = find_hub_miss(error, repo_id)
        if miss is None:
            raise
        at = "" if revision == "main" else f" (revision {revision!r})"
        if miss.reason == "unreachable":
            why, first = miss.why(), "check the network, proxy and HF_ENDPOINT"
        else:
            why, first = "HF_HUB_OFFLINE=1 is set", "unset HF_HUB_OFFLINE"
        raise ConnectionError(
            f"Could not upload to the Hub repo {repo_id!r}{at}: {why}. Uploading needs the Hub: "
            f"{first} and run upload_to_huggingface again (files already uploaded are "
            "replaced); meanwhile sae.save_model(folder) keeps each SAE, and "
            "upload_to_huggingface takes those folders."
        ) from error


def _read_cfg(ref: SaeRef) -> dict[str, Any]:
    """The ``cfg.json`` content of an SAE object or folder."""
    if isinstance(ref, SAE):
        return ref.cfg.to_dict()
    cfg_path = Path(ref) / SAE_CFG_FILENAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} does not exist: is {ref} a saved SAE folder?")
    return json.loads(cfg_path.read_text())


def model_card(
    repo_id: str,
    cfgs: Mapping[str, Mapping[str, Any]],
    level_metrics: Mapping[str, Sequence[Mapping[str, Any]]],
) -> str:
    """A README.md for the repo: levels, training config, per-level metrics, loading snippet."""
    lines = [
        "---",
        "library_name: saelens",
        "tags:",
        "- sparse-autoencoder",
        "- matryoshka",
        "- sae-lens-matryoshka",
        "---",
        "",
        "# Matryoshka SAEs",
        "",
        "Nested sparse autoencoders (Bussmann et al. 2025, arXiv 2503.17547): every prefix "
        "of the dictionary, at the widths listed as levels, reconstructs the input on its own.",
        "",
    ]
    for sae_id, cfg in cfgs.items():
        metadata = cfg.get("metadata", {}) or {}
        lines += [
            f"## `{sae_id}`",
            "",
            f"- architecture: `{cfg.get('architecture')}`, activation `{cfg.get('activation')}`"
            + (f", k = {cfg['k']}" if cfg.get("k") is not None else ""),
            f"- d_in = {cfg.get('d_in')}, d_sae = {cfg.get('d_sae')}",
            f"- levels (prefix widths): {cfg.get('matryoshka_widths')}",
        ]
        # what SAEDashboard's NeuronpediaRunner and Neuronpedia's upload form ask for
        for key in ("model_name", "hook_name", "dataset_path", "context_size", "prepend_bos"):
            if metadata.get(key) not in (None, ""):
                lines.append(f"- {key}: `{metadata[key]}`")
        neuronpedia_id = metadata.get("neuronpedia_id")
        lines.append(
            f"- neuronpedia_id: `{neuronpedia_id}`"
            if neuronpedia_id
            else "- neuronpedia_id: (empty: not on Neuronpedia yet)"
        )
        details = metadata.get("training_architecture_details")
        if details:
            lines += [
                "",
                "Training configuration:",
                "",
                "```json",
                json.dumps(details, indent=2),
                "```",
            ]
        rows = level_metrics.get(sae_id)
        if rows:
            columns = list(dict.fromkeys(key for row in rows for key in row))
            lines += [
                "",
                "Per-level metrics:",
                "",
                "| " + " | ".join(columns) + " |",
                "|" + "---|" * len(columns),
            ]
            lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
        lines.append("")
    first_id = next(iter(cfgs), "<sae_id>")
    first = (cfgs.get(first_id, {}) or {}).get("metadata", {}) or {}
    dashboards = [
        "## Dashboards: SAEDashboard, Neuronpedia",
        "",
        "SAEDashboard's `NeuronpediaRunner` writes the feature batches Neuronpedia imports; "
        "run it with the plugin imported, so that the architecture loads:",
        "",
        "```bash",
        "python -c 'import sae_lens_matryoshka, runpy; runpy.run_module("
        '"sae_dashboard.neuronpedia.neuronpedia_runner", run_name="__main__", '
        "alter_sys=True)' \\",
        f"  --sae-set {repo_id} --sae-path {first_id} --np-set-name <neuronpedia-set-name> \\",
        f"  --dataset-path {first.get('dataset_path') or '<dataset>'} "
        f"--n-tokens-in-prompt {first.get('context_size') or 128} "
        "--output-dir neuronpedia_outputs",
        "```",
    ]
    lines += [
        "## Loading",
        "",
        "```python",
        "import sae_lens_matryoshka  # registers the architecture (installed from its repository)",
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained("{repo_id}", "{first_id}")  # a MatryoshkaSAE',
        "sae.matryoshka_widths",
        "small = sae.truncate(sae.matryoshka_widths[0])  # the first level as a standalone SAE",
        "```",
        "",
        f"Architecture `{ARCHITECTURE}` needs the `sae-lens-matryoshka` plugin; "
        "`sae_lens_matryoshka.export_portable` writes a plain SAELens copy for users without it.",
        "",
        *dashboards,
    ]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
