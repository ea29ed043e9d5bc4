"""The toy demo: its latent ordering, what it writes, its per-seed result, and its command line."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from sae_lens import SAE, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.training import sae_trainer
from tqdm.auto import tqdm

from sae_lens_matryoshka.cli import main
from sae_lens_matryoshka.evals import hierarchy_absorption
from sae_lens_matryoshka.kernels.measured import cpu_model
from sae_lens_matryoshka.toy import ToyHierarchy
from sae_lens_matryoshka.toy.demo import (
    EVAL_SAMPLES,
    LATENT_LABEL_FONTSIZE,
    PARENT_CORRECTION_NOTE,
    SUMMARY_METRICS,
    _pyplot,
    decoder_cosines_figure,
    format_table,
    order_latents,
    run_toy_demo,
    summarise,
)

from .conftest import assert_readme_shows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_order_latents_sorts_within_each_level_by_best_feature() -> None:
    # 6 latents, 3 features shown in the order 2, 0, 1; levels [2, 6]
    cosines = torch.tensor(
        [
            [0.1, 0.9, 0.0],  # latent 0: feature 1
            [0.8, 0.0, 0.1],  # latent 1: feature 0
            [0.0, 0.2, 0.7],  # latent 2: feature 2, weaker
            [0.1, 0.95, 0.0],  # latent 3: feature 1
            [0.0, 0.0, 0.99],  # latent 4: feature 2, stronger
            [0.6, -0.3, 0.0],  # latent 5: feature 0
        ]
    )
    order = order_latents(cosines, [2, 6], feature_order=[2, 0, 1])
    # level 1 keeps latents 0 and 1, feature 0 before feature 1;
    # level 2: feature 2 (stronger first), feature 0, feature 1
    assert order.tolist() == [1, 0, 4, 2, 5, 3]
    # one level: a flat dictionary is sorted as a whole
    assert order_latents(cosines, [6], feature_order=[0, 1, 2]).tolist() == [1, 5, 3, 0, 4, 2]


class ShortDemo(NamedTuple):
    output: Path
    metrics: dict
    #: what the demo printed (stdout) and what its progress bar showed (stderr)
    printed: str
    shown: str


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory: pytest.TempPathFactory) -> ShortDemo:
    """Two seeds of a 60-step demo (too short to learn the hierarchy): the files and their structure."""
    output = tmp_path_factory.mktemp("demo")
    printed, shown = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(shown):
        metrics = run_toy_demo(output_dir=output, seed=5, seeds=2, steps=60)
    return ShortDemo(output, metrics, printed.getvalue(), shown.getvalue())


def test_demo_shows_one_progress_bar_over_its_trainings(short_demo: ShortDemo) -> None:
    """Not SAELens's bar for each of its trainings; SAELens's own runs keep theirs."""
    assert "Training the toy SAEs" in short_demo.shown
    assert "4/4" in short_demo.shown
    assert "Training SAE" not in short_demo.shown
    assert "Training Matryoshka SAE" not in short_demo.shown
    assert sae_trainer.tqdm is tqdm  # restored afterwards


def test_demo_writes_metrics_figures_and_saved_saes(short_demo: ShortDemo) -> None:
    output, metrics, printed, _ = short_demo
    assert {p.name for p in output.iterdir()} == {
        "metrics.json",
        "decoder_cosines.png",
        "parent_child_activations.png",
        "feature_tree.png",
        "saes",
    }
    for png in ("decoder_cosines.png", "parent_child_activations.png", "feature_tree.png"):
        assert (output / png).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((output / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    config = metrics["config"]
    assert config["seeds"] == [5, 6] and config["steps"] == 60
    assert config["matryoshka_widths"] == [3, 40] and config["activation"] == "relu"
    assert config["l1_coefficient"] == 0.1 and config["l1_warm_up_steps"] == 12
    assert [run["seed"] for run in metrics["runs"]] == [5, 6]
    for run in metrics["runs"]:
        for name in ("matryoshka", "plain"):
            assert len(run[name]["absorption_edges"]) == 9
            assert len(run[name]["best_cosine"]) == 20
            assert run[name]["min_best_cosine"] == min(run[name]["best_cosine"])
        assert [row["width"] for row in run["matryoshka"]["levels"]] == [3, 40]
        assert "parents_in_first_level" not in run["plain"]
    # the summary is each metric's mean, spread and range over the runs
    for name in ("matryoshka", "plain"):
        for metric in SUMMARY_METRICS:
            values = [run[name][metric] for run in metrics["runs"] if metric in run[name]]
            if not values:
                assert metric not in metrics["summary"][name]
                continue
            assert metrics["summary"][name][metric] == pytest.approx(
                {
                    "mean": statistics.fmean(values),
                    "std": statistics.pstdev(values),
                    "min": min(values),
                    "max": max(values),
                }
            )
    assert "parents_in_first_level" in metrics["summary"]["matryoshka"]
    assert "absorption per seed, matryoshka:" in printed and " ± " in printed
    assert "wrote" in printed
    assert f"s on {cpu_model()}" in printed.splitlines()[-1]  # the README quotes this line


def test_demo_scores_the_saes_as_saved(short_demo: ShortDemo) -> None:
    """The numbers are those of the folders on disk, loaded back, on the toy's own samples."""
    output, metrics, _, _ = short_demo
    features, x = ToyHierarchy.nabeshima(5).sample(EVAL_SAMPLES)  # what the demo scored on
    toy = ToyHierarchy.nabeshima(5)
    run = metrics["runs"][0]
    for name in ("matryoshka", "plain"):
        sae = SAE.load_from_disk(output / "saes" / "seed_5" / name)
        with torch.no_grad():
            l0 = (sae.encode(x) > 0).float().sum(-1).mean().item()
        assert run[name]["l0"] == pytest.approx(l0)
        absorption = hierarchy_absorption(sae, features, x, toy.directions, toy.children)
        assert run[name]["absorption"] == pytest.approx(absorption["absorption"])
    assert type(SAE.load_from_disk(output / "saes" / "seed_5" / "matryoshka")).__name__ == (
        "MatryoshkaSAE"
    )


