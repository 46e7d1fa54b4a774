"""Scheduling and rolling back draft tokens; acceptance of drafts; the per-request backoff."""

from __future__ import annotations

import pytest

from services.engine_core.request import Request
from services.engine_core.scheduler import Scheduler
from services.engine_core.speculative.acceptance import AcceptanceTracker
from services.engine_core.speculative.verify import verify_drafts
from tests.engine_core.test_scheduler import make_req, make_sched, step


def decoding(s: Scheduler, prompt: int = 6, max_tokens: int = 32) -> Request:
    req = make_req(prompt, max_tokens=max_tokens)
    s.add_request(req)
    step(s)  # prefill: one output token, the next step is a decode
    return req


def test_drafts_extend_a_decode_row() -> None:
    s = make_sched()
    req = decoding(s)
    req.spec_token_ids = [7, 8, 9]
    batch = s.schedule()
    assert batch.num_new_tokens == [4] and batch.spec_token_ids == [[7, 8, 9]] and batch.sample_flags == [True]
    assert len(req.block_table) == s.block_manager.blocks_needed(req.num_tokens + 3)
    # Two drafts accepted, then the target's own token: 3 tokens, K/V kept for the 2 drafts.
    s.update(batch, [[7, 8, 5]])
    assert req.output_token_ids == [1000, 7, 8, 5]
    assert req.num_computed_tokens == req.num_tokens - 1
    assert len(req.block_table) == s.block_manager.blocks_needed(req.num_tokens)


def test_prefix_cache_only_registers_accepted_tokens() -> None:
    s = make_sched(block_size=4)
    req = decoding(s, prompt=7)  # 8 tokens: 2 blocks, the second not computed yet
    req.spec_token_ids = [21, 22, 23, 24, 25]
    batch = s.schedule()
    s.update(batch, [[30]])  # every draft rejected
    assert req.all_token_ids[-2:] == [1000, 30] and req.num_computed_tokens == 8
    assert len(req.chain_ids) == 2  # tokens 0-7 are computed and accepted: two full blocks
    assert len(req.block_table) == 3  # the 9th token's block; the drafts' others are freed
    cached = s.block_manager._cache
    assert all(21 not in key[1] for key in cached)


def test_drafts_never_starve_prefills_or_admissions() -> None:
    s = make_sched(budget=10)
    req = decoding(s)
    req.spec_token_ids = [7] * 8
    waiting = make_req(30)
    s.add_request(waiting)
    batch = s.schedule()
    # The prefill chunk takes everything but the decode's own token: no room for drafts.
    assert dict(zip(batch.requests, batch.num_new_tokens, strict=True)) == {req: 1, waiting: 9}
    assert not any(batch.spec_token_ids)
    assert batch.total_tokens == 10


def test_drafts_take_what_is_left_of_the_budget() -> None:
    s = make_sched(budget=5)
    a, b = decoding(s), decoding(s)
    a.spec_token_ids = [7, 7, 7]
    b.spec_token_ids = [8, 8, 8]
    batch = s.schedule()
    assert batch.num_new_tokens == [4, 1] and batch.spec_token_ids == [[7, 7, 7], []]
    assert batch.total_tokens == 5


def test_drafts_stop_at_max_tokens_and_free_blocks() -> None:
    s = make_sched()
    req = decoding(s, max_tokens=3)  # 1 produced: at most 2 more, so 1 draft + its bonus
    req.spec_token_ids = [7, 8, 9]
    batch = s.schedule()
    assert batch.spec_token_ids == [[7]]
    done = s.update(batch, [[7, 4]])
    assert done == [req] and req.output_token_ids == [1000, 7, 4] and s.block_manager.usage == 0

    s = make_sched(num_blocks=3, block_size=4)  # 12 slots; the request holds 2 blocks
    req = decoding(s, prompt=6)
    decoding(s, prompt=2)
    req.spec_token_ids = [7] * 5  # would need a 4th block: no drafts, and no preemption
    batch = s.schedule()
    assert batch.num_new_tokens == [1, 1] and s.preemptions_total == 0


def test_a_stop_inside_the_accepted_run_ends_it_there() -> None:
    s = make_sched()
    req = make_req(6, max_tokens=32, stop_token_ids=[8])
    s.add_request(req)
    step(s)
    req.spec_token_ids = [7, 8, 9]
    batch = s.schedule()
    done = s.update(batch, [[7, 8, 9, 3]])
    assert done == [req] and req.output_token_ids == [1000, 7, 8] and req.stop_token_id == 8
    assert s.block_manager.usage == 0


def test_verify_drafts() -> None:
    assert verify_drafts([], [5]) == [5]
    assert verify_drafts([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert verify_drafts([1, 2, 3], [1, 9, 3, 4]) == [1, 9]
    assert verify_drafts([1, 2, 3], [0, 2, 3, 4]) == [0]
    with pytest.raises(ValueError):
        verify_drafts([1], [1])


def test_acceptance_backoff_and_reprobe() -> None:
    t = AcceptanceTracker()
    for _ in range(4):
        assert t.should_propose()
        t.record(4, 0)  # a bad window of 16 drafts
    assert [t.should_propose() for _ in range(5)] == [False] * 4 + [True]
    for _ in range(4):
        t.record(4, 0)
    assert [t.should_propose() for _ in range(9)] == [False] * 8 + [True]  # doubled
    for _ in range(4):
        t.record(4, 4)  # a good window resets it
    for _ in range(4):
        t.record(4, 0)
    assert [t.should_propose() for _ in range(5)] == [False] * 4 + [True]
