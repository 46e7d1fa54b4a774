"""Scheduler: budget, chunked prefill, preemption, abort, stop conditions, liveness."""

from __future__ import annotations

import itertools
import random
import zlib

import pytest

from services.engine_core.batch import ScheduledBatch
from services.engine_core.block_manager import BlockManager
from services.engine_core.request import Request, RequestStatus
from services.engine_core.scheduler import Scheduler
from shared.config import EngineConfig
from shared.errors import InvalidRequest
from shared.protocol import SamplingParams

_ids = itertools.count()


def make_sched(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    budget: int = 64,
    max_model_len: int = 1024,
    caching: bool = True,
) -> Scheduler:
    cfg = EngineConfig(
        block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, enable_prefix_caching=caching
    )
    return Scheduler(cfg, BlockManager(num_blocks, block_size, caching), max_model_len)


def make_req(prompt: list[int] | int, max_tokens: int = 16, eos: tuple[int, ...] = (), **sp: object) -> Request:
    tokens = list(range(1, prompt + 1)) if isinstance(prompt, int) else prompt
    return Request(f"r{next(_ids)}", tokens, SamplingParams(max_tokens=max_tokens, **sp), eos)


def step(s: Scheduler, token: int | None = 1000) -> tuple[ScheduledBatch, list[Request]]:
    batch = s.schedule()
    sampled = [[token] if batch.sample_flags[i] and token is not None else [] for i in range(len(batch))]
    return batch, s.update(batch, sampled)


def rows(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(r.request_id, n) for r, n in zip(batch.requests, batch.num_new_tokens, strict=True)]


def test_budget_decodes_first_then_prefill_chunks() -> None:
    s = make_sched(budget=8)
    a, b = make_req(3), make_req(3)
    s.add_request(a)
    s.add_request(b)
    batch, _ = step(s)
    assert rows(batch) == [(a.request_id, 3), (b.request_id, 3)]
    assert [batch.sample_flags[i] for i in range(2)] == [True, True]

    long = make_req(20)
    s.add_request(long)
    seen = []
    while long.num_computed_tokens < 20:
        batch, _ = step(s)
        assert batch.total_tokens <= 8
        # Decodes keep running every step; the prompt fills the rest of the budget.
        assert rows(batch)[:2] == [(a.request_id, 1), (b.request_id, 1)]
        assert batch.requests[2] is long
        seen.append((batch.num_new_tokens[2], batch.sample_flags[2]))
    assert seen == [(6, False), (6, False), (6, False), (2, True)]
    assert long.num_output_tokens == 1


def test_running_prefill_chunk_takes_leftover_budget() -> None:
    s = make_sched(budget=5)
    a = make_req(12)
    s.add_request(a)
    batch, _ = step(s)
    assert rows(batch) == [(a.request_id, 5)] and not batch.sample_flags[0]
    b = make_req(2)
    s.add_request(b)
    batch, _ = step(s)  # a still prefilling takes the whole budget; b waits
    assert rows(batch) == [(a.request_id, 5)]
    batch, _ = step(s)
    assert rows(batch) == [(a.request_id, 2), (b.request_id, 2)]
    assert batch.sample_flags[0] and batch.sample_flags[1]


def test_max_num_seqs() -> None:
    s = make_sched(max_num_seqs=2)
    reqs = [make_req(2, max_tokens=3) for _ in range(5)]
    for r in reqs:
        s.add_request(r)
    batch, _ = step(s)
    assert batch.requests == reqs[:2]
    assert s.num_running == 2 and s.num_waiting == 3
    step(s)
    _, done = step(s)
    assert done == reqs[:2]
    batch, _ = step(s)
    assert batch.requests == reqs[2:4]


def test_fcfs_head_blocks_later_requests() -> None:
    s = make_sched(num_blocks=4, budget=64)
    a = make_req(10, max_tokens=2)  # 3 blocks
    s.add_request(a)
    step(s)
    big, small = make_req([50] * 8), make_req([60])  # big needs 2 blocks, 1 free
    s.add_request(big)
    s.add_request(small)
    batch, _ = step(s)
    assert batch.requests == [a]  # small does not overtake big
    assert s.num_waiting == 2