def _metric_rows(table: str) -> dict[str, list[str]]:
    """The summary table's metric rows, by metric, each split into its cells; checks their alignment."""
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("metric "))
    rows = {line[:24].rstrip(): line for line in lines if line[:24].rstrip() in SUMMARY_METRICS}
    assert rows.keys() == set(SUMMARY_METRICS)
    assert {len(row) for row in rows.values()} == {len(header)}  # columns aligned
    return {metric: row.split()[1:] for metric, row in rows.items()}


def test_the_table_shows_mean_and_spread_over_seeds(short_demo: ShortDemo) -> None:
    metrics = short_demo.metrics
    table = format_table(metrics)
    assert "seeds 5, 6; mean ± std over seeds" in table
    for metric, cells in _metric_rows(table).items():
        expected = []
        for name in ("matryoshka", "plain"):
            stats = metrics["summary"][name].get(metric)
            expected += [f"{stats['mean']:.3f}", "±", f"{stats['std']:.3f}"] if stats else ["-"]
        assert cells == expected, metric


def test_the_table_of_one_seed_shows_its_values_without_a_spread(short_demo: ShortDemo) -> None:
    """A spread over one seed would read ``± 0.000``: a certainty no run measured."""
    runs = short_demo.metrics["runs"][:1]
    config = {**short_demo.metrics["config"], "seeds": [runs[0]["seed"]]}
    table = format_table({"config": config, "summary": summarise(runs), "runs": runs})
    assert "±" not in table
    assert "seed 5 (one seed, so no spread)" in table
    for metric, cells in _metric_rows(table).items():
        expected = [
            f"{runs[0][name][metric]:.3f}" if metric in runs[0][name] else "-"
            for name in ("matryoshka", "plain")
        ]
        assert cells == expected, metric


def _toy_sae(decoder: torch.Tensor) -> StandardTrainingSAE:
    """An SAE with the decoder rows given: all the heatmap reads of an SAE."""
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=decoder.shape[1], d_sae=len(decoder)))
    with torch.no_grad():
        sae.W_dec.copy_(decoder)
    return sae


@pytest.mark.parametrize("width", [40, 120])
@pytest.mark.parametrize("corrected", [True, False])
def test_decoder_heatmap_labels_are_readable_and_later_parent_latents_explained(
    width: int, corrected: bool
) -> None:
    """A level-2 latent matching a parent (its first-level latent's correction) gets a caption.

    The first level holds each parent leaning toward its children's mean, as
    the demo's SAEs learn it; the second level every other feature, and with
    ``corrected`` one latent for parent-without-children samples: P1 minus
    its children's mean. Latent labels keep their size at any width, the
    figure widening so that neighbouring labels do not overlap.
    """
    toy = ToyHierarchy.nabeshima(0)
    directions = toy.directions
    leaning = [directions[p] + directions[toy.children[p]].mean(0) for p in toy.parents]
    others = [directions[f] for f in toy.general_to_specific if f not in toy.parents]
    correction = directions[toy.parents[0]] - directions[toy.children[toy.parents[0]]].mean(0)
    second = ([correction] if corrected else []) + others * width
    decoder = torch.stack(leaning + second[: width - len(leaning)])
    saes = {"matryoshka": _toy_sae(decoder), "plain": _toy_sae(decoder)}
    titles = {"matryoshka": "Matryoshka", "plain": "plain"}
    fig = decoder_cosines_figure(toy, saes, [toy.n_parents, width], titles)
    try:
        fig.canvas.draw()
        axis = fig.axes[0]
        labels = axis.get_xticklabels()
        second_level = [label.get_text() for label in labels[toy.n_parents :]]
        assert ("P1" in second_level) == corrected
        assert (PARENT_CORRECTION_NOTE in [text.get_text() for text in fig.texts]) == corrected
        assert LATENT_LABEL_FONTSIZE >= 8
        assert {label.get_fontsize() for label in labels} == {LATENT_LABEL_FONTSIZE}
        (left, _), (right, _) = axis.transData.transform([(0, 0), (1, 0)])
        assert right - left >= LATENT_LABEL_FONTSIZE * fig.dpi / 72  # one label's height
    finally:
        _pyplot().close(fig)


