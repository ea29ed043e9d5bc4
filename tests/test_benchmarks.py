"""The benchmarks run end to end at toy sizes and print one JSON object.

The step-time benchmark's options are checked in this process, on its
functions (a fresh process spends seconds importing SAELens); one run of the
whole script, memory probes in their own processes included, checks that they
reach those processes.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from .conftest import BENCHMARKS

BENCHMARK = BENCHMARKS / "step_time.py"
TINY = ["--d-in", "16", "--d-sae", "128", "--batch", "64", "--k", "4"]


@pytest.fixture
def step_time(benchmark: Callable[[str], ModuleType]) -> ModuleType:
    """``benchmarks/step_time.py`` as a module."""
    return benchmark("step_time")


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_every_contender_steps_with_dead_latents_at_every_precision(
    step_time: ModuleType, precision: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """bf16 is autocast around each forward: it must run on CPU too, for ours, SAELens and sparsify."""
    options = ["--repeats", "1", "--warmup", "2", "--dead-fraction", "0.5"]
    options += ["--precision", precision, "--skip-memory", "--skip-end-to-end"]
    args = step_time.parse_args([*TINY, *options])
    step_time.set_precision(args.precision)
    assert torch.backends.cuda.matmul.allow_tf32 == (precision == "tf32")
    result = step_time.run(args)
    assert (result["precision"], result["dead_fraction"], result["warmup_steps"]) == (
        precision,
        0.5,
        2,
    )
    assert result["median_step_seconds"].keys() == set(args.contenders)
    assert set(args.contenders) | set(args.not_installed) == set(step_time.CONTENDERS)
    floor = result["floor_step_seconds"]
    assert floor > 0
    for name, ratio in result["step_time_ratio_to_floor"].items():
        assert ratio == pytest.approx(result["median_step_seconds"][name] / floor), name
    checked = [target["of"] for target in result["targets"]]
    assert checked == [
        name for name, _ in step_time.TARGETS if name in {*args.contenders, step_time.FLOOR}
    ]
    assert result["step_page_faults_mib"].keys() == set(args.contenders)
    assert result["floor_page_faults_mib"] >= 0
    step_time.report(result)
    out = capsys.readouterr().out
    assert "faulted MiB" in out
    assert f"{precision}, 50% of latents dead, 2 warm-up steps" in out
    assert "floor_gemm_adam (GEMM + Adam)" in out
    assert "target: ours / floor_gemm_adam at most 1.5x" in out  # half dead: the looser bound
    assert "kernels chosen: " in out


def test_faulted_memory_counts_what_a_step_touches_afresh(step_time: ModuleType) -> None:
    """64 MiB allocated and written: faulted in; written again: nothing more."""
    before = step_time.faulted_mib()
    block = torch.ones(16 * 2**20)
    assert step_time.faulted_mib() - before >= 60
    before = step_time.faulted_mib()
    block.fill_(2.0)
    assert step_time.faulted_mib() - before < 4


def test_the_floor_step_is_the_encoder_matmul_and_one_adam_step(step_time: ModuleType) -> None:
    """The floor runs Adam over the SAE's four parameters (each moves) and allocates no gradient."""
    args = step_time.parse_args(TINY)
    x = torch.randn(args.batch, args.d_in)
    floor = step_time.Floor(args.d_in, args.d_sae, args.device)
    shapes = {name: tuple(p.shape) for name, p in floor.named_parameters()}
    assert shapes == {
        "W_enc": (args.d_in, args.d_sae),
        "b_enc": (args.d_sae,),
        "W_dec": (args.d_sae, args.d_in),
        "b_dec": (args.d_in,),
    }
    before = {name: p.detach().clone() for name, p in floor.named_parameters()}
    grads = {name: p.grad for name, p in floor.named_parameters()}
    first = floor.step(x, args)
    torch.testing.assert_close(first, x @ before["W_enc"] + before["b_enc"])
    for name, p in floor.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name
        assert p.grad is grads[name], name  # kept, not made again
    # the next step's matmul is written where the last one's was
    place = first.data_ptr()
    weights = floor.W_enc.detach().clone(), floor.b_enc.detach().clone()
    second = floor.step(x, args)
    assert second.data_ptr() == place
    torch.testing.assert_close(second, x @ weights[0] + weights[1])


