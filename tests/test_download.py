"""Model download against a fake Hugging Face hub on localhost (the HTTP boundary): progress, cancel, resume."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from expertswap.engine import ModelNotFoundError
from expertswap.models.hub_download import DownloadCancelled, download

COMMIT = "c" * 40
FILES = {
    "config.json": b'{"model_type": "qwen3_moe"}',
    "model.safetensors": bytes(range(256)) * (100 * 1024),  # 25 MiB: more than one 10 MB read
    "pytorch_model.bin": b"pickles are never downloaded",
}


class FakeHub(BaseHTTPRequestHandler):
    """The few endpoints snapshot_download uses: revision info, file tree, resolve (HEAD/GET with Range)."""

    requests: ClassVar[list[tuple[str, str, str | None]]] = []
    files: ClassVar[dict[str, bytes]] = FILES

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _send(self, status: int, body: bytes, head: bool, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _answer(self, head: bool) -> None:
        FakeHub.requests.append((self.command, self.path, self.headers.get("Range")))
        if not self.path.startswith(("/api/models/org/tiny", "/org/tiny/")):
            self._send(404, b'{"error": "Repository not found"}', head, {"X-Error-Code": "RepoNotFound"})
        elif "/tree/" in self.path:
            tree = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                    for n, d in self.files.items()]
            self._send(200, json.dumps(tree).encode(), head, {"Content-Type": "application/json"})
        elif self.path.startswith("/api/models/"):
            info = {"id": "org/tiny", "sha": COMMIT, "siblings": [{"rfilename": n} for n in self.files]}
            self._send(200, json.dumps(info).encode(), head, {"Content-Type": "application/json"})
        else:
            data = self.files[self.path.split("/resolve/")[1].split("/", 1)[1]]
            start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
            headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": COMMIT}
            self._send(206 if start and not head else 200, data if head else data[start:], head, headers)


@pytest.fixture
def hub() -> Iterator[str]:
    FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_download_reports_progress_and_skips_pickles(hub: str, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    folder = download("org/tiny", tmp_path / "m", lambda done, total: seen.append((done, total)), endpoint=hub)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    total = len(FILES["config.json"]) + len(FILES["model.safetensors"])
    assert seen[-1] == (total, total) and all(a <= b for (a, _), (b, _) in itertools.pairwise(seen))


def test_cancel_keeps_the_partial_file_and_the_next_try_resumes(hub: str, tmp_path: Path) -> None:
    cancel = threading.Event()
    with pytest.raises(DownloadCancelled):
        download("org/tiny", tmp_path / "m", lambda done, total: done > 2**20 and cancel.set(), cancel, endpoint=hub)
    partial = tmp_path / "m" / "model.safetensors.part"
    assert 0 < partial.stat().st_size < len(FILES["model.safetensors"])
    assert not (tmp_path / "m" / "model.safetensors").exists()
    kept = partial.stat().st_size
    FakeHub.requests = []
    seen: list[int] = []
    folder = download("org/tiny", tmp_path / "m", lambda done, total: seen.append(done), endpoint=hub)
    assert seen[0] > kept  # progress starts from what was already there
    assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    ranges = [r for method, path, r in FakeHub.requests if method == "GET" and path.endswith("model.safetensors")]
    assert ranges == [f"bytes={kept}-"]  # resumed from the kept part, not restarted


def test_unknown_repo_is_model_not_found(hub: str, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        download("nobody/nothing", tmp_path / "m", endpoint=hub)
