"""What a model folder may make the engine open: its own regular files, of sane sizes, and nothing else.

A model folder is a stranger's: a hub repo, a mirror, a copy from a friend. transformers opens the
files it finds by name (config, tokenizer, chat template, the shard index and the shards it names)
and follows their links. So before anything is loaded, every file a loader may open must resolve
inside the folder (or, for a hub-cache snapshot, inside that repo's ``blobs``, where the snapshot's
links point), must be a regular file (reading a FIFO or a device hangs or never ends), and, unless
it holds weights, must be small enough to parse: a 200 MB ``tokenizer.json`` holding one huge added
token made the tokenizer allocate 15 GB and abort.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from expertswap.protocol.errors import ModelFormatError, ModelNotFoundError

INDEX = "model.safetensors.index.json"
TEMPLATES = "additional_chat_templates"  # the one subfolder transformers reads (named chat templates)
_PARSED = (".json", ".jinja", ".txt")  # files parsed as text, which get a size cap
MAX_METADATA_BYTES = 16 * 2**20  # a config, a template, a tokenizer config
_LARGER = {"tokenizer.json": 64 * 2**20, INDEX: 64 * 2**20}  # the largest real ones are about 35 and 10 MB
MAX_ADDED_TOKEN_CHARS = 1024  # real added tokens are a few characters; each costs ~90x its length to build


def check_model_folder(folder: str | os.PathLike) -> Path:
    """The folder, once it holds a config and safetensors weights, and every file a loader may open is safe."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ModelNotFoundError(f"not a folder: {path}")
    if not (path / "config.json").exists():
        raise ModelFormatError(f"no config.json in {path}: not a Hugging Face model folder")
    roots = _roots(path)
    templates = path / TEMPLATES
    # every name, not only the ones transformers asks for: on macOS and Windows "Tokenizer.JSON" is opened too
    for entry in [*sorted(path.iterdir()), *(sorted(templates.iterdir()) if templates.is_dir() else [])]:
        if not entry.is_dir() or entry.name.casefold().endswith((*_PARSED, ".safetensors")):  # a folder "x.json" too
            _check_file(entry, roots)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        found = "pytorch_model.bin" if any(path.glob("*.bin")) else "none"
        raise ModelFormatError(
            f"no .safetensors weights in {path} (found: {found}); ExpertSwap loads safetensors only"
        )
    if (path / INDEX).exists():
        _check_index(path, {w.name for w in weights})
    _check_added_tokens(path)
    return path


def read_json_object(path: Path, what: str, limit: int = MAX_METADATA_BYTES) -> dict:
    """A JSON file of at most ``limit`` bytes that must hold an object (a dict), or a typed error naming it."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise ModelFormatError(f"{what} {path} has {size:,} bytes, more than the {limit:,} allowed")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelFormatError(f"cannot read {what} {path}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data


def _roots(folder: Path) -> tuple[Path, ...]:
    """Where the folder's files may really lie: itself, and a hub-cache snapshot's ``blobs``."""
    here = folder.resolve()
    if here.parent.name == "snapshots":
        return here, here.parent.parent / "blobs"
    return (here,)


def _in_a_hub_cache(real: Path) -> bool:
    """A blob of some repo in a hub cache: where ``hf download --local-dir`` (before huggingface_hub 0.23)
    and hand-made folders of links point. Its bytes came from the hub, as a download's would."""
    return real.parent.name == "blobs" and real.parent.parent.name.startswith("models--")


def _check_file(file: Path, roots: tuple[Path, ...]) -> None:
    try:
        real = file.resolve(strict=True)
    except (OSError, RuntimeError):  # a dangling or looping link
        raise ModelFormatError(f"{file} is not a regular file: a broken or looping link") from None
    if not any(real.is_relative_to(root) for root in roots) and not _in_a_hub_cache(real):
        raise ModelFormatError(f"{file.name} in {file.parent} points outside the model folder (to {real})")
    if not real.is_file():  # a folder, a FIFO (reading it would hang), a device
        raise ModelFormatError(f"{file} is not a regular file")
    name = file.name.casefold()
    limit = _LARGER.get(name, MAX_METADATA_BYTES)
    size = real.stat().st_size
    if name.endswith(_PARSED) and size > limit:
        raise ModelFormatError(f"{file.name} in {file.parent} has {size:,} bytes, more than the {limit:,} allowed")


def _check_index(folder: Path, shards: set[str]) -> None:
    """The shard index may name only safetensors files lying in the folder itself."""
    weight_map = read_json_object(folder / INDEX, "the shard index", _LARGER[INDEX]).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelFormatError(f"{INDEX} in {folder} has no weight_map object")
    for key, name in weight_map.items():
        if not isinstance(name, str) or name not in shards:
            raise ModelFormatError(f"{INDEX} in {folder} maps {key!r} to {name!r}, which is not a safetensors "
                                   "file of the folder")


def _strings(value: object) -> list[str]:
    """Every string inside a JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _check_added_tokens(folder: Path) -> None:
    """No token a tokenizer adds may be longer than ``MAX_ADDED_TOKEN_CHARS``: building one costs memory many
    times its length. Tokens are added from the tokenizer files, the special tokens the config names (any
    ``*_token`` or ``*_tokens`` field), ``special_tokens_map.json`` and ``added_tokens.json``."""
    config = read_json_object(folder / "tokenizer_config.json", "the tokenizer config") \
        if (folder / "tokenizer_config.json").exists() else {}
    tokens = _strings({k: v for k, v in config.items() if k.endswith(("_token", "_tokens", "_tokens_decoder"))})
    fast = config.get("fast_tokenizer_files", [])
    if not isinstance(fast, list) or not all(isinstance(f, str) and (folder / f).parent == folder for f in fast):
        raise ModelFormatError(f"tokenizer_config.json in {folder}: fast_tokenizer_files must name files of the "
                               f"folder itself, got {fast!r}")
    for name in {"tokenizer.json", *fast}:
        if (folder / name).exists():
            added = read_json_object(folder / name, "the tokenizer", _LARGER["tokenizer.json"]).get("added_tokens")
            tokens += _strings([t.get("content") for t in added if isinstance(t, dict)] if isinstance(added, list)
                               else [])
    if (folder / "special_tokens_map.json").exists():
        tokens += _strings(read_json_object(folder / "special_tokens_map.json", "the special tokens map"))
    if (folder / "added_tokens.json").exists():
        tokens += list(read_json_object(folder / "added_tokens.json", "the added tokens"))
    longest = max(tokens, key=len, default="")
    if len(longest) > MAX_ADDED_TOKEN_CHARS:
        raise ModelFormatError(f"the tokenizer in {folder} adds a token of {len(longest):,} characters "
                               f"(at most {MAX_ADDED_TOKEN_CHARS} are allowed)")
