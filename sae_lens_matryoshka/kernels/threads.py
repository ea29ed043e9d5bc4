"""torch's intra-op threads, set aside where they only add synchronisation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch on one thread (its intra-op threads), restored after; also a decorator.

    The thread count is the process's: torch operations another Python
    thread runs meanwhile run on one thread too. Where tensors are small or
    cores are shared, intra-op threads only add synchronisation (see
    :func:`~.encoder_backward.latent_major_order`, and ``toy.model``'s tiny tensors).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
