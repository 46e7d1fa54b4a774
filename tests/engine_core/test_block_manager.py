"""BlockManager: ref counting, prefix caching, LRU eviction, all-or-nothing allocation."""

from __future__ import annotations

import itertools

from services.engine_core.block_manager import BlockManager
from services.engine_core.request import Request
from shared.protocol import SamplingParams

BS = 4
_ids = itertools.count()


def make_req(tokens: list[int]) -> Request:
    return Request(f"r{next(_ids)}", tokens, SamplingParams())


def attach_prefix(bm: BlockManager, req: Request) -> int:
    """Look up a new request's cached prefix and commit it (no new slots): the tokens found."""
    computed = bm.get_computed_blocks(req)
    assert bm.allocate_slots(req, 0, computed)
    return len(computed) * BS


def compute_all(bm: BlockManager, req: Request) -> None:
    """Allocate and 'compute' the whole sequence, registering its full blocks."""
    attach_prefix(bm, req)
    assert bm.allocate_slots(req, req.num_tokens - req.num_computed_tokens)
    req.num_computed_tokens = req.num_tokens
    bm.cache_full_blocks(req)


def test_allocate_and_free_ref_counting() -> None:
    bm = BlockManager(8, BS)
    req = make_req(list(range(10)))
    assert bm.allocate_slots(req, 10)
    assert len(req.block_table) == 3
    assert bm.num_free_blocks == 5 and bm.usage == 3 / 8
    # Growing within the last block needs nothing new.
    req.num_computed_tokens = 10
    assert bm.allocate_slots(req, 2) and len(req.block_table) == 3
    assert bm.allocate_slots(req, 3) and len(req.block_table) == 4
    bm.free(req)
    assert req.block_table == [] and req.chain_ids == []
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_allocate_slots_all_or_nothing() -> None:
    bm = BlockManager(4, BS)
    a = make_req(list(range(12)))
    assert bm.allocate_slots(a, 12)  # 3 blocks
    b = make_req(list(range(100, 108)))
    assert not bm.allocate_slots(b, 8)  # needs 2, 1 left
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert bm.allocate_slots(b, 4)
    assert bm.num_free_blocks == 0


def test_prefix_hit_across_requests_shares_blocks() -> None:
    bm = BlockManager(16, BS)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a = make_req(prompt)
    compute_all(bm, a)
    assert len(a.chain_ids) == 2

    b = make_req([*prompt[:8], 99, 98, 97])
    cached = attach_prefix(bm, b)
    assert cached == 8 and b.num_computed_tokens == 8
    assert b.block_table == a.block_table[:2]
    assert b.chain_ids == a.chain_ids
    assert bm.prefix_queries_total == 10 + 11 and bm.prefix_hits_total == 8
    used = bm.usage
    # Shared blocks are counted once; freeing one holder keeps them in use.
    bm.free(a)
    assert bm.usage < used
    assert bm._ref[b.block_table[0]] == 1
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_never_reports_whole_sequence_cached() -> None:
    bm = BlockManager(16, BS)
    prompt = list(range(8))  # exactly 2 full blocks
    compute_all(bm, make_req(prompt))
    b = make_req(prompt)
    # The last token must be computed for its logits: only the first block is usable.
    assert attach_prefix(bm, b) == 4
    c = make_req([*prompt, 50])
    assert attach_prefix(bm, c) == 8


def test_same_block_content_under_different_prefix_is_not_a_hit() -> None:
    bm = BlockManager(16, BS)
    shared_block = [7, 7, 7, 7]
    compute_all(bm, make_req([1, 2, 3, 4, *shared_block, 0]))
    other = make_req([5, 6, 7, 8, *shared_block, 0])
    assert attach_prefix(bm, other) == 0
    assert other.block_table == []
    # Under the same prefix it is a hit.
    same = make_req([1, 2, 3, 4, *shared_block, 0])
    assert attach_prefix(bm, same) == 8


def test_lookup_changes_nothing_and_disabled_finds_nothing() -> None:
    bm = BlockManager(16, BS)
    prompt = list(range(9))
    compute_all(bm, make_req(prompt))
    b = make_req(prompt)
    counters, free = (bm.prefix_queries_total, bm.prefix_hits_total), bm.num_free_blocks
    assert bm.get_computed_blocks(b) == bm.get_computed_blocks(b) and len(bm.get_computed_blocks(b)) == 2
    assert (bm.prefix_queries_total, bm.prefix_hits_total) == counters and bm.num_free_blocks == free
    assert b.block_table == [] and b.num_computed_tokens == 0

    off = BlockManager(16, BS, enable_prefix_caching=False)
    a = make_req(prompt)
    compute_all(off, a)
    assert a.chain_ids == [] and off.num_cached_blocks == 0
    off.free(a)
    assert attach_prefix(off, make_req(prompt)) == 0
    assert off.prefix_queries_total == 0


