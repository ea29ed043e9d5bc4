"""A Hub download that fails for want of the Hub, said with its repo, file and remedy.

huggingface_hub reports a file that is neither in the local cache nor
downloadable (``HF_HUB_OFFLINE=1``, no network, ``local_files_only=True``) as
``LocalEntryNotFoundError: An error happened while trying to locate the file
on the Hub and we cannot find the requested files in the local cache``: it
names neither the repo nor the file, so someone loading
``SAE.from_pretrained(repo, sae_id)`` offline cannot tell what to download.
The repo, revision and file survive only further down the error's chain: in
the URL the request was for (``OfflineModeIsEnabled``'s message, a connection
error's ``request``) or in the message of ``local_files_only``.
:func:`find_hub_miss` reads them back, and :class:`HubFileNotCached` says them
with what to do.

:func:`hub_misses_named` raises that error in place of the bare one around
any download; :func:`install` puts it around SAELens's SAELens-format Hub
loader (what ``SAE.from_pretrained`` uses for a Hub repo and for most
releases). This module imports nothing of the plugin, so any module of it,
``loaders`` included, can use it.
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

import huggingface_hub.constants
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from sae_lens.loading.pretrained_sae_loaders import (
    NAMED_PRETRAINED_SAE_LOADERS,
    PretrainedSaeHuggingfaceLoader,
)

#: what a download raises, somewhere in its chain, when the Hub cannot be reached:
#: nothing cached offline (huggingface_hub), a refused or failed connection
#: (``ConnectionError``, also ``datasets``' and ``OfflineModeIsEnabled``), an
#: unresolvable host name
HUB_UNREACHABLE = (LocalEntryNotFoundError, ConnectionError, socket.gaierror)

#: a file URL as ``hf_hub_url`` builds it: endpoint, optional repo-type prefix,
#: repo id (``owner/name``, or a bare legacy ``name``), quoted revision, file
_RESOLVE_URL = re.compile(
    r"https?://[^/\s]+/(?:(?P<prefix>datasets|spaces|kernels)/)?"
    r"(?P<repo>[^/\s]+(?:/[^/\s]+)?)/resolve/(?P<revision>[^/\s]+)/(?P<file>[^\s:'\"]+)"
)
#: the ``local_files_only=True`` message of ``_get_metadata_or_catch_error``
_LOCAL_ONLY = re.compile(
    r"repo_id: (?P<repo>[^,]+), repo_type: (?P<type>[^,]+), revision: (?P<revision>[^,]+), "
    r"filename: (?P<file>[^)]+)\)"
)
_PREFIX_TYPES = {"datasets": "dataset", "spaces": "space", "kernels": "kernel"}

Reason = Literal["offline", "local_files_only", "unreachable"]


@dataclass(frozen=True)
class HubMiss:
    """What was asked of the Hub and why it could not be given.

    ``filename`` is None when the error named only the repo; ``detail`` is the
    connection error's first line when the Hub could not be reached.
    """

    repo_id: str
    filename: str | None
    revision: str | None
    repo_type: str
    reason: Reason
    detail: str = ""

    def download_command(self) -> str:
        """The ``hf`` command that puts what was missing into the cache.

        A file inside a folder (an SAE id's folder: ``cfg.json``,
        ``sae_weights.safetensors``, ``sparsity.safetensors``) brings its whole
        folder, so the next file of the same load is there too; anything else,
        the repo.
        """
        parts = ["hf download", self.repo_id]
        if self.repo_type != "model":
            parts.append(f"--repo-type {self.repo_type}")
        if self.revision not in (None, "main"):
            parts.append(f"--revision {self.revision}")
        if self.filename is not None and "/" in self.filename:
            parts.append(f"--include '{self.filename.rsplit('/', 1)[0]}/*'")
        return " ".join(parts)

    def what(self) -> str:
        """What is missing, where it was looked for, and what kept the Hub from giving it."""
        kind = "" if self.repo_type == "model" else f"{self.repo_type} "
        named = f"{kind}repo {self.repo_id!r}"
        if self.filename is not None:
            named += f" file {self.filename!r}"
        if self.revision not in (None, "main"):
            named += f" at revision {self.revision!r}"
        cache = huggingface_hub.constants.HF_HUB_CACHE
        return f"{named} is not in the local Hugging Face cache ({cache}) and {self.why()}"

    def why(self) -> str:
        """What kept the Hub from giving the file."""
        return {
            "offline": "HF_HUB_OFFLINE=1 is set, so the Hub is not asked",
            "local_files_only": "local_files_only=True was given, so the Hub is not asked",
            "unreachable": f"the Hub ({huggingface_hub.constants.ENDPOINT}) could not be "
            f"reached ({self.detail or 'connection failed'})",
        }[self.reason]

    def remedy(self) -> str:
        """What to do, in the order most people can do it."""
        first = {
            "offline": "run once with network (HF_HUB_OFFLINE unset)",
            "local_files_only": "run once with network and local_files_only=False",
            "unreachable": "check the network, proxy and HF_ENDPOINT",
        }[self.reason]
        return (
            f"{first}, or download it with `{self.download_command()}` where there is network "
            "and bring that cache here, or point HF_HUB_CACHE (or HF_HOME) at a cache that has it"
        )


class HubFileNotCached(LocalEntryNotFoundError):
    """A Hub file that is not in the local cache, and the Hub could not be asked for it.

    A ``LocalEntryNotFoundError`` (so a ``FileNotFoundError``), as the bare
    error it replaces, so code catching that still does; ``miss`` holds the
    repo, file, revision and reason the message gives.
    """

    def __init__(self, message: str, miss: HubMiss | None = None) -> None:
        super().__init__(message)
        self.miss = miss

    @classmethod
    def of(cls, miss: HubMiss, context: str | None = None) -> HubFileNotCached:
        """The error for ``miss``; ``context`` (e.g. the release and SAE id asked for) leads."""
        lead = f"{context}: " if context else ""
        return cls(f"{lead}{miss.what()}: {miss.remedy()}.", miss)


def _request_url(error: BaseException) -> str | None:
    """The URL of the request ``error`` was raised for (httpx errors carry it), if any."""
    try:
        request = getattr(error, "request", None)
    except RuntimeError:  # httpx: "The .request property has not been set"
        return None
    url = getattr(request, "url", None)
    return None if url is None else str(url)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def find_hub_miss(error: BaseException, repo_id: str | None = None) -> HubMiss | None:
    """The repo, file and revision a download failed for want of the Hub, read from ``error``'s chain.

    None when ``error`` was not raised for want of the Hub. When the chain
    names no repo (some callers drop the URL), ``repo_id`` stands in for it,
    without a file; with neither, None.
    """
    chain = list(_chain(error))
    for link in chain:
        if isinstance(link, HubFileNotCached) and link.miss is not None:
            return link.miss
    if not any(isinstance(link, HUB_UNREACHABLE) for link in chain):
        return None
    reason: Reason = "unreachable"
    detail = ""
    for link in chain:
        if isinstance(link, OfflineModeIsEnabled):
            reason = "local_files_only" if "local_files_only" in str(link) else "offline"
            break
        if "outgoing traffic has been disabled" in str(link):
            reason = "local_files_only"
            break
    if reason == "local_files_only" and huggingface_hub.constants.is_offline_mode():
        # transformers and others pass local_files_only=True because HF_HUB_OFFLINE is set
        reason = "offline"
    if reason == "unreachable":
        # what huggingface_hub's LocalEntryNotFoundError was raised from: the connection's error
        connection = next(
            (link for link in chain if not isinstance(link, LocalEntryNotFoundError)), chain[-1]
        )
        said = str(connection).strip()
        detail = type(connection).__name__ + (f": {said.splitlines()[0][:200]}" if said else "")
    for link in chain:
        local_only = _LOCAL_ONLY.search(str(link))
        if local_only is not None:
            return HubMiss(
                local_only["repo"],
                local_only["file"],
                local_only["revision"],
                local_only["type"] if local_only["type"] != "None" else "model",
                reason,
                detail,
            )
        for text in (_request_url(link), str(link)):
            found = _RESOLVE_URL.search(text or "")
            if found is not None:
                return HubMiss(
                    unquote(found["repo"]),
                    unquote(found["file"]),
                    unquote(found["revision"]),
                    _PREFIX_TYPES.get(found["prefix"] or "", "model"),
                    reason,
                    detail,
                )
    if repo_id is None:
        return None
    return HubMiss(repo_id, None, None, "model", reason, detail)


@contextlib.contextmanager
def hub_misses_named(context: str | None = None, repo_id: str | None = None) -> Iterator[None]:
    """Raise :class:`HubFileNotCached` in place of a download inside that failed for want of the Hub.

    ``context`` leads the message (what was being loaded, e.g. the release and
    SAE id); ``repo_id`` is named when the error's chain names no repo. Every
    other error passes through unchanged.
    """
    try:
        yield
    except HubFileNotCached as error:
        if context is None or error.miss is None:
            raise
        raise HubFileNotCached.of(error.miss, context) from error
    except Exception as error:
        miss = find_hub_miss(error, repo_id)
        if miss is None:
            raise
        raise HubFileNotCached.of(miss, context) from error


def naming_hub_misses(loader: PretrainedSaeHuggingfaceLoader) -> PretrainedSaeHuggingfaceLoader:
    """A SAELens Hub loader whose failed downloads name the repo and file (see :func:`hub_misses_named`)."""

    @functools.wraps(loader)
    def named(*args: Any, **kwargs: Any) -> Any:
        # SAELens's from_pretrained passes repo_id by keyword
        with hub_misses_named(repo_id=kwargs.get("repo_id", args[0] if args else None)):
            return loader(*args, **kwargs)

    named._names_hub_misses = True  # type: ignore[attr-defined]
    result: PretrainedSaeHuggingfaceLoader = named
    return result


def _names_hub_misses(loader: Any) -> bool:
    """Whether ``loader``, or a loader it wraps, already names Hub misses."""
    while loader is not None:
        if getattr(loader, "_names_hub_misses", False):
            return True
        loader = getattr(loader, "__wrapped__", None)
    return False


def install() -> None:
    """Name Hub misses in SAELens's SAELens-format Hub loader (``SAE.from_pretrained``). Idempotent.

    Installed under ``loaders``' wrapper of the same loader (``register``
    calls this first), so that wrapper, and its ``__wrapped__``, stay as
    ``loaders`` made them. Only a failed download's error changes.
    """
    loader = NAMED_PRETRAINED_SAE_LOADERS["sae_lens"]
    if not _names_hub_misses(loader):
        NAMED_PRETRAINED_SAE_LOADERS["sae_lens"] = naming_hub_misses(loader)