def test_preemption_newest_first_and_resume_by_recompute() -> None:
    s = make_sched(num_blocks=4, block_size=4, budget=64, caching=False)
    a, b = make_req(6, max_tokens=5), make_req(6, max_tokens=5)
    s.add_request(a)
    s.add_request(b)
    for _ in range(3):  # prefill, then 2 decodes: each holds 2 blocks, 8 tokens
        batch, _ = step(s, token=7)
        assert batch.requests == [a, b]
    assert a.num_tokens == 9 and s.block_manager.num_free_blocks == 0
    batch, _ = step(s, token=7)  # a needs a third block: b is preempted
    assert batch.requests == [a] and batch.preempted == [b]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.block_table == [] and b.output_token_ids == [7, 7, 7]
    assert s.preemptions_total == 1 and s.num_preempted == 1 and s.num_waiting == 1
    # A newer arrival must queue behind the preempted request.
    c = make_req(1, max_tokens=1)
    s.add_request(c)
    _, done = step(s, token=7)
    assert done == [a]
    batch, _ = step(s, token=8)
    # b recomputes prompt + its 3 outputs and samples its 4th token in one go.
    assert rows(batch)[0] == (b.request_id, 9) and batch.sample_flags[0]
    assert s.num_preempted == 0 and b.status is RequestStatus.RUNNING
    assert b.output_token_ids == [7, 7, 7, 8]
    assert b.num_cached_tokens == 0  # set at first scheduling only