def test_the_floor_matmul_under_bf16_autocast_is_autocasts(step_time: ModuleType) -> None:
    """bf16 autocast casts the matmul's inputs: a bfloat16 result of its own each step."""
    args = step_time.parse_args([*TINY, "--precision", "bf16"])
    x = torch.randn(args.batch, args.d_in)
    floor = step_time.Floor(args.d_in, args.d_sae, args.device)
    weights = floor.W_enc.detach().clone(), floor.b_enc.detach().clone()
    first = floor.step(x, args)
    assert first.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(first, torch.addmm(weights[1], x, weights[0]))
    assert floor.step(x, args) is not first


@pytest.mark.parametrize(
    ("dead_fraction", "ratios", "expected"),
    [
        (
            0.0,
            {"floor": 1.29, "one": 1.12, "sparsify": 0.8, "saelens": 0.1},
            [True, False, True, True],
        ),
        (
            0.0,
            {"floor": 1.31, "one": 1.0, "sparsify": 0.81, "saelens": 0.2},
            [False, True, False, True],
        ),
        (
            0.5,
            {"floor": 1.31, "one": 1.0, "sparsify": 0.5, "saelens": 0.21},
            [True, True, True, False],
        ),
    ],
)
def test_targets_compare_each_ratio_with_its_bound(
    step_time: ModuleType, dead_fraction: float, ratios: dict[str, float], expected: list[bool]
) -> None:
    """The floor's bound is 1.3x with no latent dead and 1.5x with some; the others are fixed."""
    result = {
        "dead_fraction": dead_fraction,
        "step_time_ratio_to_floor": {step_time.OURS: ratios["floor"]},
        "ours_step_time_ratio_to": {
            "ours_batchtopk_1_level": ratios["one"],
            "sparsify_topk": ratios["sparsify"],
            "saelens_batchtopk": ratios["saelens"],
            "saelens_topk": 0.01,  # no target: not listed
        },
    }
    checked = step_time.targets(result)
    assert [target["met"] for target in checked] == expected
    assert [target["at_most"] for target in checked] == [
        1.3 if dead_fraction == 0 else 1.5,
        1.1,
        0.8,
        0.2,
    ]
    assert [target["of"] for target in checked] == [
        "floor_gemm_adam",
        "ours_batchtopk_1_level",
        "sparsify_topk",
        "saelens_batchtopk",
    ]


def test_every_contender_gets_the_same_dead_latents(step_time: ModuleType) -> None:
    """Half the latents dead adds each contender's dead-latent loss to its loss; none dead adds none."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    losses = {}
    for fraction in ("0", "0.5"):
        args = step_time.parse_args([*TINY, "--dead-fraction", fraction])
        assert int(step_time.dead_latents(args).sum()) == round(float(fraction) * 128)
        for name in args.contenders:
            torch.manual_seed(0)
            loss = step_time.make_loss(step_time.build(name, args), x, args)
            losses[name, fraction] = float(loss().detach())
    for name in args.contenders:
        assert losses[name, "0.5"] > losses[name, "0"], name


def test_contenders_can_be_chosen(
    step_time: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    chosen = ["saelens_topk", "ours_topk_1_level"]
    options = ["--repeats", "1", "--warmup", "0", "--skip-memory", "--skip-end-to-end"]
    result = step_time.run(step_time.parse_args([*TINY, *options, "--contenders", *chosen]))
    assert list(result["median_step_seconds"]) == chosen
    assert "ours_step_time_ratio_to" not in result  # no ratios without ours
    step_time.report(result)
    assert "ours_topk_1_level" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        step_time.parse_args(["--contenders", "nobody"])


def test_a_missing_sparsify_is_reported_where_its_row_would_be(
    step_time: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the ``bench`` extra the table says sparsify is missing instead of dropping its row."""
    monkeypatch.setitem(sys.modules, "sparsify", None)  # what an import finds when it is missing
    options = ["--repeats", "1", "--warmup", "0", "--skip-memory", "--skip-end-to-end"]
    args = step_time.parse_args([*TINY, *options])
    assert args.not_installed == [step_time.SPARSIFY]
    assert args.contenders == [n for n in step_time.CONTENDERS if n != step_time.SPARSIFY]
    result = step_time.run(args)
    assert result["not_installed"] == [step_time.SPARSIFY]  # in --json's object too
    step_time.report(result)
    rows = capsys.readouterr().out.splitlines()
    for name in args.contenders:
        assert any(row.split()[0] == name for row in rows), name
    missing = [row.split(maxsplit=1) for row in rows if row.split()[:1] == ["sparsify_topk"]]
    assert missing == [["sparsify_topk", 'not installed (pip install -e ".[bench]")']]
    assert not any("ours / sparsify_topk" in row for row in rows)  # no target without its row
    # asked for by name, it is refused before any work, with the same remedy
    with pytest.raises(SystemExit) as exit_info:
        step_time.parse_args(["--contenders", step_time.SPARSIFY])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.endswith(
        ": error: argument --contenders: sparsify_topk needs sparsify, which is "
        'not installed (pip install -e ".[bench]")'
    )


