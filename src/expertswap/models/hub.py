"""Models already on this machine (no network): the Hugging Face cache and ExpertSwap's own downloads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    folder: Path  # the newest snapshot holding a config.json


def cached_models(cache: Path | None = None) -> list[CachedModel]:
    """Repos under ``cache`` (default: huggingface_hub's cache folder) with a snapshot that has config.json."""
    if cache is None:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
    found = []
    for repo in sorted(cache.glob("models--*")):
        snapshots = [p.parent for p in (repo / "snapshots").glob("*/config.json")]
        if snapshots:
            newest = max(snapshots, key=lambda p: p.stat().st_mtime)
            found.append(CachedModel(repo.name.removeprefix("models--").replace("--", "/"), newest))
    return found


def downloaded_models(root: Path) -> list[CachedModel]:
    """Folders that ``download.download`` completed under ``root`` (named org--name)."""
    return [CachedModel(p.parent.name.replace("--", "/"), p.parent) for p in sorted(root.glob("*/config.json"))]
