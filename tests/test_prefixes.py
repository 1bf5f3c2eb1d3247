"""A conversation continues from its cache: a turn runs only its new tokens, and replies as a fresh prefill would."""

from __future__ import annotations

import pytest

from expertswap.engine import Engine
from expertswap.engine.decode import prefixes
from expertswap.protocol import SamplingSettings

SETTINGS = SamplingSettings(max_new_tokens=12)
QUESTIONS = ["What is a tuple?", "And a list?", "Which is faster to build?", "Say it in one line."]


def lookups(engine: Engine) -> int:
    stats = engine.stats()
    return stats.hits + stats.misses


def reply(engine: Engine, messages: list[dict[str, str]], fresh: bool = False,
          settings: SamplingSettings = SETTINGS) -> list[int]:
    """The reply's tokens; ``fresh``: with every kept cache dropped first, as an engine without reuse runs it."""
    if fresh:
        engine.forget_kept_caches()
    return list(engine.generate(engine.encode_chat(messages), settings))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_each_turn_runs_only_its_new_tokens_and_replies_as_a_fresh_prefill(tiny_model, open_engine,
                                                                          family: str) -> None:
    engine = open_engine(tiny_model(family), budget="50%")
    top_k, layers = engine.committees[0].top_k, len(engine.committees)
    sliding = engine.compact is None and getattr(engine.model.config, "sliding_window", None) is not None
    messages = [{"role": "system", "content": "Be brief."}]
    held: list[int] = []  # what the last turn left in the cache: its prompt and its reply but the last token
    for turn, question in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": question})
        prompt = engine.encode_chat(messages)
        before = lookups(engine)
        got = reply(engine, messages)
        stats = engine.stats()
        shared = min(prefixes.common_prefix(held, prompt), len(prompt) - 1)
        if sliding and shared < len(held):
            shared = 0  # a sliding-window layer cannot take back what it saw: only a cache kept whole serves
        assert stats.cached_prompt_tokens == shared
        assert stats.prompt_tokens == len(prompt)
        if turn and not sliding:
            assert stats.cached_prompt_tokens > len(held) // 2, "most of the history came from the cache"
        # a lookup is one token routed through one MoE layer: the prompt's uncached tokens, then the reply's
        assert lookups(engine) - before == (len(prompt) - stats.cached_prompt_tokens + len(got) - 1) * top_k * layers
        assert got == reply(engine, messages, fresh=True), f"turn {turn}: the whole prompt run again"
        held = prompt + got[:-1]
        messages.append({"role": "assistant", "content": engine.decode(got)})


def test_regenerate_edit_and_a_new_system_prompt_recompute_from_where_they_differ(tiny_model, open_engine) -> None:
    engine = open_engine(tiny_model("mixtral"), budget="50%")
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tuple?"}]
    prompt = engine.encode_chat(first)
    answer = reply(engine, first)
    assert reply(engine, first) == answer  # regenerate: all of the prompt but its last token from the cache
    assert engine.stats().cached_prompt_tokens == len(prompt) - 1
    for changed in ([first[0], {"role": "user", "content": "What is a set?"}],  # the question edited
                    [{"role": "system", "content": "Be long."}, first[1]]):  # the system prompt changed
        new = engine.encode_chat(changed)
        got = reply(engine, changed)
        assert engine.stats().cached_prompt_tokens == prefixes.common_prefix(prompt, new) < len(prompt) - 1
        assert got == reply(engine, changed, fresh=True)
        reply(engine, first)  # back to the first conversation for the next case
        prompt = engine.encode_chat(first)


