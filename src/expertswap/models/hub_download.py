"""Download a model from the Hugging Face hub: safetensors and metadata only, with progress, cancel, resume.

Files stream into ``<name>.part`` next to their final place; a cancelled or broken download keeps the
part, and the next try asks for the rest with an HTTP Range request. The file list comes from
huggingface_hub (which also supplies the token for gated repos); bytes come over plain HTTPS.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..engine.errors import ExpertSwapError, ModelNotFoundError

PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]
CHUNK = 1 << 20


class DownloadError(ExpertSwapError):
    """The hub could not be reached, or a file broke off; what arrived is kept for the next try."""


class DownloadCancelled(ExpertSwapError):
    """The user stopped the download; what arrived so far is kept for the next try."""


def _wanted_files(repo_id: str, revision: str, endpoint: str | None) -> list[tuple[str, int]]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    try:
        tree = [f for f in HfApi(endpoint=endpoint).list_repo_tree(repo_id, recursive=True, revision=revision)
                if hasattr(f, "size")]
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"{repo_id} was not found on the Hugging Face hub (or needs a login)") from exc
    except Exception as exc:  # offline, DNS, TLS, proxy: huggingface_hub's HTTP client raises its own kinds
        raise DownloadError(f"cannot reach the Hugging Face hub to list {repo_id}: {exc}".splitlines()[0]) from exc
    return [(f.path, f.size) for f in filter_repo_objects(tree, allow_patterns=PATTERNS, key=lambda f: f.path)]


def download(
    repo_id: str,
    folder: Path,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    revision: str = "main",
    endpoint: str | None = None,
) -> Path:
    """Fetch ``repo_id`` into ``folder`` (weights from safetensors only; never code) and return it."""
    from huggingface_hub import get_token, hf_hub_url

    cancel = cancel or threading.Event()
    files = _wanted_files(repo_id, revision, endpoint)
    total = sum(size for _, size in files)
    token = get_token()
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    done = 0
    for name, size in files:
        target = folder / name
        part = target.with_name(target.name + ".part")
        if target.exists() and target.stat().st_size == size:
            done += size
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        start = part.stat().st_size if part.exists() else 0
        url = hf_hub_url(repo_id, name, revision=revision, endpoint=endpoint)
        request = urllib.request.Request(url, headers={**auth, **({"Range": f"bytes={start}-"} if start else {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if start and response.status != 206:
                    start = 0  # the server ignored the range: start over
                done += start
                with part.open("ab" if start else "wb") as out:
                    while chunk := response.read(CHUNK):
                        if cancel.is_set():
                            raise DownloadCancelled(f"download of {repo_id} stopped; downloading again resumes it")
                        out.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
        except (urllib.error.URLError, OSError) as exc:  # network gone, timeout, or the disk is full
            raise DownloadError(f"download of {repo_id} broke off at {name}: {exc}; try again to resume") from exc
        if part.stat().st_size != size:
            raise DownloadError(f"{name} of {repo_id} arrived with {part.stat().st_size} bytes, expected {size}")
        part.replace(target)
    if progress is not None:
        progress(total, total)
    return folder
