"""Download a model from the Hugging Face hub: safetensors and metadata only, with progress, cancel, resume.

The revision asked for is pinned to its commit first and every file comes from that commit, so one
download is one snapshot even if the hub moves meanwhile. The listing is a stranger's text: every name
in it is checked before any byte is written, and none may lead outside the folder.

Files stream into ``<name>.part`` next to their final place; a cancelled or broken download keeps the
part, and the next try asks for the rest with an HTTP Range request, but only when
``.expertswap-download.json`` says the part was fetched for the content the hub lists now (its sha256,
or git blob id for small files): a part of a file that has since changed on the hub is started over.
A finished file takes its name only once its bytes on disk hash to what the hub lists. A file the record
does not know (a folder fetched before the record existed) is hashed and kept when it matches, so
downloading again does not fetch tens of GB again. The file list comes from huggingface_hub (which also
supplies the token for gated repos); bytes come over plain HTTPS, and the token never follows a redirect
to another host (the hub sends LFS files to a CDN).
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, TypeVar

from expertswap.protocol.errors import ExpertSwapError, ModelNotFoundError

if TYPE_CHECKING:
    from huggingface_hub.hf_api import RepoFile, RepoFolder

PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]
CHUNK = 1 << 20
RECORD = ".expertswap-download.json"

T = TypeVar("T")


class DownloadError(ExpertSwapError):
    """The hub could not be reached, a file broke off or did not match its hash, or the listing names a path
    outside the folder; a part that arrived intact is kept for the next try."""


class DownloadCancelled(ExpertSwapError):
    """The user stopped the download; what arrived so far is kept for the next try."""


@dataclass(frozen=True)
class _File:
    """One file to fetch: its path in the repo, its listed size, and the hash its bytes must have."""

    name: str
    size: int
    digest: str  # the LFS sha256 of the content, or (small files) git's blob id
    lfs: bool

    def hash_of(self, path: Path) -> str:
        """The hash of ``path`` computed the way the hub lists this file's: sha256 for LFS files, otherwise
        git's blob id (sha1 of ``blob <size>\\0`` and the content). Read from disk, so a bad write shows too."""
        hasher = hashlib.sha256() if self.lfs else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
        with path.open("rb") as data:
            while chunk := data.read(CHUNK):
                hasher.update(chunk)
        return hasher.hexdigest()


def _ask_hub(repo_id: str, call: Callable[[], T]) -> T:
    """Run one huggingface_hub API call, turning its errors into ours."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return call()
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"{repo_id} was not found on the Hugging Face hub (or needs a login)") from exc
    except Exception as exc:  # offline, DNS, TLS, proxy: huggingface_hub's HTTP client raises its own kinds
        raise DownloadError(f"cannot reach the Hugging Face hub to list {repo_id}: {exc}".splitlines()[0]) from exc


def _check_name(name: str, folder: Path) -> None:
    """Refuse a listed name that is absolute, holds a backslash or NUL, has an empty, ``.`` or ``..`` part, or
    resolves outside ``folder`` (through a link already there): written as given, it would land elsewhere."""
    inside = folder.resolve()
    if (any(c in name for c in "\\\0") or any(part in ("", ".", "..") for part in name.split("/"))
            or not (inside / name).resolve().is_relative_to(inside)):
        raise DownloadError(f"the hub's listing names {name!r}, a path outside the download folder; nothing was "
                            "downloaded")


def _wanted(name: str) -> bool:
    """Whether a (checked) name is one we fetch: its base name must match a pattern. fnmatch on the whole path
    would let ``*`` cross ``/``, so ``tokenizer*`` would take ``tokenizer/pytorch_model.bin``."""
    base = name.rsplit("/", 1)[-1]
    return name != RECORD and any(fnmatch.fnmatch(base, pattern) for pattern in PATTERNS)


def _files(tree: Iterable[RepoFile | RepoFolder], folder: Path) -> list[_File]:
    """The files to fetch from the listing, once every file name in it has been checked."""
    from huggingface_hub.hf_api import RepoFile

    listed = [f for f in tree if isinstance(f, RepoFile)]
    for f in listed:
        _check_name(f.path, folder)
    return [_File(f.path, f.size, f.lfs.sha256 if f.lfs else f.blob_id, f.lfs is not None)
            for f in listed if _wanted(f.path)]


def _pinned_listing(repo_id: str, revision: str, endpoint: str | None, folder: Path) -> tuple[str, list[_File]]:
    """The commit ``revision`` points at now, and the wanted files of that commit."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint)
    commit = _ask_hub(repo_id, lambda: api.repo_info(repo_id, revision=revision).sha)
    if not commit:
        raise DownloadError(f"the Hugging Face hub gave no commit for {repo_id} at {revision}")
    tree = _ask_hub(repo_id, lambda: list(api.list_repo_tree(repo_id, recursive=True, revision=commit)))
    return commit, _files(tree, folder)