def test_an_installed_sparsify_is_a_contender_by_default(step_time: ModuleType) -> None:
    if importlib.util.find_spec("sparsify") is None:
        pytest.skip("sparsify (the bench extra) is not installed")
    args = step_time.parse_args(TINY)
    assert (args.contenders, args.not_installed) == (list(step_time.CONTENDERS), [])


@pytest.mark.parametrize(
    ("device", "available", "message"),
    [
        ("cuda", {}, "cuda: torch 9.9.9+cpu here was built without CUDA; install a CUDA build"),
        ("cuda", {"cuda_built": True}, "cuda: torch sees no CUDA device"),
        ("cuda:1", {"cuda_built": True, "gpus": 1}, "cuda:1: torch sees 1 CUDA device(s)"),
        ("mps", {}, "mps: MPS is not available here"),
        ("gpu", {}, "'gpu' is not a torch device: Expected one of cpu, cuda"),
    ],
)
def test_a_device_torch_cannot_use_is_a_usage_error_before_any_work(
    step_time: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    device: str,
    available: dict[str, object],
    message: str,
) -> None:
    """Not the traceback from inside ``torch.cuda`` that ``--device cuda`` gave on a CPU-only torch.

    What this torch offers is set here, so the test reads the same on a GPU machine.
    """
    monkeypatch.setattr(torch, "__version__", "9.9.9+cpu")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: available.get("cuda_built", False))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: available.get("gpus", 0))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(step_time, "run", lambda args: pytest.fail("it went on to run"))
    monkeypatch.setattr(sys, "argv", ["step_time.py", *TINY, "--device", device])
    with pytest.raises(SystemExit) as exit_info:
        step_time.main()
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: step_time.py")
    assert "Traceback" not in captured.err
    *_, error = captured.err.splitlines()
    assert error.startswith(f"step_time.py: error: argument --device: {message}"), error


@pytest.mark.slow
def test_step_time_benchmark_reports_every_contender_as_json() -> None:
    size = [*TINY, "--repeats", "1", "--warmup", "2"]
    options = ["--e2e-tokens", "4096", "--keep-freed-memory", "--json"]
    # they reach the memory probes' processes too (bf16, slow on CPU, is checked above)
    options += ["--dead-fraction", "0.5", "--precision", "tf32"]
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), *size, *options],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(completed.stdout)  # stdout holds the JSON object and nothing else
    assert result["allocator"] == "keeps freed memory"
    assert (result["precision"], result["dead_fraction"]) == ("tf32", 0.5)
    names = {
        "ours_matryoshka_5_levels",
        "ours_matryoshka_5_levels_dense",
        "ours_batchtopk_1_level",
        "ours_topk_1_level",
        "saelens_batchtopk",
        "saelens_topk",
        "saelens_matryoshka_batchtopk",
    }
    if importlib.util.find_spec("sparsify") is not None:  # the optional `bench` extra
        names.add("sparsify_topk")
    assert result["median_step_seconds"].keys() == names
    assert result["step_peak_memory_mib"].keys() == names
    assert all(seconds > 0 for seconds in result["median_step_seconds"].values())
    assert result["ours_step_time_ratio_to"].keys() == names - {"ours_matryoshka_5_levels"}
    assert result["size"]["matryoshka_widths"] == [4, 12, 28, 60, 128]
    rates = result["end_to_end_tokens_per_second"]
    assert rates.keys() == {"ours_matryoshka_5_levels", "saelens_matryoshka_batchtopk"}
    assert all(rate > 0 for rate in rates.values())


