"""Under torchrun, the ranks agree on what they were launched with before they train.

Two gloo processes, given torchrun's environment variables by the test (as in
``test_distributed_runner.py``), go through launches that disagree: another
learning rate (would train a diverged copy that rank 0 saves, exit 0),
another activation (would hang in its first collective), another
``WORLD_SIZE`` (rank 0 would wait for a rank that never comes). Each must
fail on every rank with a ``ValueError`` naming the field and its value per
rank, within the rendezvous timeout. Ranks launched alike, but each with its
own checkpoint run id and wandb id, still train one SAE; and a difference is
found too when the process group already exists (a second run in one
process). The launcher's variables torch cannot use are named.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch.distributed as dist
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

from sae_lens_matryoshka import MatryoshkaTrainingSAEConfig, distributed
from sae_lens_matryoshka.distributed.launch import MAX_TIMEOUT_S, run_settings

from .conftest import D_MODEL, build_tiny_model, build_token_dataset, spawn_ranks, tiny_runner_cfg

#: short: a rank that waited for a missing one would fail the test's time bound
RENDEZVOUS_S = 20.0


class Launch(NamedTuple):
    """How rank 1 is launched differently from rank 0, and whether the run then trains."""

    env: dict[str, str]
    fields: dict[str, Any]
    trains: bool = False
    #: the environment of both ranks, beside the usual
    both: dict[str, str] | None = None


def _sae(**fields: Any) -> MatryoshkaTrainingSAEConfig:
    cfg: dict[str, Any] = {"d_in": D_MODEL, "d_sae": 64, "k": 4, "matryoshka_widths": [8, 24, 64]}
    cfg |= fields
    return MatryoshkaTrainingSAEConfig(**cfg)


#: how long the ranks of a world of 3 wait for the third, which is never launched
MISSING_S = 4.0
#: in order: the first four fail at the rendezvous, "alike" joins the ranks and trains, the
#: last is compared over the process group "alike" left
LAUNCHES: dict[str, Launch] = {
    "lr": Launch({}, {"lr": 1e-3}),
    "activation": Launch({}, {"sae": _sae(activation="topk")}),
    "world_size": Launch({"WORLD_SIZE": "3"}, {}),
    "missing": Launch(
        {},
        {},
        both={"WORLD_SIZE": "3", distributed.RENDEZVOUS_TIMEOUT_ENV: str(MISSING_S)},
    ),
    "alike": Launch({}, {}, trains=True),
    "k_after_joining": Launch({}, {"sae": _sae(k=8)}),
}


def _cfg(folder: Path, rank: int, **fields: Any) -> LanguageModelSAERunnerConfig[Any]:
    """The run both ranks are given; each draws its own checkpoint run id and has its own wandb id."""
    return tiny_runner_cfg(
        **{
            "sae": _sae(),
            "lr": 3e-4,
            "training_tokens": 64 * 4,
            "checkpoint_path": str(folder / "checkpoints"),
            "logger": LoggingConfig(log_to_wandb=False, wandb_id=f"run-of-rank-{rank}"),
            **fields,
        },
    )


def _rank(rank: int, folder: Path, ports: dict[str, int]) -> None:
    report: dict[str, dict[str, Any]] = {}
    for name, launch in LAUNCHES.items():
        os.environ.update(
            {
                "WORLD_SIZE": "2",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(ports[name]),
                distributed.TIMEOUT_ENV: "60",
                distributed.RENDEZVOUS_TIMEOUT_ENV: str(RENDEZVOUS_S),
                **(launch.both or {}),
                **(launch.env if rank == 1 else {}),
            }
        )
        cfg = _cfg(folder, rank, **(launch.fields if rank == 1 else {}))
        start = time.monotonic()
        outcome: dict[str, Any] = {}
        try:
            run = distributed.build_runner(
                cfg, override_model=build_tiny_model(), override_dataset=build_token_dataset()
            )
            if launch.trains:
                outcome["W_dec"] = distributed.train(run).W_dec.detach().flatten().tolist()
        except Exception as error:
            outcome |= {"error": type(error).__name__, "message": str(error)}
        report[name] = outcome | {"seconds": time.monotonic() - start}
    if dist.is_initialized():
        dist.destroy_process_group()
    (folder / f"rank{rank}.json").write_text(json.dumps(report))


def _free_ports(n: int) -> list[int]:
    with ExitStack() as stack:  # all held open at once: n different ports
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Any]]]:
    """Each rank's outcome of every launch: an error and its message, or the trained weights."""
    folder = tmp_path_factory.mktemp("ranks")
    ports = dict(zip(LAUNCHES, _free_ports(len(LAUNCHES)), strict=True))
    spawn_ranks(_rank, (folder, ports), 2, timeout_s=180)
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def _errors(reports: list[dict[str, dict[str, Any]]], launch: str) -> list[str]:
    """The message each rank failed with; a rank that did not fail with a ValueError fails the test."""
    outcomes = [report[launch] for report in reports]
    for rank, outcome in enumerate(outcomes):
        assert outcome.get("error") == "ValueError", (rank, outcome)
        assert "Launch every rank with the same settings" in outcome["message"]
        assert outcome["seconds"] < RENDEZVOUS_S, outcome  # not a wait for a timeout
    return [outcome["message"] for outcome in outcomes]


