"""Every Python block of README.md runs as shown: offline, on CPU, imports included.

How a block runs
----------------
Each ```python block runs on its own, in a fresh namespace and a fresh temporary
working directory, as if a reader pasted it into a new session: a block carries
its own imports, and nothing carries over from the block above it.

A block may use a name it does not define only when its first comment line
marks the name as the reader's own, for example::

    # yours: sae (a trained MatryoshkaSAE), x (activations, [n_tokens, d_in]),
    #        "trainer_0" (a dictionary_learning checkpoint folder)

Items are separated by commas and may carry a description in parentheses; the
marker continues onto the next comment line while a line ends with a comma. A
bare name is bound to a tiny real stand-in (``STAND_INS``); a quoted path is
created in the working directory (``FILE_STAND_INS``). Nothing else is
substituted or skipped: a block that uses an undefined name it does not mark
fails, and so does a marker naming something the block never uses or the test
has no stand-in for. ``NOT_RUN`` lists blocks that cannot run offline, each
reported as a skip with its reason; it is empty.

``"matryoshka"`` is taken out of SAELens's architecture registries while a
block runs and comes back only when the block imports ``sae_lens_matryoshka``,
as in a fresh process: a block that loads a Matryoshka SAE without the import
fails with SAELens's own ``KeyError: 'matryoshka'``.

The Hub, offline
----------------
Every Hub repo a block names is served from a real huggingface_hub cache in a
temporary folder with ``HF_HUB_OFFLINE`` set, so the real download side runs
(SAELens's release registry and converters, TransformerLens's
``from_pretrained``):

- the SAELens releases ``gemma-2-2b-res-matryoshka-dc`` and
  ``saebench_gemma-2-2b_width-2pow14_date-0107`` stay as SAELens's registry
  defines them; tiny SAEs in their formats (SAELens's own
  ``matryoshka_batchtopk`` save, a dictionary_learning
  ``MatryoshkaBatchTopKSAE`` checkpoint) sit at the repo and path the registry
  names, with the widths the block states;
- ``tiny-stories-1L-21M`` is a tiny random GPT-Neo (TinyStories' architecture)
  under ``roneneldan/TinyStories-1Layer-21M``;
- uploads are caught at the HfApi boundary, as in ``tests/test_hub.py``, and
  what is uploaded is published into the cache, so a block downloads back what
  it uploaded.

Training blocks
---------------
A real training run (a Hub model and dataset, 50M tokens, on a GPU for speed)
cannot run here in seconds, and shrinking it silently would be a fake. The
README therefore shows such a run as a config block, which runs exactly as shown
(building the config downloads nothing), followed by a run block whose config
is marked as the reader's (``cfg``, ``cache_cfg``). The stand-in configs are
real tiny ones: the cached tiny ``tiny-stories-1L-21M`` and a local text
dataset, trained and cached through the same runner calls, and the checks after
each block assert on what the run produced.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import copy
import functools
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from datasets import Dataset
from sae_lens import (
    SAE,
    ActivationsStore,
    CacheActivationsRunnerConfig,
    HookedSAETransformer,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
)
from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from transformer_lens import HookedTransformer

import sae_lens_matryoshka
from sae_lens_matryoshka import (
    MatryoshkaSAE,
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
    upload_to_huggingface,
)
from sae_lens_matryoshka.config import ARCHITECTURE
from sae_lens_matryoshka.evals import LevelEvaluator, evaluate_levels

from .conftest import (
    CONTEXT,
    D_MODEL,
    VOCAB,
    build_token_dataset,
    quick_train,
    small_sae_cfg,
    tiny_model_cfg,
    tiny_runner_cfg,
)
from .test_hub import FakeHub
from .test_imports import write_dictionary_learning
from .test_local_sources import save_long_tokens, save_users_gpt2

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = "# yours:"
PACKAGE = "sae_lens_matryoshka"

#: the README's hook and levels; the stand-in SAE's levels start at the README's first (512)
HOOK = "blocks.0.hook_mlp_out"
README_WIDTHS = [512, 1536, 3584, 7680, 16384]
WIDTHS = [512, 768, 1024]

#: blocks that cannot run offline: text in the block -> why (reported as a skip). Aim: none.
NOT_RUN: dict[str, str] = {}


# ---------------------------------------------------------------- reading the README


@dataclass(frozen=True)
class Block:
    """One fenced Python block: its section, the README line of its first code line, its code."""

    section: str
    line: int
    code: str
    source: str = "README.md"

    @property
    def id(self) -> str:
        return f"{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')}-L{self.line}"


def python_blocks(text: str, source: str = "README.md") -> list[Block]:
    """The ```python blocks of a Markdown text, each with the ``## `` section it is in."""
    blocks: list[Block] = []
    section, fence, start = "", None, 0
    body: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif stripped.startswith("```"):
                fence, start, body = stripped[3:].strip(), number + 1, []
        elif stripped.startswith("```"):
            if fence == "python":
                blocks.append(Block(section, start, "\n".join(body), source))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{source}: a code fence opened at line {start - 1} is never closed"
    return blocks