def _read_record(folder: Path) -> dict[str, str]:
    """Per file name, the hash its part or finished file was fetched for; empty when there is no record."""
    try:
        files = json.loads((folder / RECORD).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return files if isinstance(files, dict) else {}


def _write_record(folder: Path, commit: str, files: dict[str, str]) -> None:
    """Save the record; the commit is there for people and tools, resuming goes by the hashes."""
    (folder / RECORD).write_text(json.dumps({"commit": commit, "files": files}, indent=1))


class _DropAuthOnHostChange(urllib.request.HTTPRedirectHandler):
    """urllib copies every header onto a redirect, so the hub's redirect of an LFS file to its CDN would hand
    the user's token to the CDN; a redirect to another host goes without Authorization."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: http.client.HTTPMessage, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_DropAuthOnHostChange)


def _already_here(file: _File, target: Path, record: dict[str, str]) -> bool:
    """Whether ``target`` already is the file: it has the listed size and the record says it was fetched and
    checked for this content or, when the record has no entry for it (a folder fetched before the record
    existed, or the record lost), its bytes hash to the hub's. Reading it is far cheaper than fetching it."""
    if not target.is_file() or target.stat().st_size != file.size:
        return False
    if file.name in record:
        return record[file.name] == file.digest
    return file.hash_of(target) == file.digest


def _clear_stale(file: _File, target: Path, part: Path, record: dict[str, str]) -> None:
    """Remove what must not be kept: a finished file of other content (the hub has moved on), and a part
    fetched for other content or already longer than the file (resuming from it could never end right). A
    part the record has no entry for is removed too: nothing says what content it was fetched for."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    if record.get(file.name) != file.digest or (part.exists() and part.stat().st_size > file.size):
        part.unlink(missing_ok=True)


@dataclass
class _Transfer:
    """One call of ``download``: where the bytes come from, where progress goes, and how far it has got."""

    repo_id: str
    commit: str
    endpoint: str | None
    headers: dict[str, str]
    cancel: threading.Event
    progress: Callable[[int, int], None] | None
    total: int
    done: int = 0

    def _advance(self, count: int) -> None:
        self.done += count
        if self.progress is not None:
            self.progress(self.done, self.total)

    def put(self, file: _File, folder: Path, record: dict[str, str]) -> None:
        """Put one file in place, checked against its hash; a file that fails the check is fetched again from
        the start once, and failing twice is an error."""
        target = folder / file.name
        part = target.with_name(target.name + ".part")
        if _already_here(file, target, record):
            self.done += file.size  # fetched by an earlier try (or an earlier version) and checked
            if file.name not in record:
                record[file.name] = file.digest
                _write_record(folder, self.commit, record)
            return
        _clear_stale(file, target, part, record)
        record[file.name] = file.digest
        _write_record(folder, self.commit, record)
        for _ in range(2):
            self._fill(file, part)
            if file.hash_of(part) == file.digest:
                part.replace(target)
                return
            part.unlink()
            self.done -= file.size
        raise DownloadError(f"{file.name} of {self.repo_id} twice arrived with bytes that do not match the hub's hash")

    def _fill(self, file: _File, part: Path) -> None:
        """Bring the part up to the file's listed size, resuming it with a Range request."""
        start = part.stat().st_size if part.exists() else 0
        if start == file.size:  # complete, not yet checked: the last try stopped in between
            self._advance(start)
            return
        with _OPENER.open(self._request(file.name, start), timeout=60) as response:
            start = start if response.status == 206 else 0  # the server ignored the range: start over
            self._advance(start)
            with part.open("ab" if start else "wb") as out:
                self._copy(response, out, file.size - start)
        if (arrived := part.stat().st_size) < file.size:
            raise DownloadError(f"{file.name} of {self.repo_id} broke off at {arrived} of {file.size} bytes; try "
                                "again to resume")

    def _request(self, name: str, start: int) -> urllib.request.Request:
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(self.repo_id, name, revision=self.commit, endpoint=self.endpoint)
        return urllib.request.Request(url, headers={**self.headers, **({"Range": f"bytes={start}-"} if start else {})})

    def _copy(self, response: http.client.HTTPResponse, out: BinaryIO, left: int) -> None:
        """Write at most ``left`` bytes of the body: a body longer than the listed size is cut there (and the
        hash then says whether what came is the file)."""
        while left > 0 and (chunk := response.read(min(CHUNK, left))):
            if self.cancel.is_set():
                raise DownloadCancelled(f"download of {self.repo_id} stopped; downloading again resumes it")
            out.write(chunk)
            left -= len(chunk)
            self._advance(len(chunk))


def download(
    repo_id: str,
    folder: Path,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    revision: str = "main",
    endpoint: str | None = None,
) -> Path:
    """Fetch ``repo_id`` at ``revision`` into ``folder`` (weights from safetensors only; never code) and return
    it; nothing is written if the listing names a path outside the folder."""
    from huggingface_hub import get_token

    commit, files = _pinned_listing(repo_id, revision, endpoint, folder)
    token = get_token()
    transfer = _Transfer(repo_id, commit, endpoint, {"Authorization": f"Bearer {token}"} if token else {},
                         cancel or threading.Event(), progress, sum(f.size for f in files))
    record = _read_record(folder)
    for file in files:
        try:
            transfer.put(file, folder, record)
        except (OSError, http.client.HTTPException) as exc:  # network gone, timeout, cut body, or the disk is full
            raise DownloadError(f"download of {repo_id} broke off at {file.name}: {exc}; try again to resume"
                                .splitlines()[0]) from exc
    if progress is not None:
        progress(transfer.total, transfer.total)
    return folder
