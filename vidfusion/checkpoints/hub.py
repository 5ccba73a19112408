"""The one Hugging Face Hub helper: a repo's needed files into huggingface_hub's cache, or, without network access,
what the cache already holds. Checkpoints (loading.py) and LoRAs (lora_formats.py) both come through here."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import CheckpointNotFoundError


def looks_like_repo_id(text: str) -> bool:
    """"owner/name" and not a local path (a path that exists is never a repo id)."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists()


def hub_folder(repo_id: str, wanted: Callable[[list[str]], list[str]], revision: str | None = None,
               what: str = "checkpoint") -> Path:
    """Download the files `wanted(every file name of the repo)` returns and give the snapshot folder. When the Hub
    cannot be reached (no network, unknown repo, auth) the snapshot already in the cache is used, and failing
    that, a CheckpointNotFoundError says how to work offline."""
    from huggingface_hub import HfApi, snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or not hub_reachable()
    try:
        if offline:  # no retries against a network that is not there: the cache, or one line saying what to do
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        files = HfApi().list_repo_files(repo_id, revision=revision)
    except Exception as exc:
        try:
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:
            reason = "the Hub cannot be reached (no network)" if offline else \
                f"the Hub answered {type(exc).__name__}: {str(exc)[:200]}"
            raise CheckpointNotFoundError(
                f"{what} '{repo_id}' is not in the local Hugging Face cache and {reason}. On a machine with network: "
                f"`hf download {repo_id}`, then copy the cache (~/.cache/huggingface) here or pass the downloaded "
                "folder; with the files cached, HF_HUB_OFFLINE=1 skips the network") from None
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=wanted(files)))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the Hub's host ($HF_ENDPOINT), once per process: "no network" is found in
    seconds instead of after huggingface_hub's retries."""
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """One file of a repo (e.g. a shard index read while choosing what else to fetch), through the cache."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision))