@dataclass(frozen=True)
class ReaderNames:
    """What a block's ``# yours:`` marker declares: names to bind and paths to create."""

    names: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()


_ITEM = re.compile(r'^(?:"(?P<path>[^"]+)"|(?P<name>[A-Za-z_]\w*))\s*(?:\(.*\))?$', re.DOTALL)


def _split_top_level(text: str) -> list[str]:
    """``text`` split at commas outside parentheses and brackets."""
    items, depth, current = [], 0, ""
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def reader_names(code: str) -> ReaderNames:
    """Parse the block's ``# yours:`` marker (its first line, continued while a line ends in a comma)."""
    lines = code.splitlines()
    if not lines or not lines[0].startswith(MARKER):
        return ReaderNames()
    text = lines[0][len(MARKER) :]
    following = iter(lines[1:])
    while text.rstrip().endswith(","):
        line = next(following, "")
        if not line.startswith("#"):
            raise ValueError(f"the marker {lines[0]!r} ends with a comma but does not continue")
        text += " " + line.lstrip("#").strip()
    names, paths = [], []
    for item in _split_top_level(text):
        match = _ITEM.match(item)
        if match is None:
            raise ValueError(
                f"cannot read {item!r} in the marker: write name (description) or "
                '"path" (description)'
            )
        if match["path"]:
            paths.append(match["path"])
        else:
            names.append(match["name"])
    return ReaderNames(tuple(names), tuple(paths))


def undefined_names(tree: ast.AST) -> set[str]:
    """Names the code reads but never binds (assignment, import, def, argument), builtins aside."""
    loaded: set[str] = set()
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return loaded - bound - set(dir(builtins))


def check_marker(block: Block) -> ReaderNames:
    """The block's marker, after checking it declares exactly what the block takes from the reader."""
    where = f"{block.source}:{block.line} ({block.section})"
    marked = reader_names(block.code)
    tree = ast.parse(block.code)
    loaded = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    strings = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    unmarked = undefined_names(tree) - set(marked.names)
    assert not unmarked, (
        f"{where} uses {sorted(unmarked)} without defining them or marking them "
        f"as the reader's ({MARKER} name (description), ...)"
    )
    unused = [name for name in marked.names if name not in loaded] + [
        path for path in marked.paths if path not in strings
    ]
    assert not unused, f"{where} marks {unused} as the reader's but never uses them"
    missing = [name for name in marked.names if name not in STAND_INS] + [
        path for path in marked.paths if path not in FILE_STAND_INS
    ]
    assert not missing, f"{where} marks {missing} as the reader's; the test has no stand-in"
    return marked


# ---------------------------------------------------------------- running a block


def _registering_import(
    name: str,
    globals: Any = None,
    locals: Any = None,
    fromlist: Any = (),
    level: int = 0,
) -> Any:
    """``import``, registering the plugin whenever a block imports it (what a fresh import does)."""
    module = builtins.__import__(name, globals, locals, fromlist, level)
    if level == 0 and (name == PACKAGE or name.startswith(PACKAGE + ".")):
        sae_lens_matryoshka.register()
    return module


