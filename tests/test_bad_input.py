"""Every kind of bad input gets its own typed error with a message a user can act on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from expertswap.engine import Engine
from expertswap.protocol import (
    BudgetError,
    BudgetTooSmallError,
    DeviceError,
    ModelFormatError,
    ModelNotFoundError,
    PolicyError,
    UnsupportedArchitectureError,
    format_bytes,
    parse_budget,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        Engine.load(tmp_path / "nowhere")


def test_missing_config(tiny_model, tmp_path: Path) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ModelFormatError, match=r"config\.json"):
        Engine.load(folder)


def test_missing_weights(tiny_model, tmp_path: Path) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelFormatError, match="safetensors"):
        Engine.load(folder)


def test_truncated_safetensors(tiny_model, tmp_path: Path) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    weights = next(folder.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        Engine.load(folder)


def test_garbage_safetensors(tiny_model, tmp_path: Path) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    next(folder.glob("*.safetensors")).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelFormatError, match="corrupt"):
        Engine.load(folder)


def test_missing_expert_weights(tiny_model, tmp_path: Path) -> None:
    """A checkpoint whose experts are absent fails at load, naming the layer, not mid-chat."""
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    weights = next(folder.glob("*.safetensors"))
    tensors = {k: v for k, v in load_file(weights).items() if ".experts.3." not in k}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match="layer"):
        Engine.load(folder)


def test_unsupported_dense_llama(tmp_path: Path) -> None:
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as err:
        Engine.load(tmp_path)
    assert "llama" in str(err.value) and "Mixtral" in str(err.value) and "GPT-OSS" in str(err.value)


def test_unsupported_switch_transformers(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "switch_transformers",
                                                      "architectures": ["SwitchTransformersForConditionalGeneration"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedArchitectureError, match="switch_transformers"):
        Engine.load(tmp_path)


def test_budget_below_minimum(tiny_model, open_engine) -> None:
    folder = tiny_model("qwen3_moe")
    minimum = open_engine(folder).minimum_budget_bytes
    with pytest.raises(BudgetTooSmallError) as err:
        Engine.load(folder, budget=minimum - 1)
    assert err.value.minimum_bytes == minimum
    assert format_bytes(minimum) in str(err.value)


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:banana"])
def test_unknown_device(tiny_model, device: str) -> None:
    with pytest.raises(DeviceError, match="use cpu or cuda"):
        Engine.load(tiny_model("qwen3_moe"), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_gpu(tiny_model) -> None:
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        Engine.load(tiny_model("qwen3_moe"), device="cuda")


def test_unknown_policy(tiny_model) -> None:
    with pytest.raises(PolicyError, match="exact"):
        Engine.load(tiny_model("qwen3_moe"), policy="yolo")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("300MiB", 300 * 2**20), ("1.5GB", 1_500_000_000), ("50%", 500), ("100%", 1000), ("2048", 2048),
     ("1 KiB", 1024), ("0.5gib", 2**29), (4096, 4096)],
)
def test_parse_budget(text: str, expected: int) -> None:
    assert parse_budget(text, total_expert_bytes=1000) == expected


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "150%", "-5MiB", ""])
def test_parse_budget_rejects(text: str) -> None:
    with pytest.raises(BudgetError):
        parse_budget(text, total_expert_bytes=1000)


# ---- every bad input gets a typed error (issue: nothing swallowed) ------------------------------------------


def _rewrite_header(file: Path, mutate) -> None:
    """Re-serialise a safetensors file's JSON header through ``mutate(header) -> header``; data untouched."""
    import struct

    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = mutate(json.loads(raw[8 : 8 + n]))
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _edit_config(folder: Path, change) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _experts_key(config: dict) -> str:
    return next(k for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in config)


