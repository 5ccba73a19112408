"""The one Hugging Face Hub helper: a repo's needed files into huggingface_hub's cache, or, without network access,
what the cache already holds. Checkpoints (loading.py) and LoRAs (lora_formats.py) both come through here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
    except Exception as exc:
        try:
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:
            raise CheckpointNotFoundError(
                f"could not get {what} '{repo_id}' from the Hugging Face Hub ({type(exc).__name__}: "
                f"{str(exc)[:200]}). Without network access, download it elsewhere (huggingface-cli download "
                f"{repo_id}) and pass its local folder or file") from None
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=wanted(files)))


def hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """One file of a repo (e.g. a shard index read while choosing what else to fetch), through the cache."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision))
