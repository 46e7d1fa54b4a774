"""Data-parallel routing in the gateway: prefix affinity with a load guard."""

from __future__ import annotations

import pytest

from services.gateway import engine_router
from services.gateway.engine_router import IMBALANCE_ABS, EngineRouter, prompt_text
from shared.protocol import ChatMessage, GenerateRequest, SamplingParams

SYSTEM = "You are a helpful assistant who answers questions about the history of science. " * 3


def chat(*contents: str) -> str:
    roles = ["system"] + ["user", "assistant"] * len(contents)
    messages = [ChatMessage(role=r, content=c) for r, c in zip(roles, (SYSTEM, *contents), strict=False)]
    return prompt_text(GenerateRequest(request_id="x", sampling_params=SamplingParams(), messages=messages))


def test_prompt_text_of_each_prompt_kind() -> None:
    sp = SamplingParams()
    assert prompt_text(GenerateRequest(request_id="a", sampling_params=sp, prompt="hello")) == "hello"
    assert prompt_text(GenerateRequest(request_id="a", sampling_params=sp, prompt_token_ids=[1, 22])) == "1,22"
    # A later turn's text extends the earlier turn's: their prefixes are shared.
    assert chat("Who was Newton?", "A physicist.", "And Leibniz?").startswith(chat("Who was Newton?"))


def test_conversations_stick_to_their_engine() -> None:
    router = EngineRouter(2)
    question = "Question {} about topic {}: what did the people who worked on it find, and why?"
    turns = {c: [chat(question.format(c, c * 7))] for c in range(6)}
    first = {c: router.route(t[0]) for c, t in turns.items()}
    assert set(first.values()) == {0, 1}
    for e in first.values():
        router.finished(e)
    for c in turns:
        later = chat(question.format(c, c * 7), "An answer of some length.", "Tell me more.")
        assert router.route(later) == first[c]
        router.finished(first[c])
    assert router.affinity_hits >= len(turns)


def test_new_prompts_go_to_the_least_busy_engine() -> None:
    router = EngineRouter(3)
    engines = [router.route(f"unrelated prompt number {i} " * 5) for i in range(6)]
    assert sorted(engines) == [0, 0, 1, 1, 2, 2]
    assert router.in_flight == [2, 2, 2]


def test_idle_engines_share_new_conversations() -> None:
    """One conversation at a time (every engine idle): new prefixes still spread out."""
    router = EngineRouter(2)
    placed = []
    for i in range(6):
        placed.append(router.route(f"a new conversation, number {i}, with its own long opening " * 3))
        router.finished(placed[-1])
    assert placed.count(0) == placed.count(1) == 3


def test_much_busier_engine_is_routed_around() -> None:
    router = EngineRouter(2)
    home = router.route(chat("shared question"))
    # Keep piling onto the same prefix: affinity until the guard trips, then the idle engine.
    placed = [router.route(chat("shared question", "answer", f"follow-up {i}")) for i in range(IMBALANCE_ABS + 3)]
    assert placed[:IMBALANCE_ABS] == [home] * IMBALANCE_ABS
    assert 1 - home in placed
    assert max(router.in_flight) - min(router.in_flight) <= IMBALANCE_ABS + 1


def test_round_robin_and_single_engine() -> None:
    rr = EngineRouter(2, "round-robin")
    assert [rr.route(chat("same")) for _ in range(4)] == [0, 1, 0, 1]
    one = EngineRouter(1)
    assert one.route("anything") == 0 and one.in_flight == [1]
    one.finished(0)
    assert one.in_flight == [0]


def test_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_router, "MAX_ENTRIES", 50)
    router = EngineRouter(2)
    for i in range(100):
        router.finished(router.route(f"prompt {i} " * 40))
    assert len(router._holders) == 50
    assert sum(router._remembered) == 50
