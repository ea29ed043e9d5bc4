"""Shared fixtures: a real tiny TransformerLens model and pretokenized data, all offline."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
import types
from datetime import timedelta

# Tests never reach the Hub or wandb: fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# one implementation per kernel, not the one a timing on a loaded machine happens to pick:
# runs compared bit for bit (resumes, processes under torchrun) compute the same way
# (tests/test_sparse_path.py holds the candidates equal and tests the measured choice)
os.environ.setdefault(
    "SAE_MATRYOSHKA_KERNELS",
    "encoder_weight_grad=csr,group_decode=bagged,decoder_weight_grad=bagged,"
    "decode_values_grad=bagged,batch_topk_selection=sampled",
)
# and no measured choice kept in the user's cache (a test that wants the cache sets a folder)
os.environ.setdefault("SAE_MATRYOSHKA_KERNEL_CACHE", "")

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, TrainingSAE
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_matryoshka  # noqa: F401  (registers "matryoshka")
from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaSAEConfig, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.toy import ToyHierarchy

D_MODEL = 16
CONTEXT = 16
VOCAB = 64
HOOK = "blocks.0.hook_resid_post"


@contextlib.contextmanager
def new_empty_filled_with_nan() -> Iterator[None]:
    """``Tensor.new_empty`` returns NaN-filled memory: a kernel writing over it must ignore it."""
    new_empty = torch.Tensor.new_empty
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(
            torch.Tensor,
            "new_empty",
            lambda self, *a, **kw: new_empty(self, *a, **kw).fill_(torch.nan),
        )
        yield


def pin_kernel(monkeypatch: pytest.MonkeyPatch, kernel: str, candidate: str | None) -> None:
    """Fix one measured kernel's candidate for a test (None: measure it), keeping the other pins."""
    pins = dict(
        item.strip().partition("=")[::2]
        for item in os.environ.get("SAE_MATRYOSHKA_KERNELS", "").split(",")
        if item.strip()
    )
    pins.pop(kernel, None)
    if candidate is not None:
        pins[kernel] = candidate
    monkeypatch.setenv(
        "SAE_MATRYOSHKA_KERNELS", ",".join(f"{name}={pick}" for name, pick in pins.items())
    )


def tiny_model_cfg() -> HookedTransformerConfig:
    """The tiny random model's config (a ``HookedSAETransformer`` can be built from it too)."""
    return HookedTransformerConfig(
        n_layers=1,
        d_model=D_MODEL,
        n_ctx=CONTEXT,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )


def build_tiny_model() -> HookedTransformer:
    """The tiny random model; a function too, for processes the tests spawn (no fixtures there)."""
    return HookedTransformer(tiny_model_cfg())


def build_token_dataset() -> Dataset:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (64, CONTEXT), generator=generator)
    return Dataset.from_dict({"input_ids": tokens.tolist()})


def save_hf_model_folder(folder: Path, config: Any = None) -> Path:
    """A tiny random GPT-2 and its word-level tokenizer, as ``save_pretrained`` writes them.

    What a user has on disk after downloading a model once; built here from
    configs, with no download. By default the tiny model's width, context and
    vocabulary, with the ``n_ctx`` the Hub's GPT-2 configs hold; ``config``
    (a ``GPT2Config`` of vocabulary ``VOCAB``) builds another, e.g. one as a
    user builds it with today's transformers, which has and writes no ``n_ctx``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<|endoftext|>": VOCAB - 1}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    end = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token=end, eos_token=end, unk_token="w0"
    )
    torch.manual_seed(0)
    if config is None:
        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=CONTEXT,
            n_ctx=CONTEXT,
            n_embd=D_MODEL,
            n_layer=1,
            n_head=4,
        )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def dictionary_learning() -> types.SimpleNamespace:
    """dictionary_learning 0.1.0's own modules, the oracle for its formats.

    Installed with ``pip install --no-deps dictionary-learning==0.1.0``: its
    ``nnsight`` (activation collection) and ``wandb`` (logging) are not used
    here, so they are stubbed where they are absent.
    """
    if importlib.util.find_spec("dictionary_learning") is None:
        pytest.skip("dictionary_learning is not installed (pip install --no-deps it to run)")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("nnsight", "wandb"):
            if importlib.util.find_spec(name) is None:
                stub = types.ModuleType(name)
                stub.LanguageModel = object
                patch.setitem(sys.modules, name, stub)
        return types.SimpleNamespace(
            **{
                name.rsplit(".")[-1]: importlib.import_module(f"dictionary_learning.{name}")
                for name in (
                    "training",
                    "trainers.top_k",
                    "trainers.batch_top_k",
                    "trainers.matryoshka_batch_top_k",
                )
            }
        )


@pytest.fixture
def unused_port() -> int:
    """A TCP port nothing listens on (for rendezvous tests)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    return build_tiny_model()