CONFIG_CASES = {
    "null": lambda c: None,
    "a list": lambda c: [c],
    "experts as words": lambda c: {**c, _experts_key(c): "eight"},
    "negative top-k": lambda c: {**c, "num_experts_per_tok": -1},
    "zero top-k": lambda c: {**c, "num_experts_per_tok": 0},
    "top-k above experts": lambda c: {**c, "num_experts_per_tok": 99},
    "fewer layers than the weights": lambda c: {**c, "num_hidden_layers": 1},
    "hidden size as a float": lambda c: {**c, "hidden_size": 32.5},
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_configs_are_model_format_errors(tiny_model, tmp_path: Path, case: str) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    _edit_config(folder, CONFIG_CASES[case])
    with pytest.raises(ModelFormatError, match=r"config\.json|layer"):
        Engine.load(folder)


def test_unknown_model_type_names_the_supported_families(tiny_model, tmp_path: Path) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    _edit_config(folder, lambda c: {**c, "model_type": "brand_new_moe"})
    with pytest.raises(UnsupportedArchitectureError) as err:
        Engine.load(folder)
    assert "brand_new_moe" in str(err.value) and "OLMoE" in str(err.value) and "pip" not in str(err.value)


HEADER_CASES = {
    "a list": lambda h: [h],
    "a string": lambda h: "weights",
    "no data_offsets": lambda h: {**h, _first_tensor(h): {k: v for k, v in h[_first_tensor(h)].items()
                                                           if k != "data_offsets"}},
    "a string shape": lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "shape": "4x4"}},
    "negative offsets": lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "data_offsets": [-8, 0]}},
    "an entry that is a number": lambda h: {**h, _first_tensor(h): 7},
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_bad_safetensors_headers_are_model_format_errors(tiny_model, tmp_path: Path, case: str) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    _rewrite_header(next(folder.glob("*.safetensors")), HEADER_CASES[case])
    with pytest.raises(ModelFormatError):
        Engine.load(folder)


@pytest.mark.parametrize("kind", ["folder", "self-symlink", "fifo"])
def test_weights_that_are_not_a_regular_file(tiny_model, tmp_path: Path, kind: str) -> None:
    import os
    import signal

    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    weights = next(folder.glob("*.safetensors"))
    weights.unlink()
    if kind == "folder":
        weights.mkdir()
    elif kind == "self-symlink":
        weights.symlink_to(weights)
    else:
        os.mkfifo(weights)

    def hung(*_args: object) -> None:
        raise TimeoutError("reading a FIFO hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        with pytest.raises(ModelFormatError, match="not a regular file"):
            Engine.load(folder)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_list_shaped_tokenizer_config(tiny_model, tmp_path: Path) -> None:
    folder = _copy(tiny_model("qwen3_moe"), tmp_path / "m")
    (folder / "tokenizer_config.json").write_text("[]")
    with pytest.raises(ModelFormatError, match="tokenizer") as failed:
        Engine.load(folder)
    # while the app still holds the error to show it, the weights the load had opened are closed already
    assert failed.value.__traceback__ is not None
    assert not [f.path for f in psutil.Process().open_files() if f.path.startswith(str(folder))]


@pytest.mark.parametrize("text", ["1e400", "1e400%", "1e400GiB", "nan", "inf"])
def test_absurd_budgets(text: str) -> None:
    with pytest.raises(BudgetError):
        parse_budget(text, total_expert_bytes=1000)


@pytest.mark.parametrize("settings", [
    {"temperature": float("nan")}, {"temperature": -1.0}, {"temperature": float("inf")}, {"top_p": 0.0},
    {"top_p": -0.5}, {"top_p": 1.5}, {"max_new_tokens": 0}, {"max_new_tokens": 2.5}, {"seed": "x"},
])
def test_sampling_settings_are_checked_at_construction(settings: dict) -> None:
    from expertswap.protocol import SamplingSettings, SettingsError

    with pytest.raises(SettingsError):
        SamplingSettings(**settings)


def test_empty_and_undecodable_prompts(tiny_model) -> None:
    from expertswap.protocol import PromptError

    with Engine.load(tiny_model("qwen3_moe")) as engine:
        with pytest.raises(PromptError, match="empty"):
            next(engine.generate([]))
        with pytest.raises(PromptError, match="UTF-8"):
            engine.encode("caf\udce9")  # how Python hands over an undecodable argv byte
        with pytest.raises(PromptError, match="context"):
            next(engine.generate([1] * engine.model.config.max_position_embeddings))


def test_a_pickle_beside_the_safetensors_is_never_loaded(tiny_model, reference, tmp_path: Path) -> None:
    """transformers would torch.load pytorch_model.bin when no model.safetensors is named; we never do."""
    import pickle

    marker = tmp_path / "pickle-was-executed"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    source = tiny_model("qwen3_moe")
    folder = _copy(source, tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))
    with Engine.load(folder) as engine:  # model.safetensors is there: it is what loads
        ids = [3, 14, 15, 9]
        expected = reference(source)(torch.tensor([ids])).logits[0]
        assert torch.allclose(engine.logits(ids), expected, atol=1e-4)
    next(folder.glob("*.safetensors")).rename(folder / "weights.safetensors")  # now only the pickle is "standard"
    with pytest.raises(ModelFormatError):
        Engine.load(folder)
    assert not marker.exists()


