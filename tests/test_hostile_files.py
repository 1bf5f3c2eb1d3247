"""A stranger's model folder: nothing it holds makes the engine read outside it, hang, crash or run wild."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from expertswap.engine import Engine
from expertswap.engine.weights.folder import MAX_ADDED_TOKEN_CHARS, MAX_METADATA_BYTES
from expertswap.protocol import ChatTemplateError, EngineClosedError, ModelFormatError, SamplingSettings

ROOT = Path(__file__).resolve().parents[1]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _run(script: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


# ---- files that change under a loaded model ----------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])  # the compact step, and transformers' forward
def test_a_checkpoint_truncated_under_a_loaded_model_is_an_error_not_sigbus(tiny_model, tmp_path: Path,
                                                                            family: str) -> None:
    """float32 weights on the CPU were views of the file's mapping: truncating the file (a re-download, a sync
    tool, a full disk) killed the process with SIGBUS at the next token. Now the engine owns what it keeps:
    resident experts still answer, and a miss that reads the cut file is a typed error."""
    folder = _copy(tiny_model(family), tmp_path / "m")
    result = _run(f"""
        import os
        from pathlib import Path
        from expertswap.engine import Engine
        from expertswap.protocol import ExpertSwapError, SamplingSettings
        folder = Path({str(folder)!r})
        weights = folder / "model.safetensors"
        settings = SamplingSettings(max_new_tokens=8, temperature=0)
        with Engine.load(folder, budget="100%") as full, Engine.load(folder, budget="25%") as least:
            before = list(full.generate([5, 6, 7], settings))
            os.truncate(weights, 4096)
            print("full", list(full.generate([5, 6, 7], settings)) == before)
            try:
                list(least.generate(list(range(3, 40)), settings))
                print("least answered")
            except ExpertSwapError as exc:
                print("least", type(exc).__name__, exc)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "full True" in lines
    assert any(line.startswith("least ModelFormatError model.safetensors changed on disk") for line in lines), lines


# ---- files outside the folder, or not files at all ---------------------------------------------
def _index(folder: Path, target: str) -> None:
    """A shard index that maps every weight of the folder's checkpoint to ``target``."""
    header = (folder / "model.safetensors").read_bytes()
    keys = json.loads(header[8 : 8 + int.from_bytes(header[:8], "little")])
    weight_map = {k: target for k in keys if k != "__metadata__"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(tiny_model, tmp_path: Path, where: str) -> None:
    """transformers reads the shards an index names: ``../far/x.safetensors`` had the non-expert weights read
    from another folder (zeroing its lm_head changed the reply)."""
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    far = tmp_path / "far"
    far.mkdir()
    shutil.copy(folder / "model.safetensors", far / "x.safetensors")
    _index(folder, "../far/x.safetensors" if where == "relative" else str(far / "x.safetensors"))
    with pytest.raises(ModelFormatError, match="not a safetensors file of the folder"):
        Engine.load(folder)


def _load_refused(folder: Path, fifo: Path) -> ModelFormatError:
    """The error loading ``folder`` gives; fails the test if the load hangs on ``fifo`` instead."""
    errors: list[BaseException] = []

    def load() -> None:
        try:
            Engine.load(folder).close()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=120)
    if thread.is_alive():  # the load opened the FIFO: unblock it so that the thread can end
        with open(fifo, "wb"):
            pass
        pytest.fail(f"loading hung on the FIFO {fifo.name}")
    assert len(errors) == 1 and isinstance(errors[0], ModelFormatError), errors
    return errors[0]


def test_a_shard_index_naming_a_fifo_in_a_subfolder_is_refused_without_hanging(tiny_model, tmp_path: Path) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    (folder / "sub").mkdir()
    os.mkfifo(folder / "sub" / "x.safetensors")
    _index(folder, "sub/x.safetensors")
    assert "not a safetensors file of the folder" in str(_load_refused(folder, folder / "sub" / "x.safetensors"))


@pytest.mark.parametrize("name", ["tokenizer.json", "chat_template.jinja", "config.json"])
def test_a_link_leading_out_of_the_folder_is_refused(tiny_model, tmp_path: Path, name: str) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    outside = tmp_path / name
    shutil.move(folder / name, outside)
    (folder / name).symlink_to(outside)
    with pytest.raises(ModelFormatError, match="points outside the model folder"):
        Engine.load(folder)


@pytest.mark.parametrize("name", ["tokenizer.json", "additional_chat_templates/tool_use.jinja"])
def test_a_fifo_where_the_tokenizer_reads_is_refused(tiny_model, tmp_path: Path, name: str) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    (folder / name).parent.mkdir(exist_ok=True)
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    assert "not a regular file" in str(_load_refused(folder, folder / name))