@contextlib.contextmanager
def matryoshka_unregistered() -> Iterator[None]:
    """SAELens as a fresh process has it before ``import sae_lens_matryoshka``; restored afterwards.

    Neither registry knows the architecture, and SAELens's loaders are its own
    (``loaders.install`` wraps them; ``register()`` wraps them again).
    """
    registries = (SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY)
    saved = [registry.pop(ARCHITECTURE) for registry in registries]
    wrapped_disk = SAE.__dict__["load_from_disk"]
    wrapped_hub = NAMED_PRETRAINED_SAE_LOADERS["sae_lens"]
    SAE.load_from_disk = classmethod(wrapped_disk.__func__.__wrapped__)
    NAMED_PRETRAINED_SAE_LOADERS["sae_lens"] = wrapped_hub.__wrapped__
    SAE._matryoshka_loaders = False
    try:
        yield
    finally:
        for registry, entry in zip(registries, saved, strict=True):
            registry[ARCHITECTURE] = entry
        SAE.load_from_disk = wrapped_disk
        NAMED_PRETRAINED_SAE_LOADERS["sae_lens"] = wrapped_hub
        SAE._matryoshka_loaders = True


def execute(block: Block, bindings: dict[str, Any]) -> dict[str, Any]:
    """Run the block in a fresh namespace holding only ``bindings``; return the namespace.

    Compiled against the README's line numbers, so a traceback points at the README.
    """
    namespace: dict[str, Any] = {
        "__name__": "__main__",
        "__builtins__": {**vars(builtins), "__import__": _registering_import},
        **bindings,
    }
    code = compile("\n" * (block.line - 1) + block.code, block.source, "exec")
    with matryoshka_unregistered():
        exec(code, namespace)
    return namespace


def run_block(block: Block, world: World) -> dict[str, Any]:
    """Check the marker, bind its stand-ins (paths created in the working directory), run."""
    marked = check_marker(block)
    for path in marked.paths:
        FILE_STAND_INS[path](world, Path(path))
    return execute(block, {name: STAND_INS[name](world) for name in marked.names})


# ---------------------------------------------------------------- the stand-ins


def _runner_cfg(
    sae: MatryoshkaTrainingSAEConfig, **overrides: Any
) -> LanguageModelSAERunnerConfig[Any]:
    """A runner config for the tiny model: 20 steps of 64 tokens."""
    return tiny_runner_cfg(sae, **({"training_tokens": 64 * 20} | overrides))


#: what the README's stand-in dictionary_learning checkpoints record (a Gemma-2-2B run)
README_TRAINER: dict[str, Any] = {"lm_name": "google/gemma-2-2b", "layer": 12, "k": 4}


def _saelens_matryoshka_folder(folder: Path) -> Path:
    """What SAELens's own ``matryoshka_batchtopk`` training saves: a flat JumpReLU SAE, levels in metadata."""
    torch.manual_seed(0)
    sae = MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(d_in=8, d_sae=24, k=2, matryoshka_widths=[4, 12, 24])
    )
    quick_train(sae, scale=2.0).eval().save_inference_model(folder)
    return folder


def _sparsify_folder(folder: Path) -> None:
    """A TopK ``SparseCoder`` of 32768 latents, saved by sparsify's own ``save_to_disk``."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    SparseCoder(4, SparseCoderConfig(num_latents=32768, k=8)).save_to_disk(folder)


def _tiny_stories_stand_in(folder: Path) -> None:
    """TinyStories-1Layer-21M's architecture (GPT-Neo, one layer) at a tiny width, with a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    end = "<|endoftext|>"
    words = Tokenizer(
        models.WordLevel(
            vocab={f"w{i}": i for i in range(VOCAB - 1)} | {end: VOCAB - 1}, unk_token="w0"
        )
    )
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=VOCAB,
        max_position_embeddings=512,  # TransformerLens gives this model a context of 512
        hidden_size=D_MODEL,
        num_layers=1,
        num_heads=4,
        attention_types=[[["global"], 1]],
        intermediate_size=4 * D_MODEL,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    GPTNeoForCausalLM(config).save_pretrained(folder)
    PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token=end, eos_token=end, unk_token="w0"
    ).save_pretrained(folder)