def _cli(capsys, *args: str) -> tuple[int, str]:
    from expertswap.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


def test_cli_bad_inputs_exit_2_with_one_line(tiny_model, tmp_path: Path, capsys) -> None:
    model = str(tiny_model("qwen3_moe"))
    capsys.readouterr()  # building the fixture printed a progress bar
    base = ["generate", "--model", model, "--max-new-tokens", "4"]
    cases = {
        "empty prompt": ([*base, "--prompt", ""], "empty"),
        "budget 1e400": ([*base, "--prompt", "hi", "--budget", "1e400"], "too large"),
        "no tokens": (["generate", "--model", model, "--max-new-tokens", "0", "--prompt", "hi"], "max_new_tokens"),
        "unwritable events": ([*base, "--prompt", "hi", "--events", str(tmp_path / "no" / "such" / "dir" / "e.jsonl")],
                              "cannot write events"),
        "undecodable prompt": ([*base, "--prompt", "caf\udce9"], "UTF-8"),
        "chat at temperature nan": (["chat", "--model", model, "--temperature", "nan"], "temperature"),
        "chat with top-p 0": (["chat", "--model", model, "--top-p", "0"], "top_p"),
        "a model folder of garbage": (["generate", "--model", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "2"],
                                      "config.json"),
    }
    for name, (args, words) in cases.items():
        code, err = _cli(capsys, *args)
        assert code == 2, name
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, (name, err)


@pytest.mark.slow  # a subprocess or a long replay: make test runs it, make test-fast does not
def test_cli_chat_skips_an_undecodable_line_and_ctrl_c_ends_cleanly(tiny_model) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    cmd = [sys.executable, "-m", "expertswap.cli", "chat", "--model", str(tiny_model("qwen3_moe")),
           "--max-new-tokens", "4"]
    done = subprocess.run(cmd, input=b"caf\xe9\nhello\n\n", capture_output=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert b"not valid UTF-8" in done.stderr and b"Traceback" not in done.stderr
    assert done.stdout.count(b"bot> ") == 1  # the good line was answered
    child = subprocess.Popen([*cmd[:-1], "100000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
    child.stdin.write(b"tell me a long story\n")
    child.stdin.flush()
    seen = b""
    while b"bot> " not in seen:  # generating now
        chunk = child.stdout.read1(64)
        assert chunk, f"the chat ended before replying: {child.communicate()[1][-2000:]!r}"
        seen += chunk
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _out, err = child.communicate(b"\n", timeout=60)
    assert b"Traceback" not in err and child.returncode in (0, 130), err
