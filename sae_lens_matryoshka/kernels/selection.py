"""Which ``(token, latent)`` entries a top-k keeps, token-major, without ranking every entry.

:func:`batch_topk_entries` and :func:`topk_entries` return the entries a dense
top-k would keep; :func:`topk` is the dense TopK activation itself.
"""

from __future__ import annotations

import functools
import math

import torch

#: the largest and smallest samples for estimating the selection threshold (at
#: most 1/16 of the values); the result is exact whatever the sample, a better
#: estimate only means fewer candidates to rank
_THRESHOLD_SAMPLE = 1 << 16
_SMALLEST_SAMPLE = 1 << 10
#: the threshold aims for this many times the entries to keep, so that it
#: almost never falls above the true cut-off (the exact fallback then runs)
_CANDIDATE_MARGIN = 2.0
_SAMPLER_SEED = 0x5EED


@functools.lru_cache(maxsize=8)
def _sample_positions(numel: int, size: int, device: torch.device) -> torch.Tensor:
    """Fixed random positions to sample (a private generator leaves the global RNG alone)."""
    generator = torch.Generator(device=device).manual_seed(_SAMPLER_SEED)
    return torch.randint(0, numel, (size,), generator=generator, device=device)


def _candidate_threshold(flat: torch.Tensor, n_keep: int) -> torch.Tensor | float:
    """A value that, with high probability, at least ``n_keep`` entries of ``flat`` exceed.

    Stays on the device (no host synchronisation); 0 where sampling cannot help.
    """
    size = min(_THRESHOLD_SAMPLE, flat.numel() // 16)
    if size < _SMALLEST_SAMPLE:
        return 0.0
    sample = flat[_sample_positions(flat.numel(), size, flat.device)]
    above = math.ceil(_CANDIDATE_MARGIN * n_keep / flat.numel() * size) + 16
    if above >= sample.numel():
        return 0.0
    return sample.kthvalue(sample.numel() - above).values.clamp(min=0.0)


def batch_topk_entries(hidden_pre: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n_keep`` largest positive entries of ``hidden_pre [n_tokens, d_sae]``, token-major.

    The same entries as a dense ``topk`` over the flattened matrix (ties at
    the cut-off are broken by position, where a dense top-k breaks them
    arbitrarily); fewer when fewer are positive. Instead of ranking all
    ``n_tokens * d_sae`` values, entries above a threshold estimated from a
    sample are ranked; when fewer than ``n_keep`` pass it, every positive entry
    is ranked instead, so the result never depends on the estimate.
    """
    d_sae = hidden_pre.shape[-1]
    flat = hidden_pre.reshape(-1)
    if n_keep <= 0:
        nothing = torch.zeros(0, dtype=torch.long, device=flat.device)
        return nothing, nothing
    # The host synchronisation BatchTopK needs: how many entries pass the
    # threshold decides the shapes of everything that follows.
    candidates = (flat > _candidate_threshold(flat, n_keep)).nonzero().squeeze(1)
    if candidates.numel() < n_keep:
        candidates = (flat > 0).nonzero().squeeze(1)
    if candidates.numel() > n_keep:
        values = flat[candidates]
        cutoff = values.kthvalue(values.numel() - n_keep + 1).values
        # at least n_keep candidates reach the cut-off; the first n_keep of them
        # (ties broken by position) have a static size, so no synchronisation
        kept = torch.nonzero_static(values >= cutoff, size=n_keep).squeeze(1)
        candidates = candidates[kept]
    return candidates // d_sae, candidates % d_sae


def topk_entries(hidden_pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``k`` largest entries of ``hidden_pre [n_tokens, d_sae]``, token-major.

    Exactly ``k`` per token, whatever their sign, so the shapes are static (no
    host synchronisation); TopK's ReLU zeroes the non-positive ones afterwards.
    """
    latent = hidden_pre.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    token = torch.arange(hidden_pre.shape[0], device=hidden_pre.device).repeat_interleave(k)
    return token, latent.reshape(-1)


def topk(hidden_pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each token's ``k`` largest pre-activations (then ReLU)."""
    top = hidden_pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