def test_a_hub_cache_snapshot_whose_links_point_into_its_blobs_loads(tiny_model, tmp_path: Path) -> None:
    """The hub's own cache layout: snapshot files are links to ``../../blobs/<hash>``, outside the snapshot."""
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(tiny_model("qwen3_moe").iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    with Engine.load(snapshot) as engine:
        assert len(list(engine.generate([5, 6], SamplingSettings(max_new_tokens=2, temperature=0)))) == 2


def test_a_folder_of_links_into_a_hub_cache_loads(tiny_model, tmp_path: Path) -> None:
    """``hf download --local-dir`` before huggingface_hub 0.23 linked large files into the hub cache's blobs."""
    blobs = tmp_path / "hub" / "models--org--name" / "blobs"
    blobs.mkdir(parents=True)
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "local")
    shutil.move(folder / "model.safetensors", blobs / "0123abcd")
    (folder / "model.safetensors").symlink_to(blobs / "0123abcd")
    with Engine.load(folder) as engine:
        assert len(list(engine.generate([5, 6], SamplingSettings(max_new_tokens=2, temperature=0)))) == 2


def test_a_fifo_under_a_name_only_case_insensitive_disks_match_is_refused(tiny_model, tmp_path: Path) -> None:
    """On macOS and Windows transformers' open("tokenizer.json") reaches "Tokenizer.JSON": every name is checked."""
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    os.mkfifo(folder / "Tokenizer.JSON")
    assert "not a regular file" in str(_load_refused(folder, folder / "Tokenizer.JSON"))


@pytest.mark.parametrize("files", [["../outside/tokenizer.json"], ["/etc/hostname"], ["sub/tokenizer.json"], "x"])
def test_fast_tokenizer_files_must_be_files_of_the_folder(tiny_model, tmp_path: Path, files: object) -> None:
    """transformers opens the tokenizer files tokenizer_config.json lists, wherever they are."""
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "fast_tokenizer_files": files}))
    with pytest.raises(ModelFormatError, match="fast_tokenizer_files must name files of the folder"):
        Engine.load(folder)


# ---- metadata too large to parse safely ---------------------------------------------------------
def test_a_tokenizer_adding_one_huge_token_is_refused_before_it_is_built(tiny_model, tmp_path: Path) -> None:
    """Building an added token costs memory ~90 times its length: a 200 MB one aborted the process at 15 GB."""
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({"id": 9999, "content": "a" * (MAX_ADDED_TOKEN_CHARS + 1), "single_word": False,
                                      "lstrip": False, "rstrip": False, "normalized": True, "special": False})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ModelFormatError, match="adds a token of 1,025 characters"):
        Engine.load(folder)


@pytest.mark.parametrize("where", ["a special token of the config", "the special tokens map", "added_tokens.json"])
def test_a_huge_special_token_is_refused_wherever_it_is_declared(tiny_model, tmp_path: Path, where: str) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    huge = "b" * (MAX_ADDED_TOKEN_CHARS + 1)
    if where == "a special token of the config":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "additional_special_tokens": [huge]}))
    elif where == "the special tokens map":
        (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": huge}}))
    else:
        (folder / "added_tokens.json").write_text(json.dumps({huge: 9999}))
    with pytest.raises(ModelFormatError, match="adds a token of 1,025 characters"):
        Engine.load(folder)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "chat_template.jinja"])
def test_a_metadata_file_over_its_size_cap_is_refused(tiny_model, tmp_path: Path, name: str) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    with open(folder / name, "a") as f:  # still valid JSON or Jinja: whitespace at the end
        f.write(" " * MAX_METADATA_BYTES)
    with pytest.raises(ModelFormatError, match="more than the 16,777,216 allowed"):
        Engine.load(folder)


