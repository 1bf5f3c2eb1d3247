"""The async chat stream the GUI consumes: tokens arrive in order, text adds up, cancel stops it."""

from __future__ import annotations

import asyncio

import pytest
import torch

from expertswap.engine import Engine
from expertswap.protocol import EngineBusyError, SamplingSettings

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tuple?"}]


def test_stream_chat_matches_sync_generation(tiny_model) -> None:
    engine = Engine.load(tiny_model("mixtral"), budget="50%")
    settings = SamplingSettings(max_new_tokens=16)

    async def collect() -> list:
        return [chunk async for chunk in engine.stream_chat(MESSAGES, settings)]

    chunks = asyncio.run(collect())
    expected = list(engine.generate(engine.encode_chat(MESSAGES), settings))
    assert [c.token_id for c in chunks] == expected
    assert "".join(c.text for c in chunks) == engine.decode(expected)
    engine.close()


def test_cancel_stops_the_reply_and_frees_the_engine(tiny_model, open_engine) -> None:
    engine = open_engine(tiny_model("mixtral"), budget="50%")
    settings = SamplingSettings(max_new_tokens=200)

    async def stop_after_three() -> tuple[int, int]:
        seen = generated = 0
        async for _ in engine.stream_chat(MESSAGES, settings):
            seen += 1
            if seen == 3:
                generated = engine.stats().tokens_generated  # the worker may be ahead of the stream
                engine.cancel()
        return seen, generated

    seen, at_cancel = asyncio.run(stop_after_three())
    # counted in tokens, not time: the token being computed when cancel arrived may still come, no other
    assert at_cancel >= 3 and engine.stats().tokens_generated <= at_cancel + 1
    assert seen == engine.stats().tokens_generated  # and every token generated reached the stream
    # the engine is free again: a new reply runs
    assert len(list(engine.generate(engine.encode("x"), SamplingSettings(max_new_tokens=2)))) >= 1


def test_closing_the_stream_cancels(tiny_model) -> None:
    engine = Engine.load(tiny_model("mixtral"), budget="50%")

    async def take_two() -> None:
        stream = engine.stream_chat(MESSAGES, SamplingSettings(max_new_tokens=200))
        async for chunk in stream:
            if chunk.token_id >= 0:
                break
        await stream.aclose()

    asyncio.run(take_two())
    assert engine.stats().tokens_generated < 200
    engine.close()


def test_one_reply_at_a_time(tiny_model) -> None:
    engine = Engine.load(tiny_model("mixtral"))
    first = engine.generate(engine.encode("a"), SamplingSettings(max_new_tokens=5))
    next(first)
    with pytest.raises(EngineBusyError):
        next(engine.generate(engine.encode("b"), SamplingSettings(max_new_tokens=5)))
    first.close()
    engine.close()


def test_sampling_is_seeded(tiny_model) -> None:
    engine = Engine.load(tiny_model("mixtral"))
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    ids = engine.encode("Sampling")
    assert list(engine.generate(ids, settings)) == list(engine.generate(ids, settings))
    engine.close()


def test_every_engine_forward_runs_without_cudnn_attention(tiny_model) -> None:
    """cuDNN attention rebuilds a graph per sequence length (~30 ms a token on an H100): never used, flag restored."""
    import torch

    engine = Engine.load(tiny_model("qwen2_moe"), budget="50%")
    seen: list[bool] = []
    engine.model.get_input_embeddings().register_forward_pre_hook(
        lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    ids = engine.encode("a short prompt")
    list(engine.generate(ids, SamplingSettings(max_new_tokens=3)))
    engine.score(ids + ids, chunk=2)
    engine.logits(ids)
    assert len(seen) >= 6 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    engine.close()


def test_a_repetition_penalty_picks_as_transformers_processor_does_over_the_last_64_tokens(tiny_model,
                                                                                          reference) -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    folder = tiny_model("mixtral")
    with Engine.load(folder, budget="50%") as engine:
        ids = engine.encode_chat(MESSAGES)
        penalised = list(engine.generate(ids, SamplingSettings(max_new_tokens=24, repetition_penalty=1.5)))
        plain = list(engine.generate(ids, SamplingSettings(max_new_tokens=24)))
        stops = engine.decoder.stop_ids
    model, processor = reference(folder), RepetitionPenaltyLogitsProcessor(1.5)
    sequence, want = list(ids), []
    with torch.no_grad():
        while len(want) < 24 and not (want and want[-1] in stops):
            logits = model(torch.tensor([sequence])).logits[0, -1]
            scores = processor(torch.tensor([sequence[-64:]]), logits[None].clone())[0]
            want.append(int(scores.argmax()))
            sequence.append(want[-1])
    assert penalised == want
    assert penalised != plain  # it did push the loop the plain reply falls into