def test_checksum_cost_benchmark_times_writing_hashing_and_verifying(
    benchmark: Callable[[str], ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At a toy size, in this process."""
    checksum_cost = benchmark("checksum_cost")
    size = ["--d-in", "16", "--d-sae", "256", "--dir", str(tmp_path)]
    result = checksum_cost.run(
        checksum_cost.parse_args([*size, "--algorithms", "sha256", "blake2b", "crc32"])
    )
    assert list(tmp_path.iterdir()) == []  # the checkpoint is removed
    files = ("sae_weights.safetensors", "trainer_state.pt")
    for measured in ("file_bytes", "write", "sha256", "reread"):
        assert tuple(result[measured]) == files, measured
    # Adam's two moments of each parameter: twice the weights
    assert result["file_bytes"]["trainer_state.pt"] > 2 * result["file_bytes"][files[0]]
    assert result["hash_on_weights"].keys() == {"sha256", "blake2b", "crc32"}
    for measured in ("mark_complete", "verify", "trainer_state_inline_hash"):
        assert result[measured]["wall"] > 0, measured
    checksum_cost.report(result)
    out = capsys.readouterr().out
    assert f"on {result['cpu']}" in out and "mark_complete" in out and "verify" in out
    json.dumps(result)  # --json prints it


@pytest.mark.slow
def test_eval_memory_benchmark_stays_below_one_cosine_matrix() -> None:
    """At 32,768 latents one full cosine matrix is 4 GiB; blocks of 256 MiB are used."""
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "eval_memory.py"), "--d-sae", "32768", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    (row,) = json.loads(completed.stdout)["results"]
    assert row["d_sae"] == 32768
    assert row["full_matrix_mib"] == 4096
    assert 0 < row["peak_rise_mib"] < row["full_matrix_mib"] / 4
    assert -1 <= row["full_width_value"] <= 1


def test_the_gpu_table_shows_the_floor_the_targets_and_the_kernels(
    step_time: ModuleType, benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    """``gpu_check.sh``'s table, from a real (tiny) step benchmark's JSON."""
    gpu_table = benchmark("gpu_table")
    options = ["--repeats", "1", "--warmup", "1", "--skip-memory", "--skip-end-to-end"]
    contenders = ["--contenders", "ours_matryoshka_5_levels", "saelens_batchtopk"]
    result = step_time.run(step_time.parse_args([*TINY, *options, *contenders]))
    (tmp_path / "step_fp32_0.json").write_text(json.dumps(result))
    rows = gpu_table.step_rows(tmp_path)
    assert rows[0] == (
        "step, fp32, 0% dead",
        "floor (GEMM + Adam)",
        f"{result['floor_step_seconds'] * 1000:.1f} ms/step",
    )
    ours = next(row for row in rows if row[1] == "ours_matryoshka_5_levels")
    assert f"{result['step_time_ratio_to_floor']['ours_matryoshka_5_levels']:.2f}x floor" in ours[2]
    targets = [row[1] for row in rows if row[0].startswith("target")]
    assert targets == [
        "ours / floor_gemm_adam at most 1.3x",
        "ours / saelens_batchtopk at most 0.2x",
    ]
    assert rows[-1][0] == "kernels, fp32, 0% dead"
    assert "encoder_weight_grad" in rows[-1][2]