# ---- chat templates ----------------------------------------------------------------------------
TEMPLATES = {
    "loops": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "ran for more than"),
    "raises": ("{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}",
               "refused this conversation: Conversation roles must alternate"),
    "does not parse": ("{% for m in messages %}{{ m.content }", "does not parse"),
    "recurses": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed without end"),
    "divides by zero": ("{{ 1 // 0 }}", "failed: ZeroDivisionError"),
    # one C call that would build gigabytes before any line of the template ends
    "repeats a string": ("{{ 'ab' * 400000000 }}", "may not build a value this large"),
    "centres in a huge width": ("{{ 'x'|center(10000000000) }}", "is too large"),
    "formats a huge width": ("{{ '{:>9999999999}'.format(1) }}", "format width"),
    "formats a huge width with %": ("{{ '%9999999999s' % 'x' }}", "format width"),
    "replaces each match with a long text": ("{{ ('a' * 4000000)|replace('a', 'a' * 4000000) }}",
                                             "may not build a value this large"),
    "calls replace the same way": ("{{ ('a' * 4000000).replace('a', 'a' * 4000000) }}",
                                   "may not build a value this large"),
}


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_a_chat_template_that_fails_is_a_typed_error_and_the_engine_goes_on(tiny_model, open_engine,
                                                                           case: str) -> None:
    engine = open_engine(tiny_model("qwen3_moe"))
    good = engine.tokenizer.chat_template
    engine.tokenizer.chat_template, expected = TEMPLATES[case]
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match=expected):
        engine.encode_chat([{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 30  # the loop alone would run for hours
    engine.tokenizer.chat_template = good
    assert engine.encode_chat([{"role": "user", "content": "hi"}])


def test_a_chat_template_that_doubles_a_value_line_by_line_is_stopped_by_its_memory(tiny_model, open_engine) -> None:
    """No single step is large: the resident set, checked at each of the template's lines, is what stops it (the
    time limit is lifted here, so that a slow machine does not stop it first)."""
    from expertswap.engine.decode.chat_template import render

    engine = open_engine(tiny_model("qwen3_moe"))
    engine.tokenizer.chat_template = ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}"
                                      "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}")
    with pytest.raises(ChatTemplateError, match="used more than 1024 MiB"):
        render(engine.tokenizer, [{"role": "user", "content": "hi"}], seconds=600)


# ---- memory that must come back ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_moe", "granitemoe"])  # the compact step, and transformers' forward
def test_attention_on_the_cpu_meets_few_shapes_and_keeps_its_accuracy(tmp_path: Path, monkeypatch,
                                                                      family: str) -> None:
    """torch's CPU flash attention keeps a compiled kernel for every shape it meets (on CPUs with AMX: 217 MiB
    over 300 prompt lengths, for good): bf16 attention sees lengths rounded up to 64, and is no less accurate."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tools.synthetic import build_model

    folder = build_model(family, tmp_path / family, dtype=torch.bfloat16)
    shapes: set[tuple[int, int]] = set()
    attend = F.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):  # type: ignore[no-untyped-def]
        shapes.add((query.shape[-2], key.shape[-2]))
        return attend(query, key, value, *args, **kwargs)

    with Engine.load(folder, budget="100%", swapper=False) as engine:
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        for n in range(1, 150, 3):
            list(engine.generate(list(range(3, 3 + n)), SamplingSettings(max_new_tokens=3, temperature=0)))
        monkeypatch.undo()
        assert 0 < len(shapes) <= 12, sorted(shapes)  # 150 before: one per length
        ids = list(range(5, 75))  # not a multiple of 64: padded rows and keys
        logits = engine.logits(ids).float()
    with torch.inference_mode():
        truth = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0]
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)(torch.tensor([ids])).logits[0]
    assert (logits - truth).abs().mean() <= 1.5 * (plain.float() - truth).abs().mean() + 1e-3


@pytest.mark.slow
def test_replies_of_300_distinct_lengths_do_not_grow_the_resident_set(tmp_path: Path) -> None:
    """oneDNN and ideep kept a compiled kernel per matmul shape (1024 by default), so every new prompt length
    grew the resident set for good: 667 MiB over these 300 replies before the caps, 33 MiB after. On CPUs with
    AMX torch's flash attention did the same (213-217 MiB) until attention met lengths in steps of 64."""
    result = _run(f"""
        import sys
        from pathlib import Path
        import psutil, torch
        sys.path.insert(0, {str(ROOT)!r})
        from expertswap.engine import Engine
        from expertswap.protocol import SamplingSettings
        from tools.synthetic import build_model
        folder = build_model("qwen3_moe", Path({str(tmp_path / "m")!r}), hidden=256, intermediate=256, heads=8,
                             dtype=torch.bfloat16)
        torch.set_num_threads(2)
        process, settings = psutil.Process(), SamplingSettings(max_new_tokens=1, temperature=0)
        with Engine.load(folder, budget="50%") as engine:
            for n in range(1, 301):
                list(engine.generate(list(range(3, 3 + n)), settings))
                if n == 20:
                    settled = process.memory_info().rss
            print((process.memory_info().rss - settled) >> 20)
    """, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) <= 64


def test_a_closed_engine_reports_nothing_resident_and_refuses_to_move_experts(tiny_model) -> None:
    """close() gave the memory back: the app's panels may still ask, and get the truth; nothing loads again."""
    engine = Engine.load(tiny_model("qwen3_moe"), budget="50%")
    list(engine.generate([5, 6, 7], SamplingSettings(max_new_tokens=4, temperature=0)))
    engine.close()
    assert all(not experts for experts in engine.residency().resident.values())
    stats = engine.stats()  # what the reply did stays: expertswap-cli generate --json reports it after close
    assert stats.hits + stats.misses > 0 and stats.budget_bytes > 0 and engine.resident_expert_bytes() == 0
    for call in (lambda: engine.set_budget("100%"), lambda: engine.set_policy("lru"),
                 lambda: list(engine.generate([5, 6], SamplingSettings(max_new_tokens=2)))):
        with pytest.raises(EngineClosedError):
            call()
    engine.close()  # twice is fine
