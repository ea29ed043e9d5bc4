"""``distributed.run``: SAELens's runner, data-parallel, from tokens or from an activation cache.

The cache is written by SAELens's own ``CacheActivationsRunner`` from a tiny
random model (its model loader is pointed at that model: nothing is
downloaded). Training from it must not run the language model again. Under two
gloo ranks (spawned by the test with torchrun's environment variables) each
rank reads a disjoint shard, the replicas stay identical, only rank 0 saves,
and every rank resumes from rank 0's checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import sae_lens.cache_activations_runner as cache_module
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sae_lens import (
    SAE,
    CacheActivationsRunner,
    CacheActivationsRunnerConfig,
    LanguageModelSAERunnerConfig,
    TrainingSAE,
)
from safetensors.torch import load_file

from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaTrainingSAEConfig, distributed
from sae_lens_matryoshka.distributed import launch
from sae_lens_matryoshka.io.checkpoints import latest_complete

from .conftest import CONTEXT, D_MODEL, HOOK, build_tiny_model, build_token_dataset, tiny_runner_cfg


def _write_cache(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "load_model", lambda *args, **kwargs: build_tiny_model())
    cfg = CacheActivationsRunnerConfig(
        dataset_path="",
        model_name="tiny-random",
        model_batch_size=8,
        hook_name=HOOK,
        d_in=D_MODEL,
        training_tokens=64 * CONTEXT,
        context_size=CONTEXT,
        new_cached_activations_path=str(path),
        prepend_bos=False,
        shuffle=False,
        streaming=False,
        buffer_size_gb=256 * D_MODEL * 4 / 1e9,  # 256 tokens per shard, not SAELens's 2 GB
    )
    CacheActivationsRunner(cfg, override_dataset=build_token_dataset()).run()


def _runner_cfg(output: Path, cache: Path | None) -> LanguageModelSAERunnerConfig[Any]:
    return tiny_runner_cfg(
        MatryoshkaTrainingSAEConfig(d_in=D_MODEL, d_sae=64, k=4, matryoshka_widths=[8, 64]),
        training_tokens=32 * 30,
        train_batch_size_tokens=32,
        use_cached_activations=cache is not None,
        cached_activations_path=None if cache is None else str(cache),
        output_path=str(output),
    )


def test_training_from_a_cache_never_runs_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_cache(tmp_path / "cache", monkeypatch)
    model = build_tiny_model()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    sae = distributed.run(
        _runner_cfg(tmp_path / "out", tmp_path / "cache"),
        override_model=model,
        override_dataset=build_token_dataset(),
    )
    assert calls == []
    loaded = SAE.load_from_disk(tmp_path / "out")
    assert isinstance(loaded, MatryoshkaSAE)
    torch.testing.assert_close(loaded.W_dec, sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True))


def _rank(rank: int, folder: Path, port: int) -> None:
    import os

    os.environ.update(
        {
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            distributed.TIMEOUT_ENV: "60",
        }
    )
    report: dict[str, Any] = {}
    for source in ("tokens", "cache"):
        cache = folder / "cache" if source == "cache" else None
        cfg = _runner_cfg(folder / f"out-{source}", cache)
        captured: dict[str, Any] = {}
        original = launch.shard_activation_source

        def spy(
            runner: Any,
            mesh: Any,
            keep: dict[str, Any] = captured,
            shard: Any = original,
            column: str = "token_ids" if cache else "input_ids",
        ) -> None:
            shard(runner, mesh)
            store = runner.activations_store
            rows = store.cached_activation_dataset or store.dataset
            keep["first_rows"] = [row[column] for row in rows][:4]

        launch.shard_activation_source = spy  # type: ignore[assignment]
        sae = distributed.run(
            cfg, override_model=build_tiny_model(), override_dataset=build_token_dataset()
        )
        launch.shard_activation_source = original
        report[source] = {
            "first_rows": [torch.as_tensor(r).tolist() for r in captured["first_rows"]],
            "W_dec": sae.W_dec.detach().flatten().tolist(),
        }
    report["resume"] = _train_then_resume(folder)
    report["sharded"] = _sharded_train_then_resume(folder)
    (folder / f"rank{rank}.json").write_text(json.dumps(report))


def _train_then_resume(folder: Path) -> bool:
    """Every rank resumes from rank 0's checkpoint; with nothing left to train, the result is it."""
    checkpoints = folder / "checkpoints"
    cfg = dataclasses.replace(
        _runner_cfg(folder / "out-checkpointed", None),
        checkpoint_path=str(checkpoints),
        n_checkpoints=1,
    )
    distributed.run(cfg, override_model=build_tiny_model(), override_dataset=build_token_dataset())
    dist.barrier()
    checkpoint = max(
        (path.parent for path in checkpoints.rglob("sae_weights.safetensors")),
        key=lambda path: int(path.name),
    )
    resumed = _resume(cfg, checkpoint, folder / "out-resumed")
    return _holds(resumed, checkpoint)