class PublishingHub(FakeHub):
    """``FakeHub`` whose uploads are published into the offline cache at once, as the Hub serves them."""

    def __init__(self, cache: Path) -> None:
        super().__init__()
        self.cache = cache

    def api(self) -> Any:
        hub, recording = self, super().api()

        class PublishingHfApi(recording):  # type: ignore[misc, valid-type]
            def upload_folder(self, **kwargs: Any) -> None:
                super().upload_folder(**kwargs)
                hub.place_in_cache(hub.cache, kwargs["repo_id"])

            def upload_file(self, **kwargs: Any) -> None:
                super().upload_file(**kwargs)
                hub.place_in_cache(hub.cache, kwargs["repo_id"])

        return PublishingHfApi

    def publish(self, repo_id: str, folder: Path, path_in_repo: str = "") -> None:
        """Put every file of ``folder`` in the repo under ``path_in_repo``, and in the cache."""
        files = self.repos.setdefault(repo_id, {})
        for file in folder.rglob("*"):
            if file.is_file():
                files[str(Path(path_in_repo) / file.relative_to(folder))] = file.read_bytes()
        self.place_in_cache(self.cache, repo_id)


class World:
    """The tiny real objects the stand-ins come from, each built once for the module, when first needed."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @functools.cached_property
    def hub(self) -> PublishingHub:
        """The offline Hub cache, holding every repo the README downloads from."""
        hub = PublishingHub(self.root / "hf-cache")
        staging = self.root / "staging"
        _tiny_stories_stand_in(staging / "tiny-stories")
        hub.publish("roneneldan/TinyStories-1Layer-21M", staging / "tiny-stories")
        # SAELens's registry: gemma-2-2b-res-matryoshka-dc -> this repo, standard/<sae_id>
        hub.publish(
            "chanind/gemma-2-2b-batch-topk-matryoshka-saes-w-32k-l0-40",
            _saelens_matryoshka_folder(staging / "dc"),
            "standard/blocks.12.hook_resid_post",
        )
        # saebench_gemma-2-2b_width-2pow14_date-0107 -> this repo; trainer_0, levels as in the README
        saebench = staging / "saebench"
        write_dictionary_learning(
            saebench,
            "MatryoshkaBatchTopKSAE",
            d_in=4,
            group_sizes=[512, 1024, 2048, 4096, 8704],
            **README_TRAINER,
        )
        hub.publish(
            "canrager/saebench_gemma-2-2b_width-2pow14_date-0107",
            saebench,
            "gemma-2-2b_matryoshka_batch_top_k_width-2pow14_date-0107/resid_post_layer_12/trainer_0",
        )
        return hub

    @functools.cached_property
    def model(self) -> HookedSAETransformer:
        return HookedSAETransformer(tiny_model_cfg())

    def dataset(self) -> Dataset:
        """A fresh copy each time: SAELens's activation store sets the format of the one it gets."""
        return build_token_dataset()

    @functools.cached_property
    def text_folder(self) -> Path:
        """A local text dataset (one JSON file) in the tiny tokenizer's words."""
        generator = torch.Generator().manual_seed(1)
        words = torch.randint(0, VOCAB - 1, (64, 40), generator=generator)
        folder = self.root / "stories"
        folder.mkdir()
        texts = [" ".join(f"w{int(i)}" for i in row) for row in words]
        Dataset.from_dict({"text": texts}).to_json(folder / "train.jsonl")
        return folder

    @functools.cached_property
    def trained_folder(self) -> Path:
        """A Matryoshka SAE with the README's levels, trained 20 steps by SAELens's runner, saved."""
        folder = self.root / "trained"
        torch.manual_seed(0)
        sae_cfg = MatryoshkaTrainingSAEConfig(
            d_in=D_MODEL, d_sae=WIDTHS[-1], k=4, matryoshka_widths=WIDTHS
        )
        LanguageModelSAETrainingRunner(
            _runner_cfg(sae_cfg, output_path=str(folder)),
            override_model=self.model,
            override_dataset=self.dataset(),
        ).run()
        return folder

    @functools.cached_property
    def sae(self) -> MatryoshkaSAE:
        sae = SAE.load_from_disk(self.trained_folder)
        assert isinstance(sae, MatryoshkaSAE)
        return sae

    def activation_store(self) -> ActivationsStore:
        cfg = _runner_cfg(small_sae_cfg())
        return ActivationsStore.from_config(self.model, cfg, override_dataset=self.dataset())

    @functools.cached_property
    def rows(self) -> list[dict[str, float]]:
        return evaluate_levels(self.sae, self.model, self.activation_store(), n_batches=2)

    def tokens(self) -> torch.Tensor:
        return torch.tensor(self.dataset()["input_ids"][:4])

    def x(self) -> torch.Tensor:
        _, cache = self.model.run_with_cache(self.tokens(), names_filter=HOOK)
        return cache[HOOK].reshape(-1, D_MODEL)


