"""The package's layers: no module imports (at run time) a module above it."""

from __future__ import annotations

import ast
from pathlib import Path

import sae_lens_matryoshka

PACKAGE = Path(sae_lens_matryoshka.__file__).parent

#: every module, bottom to top: a module may import only modules before it (the README's map)
ORDER = [
    # what a configuration is
    "config",
    "levels",
    "decoder",
    "sae_base",
    # pure tensor functions
    "kernels.threads",
    "kernels.measured",
    "kernels.kept_memory",
    "kernels.entry_sets",
    "kernels.encoder_backward",
    "kernels.selection",
    "kernels.level_decode",
    "kernels.jumprelu",
    "kernels",
    # the parts a training step is composed of
    "collectives",
    "latent_part",
    "losses",
    "divergence",
    "first_batch",
    "parametrization",
    "encodings",
    "inference_activations",
    "activations",
    # files the SAE classes check
    "io.hub_misses",
    "io.checkpoints",
    "io.safe_loading",
    # the step, and the two SAELens classes
    "step",
    "inference_sae",
    "training_sae",
    # everything that uses the SAEs
    "io.loaders",
    "io.interop",
    "io.hub",
    "io.local_sources",
    "io.save_paths",
    "io",
    "evals",
    "hierarchy",
    "recipes",
    "progress",
    "run_checks",
    "kept_outputs",
    "latent_order",
    "seeding",
    "run_record",
    "quiet",
    "dashboard",
    "distributed.mesh",
    "distributed.sharding",
    "distributed.agreement",
    "distributed.launch",
    "distributed",
    "toy.model",
    "toy.demo",
    "toy",
    "registration",
    "",  # the package itself
    "cli",
    "__main__",
]


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules ``path`` imports when it runs (not under ``TYPE_CHECKING``)."""
    found: set[str] = set()

    class Imports(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            module = node.module or ""
            if module == "sae_lens_matryoshka" or module.startswith("sae_lens_matryoshka."):
                inside = module.removeprefix("sae_lens_matryoshka").removeprefix(".")
                for alias in node.names:
                    child = f"{inside}.{alias.name}".lstrip(".")
                    found.add(child if child in modules else inside)

        def visit_Import(self, node: ast.Import) -> None:
            for alias in node.names:
                if alias.name.split(".")[0] == "sae_lens_matryoshka":
                    found.add(alias.name.removeprefix("sae_lens_matryoshka").removeprefix("."))

    Imports().visit(ast.parse(path.read_text()))
    return found


def test_every_module_has_a_place_in_the_layers() -> None:
    modules = {_name(path) for path in PACKAGE.rglob("*.py")}
    assert modules == set(ORDER)
    assert len(ORDER) == len(set(ORDER))


def test_no_module_imports_a_module_above_it() -> None:
    modules = set(ORDER)
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = _name(path)
        for imported in _runtime_imports(path, modules):
            if ORDER.index(imported) >= ORDER.index(module) and imported != module:
                upward.append(f"{module or 'sae_lens_matryoshka'} imports {imported}")
    assert not upward, upward


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The control: an import of a later module is found (a checker that finds nothing passes)."""
    source = tmp_path / "module.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from sae_lens_matryoshka import step\n"
        "from sae_lens_matryoshka.io.loaders import load_sae\n"
        "if TYPE_CHECKING:\n"
        "    from sae_lens_matryoshka.training_sae import MatryoshkaTrainingSAE\n"
    )
    assert _runtime_imports(source, set(ORDER)) == {"step", "io.loaders"}