def _resume(
    cfg: LanguageModelSAERunnerConfig[Any], checkpoint: Path, output: Path, latent_shards: int = 1
) -> TrainingSAE[Any]:
    """``cfg``'s run resumed from ``checkpoint``, from a fresh SAE unlike the first."""
    resumed_cfg = dataclasses.replace(
        cfg,
        training_tokens=int(checkpoint.name),
        resume_from_checkpoint=str(checkpoint),
        checkpoint_path=None,
        n_checkpoints=0,
        output_path=str(output),
    )
    model = build_tiny_model()  # (building it reseeds torch)
    torch.manual_seed(1234)  # a fresh SAE unlike the first: only the checkpoint can match it
    return distributed.run(
        resumed_cfg,
        latent_shards=latent_shards,
        override_model=model,
        override_dataset=build_token_dataset(),
    )


def _holds(sae: TrainingSAE[Any], checkpoint: Path) -> bool:
    """Whether ``sae`` holds exactly the weights saved in ``checkpoint``."""
    saved = load_file(checkpoint / "sae_weights.safetensors")
    state = sae.state_dict()
    return all(torch.equal(state[name].to(value.dtype), value) for name, value in saved.items())


def _sharded_train_then_resume(folder: Path) -> dict[str, Any]:
    """Two ranks hold one SAE's latents: it is saved whole, checkpointed in parts, resumed."""
    checkpoints = folder / "sharded-checkpoints"
    cfg = dataclasses.replace(
        _runner_cfg(folder / "out-sharded", None),
        checkpoint_path=str(checkpoints),
        n_checkpoints=1,
    )
    sae = distributed.run(
        cfg,
        latent_shards=2,
        override_model=build_tiny_model(),
        override_dataset=build_token_dataset(),
    )
    shard_rows = sae.W_dec.shape[0]
    dist.barrier()
    checkpoint = latest_complete(next(checkpoints.iterdir()))
    assert checkpoint is not None
    part = checkpoint / f"shard-{dist.get_rank()}-of-2"
    resumed = _resume(cfg, checkpoint, folder / "out-sharded-resumed", latent_shards=2)
    return {
        "shard_rows": shard_rows,
        "checkpoint": str(checkpoint),
        "resumed_its_part": _holds(resumed, part),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_two_ranks_train_one_sae_from_disjoint_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_cache(tmp_path / "cache", monkeypatch)
    context = mp.spawn(_rank, args=(tmp_path, _free_port()), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish within 240 s")
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for source in ("tokens", "cache"):
        zero, one = reports[0][source], reports[1][source]
        assert zero["W_dec"] == one["W_dec"]  # one SAE, not two
        assert not any(row in one["first_rows"] for row in zero["first_rows"])  # disjoint
        assert (tmp_path / f"out-{source}" / "cfg.json").exists()  # rank 0 saved
        saved = SAE.load_from_disk(tmp_path / f"out-{source}")
        assert isinstance(saved, MatryoshkaSAE)
    assert reports[0]["resume"] and reports[1]["resume"]  # every rank resumed the checkpoint

    # latent-sharded: each rank held half the latents, and the SAE was saved whole
    assert [report["sharded"]["shard_rows"] for report in reports] == [32, 32]
    whole = SAE.load_from_disk(tmp_path / "out-sharded")
    assert isinstance(whole, MatryoshkaSAE) and whole.cfg.d_sae == 64
    assert (tmp_path / "out-sharded" / "runner_cfg.json").is_file()
    checkpoint = Path(reports[0]["sharded"]["checkpoint"])
    assert sorted(part.name for part in checkpoint.iterdir()) == ["shard-0-of-2", "shard-1-of-2"]
    assert all(report["sharded"]["resumed_its_part"] for report in reports)
    resumed = SAE.load_from_disk(tmp_path / "out-sharded-resumed")
    parts = [load_file(checkpoint / f"shard-{s}-of-2" / "sae_weights.safetensors") for s in (0, 1)]
    # the resumed run trained nothing more: its whole SAE is the checkpoint's parts, joined
    # (saved in inference form: decoder norms folded into the encoder)
    W_dec = torch.cat([part["W_dec"] for part in parts])
    torch.testing.assert_close(resumed.W_dec, W_dec / W_dec.norm(dim=-1, keepdim=True))