def test_conversations_taking_turns_each_continue_from_their_own_parked_cache(tiny_model, open_engine) -> None:
    engine = open_engine(tiny_model("mixtral"), budget="50%")
    fresh = open_engine(tiny_model("mixtral"), budget="50%")  # keeps nothing: every prompt runs whole

    def turn(chat: list[dict[str, str]]) -> list[int]:
        """The reply to ``chat``'s last message, checked against a fresh prefill; added to it with a next question.
        Returns the prompt tokens that came from the cache, and how long the previous turn's prompt was."""
        before = len(engine.encode_chat(chat[:-2])) if len(chat) > 2 else 0
        got = reply(engine, chat)
        cached = engine.stats().cached_prompt_tokens
        assert got == reply(fresh, chat, fresh=True)
        chat += [{"role": "assistant", "content": engine.decode(got)}, {"role": "user", "content": "Go on."}]
        return [cached, before]

    chats = [[{"role": "user", "content": f"Tell me about number {n}."}] for n in range(prefixes.PARKED + 1)]
    for n, chat in enumerate(chats):  # the last one is live, the others parked
        cached, _ = turn(chat)
        assert (n == 0 or cached > 0) and cached < 16  # a new chat: the template's start came from another,
        # which stays as it was
    for chat in reversed(chats):  # each back to its own cache: the whole earlier prompt at least
        cached, before = turn(chat)
        assert cached > before
    engine.logits(engine.encode("a score between turns parks the live conversation"))
    cached, before = turn(chats[0])
    assert cached > before
    for n in range(prefixes.PARKED):  # newer conversations push the oldest out
        turn([{"role": "user", "content": f"Something else, {n}."}])
    cached, before = turn(chats[1])
    assert cached < 16


def test_a_cancelled_reply_leaves_what_it_fed_for_the_next_turn(tiny_model, open_engine) -> None:
    engine = open_engine(tiny_model("mixtral"), budget="50%")
    chat = [{"role": "user", "content": "Count to twenty."}]
    ids = engine.encode_chat(chat)
    stream = engine.generate(ids, SamplingSettings(max_new_tokens=40))
    partial = [next(stream) for _ in range(5)]
    stream.close()  # the reader stopped: steps queued ahead are taken back
    held = engine.decoder.prefixes.live
    assert held is not None and held.ids == (ids + partial)[: held.session.length()]
    assert held.session.length() >= len(ids) + 3
    chat += [{"role": "assistant", "content": engine.decode(partial)}, {"role": "user", "content": "Go on."}]
    got = reply(engine, chat)
    assert engine.stats().cached_prompt_tokens >= len(ids)
    assert got == reply(engine, chat, fresh=True)


def test_a_budget_change_drops_the_cache_only_where_the_policy_reads_the_residency(tiny_model,
                                                                                   open_engine) -> None:
    engine = open_engine(tiny_model("mixtral"), budget="50%")
    chat = [{"role": "user", "content": "What is a tuple?"}]
    size = len(engine.encode_chat(chat)) - 1
    reply(engine, chat)
    engine.set_budget("100%")
    reply(engine, chat)
    assert engine.stats().cached_prompt_tokens == size  # exact: the same output at every budget
    engine.set_policy("substitute")
    reply(engine, chat)
    assert engine.stats().cached_prompt_tokens == 0  # computed under another policy
    reply(engine, chat)
    assert engine.stats().cached_prompt_tokens == size
    engine.set_budget("50%")
    reply(engine, chat)
    assert engine.stats().cached_prompt_tokens == 0  # substitute's output depends on what is resident


def test_a_failed_reply_keeps_nothing(tiny_model, open_engine, monkeypatch) -> None:
    engine = open_engine(tiny_model("mixtral"), budget="50%")
    chat = [{"role": "user", "content": "What is a tuple?"}]
    reply(engine, chat)
    session = engine.decoder.prefixes.live.session

    def broken(ids, all_logits=False):
        raise RuntimeError("a step that failed half done")

    monkeypatch.setattr(session, "run", broken)
    with pytest.raises(RuntimeError):
        reply(engine, chat)
    assert engine.decoder.prefixes.live is None
    monkeypatch.undo()
    reply(engine, chat)
    assert engine.stats().cached_prompt_tokens == 0


def test_a_recorded_trace_holds_every_prompt_token_so_nothing_is_reused_while_it_records(tiny_model, open_engine,
                                                                                         tmp_path) -> None:
    engine = open_engine(tiny_model("mixtral"), budget="50%")
    chat = [{"role": "user", "content": "What is a tuple?"}]
    reply(engine, chat)
    with engine.record_trace(tmp_path / "t.jsonl"):
        reply(engine, chat)
        assert engine.stats().cached_prompt_tokens == 0
        reply(engine, chat)
        assert engine.stats().cached_prompt_tokens == 0
    reply(engine, chat)
    reply(engine, chat)
    assert engine.stats().cached_prompt_tokens > 0  # reused again once the recording ends
