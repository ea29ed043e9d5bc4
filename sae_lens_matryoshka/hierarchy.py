"""The feature tree of a trained SAE: which later latents specialise which earlier ones.

A Matryoshka SAE is meant to hold general features in its early levels and
their specialisations in later ones. ``find_hierarchy`` recovers that
structure from how latents fire together on real activations, with no ground
truth, and returns a :class:`LatentHierarchy`: the edges ``(parent, child)``,
each latent's level, and per edge the evidence. It can be drawn
(:meth:`LatentHierarchy.plot`, levels as rows) and exported as JSON.

**The criterion.** Latent ``p`` is the parent of latent ``c`` when, over the
tokens seen (``n_x`` = tokens where ``x`` fires, ``n_pc`` = tokens where both do):

1. the child fires almost only with its parent: ``P(p | c) = n_pc / n_c >=
   min_parent_given_child`` (0.9; a toy child's parent latent fires with it
   every time, an absorbed parent falls silent on a share of its children's
   tokens and fails here);
2. the parent also fires without the child: ``P(c | p) = n_pc / n_p <=
   max_child_given_parent`` (0.8), and ``n_p > n_c`` (so parent chains only
   go towards more frequent latents and the tree has no cycles); two latents
   that always fire together are duplicates, not a hierarchy;
3. more often than chance: ``P(p | c) / P(p) >= min_lift`` (2), which keeps a
   latent firing on most tokens from parenting everything;
4. the parent is not in a later level than the child (``level(p) <=
   level(c)``; with ``allow_same_level=False``, strictly earlier). Same-level
   edges are allowed by default because a tree can be deeper than the SAE
   has levels, and because a one-level (plain) SAE has only those;
5. enough evidence: ``n_c >= min_child_firings`` (20);
6. optionally, decoder geometry: ``cos(W_dec[p], W_dec[c]) >=
   min_decoder_cosine`` (off by default: in a Matryoshka SAE a child's
   decoder subtracts its parent's share, so the cosine says little; it is
   reported per edge either way).

Of the latents that pass for one child, its parent is the one firing least
often: ancestors all pass (a grandparent fires whenever the parent does), and
the least frequent of them is the nearest. So every child has one parent and
``edges`` is a forest.

**Scale.** Activations are streamed a block of tokens at a time: no
``d_sae x d_sae`` matrix, and no list of every co-firing pair. For each
latent ``c`` (as a child) a table holds candidate parents with their exact
co-firing counts. During ``c``'s first ``seed_firings`` (16) firings every
latent firing with it (and allowed by the levels) is admitted; after that no
new candidate is admitted, and a candidate is dropped as soon as it has fired
on fewer than ``prune_below`` (half) of ``c``'s firings. A true parent (on at
least 90% of ``c``'s firings) co-fires within the first 16 firings except with
probability ``0.1 ** 16``, and falls below half of them only if the tokens
come in a strongly non-random order; a candidate that was never dropped has
its exact count. Work per block is ``O(nnz * L0)`` while latents are being
seeded and ``O(nnz * candidates)`` after, i.e. ``O(nnz)``: most latents
finish seeding within the first batches. Memory is bounded explicitly: at
most ``max_candidates`` (32) candidates per child, so at most
``d_sae * max_candidates`` tracked pairs of 16 bytes (32 MiB at 65,536
latents) plus ``d_sae`` firing counts; a block's temporaries hold at most
``2**15`` active entries times the largest L0 (candidates dropped because a
table was full are counted in ``stats["refused"]``).
``benchmarks/hierarchy_scale.py`` measures it at 65,536 latents.

Inputs: an activations tensor ``[n_tokens, d_in]`` (or ``[..., d_in]``), an
iterable of such batches, or a SAELens ``ActivationsStore`` with the model it
reads (``model=``, as ``evals.evaluate_levels``), in which case each latent is
also labelled with the tokens it fires on most strongly. ``hierarchy_from_codes``
takes latent codes directly (dense or sparse ``[n_tokens, d_sae]``).
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens import HookedRootModule

from sae_lens_matryoshka.evals import HookSite, ignored_tokens, token_mask

#: the JSON export's format tag and version
FORMAT = "sae_lens_matryoshka.hierarchy"
VERSION = 1
#: active entries per block of the counter: its temporaries hold this times the largest L0
_ENTRY_BLOCK = 1 << 15
#: bits of a co-firing count in ``CoFiringCounter``'s packed sort key (larger counts tie)
_HIT_BITS = 20
#: elements of one encoded block ``[tokens, d_sae]`` (64 MiB in float32)
_ENCODE_BLOCK = 1 << 24


@dataclass(frozen=True)
class HierarchyCriteria:
    """The thresholds of the parent test (see the module docstring for why each)."""

    min_parent_given_child: float = 0.9
    max_child_given_parent: float = 0.8
    min_lift: float = 2.0
    min_child_firings: int = 20
    allow_same_level: bool = True
    min_decoder_cosine: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_parent_given_child", "max_child_given_parent"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}.")
        if self.min_lift < 0:
            raise ValueError(f"min_lift must be >= 0, got {self.min_lift}.")
        if self.min_child_firings < 1:
            raise ValueError(f"min_child_firings must be >= 1, got {self.min_child_firings}.")
        if self.min_decoder_cosine is not None and not -1 <= self.min_decoder_cosine <= 1:
            raise ValueError(
                f"min_decoder_cosine must be a cosine in [-1, 1] or None, "
                f"got {self.min_decoder_cosine}."
            )


@dataclass(frozen=True)
class Edge:
    """One parent -> child edge and its evidence, over ``LatentHierarchy.n_tokens`` tokens."""

    parent: int
    child: int
    #: tokens where both fire
    co_firings: int
    #: ``P(parent fires | child fires)``: near 1 for a child
    parent_given_child: float
    #: ``P(child fires | parent fires)``: below 1, the parent fires without it too
    child_given_parent: float
    #: cosine of the two decoder vectors (None when no decoder was given)
    decoder_cosine: float | None


@dataclass
class LatentHierarchy:
    """A forest of latents: ``edges`` ``(parent, child)``, levels, and per edge the evidence.

    ``firings`` and ``labels`` cover the latents in an edge (``labels`` only
    where a label is known: the top tokens on a model, or what the caller
    passes). ``stats`` says how the counting went (tokens, tracked pairs,
    candidates refused for lack of room).
    """

    widths: list[int]
    n_tokens: int
    evidence: list[Edge]
    firings: dict[int, int]
    criteria: HierarchyCriteria
    stats: dict[str, int] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)

    @property
    def edges(self) -> list[tuple[int, int]]:
        """``(parent_latent, child_latent)`` pairs, sorted."""
        return [(edge.parent, edge.child) for edge in self.evidence]

    @property
    def parents(self) -> dict[int, int]:
        """Each child's parent."""
        return {edge.child: edge.parent for edge in self.evidence}

    @property
    def children(self) -> dict[int, list[int]]:
        """Each parent's children, in increasing order."""
        found: dict[int, list[int]] = {}
        for edge in self.evidence:
            found.setdefault(edge.parent, []).append(edge.child)
        return found

    @property
    def roots(self) -> list[int]:
        """Latents that are parents but have no parent themselves."""
        return sorted(set(self.children) - set(self.parents))

    def level(self, latent: int) -> int:
        """The level (0 = first) whose group holds ``latent``."""
        if not 0 <= latent < self.widths[-1]:
            raise ValueError(f"latent must be in [0, {self.widths[-1]}), got {latent}.")
        return next(i for i, width in enumerate(self.widths) if latent < width)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``LatentHierarchy.from_json`` reads it back)."""
        latents = sorted(set(self.firings) | set(self.labels))
        return {
            "format": FORMAT,
            "version": VERSION,
            "widths": self.widths,
            "n_tokens": self.n_tokens,
            "criteria": asdict(self.criteria),
            "stats": self.stats,
            "latents": [
                {
                    "latent": latent,
                    "level": self.level(latent),
                    "firings": self.firings.get(latent),
                    "label": self.labels.get(latent),
                }
                for latent in latents
            ],
            "edges": [asdict(edge) for edge in self.evidence],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LatentHierarchy:
        """The hierarchy ``to_json`` wrote."""
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(
                f"not a feature tree of this version: expected format {FORMAT!r} version "
                f"{VERSION}, got {data.get('format')!r} version {data.get('version')!r}."
            )
        latents = data["latents"]
        return cls(
            widths=list(data["widths"]),
            n_tokens=data["n_tokens"],
            evidence=[Edge(**edge) for edge in data["edges"]],
            firings={
                row["latent"]: row["firings"] for row in latents if row["firings"] is not None
            },
            criteria=HierarchyCriteria(**data["criteria"]),
            stats=dict(data["stats"]),
            labels={row["latent"]: row["label"] for row in latents if row["label"] is not None},
        )

    def save(self, path: str | Path) -> Path:
        """Write ``to_json()`` to ``path`` (parent folders created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatentHierarchy:
        """A hierarchy ``save`` wrote."""
        return cls.from_json(json.loads(Path(path).read_text()))

    def plot(
        self,
        path: str | Path,
        labels: Mapping[int, str] | None = None,
        latents: Iterable[int] = (),
        max_nodes: int = 80,
        title: str | None = None,
    ) -> Path:
        """Draw the tree to a PNG (see :func:`draw_hierarchy` for the arguments)."""
        plt = _pyplot()
        fig, axis = plt.subplots(figsize=(10, 5))
        draw_hierarchy(self, axis, labels=labels, latents=latents, max_nodes=max_nodes)
        if title is not None:
            axis.set_title(title)
        fig.set_size_inches(max(6.0, 0.55 * _leaf_count(self, latents, max_nodes) + 2), 5)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


# ---------------------------------------------------------------- counting


class CoFiringCounter:
    """Streamed firing counts and, per child, its candidate parents' exact co-firing counts.

    ``add`` takes one batch's active entries; ``hierarchy`` applies the
    criteria. See the module docstring for the seeding / pruning rule and the
    memory bound.
    """

    def __init__(
        self,
        widths: Sequence[int],
        allow_same_level: bool = True,
        seed_firings: int = 16,
        prune_below: float = 0.5,
        max_candidates: int = 32,
    ) -> None:
        self.widths = _check_widths(widths)
        if seed_firings < 1:
            raise ValueError(f"seed_firings must be >= 1, got {seed_firings}.")
        if not 0 <= prune_below <= 1:
            raise ValueError(f"prune_below must be a fraction in [0, 1], got {prune_below}.")
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}.")
        self.d_sae = self.widths[-1]
        self.allow_same_level = allow_same_level
        self.seed_firings = seed_firings
        self.prune_below = prune_below
        self.max_candidates = max_candidates
        self.level = torch.bucketize(
            torch.arange(self.d_sae), torch.tensor(self.widths), right=True
        )
        self.firings = torch.zeros(self.d_sae, dtype=torch.long)
        #: tracked pairs, sorted: ``child * d_sae + parent``, and their co-firing counts
        self.keys = torch.empty(0, dtype=torch.long)
        self.hits = torch.empty(0, dtype=torch.long)
        self.n_tokens = 0
        self.stats = {"most_tracked_pairs": 0, "refused": 0, "pruned": 0}

    def add(self, tokens: torch.Tensor, latents: torch.Tensor, n_tokens: int) -> None:
        """One batch: active entries ``(tokens[i], latents[i])`` of ``n_tokens`` tokens."""
        tokens, latents = tokens.long().cpu(), latents.long().cpu()
        if tokens.shape != latents.shape or tokens.ndim != 1:
            raise ValueError(
                f"tokens and latents must be 1-d of one length, got shapes "
                f"{tuple(tokens.shape)} and {tuple(latents.shape)}."
            )
        if len(latents) and not (int(latents.min()) >= 0 and int(latents.max()) < self.d_sae):
            raise ValueError(f"latent ids must be in [0, {self.d_sae}).")
        if len(tokens) and not (int(tokens.min()) >= 0 and int(tokens.max()) < n_tokens):
            raise ValueError(f"token ids must be in [0, n_tokens={n_tokens}).")
        order = torch.argsort(tokens * self.d_sae + latents)
        tokens, latents = tokens[order], latents[order]
        # blocks of whole tokens with at most _ENTRY_BLOCK entries each (one token may exceed it)
        ends = torch.bincount(tokens, minlength=n_tokens).cumsum(0)
        start = 0
        while start < n_tokens:
            done = int(ends[start - 1]) if start else 0
            stop = max(int(torch.searchsorted(ends, done + _ENTRY_BLOCK, right=True)), start + 1)
            if int(ends[stop - 1]) > done:
                block = slice(done, int(ends[stop - 1]))
                self._add_block(tokens[block] - start, latents[block], stop - start)
            start = stop
        self.n_tokens += n_tokens

    def _add_block(self, tokens: torch.Tensor, latents: torch.Tensor, n_tokens: int) -> None:
        seeding = (self.firings < self.seed_firings)[latents]
        self.firings += torch.bincount(latents, minlength=self.d_sae)
        entry_keys = tokens * self.d_sae + latents  # sorted: token-major
        pairs = torch.cat(
            [
                self._co_active_pairs(tokens, latents, seeding, n_tokens),
                self._tracked_pairs(tokens[~seeding], latents[~seeding], entry_keys),
            ]
        )
        batch_keys, counts = torch.unique(pairs, return_counts=True)
        self._merge(batch_keys, counts)
        self._prune()

    def _co_active_pairs(
        self, tokens: torch.Tensor, latents: torch.Tensor, seeding: torch.Tensor, n_tokens: int
    ) -> torch.Tensor:
        """``child * d_sae + parent`` for every seeding child and each latent firing with it."""
        per_token = torch.bincount(tokens, minlength=n_tokens)
        first = per_token.cumsum(0) - per_token
        child_token = tokens[seeding]
        child = latents[seeding]
        owner, offset = _ragged(per_token[child_token])
        parent = latents[first[child_token][owner] + offset]
        child = child[owner]
        allowed = parent != child
        allowed &= (
            self.level[parent] <= self.level[child]
            if self.allow_same_level
            else self.level[parent] < self.level[child]
        )
        return (child * self.d_sae + parent)[allowed]

    def _tracked_pairs(
        self, tokens: torch.Tensor, children: torch.Tensor, entry_keys: torch.Tensor
    ) -> torch.Tensor:
        """``child * d_sae + parent`` for each tracked candidate firing with its child here."""
        lo = torch.searchsorted(self.keys, children * self.d_sae)
        hi = torch.searchsorted(self.keys, (children + 1) * self.d_sae)
        owner, offset = _ragged(hi - lo)
        pair = self.keys[lo[owner] + offset]
        query = tokens[owner] * self.d_sae + pair % self.d_sae
        found = torch.searchsorted(entry_keys, query).clamp(max=max(len(entry_keys) - 1, 0))
        return pair[entry_keys[found] == query] if len(entry_keys) else pair[:0]

    def _merge(self, batch_keys: torch.Tensor, counts: torch.Tensor) -> None:
        """Add the block's counts; admit new candidates, the best first where a table is full."""
        where = torch.searchsorted(self.keys, batch_keys)
        known = where < len(self.keys)
        known[known.clone()] = self.keys[where[known]] == batch_keys[known]
        self.hits.index_add_(0, where[known], counts[known])
        if known.all():
            return
        keys = torch.cat([self.keys, batch_keys[~known]])
        hits = torch.cat([self.hits, counts[~known]])
        child = keys // self.d_sae
        over = torch.bincount(child, minlength=self.d_sae)[child] > self.max_candidates
        if over.any():
            kept = self._best_candidates(keys[over], hits[over])
            self.stats["refused"] += int(over.sum()) - len(kept)
            keys = torch.cat([keys[~over], keys[over][kept]])
            hits = torch.cat([hits[~over], hits[over][kept]])
        order = torch.argsort(keys)
        self.keys, self.hits = keys[order], hits[order]
        self.stats["most_tracked_pairs"] = max(self.stats["most_tracked_pairs"], len(self.keys))

    def _best_candidates(self, keys: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
        """Which of ``keys`` to keep: per child the ``max_candidates`` most co-firing.

        Ties go to the more frequent parent (parents fire more often than their
        children). One sort of a packed key: child, then co-firings, then the
        parent's firings, each descending field stored as its complement.
        """
        child_bits = max(1, (self.d_sae - 1).bit_length())
        firing_bits = 63 - child_bits - _HIT_BITS
        most_hits, most_firings = (1 << _HIT_BITS) - 1, (1 << firing_bits) - 1
        child = keys // self.d_sae
        packed = (
            (child << (_HIT_BITS + firing_bits))
            | ((most_hits - hits.clamp(max=most_hits)) << firing_bits)
            | (most_firings - self.firings[keys % self.d_sae].clamp(max=most_firings))
        )
        order = torch.argsort(packed)
        ranked = child[order]
        rank = torch.arange(len(order)) - torch.searchsorted(ranked, ranked)
        return order[rank < self.max_candidates]

    def _prune(self) -> None:
        """Drop candidates of seeded children that fire on under ``prune_below`` of the child's firings."""
        child_firings = self.firings[self.keys // self.d_sae]
        hopeless = (child_firings >= self.seed_firings) & (
            self.hits < self.prune_below * child_firings
        )
        if hopeless.any():
            self.stats["pruned"] += int(hopeless.sum())
            self.keys, self.hits = self.keys[~hopeless], self.hits[~hopeless]

    def hierarchy(
        self, criteria: HierarchyCriteria, W_dec: torch.Tensor | None = None
    ) -> LatentHierarchy:
        """The tree the counts so far support under ``criteria``."""
        if criteria.allow_same_level and not self.allow_same_level:
            raise ValueError(
                "the counter tracked only earlier-level parents (allow_same_level=False); "
                "criteria cannot allow same-level ones."
            )
        child, parent = self.keys // self.d_sae, self.keys % self.d_sae
        n_child, n_parent = self.firings[child], self.firings[parent]
        parent_given_child = self.hits / n_child.clamp(min=1)
        child_given_parent = self.hits / n_parent.clamp(min=1)
        lift = parent_given_child * self.n_tokens / n_parent.clamp(min=1)
        level_ok = (
            self.level[parent] <= self.level[child]
            if criteria.allow_same_level
            else self.level[parent] < self.level[child]
        )
        passing = (
            (n_child >= criteria.min_child_firings)
            & (parent_given_child >= criteria.min_parent_given_child)
            & (child_given_parent <= criteria.max_child_given_parent)
            & (n_parent > n_child)
            & (lift >= criteria.min_lift)
            & level_ok
        )
        if criteria.min_decoder_cosine is not None and W_dec is None:
            raise ValueError("min_decoder_cosine needs the SAE's decoder (W_dec), none was given.")
        cosine = None
        if W_dec is not None:
            cosine = _decoder_cosines(W_dec, child[passing], parent[passing])
            if criteria.min_decoder_cosine is not None:
                close = cosine >= criteria.min_decoder_cosine
                passing[passing.clone()] = close
                cosine = cosine[close]
        best: dict[int, tuple[int, float, int, int]] = {}
        rows = zip(
            child[passing].tolist(),
            parent[passing].tolist(),
            n_parent[passing].tolist(),
            parent_given_child[passing].tolist(),
            range(int(passing.sum())),
            strict=True,
        )
        for c, p, n_p, p_given_c, row in rows:
            # the nearest ancestor: fewest firings, then the surest, then the lowest index
            key = (n_p, -p_given_c, p, row)
            if c not in best or key < best[c]:
                best[c] = key
        hits, child_given = self.hits[passing], child_given_parent[passing]
        edges = []
        for c, (_, neg_p_given_c, p, row) in best.items():
            edges.append(
                Edge(
                    parent=p,
                    child=c,
                    co_firings=int(hits[row]),
                    parent_given_child=-neg_p_given_c,
                    child_given_parent=float(child_given[row]),
                    decoder_cosine=None if cosine is None else float(cosine[row]),
                )
            )
        edges.sort(key=lambda edge: (edge.parent, edge.child))
        nodes = {latent for edge in edges for latent in (edge.parent, edge.child)}
        return LatentHierarchy(
            widths=list(self.widths),
            n_tokens=self.n_tokens,
            evidence=edges,
            firings={latent: int(self.firings[latent]) for latent in sorted(nodes)},
            criteria=criteria,
            stats={"tracked_pairs": len(self.keys), **self.stats},
        )


def _ragged(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of ``lengths`` items: each item's row, and its position within the row."""
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = lengths.cumsum(0) - lengths
    return owner, torch.arange(len(owner)) - starts[owner]


@torch.no_grad()
def _decoder_cosines(W_dec: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of decoder rows ``a[i]`` and ``b[i]``, on the CPU."""
    rows = W_dec.detach().float()
    first, second = rows[a.to(rows.device)], rows[b.to(rows.device)]
    return torch.nn.functional.cosine_similarity(first, second, dim=-1).cpu()


def _check_widths(widths: Sequence[int]) -> list[int]:
    widths = [int(w) for w in widths]
    if not widths or widths[0] < 1 or any(b <= a for a, b in itertools.pairwise(widths)):
        raise ValueError(f"widths must be positive and strictly increasing, got {widths}.")
    return widths


# ---------------------------------------------------------------- entry points


def _sae_widths(sae: SAE[Any], widths: Sequence[int] | None) -> list[int]:
    """The level widths: given, the SAE's ``matryoshka_widths``, or one level."""
    d_sae = int(sae.cfg.d_sae)
    chosen = list(widths or getattr(sae, "matryoshka_widths", None) or [d_sae])
    if _check_widths(chosen)[-1] != d_sae:
        raise ValueError(f"widths must end at the SAE's d_sae={d_sae}, got {chosen}.")
    return chosen


def _firing_entries(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and latent ids where ``codes`` (dense or sparse ``[n_tokens, d_sae]``) is nonzero."""
    if codes.is_sparse:
        codes = codes.coalesce()
        tokens, latents = codes.indices()
        return tokens[codes.values() != 0], latents[codes.values() != 0]
    tokens, latents = (codes != 0).nonzero(as_tuple=True)
    return tokens, latents


def hierarchy_from_codes(
    codes: torch.Tensor | Iterable[torch.Tensor],
    widths: Sequence[int],
    W_dec: torch.Tensor | None = None,
    *,
    min_parent_given_child: float = 0.9,
    max_child_given_parent: float = 0.8,
    min_lift: float = 2.0,
    min_child_firings: int = 20,
    allow_same_level: bool = True,
    min_decoder_cosine: float | None = None,
    seed_firings: int = 16,
    prune_below: float = 0.5,
    max_candidates: int = 32,
) -> LatentHierarchy:
    """The feature tree from latent codes: one ``[n_tokens, d_sae]`` tensor or batches of them.

    Codes may be dense or sparse (COO); a latent fires where its code is
    nonzero. ``widths`` are the level widths (the last is ``d_sae``),
    ``W_dec`` (optional) gives each edge its decoder cosine. The other
    arguments are the criteria and the counter's bounds (module docstring).
    """
    criteria = HierarchyCriteria(
        min_parent_given_child=min_parent_given_child,
        max_child_given_parent=max_child_given_parent,
        min_lift=min_lift,
        min_child_firings=min_child_firings,
        allow_same_level=allow_same_level,
        min_decoder_cosine=min_decoder_cosine,
    )
    if prune_below > min_parent_given_child:
        raise ValueError(
            f"prune_below ({prune_below}) must not exceed min_parent_given_child "
            f"({min_parent_given_child}): it would drop parents the criterion accepts."
        )
    counter = CoFiringCounter(widths, allow_same_level, seed_firings, prune_below, max_candidates)
    batches = [codes] if isinstance(codes, torch.Tensor) else codes
    for index, batch in enumerate(batches):
        if not isinstance(batch, torch.Tensor) or batch.ndim != 2:
            raise ValueError(
                f"codes: batch {index} must be a 2-d tensor [n_tokens, d_sae={counter.d_sae}], "
                f"got {_describe(batch)}."
            )
        if batch.shape[1] != counter.d_sae:
            raise ValueError(
                f"codes: batch {index} has {batch.shape[1]} latents, the widths end at "
                f"{counter.d_sae}."
            )
        counter.add(*_firing_entries(batch), n_tokens=batch.shape[0])
    return counter.hierarchy(criteria, W_dec)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


@torch.no_grad()
def find_hierarchy(
    sae: SAE[Any],
    activations: torch.Tensor | Iterable[torch.Tensor] | ActivationsStore,
    *,
    model: HookedRootModule | None = None,
    n_batches: int = 10,
    batch_size_prompts: int | None = None,
    exclude_special_tokens: Iterable[int] | bool = False,
    activation_scaler: ActivationScaler | None = None,
    top_tokens: int = 3,
    widths: Sequence[int] | None = None,
    **options: Any,
) -> LatentHierarchy:
    """The feature tree of ``sae`` on ``activations``: which latents specialise which.

    Args:
        sae: any SAELens SAE (a Matryoshka SAE, training or inference, gives
            its levels; another SAE is one level). Encoded in eval mode.
        activations: ``[n_tokens, d_in]`` (or ``[..., d_in]``), an iterable of
            such batches, or an ``ActivationsStore`` (then ``model`` is needed).
        model: the model the store reads; ``n_batches`` token batches of
            ``batch_size_prompts`` prompts (default the store's) are run
            through it, positions of ``exclude_special_tokens`` skipped, and
            the activations scaled by ``activation_scaler``, as ``evals.evaluate_levels``.
        top_tokens: with a model, label each latent with its ``top_tokens``
            most strongly activating tokens (0: no labels).
        widths: level widths, overriding the SAE's.
        **options: criteria and counter bounds of :func:`hierarchy_from_codes`
            (``min_parent_given_child``, ``max_child_given_parent``,
            ``min_lift``, ``min_child_firings``, ``allow_same_level``,
            ``min_decoder_cosine``, ``seed_firings``, ``prune_below``,
            ``max_candidates``).
    """
    known = set(inspect.signature(hierarchy_from_codes).parameters) - {"codes", "widths", "W_dec"}
    if unknown := sorted(set(options) - known):
        raise TypeError(
            f"find_hierarchy got unknown options {unknown}; the options are {sorted(known)}."
        )
    levels = _sae_widths(sae, widths)
    d_in, d_sae = int(sae.cfg.d_in), levels[-1]
    top = (
        _TopTokens(d_sae, top_tokens, getattr(model, "tokenizer", None))
        if model is not None and top_tokens > 0
        else None
    )
    if isinstance(activations, ActivationsStore):
        if model is None:
            raise ValueError(
                "activations is an ActivationsStore: pass model= (the HookedTransformer it reads)."
            )
        batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]] = _store_batches(
            sae,
            model,
            activations,
            n_batches,
            batch_size_prompts or activations.store_batch_size_prompts,
            ignored_tokens(model, exclude_special_tokens),
            activation_scaler or ActivationScaler(),
        )
    elif model is not None:
        raise ValueError(
            f"model= goes with an ActivationsStore; activations is {_describe(activations)}."
        )
    else:
        batches = ((x, None) for x in _activation_batches(activations, d_in))
    was_training = sae.training
    sae.eval()
    try:
        codes = _encoded(sae, batches, d_sae, top)
        tree = hierarchy_from_codes(codes, levels, sae.W_dec, **options)
    finally:
        sae.train(was_training)
    if top is not None:
        tree.labels = top.labels(sorted(tree.firings))
    return tree


def _activation_batches(
    activations: torch.Tensor | Iterable[torch.Tensor], d_in: int
) -> Iterator[torch.Tensor]:
    """Each batch as ``[n_tokens, d_in]``, or a ValueError naming what came instead."""
    if isinstance(activations, torch.Tensor):
        batches: Iterable[Any] = [activations]
    elif isinstance(activations, Iterable) and not isinstance(activations, str | bytes):
        batches = activations
    else:
        raise ValueError(
            "activations must be a tensor [n_tokens, d_in], an iterable of such tensors, or an "
            f"ActivationsStore (with model=); got {_describe(activations)}."
        )
    for index, batch in enumerate(batches):
        if not isinstance(batch, torch.Tensor) or batch.ndim < 2 or batch.shape[-1] != d_in:
            raise ValueError(
                f"activations: batch {index} must be a tensor [..., d_in={d_in}], "
                f"got {_describe(batch)}."
            )
        yield batch.reshape(-1, d_in)


def _store_batches(
    sae: SAE[Any],
    model: HookedRootModule,
    store: ActivationsStore,
    n_batches: int,
    batch_size: int,
    ignore: list[int],
    scaler: ActivationScaler,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The SAE's input at its hook and the token ids, counted positions only, per token batch."""
    hook_name = sae.cfg.metadata.hook_name
    site = HookSite(hook_name, sae.cfg.metadata.hook_head_index)
    for _ in range(n_batches):
        tokens = store.get_batch_tokens(batch_size)
        _, cache = model.run_with_cache(tokens, names_filter=[hook_name])
        mask = token_mask(tokens, ignore)
        yield scaler.scale(site.read(cache[hook_name])[mask]), tokens[mask]


def _encoded(
    sae: SAE[Any],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    d_sae: int,
    top: _TopTokens | None,
) -> Iterator[torch.Tensor]:
    """Each batch's codes as sparse ``[n_tokens, d_sae]`` tensors, a bounded block of tokens at a time."""
    rows = max(1, _ENCODE_BLOCK // d_sae)
    weight = sae.W_enc
    for x, token_ids in batches:
        for start in range(0, x.shape[0], rows):
            acts = sae.encode(x[start : start + rows].to(weight.device, weight.dtype))
            tokens, latents = _firing_entries(acts)
            values = acts[tokens, latents]
            if top is not None and token_ids is not None:
                ids = token_ids[start : start + rows].to(tokens.device)[tokens]
                top.add(latents.cpu(), values.float().cpu(), ids.cpu())
            yield torch.sparse_coo_tensor(
                torch.stack([tokens, latents]).cpu(), values.cpu(), (acts.shape[0], d_sae)
            )


class _TopTokens:
    """Per latent, the ``k`` token ids it fired on most strongly: ``[d_sae, k]``, bounded."""

    def __init__(self, d_sae: int, k: int, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.values = torch.full((d_sae, k), -math.inf)
        self.ids = torch.full((d_sae, k), -1, dtype=torch.long)
        self.k = k

    def add(self, latents: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> None:
        touched = torch.unique(latents)
        # the touched latents' current best, and this block's entries, in one list
        row_of = torch.searchsorted(touched, latents)
        all_rows = torch.cat([torch.arange(len(touched)).repeat_interleave(self.k), row_of])
        all_values = torch.cat([self.values[touched].flatten(), values])
        all_ids = torch.cat([self.ids[touched].flatten(), ids])
        order = torch.argsort(all_values, descending=True, stable=True)
        order = order[torch.argsort(all_rows[order], stable=True)]
        rows = all_rows[order]
        rank = torch.arange(len(order)) - torch.searchsorted(rows, rows)
        keep = order[rank < self.k]
        self.values[touched] = all_values[keep].view(-1, self.k)
        self.ids[touched] = all_ids[keep].view(-1, self.k)

    def labels(self, latents: Iterable[int]) -> dict[int, str]:
        """``"tok1 | tok2"`` per latent: its distinct top tokens, strongest first (ids without a tokenizer)."""
        tokenizer = self.tokenizer
        found = {}
        for latent in latents:
            ids = [i for i in self.ids[latent].tolist() if i >= 0]
            words = [tokenizer.decode([i]) if tokenizer is not None else f"#{i}" for i in ids]
            if words:
                found[latent] = " | ".join(dict.fromkeys(repr(w)[1:-1] for w in words))
        return found


# ---------------------------------------------------------------- ground truth


def edge_recovery(
    found: Iterable[tuple[int, int]],
    children: Mapping[int, Sequence[int]],
    cosines: torch.Tensor,
) -> dict[str, float]:
    """Precision and recall of ``found`` latent edges against a true feature hierarchy.

    ``children`` maps each true feature to its children (any depth: a child
    may be a parent too); ``cosines`` is ``[d_sae, n_features]``, each
    latent's decoder cosine with each true feature (e.g.
    ``ToyHierarchy.decoder_cosines``). Each true feature is mapped to its
    best-cosine latent, which maps the true edges to latent edges.
    ``recall``: the fraction of those found. ``precision``: the fraction of
    found edges between two mapped latents that are true. Edges touching a
    latent that is no feature's best match (a split feature's second latent,
    a parent's correction latent) are not judged, since the ground truth
    says nothing about them: ``unjudged`` counts them. Precision and recall
    are 1.0 where there is nothing to count.
    """
    found = set(found)
    best = cosines.argmax(dim=0).tolist()
    true = {(best[parent], best[child]) for parent, kids in children.items() for child in kids}
    mapped = set(best)
    judged = {edge for edge in found if edge[0] in mapped and edge[1] in mapped}
    return {
        "precision": len(judged & true) / len(judged) if judged else 1.0,
        "recall": len(found & true) / len(true) if true else 1.0,
        "unjudged": len(found - judged),
    }


# ---------------------------------------------------------------- drawing


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _shown(tree: LatentHierarchy, latents: Iterable[int], max_nodes: int) -> list[int]:
    """The roots drawn: largest trees first while the node budget lasts, then extra latents."""
    children = tree.children
    parents = tree.parents

    def subtree(node: int) -> list[int]:
        return [node, *(n for kid in children.get(node, []) for n in subtree(kid))]

    extra = {latent for latent in latents if latent not in parents and latent not in children}
    roots = sorted(tree.roots, key=lambda root: (-len(subtree(root)), root))
    shown: list[int] = []
    used = 0
    for root in [*roots, *sorted(extra)]:
        size = len(subtree(root))
        if used + size > max_nodes and shown:
            continue
        shown.append(root)
        used += size
    return shown


def _leaf_count(tree: LatentHierarchy, latents: Iterable[int], max_nodes: int) -> int:
    children = tree.children

    def leaves(node: int) -> int:
        return sum(leaves(kid) for kid in children[node]) if node in children else 1

    return sum(leaves(root) for root in _shown(tree, latents, max_nodes))


def draw_hierarchy(
    tree: LatentHierarchy,
    axis: Any,
    labels: Mapping[int, str] | None = None,
    latents: Iterable[int] = (),
    max_nodes: int = 80,
) -> None:
    """Draw ``tree`` on a matplotlib axis: one row per level, edges from parent to child.

    Each node shows its latent index and, where known, its label (``labels``,
    else the tree's own, e.g. top tokens). ``latents`` are drawn even without
    an edge (on a toy: every true feature's latent, so an absorbed child shows
    as a node with no parent). Same-level children sit on a sub-row below
    their parent. At most ``max_nodes`` nodes: whole trees, largest first.
    """
    latents = list(latents)
    names = {**tree.labels, **(labels or {})}
    children, parents = tree.children, tree.parents
    roots = _shown(tree, latents, max_nodes)
    x: dict[int, float] = {}
    depth: dict[int, int] = {}  # same-level ancestors above a node
    next_leaf = 0

    def place(node: int, same_level_depth: int) -> None:
        nonlocal next_leaf
        depth[node] = same_level_depth
        kids = children.get(node, [])
        for kid in kids:
            place(kid, same_level_depth + 1 if tree.level(kid) == tree.level(node) else 0)
        if kids:
            x[node] = sum(x[kid] for kid in kids) / len(kids)
        else:
            x[node] = next_leaf
            next_leaf += 1

    for root in roots:
        place(root, 0)
    levels = sorted({tree.level(node) for node in x})
    sub_rows = {level: 1 + max(depth[n] for n in x if tree.level(n) == level) for level in levels}
    row_top, top = {}, 0
    for level in levels:
        row_top[level] = top
        top += sub_rows[level]
    y = {node: -(row_top[tree.level(node)] + depth[node]) for node in x}
    colours = _pyplot().get_cmap("tab10")
    for node in x:
        parent = parents.get(node)
        if parent is not None and parent in x:
            axis.plot([x[parent], x[node]], [y[parent], y[node]], color="grey", zorder=1)
    for node in x:
        text = str(node) + (f"\n{names[node]}" if names.get(node) else "")
        axis.text(
            x[node],
            y[node],
            text,
            ha="center",
            va="center",
            fontsize=7,
            zorder=2,
            bbox={
                "boxstyle": "round,pad=0.3",
                "facecolor": colours(tree.level(node) % 10),
                "alpha": 0.35,
                "edgecolor": "black" if node in parents or node in children else "grey",
            },
        )
    axis.set_xlim(-0.8, max(next_leaf - 0.2, 0.8))
    axis.set_ylim(-top + 0.4, 0.6)
    starts = [0, *tree.widths[:-1]]
    axis.set_yticks(
        [-row_top[level] for level in levels],
        [
            f"level {level + 1}\nlatents {starts[level]}-{tree.widths[level] - 1}"
            for level in levels
        ],
    )
    axis.set_xticks([])
    for side in ("top", "right", "bottom"):
        axis.spines[side].set_visible(False)