def test_freed_cached_blocks_are_reused_and_lru_evicted() -> None:
    bm = BlockManager(6, BS)
    a = make_req([*list(range(8)), 0])  # 2 full blocks (cached) + partial
    compute_all(bm, a)
    b = make_req([*list(range(100, 108)), 0])
    compute_all(bm, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)  # freed first -> least recently freed
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4

    # Partial (unhashed) blocks are reused before any cached block is evicted.
    x = make_req([200, 201])
    assert bm.allocate_slots(x, 2)
    assert x.block_table[0] in (a_blocks[2], b_blocks[2])
    assert bm.num_cached_blocks == 4
    y = make_req([201])
    assert bm.allocate_slots(y, 1)
    assert bm.num_cached_blocks == 4

    # Next: evict a's tail block first (freed in reverse order), then a's head.
    z = make_req(list(range(300, 304)))
    assert bm.allocate_slots(z, 4)
    assert z.block_table == [a_blocks[1]]
    assert bm.num_cached_blocks == 3
    # a's head block is still a hit (ending the chain), b's full prefix too.
    assert attach_prefix(bm, make_req([*list(range(8)), 0])) == 4
    assert attach_prefix(bm, make_req([*list(range(100, 108)), 0])) == 8


def test_hit_takes_cached_free_block_back_into_use() -> None:
    bm = BlockManager(3, BS)
    a = make_req([*list(range(8)), 0])
    compute_all(bm, a)
    bm.free(a)
    b = make_req([*list(range(8)), 1])
    assert attach_prefix(bm, b) == 8
    assert bm.num_free_blocks == 1
    # The only block left to hand out is the unhashed one; the hit blocks are safe.
    assert bm.allocate_slots(b, 1)
    assert not bm.allocate_slots(make_req([5]), 1)


def test_concurrent_identical_prefix_keeps_first_mapping() -> None:
    bm = BlockManager(16, BS)
    prompt = list(range(9))
    a, b = make_req(prompt), make_req(prompt)
    for r in (a, b):  # both admitted before either computed: no hits
        assert attach_prefix(bm, r) == 0
        assert bm.allocate_slots(r, 9)
    for r in (a, b):
        r.num_computed_tokens = 9
        bm.cache_full_blocks(r)
    assert a.chain_ids == b.chain_ids
    assert bm.num_cached_blocks == 2
    bm.free(b)  # b's duplicate blocks were never registered
    assert bm.num_cached_blocks == 2
    # b's chain continues from a's entries: a later block of b chains correctly.
    c = make_req(prompt)
    assert attach_prefix(bm, c) == 8 and c.block_table == a.block_table[:2]


def test_cache_full_blocks_incremental_decode() -> None:
    bm = BlockManager(16, BS)
    req = make_req([1, 2, 3])
    assert bm.allocate_slots(req, 3)
    req.num_computed_tokens = 3
    bm.cache_full_blocks(req)
    assert req.chain_ids == []
    req.append_output_token(4)
    assert bm.allocate_slots(req, 1)
    req.num_computed_tokens = 4
    bm.cache_full_blocks(req)
    assert len(req.chain_ids) == 1
    req.append_output_token(5)
    assert attach_prefix(bm, make_req([1, 2, 3, 4, 9])) == 4


def test_allocation_that_does_not_fit_commits_nothing() -> None:
    bm = BlockManager(4, BS)
    prompt = list(range(9))
    done = make_req(prompt)
    compute_all(bm, done)
    bm.free(done)  # its two full blocks stay cached, evictable
    q, h = bm.prefix_queries_total, bm.prefix_hits_total
    r = make_req(prompt)
    computed = bm.get_computed_blocks(r)
    assert len(computed) == 2
    # 2 cached blocks taken back + 3 fresh ones for 12 more tokens > 4 blocks: refused, untouched.
    assert not bm.allocate_slots(r, 12, computed)
    assert (bm.prefix_queries_total, bm.prefix_hits_total) == (q, h)
    assert r.num_computed_tokens == 0 and r.block_table == [] and r.chain_ids == []
    assert [bm._ref[b] for b in computed] == [0, 0] and bm.num_cached_blocks == 2
    # What fits is committed whole: the hit counted once, its blocks held.
    assert bm.allocate_slots(r, 1, computed)
    assert (bm.prefix_queries_total, bm.prefix_hits_total) == (q + 9, h + 8)
    assert r.num_computed_tokens == 8 and r.block_table[:2] == computed and [bm._ref[b] for b in computed] == [1, 1]


def test_reset_prefix_cache() -> None:
    bm = BlockManager(8, BS)
    prompt = list(range(9))
    running = make_req(prompt)
    compute_all(bm, running)
    done = make_req(list(range(50, 59)))
    compute_all(bm, done)
    bm.free(done)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8 - 3
    assert attach_prefix(bm, make_req(prompt)) == 0
    bm.free(running)
    assert bm.num_free_blocks == 8