def test_another_learning_rate_fails_on_every_rank_naming_both(
    reports: list[dict[str, dict[str, Any]]],
) -> None:
    for rank, message in enumerate(_errors(reports, "lr")):
        assert message.startswith(f"rank {rank} of 2: the ranks were launched with different")
        assert "\n  lr: rank 0 0.0003, rank 1 0.001;\n" in message
        assert "sae.k:" not in message  # only what differs
        # per-rank fields are not differences: each rank's checkpoint run id and wandb id
        assert "checkpoint_path" not in message and "wandb_id" not in message


def test_another_activation_fails_instead_of_hanging(
    reports: list[dict[str, dict[str, Any]]],
) -> None:
    for message in _errors(reports, "activation"):
        assert '\n  sae.activation: rank 0 "batchtopk", rank 1 "topk";\n' in message


def test_another_world_size_fails_within_the_rendezvous_timeout(
    reports: list[dict[str, dict[str, Any]]],
) -> None:
    """Rank 0 does not wait for the rank 2 that rank 1's WORLD_SIZE promises."""
    zero, one = _errors(reports, "world_size")
    assert zero.startswith("rank 0 of 2:") and one.startswith("rank 1 of 3:")
    for message in (zero, one):
        assert "\n  WORLD_SIZE: rank 0 2, rank 1 3;\n" in message


def test_a_rank_never_launched_is_named_on_every_rank(
    reports: list[dict[str, dict[str, Any]]],
) -> None:
    """Rank 0, whose store the board is, waits for rank 1 to read why before it goes."""
    for rank, report in enumerate(reports):
        outcome = report["missing"]
        assert outcome.get("error") == "CollectiveError", outcome
        assert outcome["message"].startswith(f"rank {rank} of 3: ranks [2] did not join within")
        assert outcome["seconds"] < MISSING_S + 10


def test_ranks_launched_alike_train_one_sae(reports: list[dict[str, dict[str, Any]]]) -> None:
    zero, one = (report["alike"] for report in reports)
    assert "error" not in zero and "error" not in one, (zero, one)
    assert zero["W_dec"] == one["W_dec"]


def test_a_difference_is_found_over_a_process_group_that_exists(
    reports: list[dict[str, dict[str, Any]]],
) -> None:
    for rank, message in enumerate(_errors(reports, "k_after_joining")):
        assert message.startswith(f"rank {rank} of 2:")
        assert "\n  sae.k: rank 0 4, rank 1 8;\n" in message


#: what rank 0 was launched with, in the comparison below
RANK_0 = {"sae": _sae(), "device": "cuda:0", "checkpoint_path": "checkpoints"}


@pytest.mark.parametrize(
    ("rank_1", "differs"),
    [
        # each rank's own GPU; the checkpoint run id each process draws; a wandb id, which
        # only rank 0 uses (it also becomes the checkpoint run id)
        ({"device": "cuda:1"}, False),
        ({}, False),
        ({"logger": LoggingConfig(log_to_wandb=False, wandb_id="another")}, False),
        # what would train another SAE, or save it elsewhere
        ({"device": "cpu"}, True),
        ({"checkpoint_path": "elsewhere"}, True),
        ({"sae": _sae(k=5)}, True),
        ({"sae": _sae(use_matryoshka_aux_loss=True)}, True),
        ({"hook_name": "blocks.0.hook_mlp_out"}, True),
        ({"train_batch_size_tokens": 32}, True),
        ({"logger": LoggingConfig(log_to_wandb=False, wandb_project="another")}, True),
    ],
)
def test_only_what_may_differ_per_rank_is_left_out_of_the_comparison(
    rank_1: dict[str, Any], differs: bool
) -> None:
    zero = run_settings(tiny_runner_cfg(**RANK_0))
    one = run_settings(tiny_runner_cfg(**(RANK_0 | rank_1)))
    shown = {f: (zero.get(f), one.get(f)) for f in {*zero, *one} if zero.get(f) != one.get(f)}
    assert (one != zero) is differs, shown


def test_latent_shards_are_compared_too() -> None:
    cfg = tiny_runner_cfg(_sae())
    assert run_settings(cfg, latent_shards=2) != run_settings(cfg)


def _launcher_env(monkeypatch: pytest.MonkeyPatch, port: int, **env: str) -> None:
    """Rank 0 of 2 at an unused port, with a short rendezvous (today's code would wait there)."""
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    for name, value in {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        distributed.RENDEZVOUS_TIMEOUT_ENV: "1",
        **env,
    }.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("port", ["99999", "65536", "0"])
def test_a_master_port_outside_the_tcp_range_is_named(
    port: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _launcher_env(monkeypatch, 0, MASTER_PORT=port)
    with pytest.raises(ValueError, match=rf"MASTER_PORT='{port}' must be between 1 and 65535"):
        distributed.init_from_env()


@pytest.mark.parametrize("name", [distributed.TIMEOUT_ENV, distributed.RENDEZVOUS_TIMEOUT_ENV])
@pytest.mark.parametrize("seconds", ["1e30", "1e10"])
def test_a_timeout_torch_cannot_wait_is_named(
    name: str, seconds: str, monkeypatch: pytest.MonkeyPatch, unused_port: int
) -> None:
    _launcher_env(monkeypatch, unused_port, **{name: seconds})
    with pytest.raises(ValueError, match=rf"{name}='{seconds}' .* at most {MAX_TIMEOUT_S} "):
        distributed.init_from_env()


def test_a_timeout_argument_torch_cannot_wait_is_named(
    monkeypatch: pytest.MonkeyPatch, unused_port: int
) -> None:
    _launcher_env(monkeypatch, unused_port)
    with pytest.raises(ValueError, match=rf"timeout_s=1e\+30 .* at most {MAX_TIMEOUT_S} "):
        distributed.init_from_env(timeout_s=1e30)
