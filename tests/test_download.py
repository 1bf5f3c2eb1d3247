"""Model download against a fake Hugging Face hub on localhost (the HTTP boundary): progress, cancel, resume,
names that would leave the folder, commits that move, bodies that do not match their hash, folders fetched before
the download record existed, and the token on a redirect to a CDN."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from expertswap.models.hub_download import RECORD, DownloadCancelled, DownloadError, download
from expertswap.protocol import ModelNotFoundError

COMMIT = "c" * 40
NEW_COMMIT = "d" * 40
FILES = {
    "config.json": b'{"model_type": "qwen3_moe"}',
    "model.safetensors": bytes(range(256)) * (100 * 1024),  # 25 MiB: more than one 10 MB read
    "pytorch_model.bin": b"pickles are never downloaded",
}
CHANGED = bytes(reversed(FILES["model.safetensors"]))  # the same size: only the hash tells them apart


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tree_entry(name: str, data: bytes) -> dict[str, object]:
    """What the hub lists for a file: safetensors are LFS (the git blob is then the pointer), the rest plain git."""
    if not name.endswith(".safetensors"):
        return {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
    lfs = {"oid": sha256, "size": len(data), "pointerSize": len(pointer)}
    return {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(pointer), "lfs": lfs}


class FakeHub(BaseHTTPRequestHandler):
    """The endpoints download uses: revision info, file tree, resolve (GET with Range). ``main`` is ``commit``;
    older commits stay fetchable by their sha; ``bodies`` are sent once each instead of a file's bytes; with
    ``cdn`` set, safetensors are redirected there, as the hub sends LFS files to its CDN."""

    requests: ClassVar[list[tuple[str, str, str | None]]] = []
    authorizations: ClassVar[list[str | None]] = []  # the Authorization header of each request
    cdn: ClassVar[str] = ""
    files: ClassVar[dict[str, bytes]] = FILES
    commit: ClassVar[str] = COMMIT
    history: ClassVar[dict[str, dict[str, bytes]]] = {}
    bodies: ClassVar[dict[str, list[bytes]]] = {}
    url: ClassVar[str] = ""

    @classmethod
    def move_to(cls, commit: str, files: dict[str, bytes]) -> None:
        """A new commit on the hub: main points at it; the one before can still be fetched by its sha."""
        cls.history = {**cls.history, cls.commit: cls.files}
        cls.commit, cls.files = commit, files

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _send(self, status: int, body: bytes, head: bool, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading (a cancel, a body cut at its listed size)

    def _at(self, revision: str) -> dict[str, bytes] | None:
        return self.files if revision in ("main", self.commit) else self.history.get(revision)

    def _answer(self, head: bool) -> None:
        self.requests.append((self.command, self.path, self.headers.get("Range")))
        self.authorizations.append(self.headers.get("Authorization"))
        path = urllib.parse.unquote(self.path.split("?")[0])
        if not path.startswith(("/api/models/org/tiny", "/org/tiny/")):
            self._send(404, b'{"error": "Repository not found"}', head, {"X-Error-Code": "RepoNotFound"})
        elif "/tree/" in path:
            files = self._at(path.split("/tree/")[1].split("/")[0]) or {}
            tree = [tree_entry(name, data) for name, data in files.items()]
            self._send(200, json.dumps(tree).encode(), head, {"Content-Type": "application/json"})
        elif path.startswith("/api/models/"):
            info = {"id": "org/tiny", "sha": self.commit, "siblings": [{"rfilename": n} for n in self.files]}
            self._send(200, json.dumps(info).encode(), head, {"Content-Type": "application/json"})
        else:
            revision, name = path.split("/resolve/", 1)[1].split("/", 1)
            self._resolve(self._at(revision), name, head)

    def _resolve(self, files: dict[str, bytes] | None, name: str, head: bool) -> None:
        if files is None or name not in files:
            self._send(404, b'{"error": "Entry not found"}', head, {"X-Error-Code": "EntryNotFound"})
            return
        if self.cdn and name.endswith(".safetensors"):
            self._send(302, b"", head, {"Location": self.cdn + self.path})
            return
        queued = self.bodies.get(name)
        data = queued.pop(0) if queued and not head else files[name]
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        if start and start >= len(data):
            self._send(416, b"", head, {"Content-Range": f"bytes */{len(data)}"})
            return
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": self.commit}
        self._send(206 if start and not head else 200, data if head else data[start:], head, headers)


@contextmanager
def fresh_hub() -> Iterator[type[FakeHub]]:
    """A fake hub of its own class (so a test may move it, queue bodies and read its requests), served on a port
    of its own until the block ends."""

    class Hub(FakeHub):
        requests: ClassVar[list[tuple[str, str, str | None]]] = []
        authorizations: ClassVar[list[str | None]] = []
        files: ClassVar[dict[str, bytes]] = dict(FILES)
        history: ClassVar[dict[str, dict[str, bytes]]] = {}
        bodies: ClassVar[dict[str, list[bytes]]] = {}

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Hub.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield Hub
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hub() -> Iterator[type[FakeHub]]:
    """A fresh fake hub per test."""
    with fresh_hub() as fake:
        yield fake


def ranges(hub: type[FakeHub], name: str) -> list[str | None]:
    """The Range header of each GET of ``name`` (None: the whole file)."""
    return [r for method, path, r in hub.requests if method == "GET" and path.endswith(f"/resolve/{hub.commit}/{name}")]


def everything_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def cancel_halfway(hub: type[FakeHub], folder: Path) -> Path:
    """Stop a download after its first MiB; returns the part it leaves."""
    cancel = threading.Event()
    with pytest.raises(DownloadCancelled):
        download("org/tiny", folder, lambda done, total: done > 2**20 and cancel.set(), cancel, endpoint=hub.url)
    part = folder / "model.safetensors.part"
    assert 0 < part.stat().st_size < len(FILES["model.safetensors"])
    return part


def test_download_reports_progress_and_skips_pickles(hub: type[FakeHub], tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    folder = download("org/tiny", tmp_path / "m", lambda done, total: seen.append((done, total)), endpoint=hub.url)
    assert everything_under(folder) == [RECORD, "config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    total = len(FILES["config.json"]) + len(FILES["model.safetensors"])
    assert seen[-1] == (total, total) and all(a <= b for (a, _), (b, _) in itertools.pairwise(seen))
    assert ranges(hub, "config.json") == ranges(hub, "model.safetensors") == [None]  # each fetched at the commit


def test_cancel_keeps_the_partial_file_and_the_next_try_resumes(hub: type[FakeHub], tmp_path: Path) -> None:
    partial = cancel_halfway(hub, tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()
    kept = partial.stat().st_size
    hub.requests.clear()
    seen: list[int] = []
    folder = download("org/tiny", tmp_path / "m", lambda done, total: seen.append(done), endpoint=hub.url)
    assert seen[0] > kept  # progress starts from what was already there
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert ranges(hub, "model.safetensors") == [f"bytes={kept}-"]  # resumed from the kept part, not restarted
    assert ranges(hub, "config.json") == []  # finished and checked the first time
    assert not partial.exists()


def test_unknown_repo_is_model_not_found(hub: type[FakeHub], tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        download("nobody/nothing", tmp_path / "m", endpoint=hub.url)


@pytest.mark.parametrize("name", [
    "../../x.json", "{tmp}/outside/x.json", "tokenizer/../../../../evil_hook.pth", "sub\\x.json", "./config.json",
    "sub//x.json", "sub/./x.json",
])
def test_a_listed_name_that_leaves_the_folder_is_refused_before_anything_is_written(
        hub: type[FakeHub], tmp_path: Path, name: str) -> None:
    name = name.format(tmp=tmp_path)
    hub.files = {**FILES, name: b"{}"}
    with pytest.raises(DownloadError) as error:
        download("org/tiny", tmp_path / "a" / "b" / "c" / "m", endpoint=hub.url)
    assert repr(name) in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.rglob("*")) == []  # not even config.json: the whole listing is checked first
    assert ranges(hub, "config.json") == []


def test_a_name_through_a_link_out_of_the_folder_is_refused(hub: type[FakeHub], tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer").symlink_to(tmp_path / "elsewhere")
    hub.files = {**FILES, "tokenizer/tokenizer.json": b"{}"}
    with pytest.raises(DownloadError, match=r"tokenizer/tokenizer\.json"):
        download("org/tiny", tmp_path / "m", endpoint=hub.url)
    assert everything_under(tmp_path) == []


def test_patterns_match_the_base_name_so_star_does_not_cross_a_slash(hub: type[FakeHub], tmp_path: Path) -> None:
    hub.files = {**FILES, "tokenizer/pytorch_model.bin": b"a pickle", "tokenizer_extra/hook.pth": b"import os",
                 "onnx/config.json": b"{}"}
    folder = download("org/tiny", tmp_path / "m", endpoint=hub.url)
    assert everything_under(folder) == [RECORD, "config.json", "model.safetensors", "onnx/config.json"]


def test_every_file_comes_from_the_commit_pinned_at_the_start(hub: type[FakeHub], tmp_path: Path) -> None:
    def push_after_the_config(done: int, total: int) -> None:
        if done == len(FILES["config.json"]) and hub.commit == COMMIT:
            hub.move_to(NEW_COMMIT, {**FILES, "model.safetensors": CHANGED})

    folder = download("org/tiny", tmp_path / "m", push_after_the_config, endpoint=hub.url)
    assert hub.commit == NEW_COMMIT  # the hub did move mid-download
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]  # one snapshot, not a mix


def test_a_resume_after_the_hub_moved_starts_a_changed_file_over(hub: type[FakeHub], tmp_path: Path) -> None:
    part = cancel_halfway(hub, tmp_path / "m")
    hub.move_to(NEW_COMMIT, {**FILES, "model.safetensors": CHANGED})
    folder = download("org/tiny", tmp_path / "m", endpoint=hub.url)
    assert (folder / "model.safetensors").read_bytes() == CHANGED  # not the old prefix glued to the new tail
    assert ranges(hub, "model.safetensors") == [None] and not part.exists()
    assert json.loads((folder / RECORD).read_text())["commit"] == NEW_COMMIT


def test_a_resume_after_the_hub_moved_keeps_an_unchanged_part(hub: type[FakeHub], tmp_path: Path) -> None:
    kept = cancel_halfway(hub, tmp_path / "m").stat().st_size
    hub.move_to(NEW_COMMIT, {**FILES, "README.md": b"a typo fixed"})
    folder = download("org/tiny", tmp_path / "m", endpoint=hub.url)
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert ranges(hub, "model.safetensors") == [f"bytes={kept}-"]


def test_a_finished_file_that_changed_on_the_hub_is_fetched_again(hub: type[FakeHub], tmp_path: Path) -> None:
    download("org/tiny", tmp_path / "m", endpoint=hub.url)
    new_config = FILES["config.json"].replace(b"qwen3_moe", b"olmoe_moe")  # the same size
    hub.move_to(NEW_COMMIT, {**FILES, "config.json": new_config})
    folder = download("org/tiny", tmp_path / "m", endpoint=hub.url)
    assert (folder / "config.json").read_bytes() == new_config
    assert ranges(hub, "model.safetensors") == []  # unchanged: kept


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])  # git blob id, LFS sha256
def test_a_body_that_fails_its_hash_is_fetched_again_from_the_start(hub: type[FakeHub], tmp_path: Path,
                                                                    name: str) -> None:
    hub.bodies[name] = [bytes(len(FILES[name]))]
    folder = download("org/tiny", tmp_path / "m", endpoint=hub.url)
    assert (folder / name).read_bytes() == FILES[name]
    assert ranges(hub, name) == [None, None]


def test_failing_the_hash_twice_is_a_download_error(hub: type[FakeHub], tmp_path: Path) -> None:
    hub.bodies["model.safetensors"] = [CHANGED, CHANGED]
    with pytest.raises(DownloadError, match=r"model\.safetensors of org/tiny .* do not match the hub's hash"):
        download("org/tiny", tmp_path / "m", endpoint=hub.url)
    assert everything_under(tmp_path / "m") == [RECORD, "config.json"]  # no wrong file, no part to resume from


def test_a_body_longer_than_listed_is_cut_at_the_listed_size(hub: type[FakeHub], tmp_path: Path) -> None:
    hub.bodies["model.safetensors"] = [FILES["model.safetensors"] + b"\xff" * (3 * 2**20)]
    folder = download("org/tiny", tmp_path / "m", endpoint=hub.url)
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert everything_under(folder) == [RECORD, "config.json", "model.safetensors"]


@pytest.mark.parametrize(("tail", "expected"), [
    (b"\xff" * 2**20, [None]),  # longer than the file: never resumed from, fetched again whole
    (None, []),  # complete (killed before it took its name): checked and kept, nothing fetched
])
def test_a_part_left_at_or_past_the_listed_size(hub: type[FakeHub], tmp_path: Path, tail: bytes | None,
                                                expected: list[str | None]) -> None:
    part = cancel_halfway(hub, tmp_path / "m")
    with part.open("ab") as out:
        out.write(FILES["model.safetensors"][part.stat().st_size:] + (tail or b""))
    hub.requests.clear()
    folder = download("org/tiny", tmp_path / "m", endpoint=hub.url)
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert ranges(hub, "model.safetensors") == expected and not part.exists()


def fetched(hub: type[FakeHub]) -> list[str]:
    """The paths of every file GET the hub answered."""
    return [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]


def left_by_an_earlier_version(folder: Path, files: dict[str, bytes]) -> None:
    """A folder as the download left it before it kept a record: the finished files and nothing else."""
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)


def test_a_finished_folder_with_no_record_is_checked_and_nothing_is_fetched_again(hub: type[FakeHub],
                                                                                  tmp_path: Path) -> None:
    wanted = {name: FILES[name] for name in ("config.json", "model.safetensors")}
    left_by_an_earlier_version(tmp_path / "m", wanted)
    folder = download("org/tiny", tmp_path / "m", endpoint=hub.url)
    assert fetched(hub) == []
    assert everything_under(folder) == [RECORD, *wanted]
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    recorded = json.loads((folder / RECORD).read_text())["files"]  # checked, so recorded
    assert recorded == {"config.json": git_blob_id(FILES["config.json"]),
                        "model.safetensors": hashlib.sha256(FILES["model.safetensors"]).hexdigest()}
    download("org/tiny", tmp_path / "m", endpoint=hub.url)  # now recorded: kept again without a fetch
    assert fetched(hub) == []


def test_one_damaged_file_in_a_folder_with_no_record_is_the_only_one_fetched(hub: type[FakeHub],
                                                                             tmp_path: Path) -> None:
    left_by_an_earlier_version(tmp_path / "m", {"config.json": FILES["config.json"], "model.safetensors": CHANGED})
    folder = download("org/tiny", tmp_path / "m", endpoint=hub.url)
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert ranges(hub, "model.safetensors") == [None] and ranges(hub, "config.json") == []


def test_a_part_with_no_record_is_started_over(hub: type[FakeHub], tmp_path: Path) -> None:
    cancel_halfway(hub, tmp_path / "m")
    (tmp_path / "m" / RECORD).unlink()  # nothing says what the part was fetched for
    hub.requests.clear()
    folder = download("org/tiny", tmp_path / "m", endpoint=hub.url)
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert ranges(hub, "model.safetensors") == [None]


def test_the_token_is_not_sent_on_to_a_cdn_on_another_host(hub: type[FakeHub], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with fresh_hub() as cdn:
        hub.cdn = cdn.url
        folder = download("org/tiny", tmp_path / "m", endpoint=hub.url)
        assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
        assert ranges(cdn, "model.safetensors") == [None]  # the hub redirected it there
        assert cdn.authorizations == [None]
        assert set(hub.authorizations) == {"Bearer hf_secret"}  # the hub itself still gets the token