def _reader_runner_cfg(world: World) -> LanguageModelSAERunnerConfig[Any]:
    """The reader's training config: the cached tiny TinyStories model and a local text dataset."""
    return _runner_cfg(
        small_sae_cfg(),
        model_name="tiny-stories-1L-21M",
        dataset_path=str(world.text_folder),
        is_dataset_tokenized=False,
        output_path="matryoshka_tiny_stories",
    )


def _reader_cache_cfg(world: World) -> CacheActivationsRunnerConfig:
    """The reader's activation-cache config, on the same tiny model and text."""
    return CacheActivationsRunnerConfig(
        dataset_path=str(world.text_folder),
        model_name="tiny-stories-1L-21M",
        model_batch_size=4,
        hook_name=HOOK,
        d_in=D_MODEL,
        training_tokens=CONTEXT * 32,
        context_size=CONTEXT,
        new_cached_activations_path="activations/tiny-stories-l0",
        buffer_size_gb=CONTEXT * 32 * D_MODEL * 4 / 2**30,  # one buffer: the 32 sequences
    )


def _saelens_jumprelu(world: World) -> JumpReLUSAE:
    """A plain SAELens JumpReLU SAE of 16384 latents (the widths the README gives it end there)."""
    torch.manual_seed(1)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=4, d_sae=16384))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, 0.3)
        sae.threshold.abs_()
    return sae


#: the reader's names a block may mark -> a fresh tiny real stand-in
STAND_INS: dict[str, Callable[[World], Any]] = {
    "sae": lambda world: copy.deepcopy(world.sae),  # trained, levels from the README's first
    "model": lambda world: copy.deepcopy(world.model),  # the HookedSAETransformer it was trained on
    "activation_store": lambda world: world.activation_store(),
    "runner": lambda world: LanguageModelSAETrainingRunner(
        _runner_cfg(small_sae_cfg()),
        override_model=copy.deepcopy(world.model),
        override_dataset=world.dataset(),
    ),
    "x": lambda world: world.x(),  # activations at the SAE's hook, [64, d_in]
    "tokens": lambda world: world.tokens(),  # [4, 16]
    "rows": lambda world: copy.deepcopy(world.rows),  # evaluate_levels of the SAE
    "dataset": lambda world: world.dataset(),  # 64 sequences of 16 token ids
    "cfg": _reader_runner_cfg,
    "cache_cfg": _reader_cache_cfg,
    "any_saelens_sae": _saelens_jumprelu,
}

