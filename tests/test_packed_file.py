"""The packed expert file: written once in the background, read by misses instead of quantising again, resumed
after a stop, and never a loss when the disk refuses it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from expertswap.engine.weights import packed_file, store
from expertswap.protocol import PackProgress

IDS = [1, 5, 9, 13, 2, 7, 11, 3, 4, 8, 12, 6]


def _no_quantising(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on an expert that is quantised from the checkpoint fails the test."""
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("an expert was quantised again: its packed file was not read")

    monkeypatch.setattr(store, "quantize", refuse)


@pytest.fixture
def model(tiny_model) -> Path:
    return tiny_model("qwen3_moe")


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors*"))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_misses_read_the_packed_file_and_give_the_same_bits(model, open_engine, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    want = open_engine(model, budget="30%", quantize=kind, swapper=False).logits(IDS)
    engine = open_engine(model, budget="30%", quantize=kind, swapper=False, pack_root=tmp_path)
    events = engine.subscribe()
    assert engine.packer is not None and engine.packer.wait(timeout=60)
    layers = len(engine.committees)
    assert [f.name for f in _files(tmp_path)] == [f"layer-{c.layer:04d}.safetensors" for c in engine.committees]
    progress = [e for e in events.drain() if isinstance(e, PackProgress)]
    assert progress[-1].layers_done == progress[-1].layers == layers and not progress[-1].error
    assert engine.store.host_bytes == 0  # residents are in their slots only, misses read the file
    _no_quantising(monkeypatch)
    assert torch.equal(engine.logits(IDS), want)  # misses at 30% now come from the packed file
    assert engine.stats().expert_loads > 0
    # a second load reads what the first wrote: nothing is quantised, the same bits come out
    again = open_engine(model, budget="30%", quantize=kind, swapper=False, pack_root=tmp_path)
    assert again.packer is not None and again.packer.done == layers
    assert torch.equal(again.logits(IDS), want)
    tier = open_engine(model, budget="30%", quantize=kind, swapper=False, pack_root=tmp_path, ram_tier=True)
    assert tier.store.host_bytes > 0 and torch.equal(tier.logits(IDS), want)  # the RAM tier filled from the file


def test_a_stopped_pack_resumes_and_a_broken_layer_is_written_again(model, open_engine, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first = open_engine(model, budget="30%", quantize="int8", swapper=False, pack_root=tmp_path)
    assert first.packer is not None and first.packer.wait(timeout=60)
    want = first.logits(IDS)
    first.close()
    done = _files(tmp_path)
    folder = done[0].parent
    done[-1].unlink()  # a crash before the last layer was renamed: its .part is all that is left
    (folder / (done[-1].name + ".part")).write_bytes(b"half a layer")
    kept = done[0].stat().st_mtime_ns
    engine = open_engine(model, budget="30%", quantize="int8", swapper=False, pack_root=tmp_path)
    assert engine.packer is not None and engine.packer.wait(timeout=60)
    assert [f.name for f in _files(tmp_path)] == [f.name for f in done]  # no .part left
    assert done[0].stat().st_mtime_ns == kept  # a whole layer is not written twice
    engine.close()
    with open(done[0], "r+b") as broken:  # a layer cut short by a bad disk is written again
        broken.truncate(os.path.getsize(done[0]) // 2)
    kept = done[-1].stat().st_mtime_ns
    engine = open_engine(model, budget="30%", quantize="int8", swapper=False, pack_root=tmp_path)
    assert engine.packer is not None and engine.packer.wait(timeout=60)
    assert done[-1].stat().st_mtime_ns == kept and done[0].stat().st_size == done[-1].stat().st_size
    _no_quantising(monkeypatch)
    assert torch.equal(engine.logits(IDS), want)


def test_a_disk_that_refuses_the_file_loses_nothing(model, open_engine, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    want = open_engine(model, budget="30%", quantize="int8", swapper=False).logits(IDS)

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packed_file.os, "fsync", full)
    engine = open_engine(model, budget="30%", quantize="int8", swapper=False, pack_root=tmp_path)
    assert engine.packer is not None and not engine.packer.wait(timeout=60)
    assert "No space left on device" in engine.packer.error
    assert _files(tmp_path) == []  # no .part left behind
    assert torch.equal(engine.logits(IDS), want)  # misses are quantised as they are read, as before


def test_a_changed_checkpoint_gets_a_new_packed_folder(model, tmp_path: Path) -> None:
    from expertswap.engine.weights import Checkpoint

    before = packed_file.packed_folder(tmp_path, Checkpoint(model), "int8")
    assert before != packed_file.packed_folder(tmp_path, Checkpoint(model), "int4")
    shard = next(model.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert packed_file.packed_folder(tmp_path, Checkpoint(model), "int8") != before


def test_cli_pack_writes_every_layer_and_wants_a_quantisation(model, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from expertswap.cli import main

    monkeypatch.setenv("EXPERTSWAP_CACHE", str(tmp_path))
    assert main(["pack", "--model", str(model), "--device", "cpu"]) == 2
    assert "give --quantize" in capsys.readouterr().err
    assert main(["pack", "--model", str(model), "--device", "cpu", "--quantize", "int8"]) == 0
    err = capsys.readouterr().err
    files = _files(tmp_path / "packed")
    assert files and all(f.suffix == ".safetensors" for f in files)
    assert f"{len(files)}/{len(files)} layers" in err and "packed experts in" in err


def test_cli_pack_says_why_when_the_cache_cannot_be_written(model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys) -> None:
    from expertswap.cli import main

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("EXPERTSWAP_CACHE", str(blocked))
    assert main(["pack", "--model", str(model), "--device", "cpu", "--quantize", "int8"]) == 1
    err = capsys.readouterr().err
    assert "expertswap-cli: error: cannot write packed experts to" in err and "Not a directory" in err
