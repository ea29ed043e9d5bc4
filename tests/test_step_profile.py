"""``benchmarks/step_profile.py`` at a toy size: it profiles real steps and finds the calls they make.

The checks read what the profiler recorded of real training steps (the
selection's k-th value, the dead-latent pick's top-k, the one sort of each
set of entries, with their shapes and call sites), and a sort planted in the
step is found at the function that planted it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from sae_lens_matryoshka.kernels import selection

#: 64 tokens, k = 4: 256 selected entries; half of 128 latents dead, d_in / 2 = 8 picked per token
TINY = ["--d-in", "16", "--d-sae", "128", "--batch", "64", "--k", "4", "--dead-fraction", "0.5"]


@pytest.fixture
def step_profile(benchmark: Callable[[str], ModuleType]) -> ModuleType:
    """``benchmarks/step_profile.py`` as a module."""
    return benchmark("step_profile")


def test_the_profile_finds_the_steps_operations_and_sort_like_calls(
    step_profile: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    args = step_profile.parse_args([*TINY, "--steps", "2", "--warmup", "1"])
    result = step_profile.profile_steps(args)

    assert len(result.step_seconds) == 2 and all(seconds > 0 for seconds in result.step_seconds)
    top = result.top
    assert [row.self_ms for row in top] == sorted((row.self_ms for row in top), reverse=True)
    assert 0 < sum(row.share for row in top) <= 1 + 1e-9
    assert result.self_total_ms >= sum(row.self_ms for row in top)
    assert "aten::addmm" in {row.name for row in top}  # the encoder's forward matmul

    calls = result.sort_calls
    assert all(len(call.self_ms) == 2 for call in calls)  # one figure per profiled step
    # BatchTopK's selection: a k-th value over the candidates, never a sort of them
    assert any(
        call.name == "aten::kthvalue"
        and "selection.py" in call.site[0]
        and "_first_largest" in call.site[0]
        for call in calls
    )
    # the dead-latent pick: a top-k over the 64 dead latents' columns of the 64 tokens
    assert any(
        call.name == "aten::topk"
        and call.input_shapes[0] == [64, 64]
        and "block_top" in call.site[0]
        for call in calls
    )
    # one sort per set of entries (the selected ones and the dead-latent picks), in the backward
    sorts = [call for call in calls if call.name in ("aten::sort", "aten::argsort")]
    assert sorted(call.input_shapes[0] for call in sorts) == [[256], [512]]
    for call in sorts:
        assert "latent_major_order" in call.site[0]
        assert any("decode_groups" in frame for frame in call.forward_site[1:])
    grouped = {(row["name"], row["input_shapes"]) for row in result.sort_by_shape}
    assert ("aten::argsort", str([[256], [], [], []])) in grouped

    step_profile.report(result)
    out = capsys.readouterr().out
    assert "Top operations by self CPU time" in out and "aten::addmm" in out
    assert "aten::argsort [[256]]" in out and "<- sae_lens_matryoshka/kernels/" in out


def test_a_sort_planted_in_the_step_is_found_where_it_was_called(
    step_profile: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_largest = selection._first_largest

    def planted_sort(values: torch.Tensor, n_keep: int) -> torch.Tensor:
        torch.sort(torch.arange(37.0).flip(0))  # a shape no step sorts
        return first_largest(values, n_keep)

    monkeypatch.setattr(selection, "_first_largest", planted_sort)
    result = step_profile.profile_steps(step_profile.parse_args([*TINY, "--steps", "1"]))
    planted = [call for call in result.sort_calls if call.input_shapes[:1] == [[37]]]
    assert len(planted) == 1 and planted[0].name == "aten::sort"
    assert "test_step_profile.py" in planted[0].site[0] and "planted_sort" in planted[0].site[0]
    assert "sampled_batch_topk_entries" in planted[0].site[1]


def test_json_output_is_one_object(
    step_profile: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["step_profile.py", *TINY, "--steps", "1", "--json"])
    step_profile.main()
    result = json.loads(capsys.readouterr().out)
    assert result["size"]["d_sae"] == 128 and result["size"]["dead_fraction"] == 0.5
    # tests/conftest.py's choice (the record is the process's: earlier tests may add theirs)
    assert result["kernels"]["encoder_weight_grad"]["*"] == "csr"
    assert {call["name"] for call in result["sort_calls"]} >= {"aten::kthvalue", "aten::topk"}
    with pytest.raises(SystemExit):
        step_profile.parse_args(["--dead-fraction", "2"])