#: the reader's files a block may mark -> writes a stand-in at the given path
FILE_STAND_INS: dict[str, Callable[[World, Path], Any]] = {
    "matryoshka_tiny_stories": lambda world, path: shutil.copytree(world.trained_folder, path),
    "saelens_matryoshka_output": lambda world, path: _saelens_matryoshka_folder(path),
    "trainer_0": lambda world, path: write_dictionary_learning(
        path, "MatryoshkaBatchTopKSAE", d_in=4, group_sizes=[4, 8, 12], **README_TRAINER
    ),
    "trainer_1": lambda world, path: write_dictionary_learning(
        path, "BatchTopKSAE", d_in=4, group_sizes=[16384], **README_TRAINER
    ),
    "checkpoints/run/layers.6": lambda world, path: _sparsify_folder(path),
    # a GPT-2 as a user saves one with the installed transformers (no n_ctx), and its tokens
    "models/my-gpt2": lambda world, path: save_users_gpt2(path),
    "data/my-tokens": lambda world, path: save_long_tokens(path, rows=64),
}


# ---------------------------------------------------------------- what each block must produce


def _assert_same_outputs(a: SAE[Any], b: SAE[Any], d_in: int) -> None:
    x = torch.randn(20, d_in) * 2
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def _after_install(ns: dict[str, Any], world: World) -> None:
    assert SAE_CLASS_REGISTRY[ARCHITECTURE][0] is MatryoshkaSAE


def _after_level_evals(ns: dict[str, Any], world: World) -> None:
    rows = ns["rows"]
    assert [row["width"] for row in rows] == WIDTHS
    # every level on the same tokens: the same clean loss; nested levels fire nested latents
    assert len({row["ce_loss_without_sae"] for row in rows}) == 1
    assert 0 < rows[0]["l0"] <= rows[1]["l0"] <= rows[2]["l0"]
    assert Path("levels.png").stat().st_size > 0
    assert isinstance(ns["runner"].evaluator, LevelEvaluator)


def _after_config(ns: dict[str, Any], world: World) -> None:
    cfg = ns["cfg"]
    assert isinstance(cfg.sae, MatryoshkaTrainingSAEConfig)
    assert cfg.sae.matryoshka_widths == README_WIDTHS
    assert (cfg.model_name, cfg.device) == ("tiny-stories-1L-21M", "cpu")


def _after_training(ns: dict[str, Any], world: World) -> None:
    assert isinstance(ns["sae"], MatryoshkaTrainingSAE)
    loaded = ns["loaded"]
    assert isinstance(loaded, MatryoshkaSAE) and loaded.matryoshka_widths == [8, 24, 64]
    assert loaded.cfg.metadata.model_name == "tiny-stories-1L-21M"
    x = STAND_INS["x"](world)
    assert ns["levels"].shape == (3, *x.shape)
    with torch.no_grad():
        torch.testing.assert_close(ns["levels"][-1], loaded(x))


def _after_from_dict(ns: dict[str, Any], world: World) -> None:
    assert isinstance(ns["cfg"].sae, MatryoshkaTrainingSAEConfig)
    assert ns["cfg"].sae.matryoshka_widths == README_WIDTHS
    assert ns["cfg"].logger.log_to_wandb is False


def _after_offline(ns: dict[str, Any], world: World) -> None:
    assert isinstance(ns["sae"], MatryoshkaTrainingSAE)
    saved = SAE.load_from_disk(ns["cfg"].output_path)
    assert isinstance(saved, MatryoshkaSAE) and saved.matryoshka_widths == [32, 96, 224, 512]