@pytest.fixture
def token_dataset() -> Dataset:
    return build_token_dataset()


#: each training activation, and the config fields it needs besides the defaults (k for the k-sparse)
ACTIVATION_FIELDS: dict[str, dict[str, Any]] = {
    "batchtopk": {"k": 4},
    "topk": {"k": 4},
    "jumprelu": {},
    "relu": {},
}


def small_sae_cfg() -> MatryoshkaTrainingSAEConfig:
    """A small Matryoshka SAE for the tiny model: 64 latents, levels 8 / 24 / 64, k=4."""
    return MatryoshkaTrainingSAEConfig(d_in=D_MODEL, d_sae=64, k=4, matryoshka_widths=[8, 24, 64])


def tiny_runner_cfg(sae: Any = None, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
    """A runner config for the tiny model (40 steps of 64 tokens, nothing saved); keywords override."""
    fields: dict[str, Any] = {
        "sae": small_sae_cfg() if sae is None else sae,
        "model_name": "tiny-random",
        "hook_name": HOOK,
        "dataset_path": "",
        "is_dataset_tokenized": True,
        "context_size": CONTEXT,
        "training_tokens": 64 * 40,
        "train_batch_size_tokens": 64,
        "store_batch_size_prompts": 4,
        "n_batches_in_buffer": 4,
        "prepend_bos": False,
        "lr": 3e-3,
        "output_path": None,
        "checkpoint_path": None,
        "logger": LoggingConfig(log_to_wandb=False),
        "device": "cpu",
        "seed": 0,
        "verbose": False,
    }
    return LanguageModelSAERunnerConfig(**(fields | overrides))


@pytest.fixture
def runner_cfg(tmp_path: Path) -> Callable[..., LanguageModelSAERunnerConfig[Any]]:
    """``tiny_runner_cfg``, saving to a temporary folder unless told otherwise."""

    def build(sae: Any = None, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
        return tiny_runner_cfg(sae, **({"output_path": str(tmp_path / "output")} | overrides))

    return build


def step_input(
    x: torch.Tensor,
    dead: torch.Tensor | None = None,
    *,
    logging: bool = True,
    step: int = 0,
    **coefficients: float,
) -> TrainStepInput:
    """What SAELens's trainer hands a training step (and its aux-loss hook) for ``x``."""
    return TrainStepInput(
        sae_in=x,
        coefficients=coefficients,
        dead_neuron_mask=dead,
        n_training_steps=step,
        is_logging_step=logging,
    )


def step_output(
    sae: TrainingSAE,
    x: torch.Tensor,
    dead: torch.Tensor | None = None,
    *,
    logging: bool = True,
    step: int = 0,
    **coefficients: float,
) -> TrainStepOutput:
    """``sae.training_forward_pass`` on ``x`` as SAELens's trainer calls it (no backward)."""
    return sae.training_forward_pass(
        step_input(x, dead, logging=logging, step=step, **coefficients)
    )


def dense(acts: torch.Tensor) -> torch.Tensor:
    """``acts`` as a dense tensor (the sparse training path hands SAELens sparse COO activations)."""
    return acts.to_dense() if acts.is_sparse else acts


def train_step(
    sae: TrainingSAE, x: torch.Tensor, dead: torch.Tensor | None = None, **coefficients: float
) -> TrainStepOutput:
    """One logged training step from zeroed gradients: forward, then ``loss.backward()``."""
    sae.zero_grad()
    out = step_output(sae, x, dead, **coefficients)
    out.loss.backward()
    return out


def join_gloo(rendezvous: Path, rank: int, world: int) -> None:
    """Join a ``world``-rank gloo process group through the file ``rendezvous`` (30 s timeout)."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )


def spawn_ranks(
    target: Callable[..., None], args: tuple[Any, ...], world: int, timeout_s: float
) -> None:
    """Run ``target(rank, *args)`` on ``world`` processes; fail the test if they outlast ``timeout_s``."""
    context = mp.spawn(target, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {timeout_s} s")


def run_torchrun(arguments: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 <arguments>``, output captured."""
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    return subprocess.run([*launch, *arguments], capture_output=True, text=True, timeout=timeout_s)


def quick_train(
    sae: TrainingSAE, steps: int = 20, batch_size: int = 32, scale: float = 1.0
) -> TrainingSAE:
    """A few Adam steps on Gaussian inputs, so thresholds and weights are no longer at init."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(steps):
        x = torch.randn(batch_size, sae.cfg.d_in) * scale
        out = step_output(sae, x, logging=False, step=step, l1=0.05, l0=0.05)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return sae


def hand_built_sae(toy: ToyHierarchy, absorbed_parent: int | None) -> MatryoshkaSAE:
    """Latents = the true features; optionally one parent's latent is silenced when a child fires."""
    n = toy.n_features
    sae = MatryoshkaSAE(
        MatryoshkaSAEConfig(d_in=n, d_sae=n, matryoshka_widths=[n], activation="relu")
    )
    encoder = toy.directions.T.clone()
    if absorbed_parent is not None:
        for child in toy.children[absorbed_parent]:
            encoder[:, absorbed_parent] -= 2 * toy.directions[child]
    with torch.no_grad():
        sae.W_enc.copy_(encoder)
        sae.W_dec.copy_(toy.directions)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def flip_bytes(path: Path, count: int = 4) -> None:
    """Invert ``count`` bytes in the middle of ``path``'s data, in place, its size unchanged.

    In a safetensors file the middle of what follows the header (tensor data),
    as a disk or a copy would damage it; elsewhere the middle of the file.
    """
    with path.open("r+b") as file:
        size = path.stat().st_size
        start = 0
        if path.suffix == ".safetensors":
            start = 8 + int.from_bytes(file.read(8), "little")
        file.seek((start + size) // 2)
        original = file.read(count)
        file.seek((start + size) // 2)
        file.write(bytes(byte ^ 0xFF for byte in original))


def record_hashed_files(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files checkpoint checks hash from now on (a remembered digest is not hashed again)."""
    from sae_lens_matryoshka.io import checkpoints

    hashed: list[Path] = []
    digest = checkpoints.file_digest

    def noting(path: str | Path) -> str:
        if checkpoints._identity(path) not in checkpoints._remembered:
            hashed.append(Path(path))
        return digest(path)

    monkeypatch.setattr(checkpoints, "file_digest", noting)
    return hashed


README = Path(__file__).resolve().parent.parent / "README.md"
#: a number as the README's sample outputs print it
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def assert_readme_shows(
    first_line: str, printed: str, abs_tol: float, rel_tol: float = 0.0
) -> None:
    """The README's sample output starting with ``first_line`` is what was just ``printed``.

    Its text must match with every number replaced, and every number within the
    tolerances: training on another CPU rounds differently, so the last digit
    of a sample output may move, but never a word or a number's order of magnitude.
    """
    text = README.read_text()
    start = text.index(f"```\n{first_line}") + 4
    shown = text[start : text.index("```", start)].strip()
    printed = printed.strip()
    assert NUMBER.sub("#", shown) == NUMBER.sub("#", printed), (shown, printed)
    for in_readme, now in zip(NUMBER.findall(shown), NUMBER.findall(printed), strict=True):
        assert float(now) == pytest.approx(float(in_readme), abs=abs_tol, rel=rel_tol), (
            in_readme,
            now,
        )


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def benchmark(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Any]]:
    """Imports ``benchmarks/<name>.py`` as a module, in this process.

    A fresh process would spend seconds importing SAELens. The matmul
    precision a benchmark sets for its contenders is restored afterwards.
    """
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    precision = torch.get_float32_matmul_precision()
    yield importlib.import_module
    torch.set_float32_matmul_precision(precision)