def _assert_the_papers_result(metrics: dict) -> None:
    """Per seed: parents first, no absorption, every feature learned, the true tree."""
    for run in metrics["runs"]:
        ours, plain = run["matryoshka"], run["plain"]
        assert ours["parents_in_first_level"] == 3, run["seed"]
        assert ours["absorption"] <= 0.1, (run["seed"], ours["absorption"])
        assert ours["absorption"] < plain["absorption"], (run["seed"], plain["absorption"])
        # every feature learned; the children least exactly, as the README explains (the
        # loosest: seed 1's C1a at 0.77; without the L1 warm-up, 0.80 on seed 42)
        assert ours["min_best_cosine"] > 0.75, (run["seed"], ours["best_cosine"])
        assert ours["mean_best_cosine"] > plain["mean_best_cosine"], run["seed"]
        # the feature tree found from co-firing alone: the true edges, and more of them than
        # in the plain SAE, whose absorbed children lose their parents
        assert ours["tree_precision"] >= 0.9, (run["seed"], ours["tree"]["edges"])
        assert ours["tree_recall"] > plain["tree_recall"], run["seed"]


def test_the_default_demo_shows_the_papers_result_on_every_seed(tmp_path: Path) -> None:
    """What ``make demo`` prints and the README reports."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = run_toy_demo(output_dir=tmp_path)
    assert len(metrics["runs"]) >= 3
    _assert_the_papers_result(metrics)
    # the README's sample output is this run's table
    table = printed.getvalue().split("\nwrote ")[0]
    assert_readme_shows("relu: Matryoshka (levels [3, 40])", table, abs_tol=0.01)


#: ten consecutive seeds no setting of the demo was chosen on (its L1 warm-up was
#: chosen on seeds 3-32, where seed 23 still ends with 2 parents in the first level;
#: without it seeds 36 and 42 of these fail)
UNSEEN_SEEDS = range(33, 43)


@pytest.mark.slow
def test_the_default_demo_holds_on_ten_seeds_it_was_not_tuned_on(tmp_path: Path) -> None:
    """The demo's defaults on seeds 33-42: what any seed gives, not only the shown ones (160 s)."""
    metrics = run_toy_demo(output_dir=tmp_path, seed=UNSEEN_SEEDS[0], seeds=len(UNSEEN_SEEDS))
    assert [run["seed"] for run in metrics["runs"]] == list(UNSEEN_SEEDS)
    _assert_the_papers_result(metrics)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "argument --steps: must be positive, got 0"),
        (["--width", "-4"], "argument --width: must be positive, got -4"),
        (["--seeds", "two"], "argument --seeds: invalid int value: 'two'"),
        (["--l1", "0"], "argument --l1: must be positive, got 0"),
        (["--width", "3"], "width must be larger than the first level (3 latents"),
        (["--l1", "0.1", "--l0", "1.0"], "l1 goes with the relu activation"),
        (["--activation", "relu", "--l0", "1.0"], "l1 goes with the relu activation"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_toy_command_line_refuses_bad_values(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["toy", "--output-dir", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_toy_command_line_runs_batchtopk_when_given_l0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--steps", "30", "--seed", "1", "--seeds", "1", "--width", "20", "--l0", "1.0"]
    code = main(["toy", *flags, "--output-dir", str(tmp_path)])
    assert code == 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["seeds"] == [1] and saved["config"]["steps"] == 30
    assert saved["config"]["activation"] == "batchtopk" and saved["config"]["k"] == 1.0
    assert saved["config"]["matryoshka_widths"] == [3, 20]
    assert "wrote" in capsys.readouterr().out