def _after_quickstart(ns: dict[str, Any], world: World) -> None:
    """The CPU variant ran: the levels it states, and the record the README says it leaves."""
    assert isinstance(ns["sae"], MatryoshkaTrainingSAE) and ns["on_gpu"] is False
    folder = Path(ns["cfg"].output_path)
    saved = SAE.load_from_disk(folder)
    d_sae = ns["d_sae"]
    assert isinstance(saved, MatryoshkaSAE)
    assert saved.matryoshka_widths == [d_sae // 32, d_sae // 8, d_sae // 2, d_sae]
    assert {"training_log.jsonl", "loss_curve.png"} <= {path.name for path in folder.iterdir()}


def _after_local_folders(ns: dict[str, Any], world: World) -> None:
    assert isinstance(ns["sae"], MatryoshkaTrainingSAE)
    saved = SAE.load_from_disk(ns["cfg"].output_path)
    assert isinstance(saved, MatryoshkaSAE) and saved.matryoshka_widths == [32, 128, 256]
    assert saved.cfg.metadata.model_name == "models/my-gpt2"


def _after_levels(ns: dict[str, Any], world: World) -> None:
    x = STAND_INS["x"](world)
    assert ns["acts"].shape == (x.shape[0], 512)
    assert ns["levels"].shape == (len(WIDTHS), *x.shape)
    with torch.no_grad():
        torch.testing.assert_close(ns["x_hat"], ns["levels"][0])
        torch.testing.assert_close(ns["small"].encode(x), ns["acts"])
    assert isinstance(ns["small"], MatryoshkaSAE) and ns["small"].cfg.d_sae == 512


def _after_sharing(ns: dict[str, Any], world: World) -> None:
    uploaded = world.hub.repos["you/matryoshka-tiny-stories"]
    assert {"README.md", f"{HOOK}/cfg.json", f"{HOOK}/sae_weights.safetensors"} <= set(uploaded)
    assert "| width |" in uploaded["README.md"].decode()  # the level metrics went up
    downloaded = ns["sae"]
    assert isinstance(downloaded, MatryoshkaSAE) and downloaded.matryoshka_widths == WIDTHS
    _assert_same_outputs(downloaded, world.sae, D_MODEL)
    portable = SAE.load_from_disk("plain_copy")
    assert not isinstance(portable, MatryoshkaSAE)
    _assert_same_outputs(portable, world.sae, D_MODEL)


def _after_caching(ns: dict[str, Any], world: World) -> None:
    """The cache holds the cached model's activations at the hook, for the tokens it records."""
    cached = Dataset.load_from_disk("activations/tiny-stories-l0").with_format("torch")
    assert len(cached) >= 32
    model = HookedTransformer.from_pretrained_no_processing("tiny-stories-1L-21M")
    tokens = cached[:4]["token_ids"]
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    torch.testing.assert_close(cached[:4][HOOK], cache[HOOK], rtol=1e-4, atol=1e-5)


#: text in a block -> what must hold once it has run (each text must pick exactly one block)
CHECKS: dict[str, Callable[[dict[str, Any], World], None]] = {
    "with SAELens (idempotent)": _after_install,
    "evaluate_levels(sae, model, activation_store": _after_level_evals,
    '    model_name="tiny-stories-1L-21M",': _after_config,
    "LanguageModelSAETrainingRunner(cfg).run()": _after_training,
    "LanguageModelSAERunnerConfig.from_dict(": _after_from_dict,
    "n_batches_in_buffer=64,": _after_offline,
    "on_gpu = torch.cuda.is_available()": _after_quickstart,
    "**local_overrides(cfg)": _after_local_folders,
    "sae.decode_levels(sae.encode(x))": _after_levels,
    "upload_to_huggingface(": _after_sharing,
    "CacheActivationsRunner(cache_cfg).run()": _after_caching,
}


# ---------------------------------------------------------------- the tests

BLOCKS = python_blocks(README.read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("readme-world"))


@pytest.fixture
def offline_hub(world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> PublishingHub:
    """The world's Hub cache, offline; uploads caught at the HfApi boundary and published into it."""
    hub = world.hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("sae_lens.training.upload_saes_to_huggingface.HfApi", hub.api())
    monkeypatch.setattr("sae_lens.training.upload_saes_to_huggingface.create_repo", hub.create_repo)
    monkeypatch.setattr("sae_lens_matryoshka.io.hub.HfApi", hub.api())
    monkeypatch.chdir(tmp_path)
    return hub


def test_every_check_names_one_block_and_nothing_is_skipped() -> None:
    """The checks below follow the README: each picks out exactly one block, and no block is skipped."""
    assert len(BLOCKS) >= len(CHECKS)
    for text in CHECKS:
        assert sum(text in block.code for block in BLOCKS) == 1, f"{text!r} is not in one block"
    for text in NOT_RUN:
        assert sum(text in block.code for block in BLOCKS) == 1, f"{text!r} is not in one block"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_readme_block_runs_as_shown(block: Block, world: World, offline_hub: PublishingHub) -> None:
    for text, reason in NOT_RUN.items():
        if text in block.code:
            pytest.skip(f"{block.source}:{block.line} does not run offline: {reason}")
    namespace = run_block(block, world)
    for text, check in CHECKS.items():
        if text in block.code:
            check(namespace, world)


def test_model_card_loading_snippet_runs(world: World, offline_hub: PublishingHub) -> None:
    """The card an upload writes shows a loading snippet that runs as shown, import included."""
    card = upload_to_huggingface({HOOK: world.sae}, "someone/card-check", show_progress=False)
    assert offline_hub.repos["someone/card-check"]["README.md"].decode() == card
    (snippet,) = python_blocks(card, "model card")
    namespace = run_block(snippet, world)
    assert isinstance(namespace["sae"], MatryoshkaSAE)
    assert namespace["small"].cfg.d_sae == WIDTHS[0]
    _assert_same_outputs(namespace["sae"], world.sae, D_MODEL)

    # the same snippet without its import fails as SAELens alone does
    without_import = snippet.code.replace(f"import {PACKAGE}", "pass", 1)
    with pytest.raises(KeyError, match=ARCHITECTURE):
        run_block(Block(snippet.section, snippet.line, without_import, "model card"), world)


# ---------------------------------------------------------------- the harness itself can fail


def test_marker_grammar() -> None:
    code = (
        '# yours: sae (a MatryoshkaSAE, trained), x (activations, [n, d_in]),\n#   "trainer_0"\n'
        "sae(x)\n"
    )
    assert reader_names(code) == ReaderNames(("sae", "x"), ("trainer_0",))
    assert reader_names("# a comment\nx = 1\n") == ReaderNames()
    with pytest.raises(ValueError, match="cannot read"):
        reader_names("# yours: the sae\n")


def test_unmarked_names_unused_marks_and_missing_stand_ins_fail(world: World) -> None:
    block = Block("Test", 1, "y = sae.encode(x)")
    with pytest.raises(AssertionError, match=r"uses \['sae', 'x'\] without defining them"):
        run_block(block, world)
    with pytest.raises(AssertionError, match=r"marks \['tokens'\] as the reader's but never"):
        run_block(Block("Test", 1, "# yours: sae, x, tokens\n" + block.code), world)
    with pytest.raises(AssertionError, match=r"marks \['y2'\] .* no stand-in"):
        run_block(Block("Test", 1, "# yours: y2\nprint(y2)"), world)


def test_loading_without_the_import_fails_as_in_a_fresh_process(
    world: World, offline_hub: PublishingHub
) -> None:
    code = '# yours: "matryoshka_tiny_stories"\nfrom sae_lens import SAE\n'
    load = 'SAE.load_from_disk("matryoshka_tiny_stories")\n'
    with pytest.raises(KeyError, match=ARCHITECTURE):
        run_block(Block("Test", 1, code + load), world)
    shutil.rmtree("matryoshka_tiny_stories")
    namespace = run_block(
        Block("Test", 1, code + "import sae_lens_matryoshka\nsae = " + load), world
    )
    assert isinstance(namespace["sae"], MatryoshkaSAE)
    assert ARCHITECTURE in SAE_CLASS_REGISTRY  # restored after every block


def test_a_failing_block_reports_its_readme_line(world: World) -> None:
    with pytest.raises(ZeroDivisionError) as raised:
        execute(Block("Test", 40, "x = 1\n1 / 0"), {})
    assert raised.traceback[-1].lineno + 1 == 41


def test_every_link_to_a_section_finds_its_heading() -> None:
    """The contents line and the cross-references use GitHub's heading anchors."""
    text = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    anchors = {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)
    }
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert len(links) > 15  # the contents line at least
    assert sorted(links - anchors) == []