def test_preempting_itself_when_newest() -> None:
    s = make_sched(num_blocks=3, block_size=4, budget=64, caching=False)
    a, b = make_req(4, max_tokens=8), make_req(4, max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    step(s)  # a: 1 block, b: 1 block
    batch, _ = step(s)  # a takes the last block; b, the newest, cannot grow
    assert batch.preempted == [b] and batch.requests == [a]
    assert s.running == [a] and list(s.waiting.values()) == [b]


def test_preempting_an_already_scheduled_decode_refunds_it() -> None:
    s = make_sched(num_blocks=4, block_size=4, budget=64, caching=False)
    a, b = make_req(12), make_req(2)
    s.add_request(a)
    s.add_request(b)
    step(s)
    a.num_computed_tokens = 8  # pretend a is still prefilling (older, needs a 4th block)
    batch = s.schedule()
    assert batch.preempted == [b]
    assert rows(batch) == [(a.request_id, 5)]
    assert s.block_manager.num_free_blocks == 0 and len(a.block_table) == 4


def test_abort_from_each_state_frees_blocks_at_once() -> None:
    s = make_sched(num_blocks=4, block_size=4, budget=64, caching=False)
    bm = s.block_manager
    a, b = make_req(6, max_tokens=20), make_req(6, max_tokens=20)
    w = make_req(3)
    for r in (a, b, w):
        s.add_request(r)
    for _ in range(4):
        step(s)
    assert b.status is RequestStatus.PREEMPTED and w.status is RequestStatus.WAITING
    assert s.abort(["nope", b.request_id]) == [b]
    assert s.num_preempted == 0 and s.num_waiting == 1
    assert s.abort([w.request_id]) == [w] and s.num_waiting == 0
    free_before = bm.num_free_blocks
    assert s.abort([a.request_id]) == [a]
    assert bm.num_free_blocks == free_before + 3 == 4
    for r in (a, b, w):
        assert r.status is RequestStatus.FINISHED_ABORTED and r.block_table == []
    assert not s.has_unfinished and s.abort([a.request_id]) == []


def test_abort_between_schedule_and_update() -> None:
    s = make_sched()
    a, b = make_req(3), make_req(3)
    s.add_request(a)
    s.add_request(b)
    batch = s.schedule()
    s.abort([a.request_id])
    done = s.update(batch, [[5], [5]])
    assert done == [] and a.output_token_ids == [] and b.output_token_ids == [5]
    assert s.running == [b] and s.block_manager.usage == 1 / 64


@pytest.mark.parametrize(
    "kwargs, tokens, status, n_out, stop_id",
    [
        (dict(eos=(2,)), [5, 2, 5], RequestStatus.FINISHED_STOPPED, 2, 2),
        (dict(eos=(2,), ignore_eos=True, max_tokens=3), [5, 2, 5], RequestStatus.FINISHED_LENGTH, 3, None),
        (dict(stop_token_ids=[9], ignore_eos=True), [5, 9], RequestStatus.FINISHED_STOPPED, 2, 9),
        (dict(max_tokens=2), [5, 5, 5], RequestStatus.FINISHED_LENGTH, 2, None),
        (dict(max_model_len=6), [5] * 10, RequestStatus.FINISHED_LENGTH, 2, None),
        (dict(num_blocks=2), [5] * 10, RequestStatus.FINISHED_LENGTH, 4, None),  # cache limit
    ],
)
def test_stop_conditions(
    kwargs: dict, tokens: list[int], status: RequestStatus, n_out: int, stop_id: int | None
) -> None:
    sched_kw = {k: kwargs.pop(k) for k in ("max_model_len", "num_blocks") if k in kwargs}
    s = make_sched(**sched_kw)
    kwargs.setdefault("max_tokens", 16)
    req = make_req(4, **kwargs)
    s.add_request(req)
    for t in tokens:
        _, done = step(s, token=t)
        if done:
            break
    assert done == [req] and req.status is status
    assert req.num_output_tokens == n_out and req.stop_token_id == stop_id
    assert not s.has_unfinished and s.block_manager.usage == 0


def test_admission_errors() -> None:
    """The context length is the engine's check (check_context_length); the cache is the scheduler's."""
    s = make_sched(num_blocks=2, block_size=4, max_model_len=20)
    with pytest.raises(InvalidRequest, match="prompt has 8 tokens but this server's KV cache holds only 8 tokens"):
        s.add_request(make_req(8))
    ok = make_req(7)
    s.add_request(ok)
    with pytest.raises(ValueError, match="already in use") as exc:
        s.add_request(ok)
    assert not isinstance(exc.value, InvalidRequest)  # a duplicate id is a bug upstream, not the client's
    assert s.num_waiting == 1


def test_prefix_cache_hit_sets_num_cached_tokens() -> None:
    s = make_sched(block_size=4)
    prompt = list(range(1, 11))
    a = make_req(prompt, max_tokens=1)
    s.add_request(a)
    step(s)
    assert a.num_cached_tokens == 0 and a.first_scheduled_time is not None
    b = make_req(prompt, max_tokens=1)
    s.add_request(b)
    batch, _ = step(s)
    assert b.num_cached_tokens == 8 and rows(batch) == [(b.request_id, 2)]
    bm = s.block_manager
    assert bm.prefix_queries_total == 20 and bm.prefix_hits_total == 8


def test_failed_admission_does_not_double_count_prefix_queries() -> None:
    s = make_sched(num_blocks=3, block_size=4, budget=64)
    a = make_req(10, max_tokens=3)
    s.add_request(a)
    step(s)
    b = make_req(10)
    s.add_request(b)
    # b gets a 2-block prefix hit but no fresh block: rolled back. a then reaches the
    # cache's 12-token capacity and finishes.
    _, done = step(s)
    assert done == [a] and a.status is RequestStatus.FINISHED_LENGTH
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert s.block_manager.prefix_queries_total == 10
    batch, _ = step(s)
    assert rows(batch) == [(b.request_id, 2)] and b.num_cached_tokens == 8
    assert s.block_manager.prefix_queries_total == 20


# --- randomized liveness / correctness simulation -------------------------------------

VOCAB = 6
EOS = 0


def fake_model(tokens: list[int]) -> int:
    """A deterministic 'model': the next token depends only on the context."""
    return zlib.crc32(repr(tokens).encode()) % VOCAB


def reference_output(req: Request, len_limit: int) -> list[int]:
    tokens, out = list(req.prompt_token_ids), []
    while True:
        t = fake_model(tokens)
        tokens.append(t)
        out.append(t)
        if t == EOS or len(out) >= req.max_tokens or len(tokens) >= len_limit:
            return out


@pytest.mark.parametrize("seed, caching", [(0, True), (1, False), (2, True), (3, True)])
def test_randomized_simulation_finishes_everything(seed: int, caching: bool) -> None:
    rng = random.Random(seed)
    bs, num_blocks, max_model_len = 4, 10, 36
    s = make_sched(
        num_blocks=num_blocks,
        block_size=bs,
        max_num_seqs=4,
        budget=rng.choice([5, 8, 16]),
        max_model_len=max_model_len,
        caching=caching,
    )
    kv: list[int | None] = [None] * (num_blocks * bs)  # the token whose K/V each slot holds
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(12)] for _ in range(3)]
    pending = []
    for _ in range(60):
        suffix = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 10))]
        prompt = rng.choice(prefixes)[: rng.randint(0, 12)] + suffix
        pending.append((rng.randrange(150), make_req(prompt, max_tokens=rng.randint(1, 20), eos=(EOS,))))
    pending.sort(key=lambda p: p[0])
    all_reqs = [r for _, r in pending]
    work = sum(r.num_prompt_tokens + r.max_tokens for _, r in pending)
    arrived: dict[str, int] = {}
    finished: dict[str, int] = {}
    aborted: set[str] = set()

    step_no = 0
    while pending or s.has_unfinished:
        while pending and pending[0][0] <= step_no:
            arrived[pending[0][1].request_id] = step_no
            s.add_request(pending.pop(0)[1])
        if rng.random() < 0.02 and s.running:
            victim = rng.choice(s.running + list(s.waiting.values()))
            for r in s.abort([victim.request_id]):
                aborted.add(r.request_id)
                finished[r.request_id] = step_no
        batch = s.schedule()
        assert batch.total_tokens <= s.config.max_num_batched_tokens
        assert s.num_running <= 4 and len(set(map(id, batch.requests))) == len(batch)
        sampled: list[list[int]] = []
        for i, (r, n) in enumerate(zip(batch.requests, batch.num_new_tokens, strict=True)):
            c = r.num_computed_tokens
            assert n >= 1 and len(r.block_table) * bs >= c + n
            for pos in range(c, c + n):  # write this step's K/V...
                kv[r.block_table[pos // bs] * bs + pos % bs] = r.all_token_ids[pos]
            for pos in range(c + n):  # ...then attend over the whole context
                assert kv[r.block_table[pos // bs] * bs + pos % bs] == r.all_token_ids[pos]
            sampled.append([fake_model(r.all_token_ids)] if batch.sample_flags[i] else [])
        for r in s.update(batch, sampled):
            finished[r.request_id] = step_no
        step_no += 1
        assert step_no < 3 * work, "no progress: livelock or deadlock"

    len_limit = min(max_model_len, num_blocks * bs)
    assert s.block_manager.usage == 0 and s.block_manager.num_free_blocks == num_blocks
    assert s.num_preempted == 0 and s.num_waiting == 0
    assert s.preemptions_total > 0  # the cache is tiny on purpose
    if caching:
        assert s.block_manager.prefix_hits_total > 0
    # Every request finished, with exactly the output it would have had alone.
    assert len(finished) == 60
    for r in all_reqs:
        rid = r.request_id
        if rid in aborted:
            assert r.status is RequestStatus.FINISHED_ABORTED
            continue
        assert r.output_token_ids == reference_output(r, len_limit), rid
        # FCFS + only-the-newest-is-preempted: a request waits at most for the work that
        # arrived no later than it (each step advances the oldest running request).
        ahead = sum(q.num_prompt_tokens + q.max_tokens for q in all_reqs if arrived[q.request_id] <= arrived[rid])
        assert finished[rid] - arrived[rid] <= ahead, rid
