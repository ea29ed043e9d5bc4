"""Several sets of a step's entries through one weight, and one gradient kernel call for all of them.

With dead latents a step differentiates two sets of ``(token, latent)``
entries through ``W_enc`` and ``W_dec``: the ones the activation kept and
the ones the dead-latent loss picked (one set per level with
``use_matryoshka_aux_loss``). Each set's function would give each weight a
gradient of its own, and autograd would sum them into new memory: on one
2-thread AMD EPYC at the default benchmark size about 35 ms of adding, the
sum's 48 MiB faulted in and freed by ``zero_grad``, per weight and step. And
the dead-latent loss's set cannot join the first set's function: how many
latents are dead, which fixes its shapes, is read back with the step's one
host read, after the first set has been decoded.

So the first set's function (``encoder_backward.SparseEncoderValues``,
``level_decode.GroupDecode``) returns, beside its result, a *link*: an empty
tensor that each later set's function takes as an input. Autograd then runs
every later set's backward before the first set's (which waits for the
link's gradient) and runs the first set's whenever a later set's runs (a
later set's result depends on it through the link). Each later set leaves
its entries and their gradients in :class:`LaterGradients` and gives the
link an empty gradient; the first set's backward computes the weight's
gradient over all the sets in one kernel call, into one block of memory.
A backward pass that reaches only the first set sees nothing left and
computes its own set's gradient alone.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import torch

Item = TypeVar("Item")


class LaterGradients(Generic[Item]):
    """What the later sets' backward passes leave for the first set's: one item per set, as they ran."""

    def __init__(self) -> None:
        self._items: list[Item] = []

    def leave(self, item: Item) -> None:
        self._items.append(item)

    def take(self) -> list[Item]:
        """Everything left since the last take (a graph run backward twice leaves it twice)."""
        items, self._items = self._items, []
        return items


class EntrySets(Generic[Item]):
    """A step's sets of entries through one weight: the first set's link, once made, and what later sets leave.

    Held by the step's encoding, never by the graph (whose functions hold only
    :attr:`later`), so that the link, whose ``grad_fn`` is the first set's
    function, makes no reference cycle through it.
    """

    def __init__(self) -> None:
        self.later: LaterGradients[Item] = LaterGradients()
        #: the first set's link; None until a first set has run with a graph
        self.link: torch.Tensor | None = None
