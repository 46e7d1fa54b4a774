import random
from typing import Any

import pytest

from services.engine_core.speculative.proposer import make_proposer
from services.engine_core.speculative.suffix import SuffixProposer, SuffixTrie
from shared.config import EngineConfig


def proposer(**kw: float) -> SuffixProposer:
    fields = {"suffix_min_token_prob": 0.0, "suffix_max_spec_factor": 8.0} | kw
    return SuffixProposer(EngineConfig(**fields))  # type: ignore[arg-type]


def substring_counts(seqs: list[list[int]], depth: int) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for s in seqs:
        for i in range(len(s)):
            for j in range(i + 1, min(i + depth, len(s)) + 1):
                counts[tuple(s[i:j])] = counts.get(tuple(s[i:j]), 0) + 1
    return counts


def trie_counts(trie: SuffixTrie) -> dict[tuple[int, ...], int]:
    out: dict[tuple[int, ...], int] = {}
    stack: list[tuple[tuple[int, ...], Any]] = [((), trie.root)]
    while stack:
        path, node = stack.pop()
        assert node.total == sum(c.count for _, c in node.children())
        for tok, child in node.children():
            key = (*path, tok)
            out[key] = child.count
            stack.append((key, child))
    return out


def test_trie_counts_every_bounded_substring_and_removal_undoes_add() -> None:
    rng = random.Random(0)
    seqs = [[rng.randrange(4) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    trie = SuffixTrie(5)
    for s in seqs:
        trie.add(s)
    assert trie_counts(trie) == substring_counts(seqs, 5)
    assert trie.num_nodes == len(substring_counts(seqs, 5))
    for i in (3, 0, 5):
        trie.remove(seqs[i])
    rest = [s for i, s in enumerate(seqs) if i not in (0, 3, 5)]
    assert trie_counts(trie) == substring_counts(rest, 5)
    assert trie.num_nodes == len(substring_counts(rest, 5))
    for s in rest:
        trie.remove(s)
    assert trie.num_nodes == 0 and trie.root.child is None and trie.root.more is None


def test_proposes_what_followed_the_match_in_the_request() -> None:
    p = proposer()
    #         prompt: a function header seen before, then its start again
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    assert p.propose("r", tokens, 12, 4) == [4, 5, 6, 7]
    assert p.propose("r", tokens, 12, 2) == [4, 5]  # capped by k
    assert p.propose("q", [1, 2, 3, 4], 4, 4) == []  # nothing repeats
    assert p.propose("q", [1, 2, 3, 4], 4, 0) == []


def test_most_frequent_continuation_wins() -> None:
    p = proposer()
    # After "5 6": 7 twice, 8 once; the latest occurrence (8) does not decide, counts do.
    tokens = [5, 6, 7, 0, 5, 6, 7, 1, 5, 6, 8, 2, 5, 6]
    assert p.propose("r", tokens, len(tokens), 1) == [7]
    # After "5 6 7": 0 and 1 once each: a tie is broken by what came first.
    assert p.propose("r", [*tokens, 7], len(tokens) + 1, 1) == [0]


def test_longer_match_beats_a_more_frequent_short_one() -> None:
    p = proposer()
    tokens = [9, 3, 1, 9, 3, 1, 9, 3, 1, 7, 8, 3, 4, 8, 3]
    # "3" is followed by 1 three times, but "8 3" was followed by 4.
    assert p.propose("r", tokens, len(tokens), 1) == [4]


def test_adaptive_k_follows_match_length_and_confidence() -> None:
    # factor 1: a match of m tokens proposes at most m.
    p = proposer(suffix_max_spec_factor=1.0)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 50, 7]  # only "7" matches (m = 1)
    assert p.propose("a", tokens, len(tokens), 8) == [8]
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 50, 6, 7, 8]  # "6 7 8" matches (m = 3)
    assert p.propose("b", tokens, len(tokens), 8) == [50, 6, 7]
    # min_token_prob: after "1 2" came 3, 4 and 5 once each (p = 1/3): 0.3 passes, 0.4 stops
    # the proposal.
    tokens = [1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2]
    assert len(proposer(suffix_min_token_prob=0.3).propose("c", tokens, len(tokens), 4)) >= 1
    assert proposer(suffix_min_token_prob=0.4).propose("d", tokens, len(tokens), 4) == []
    # The path stops where the cumulative probability falls below the threshold:
    # "4 5" -> 6 always (1.0), then 7 or 8 (1/2 each).
    tokens = [4, 5, 6, 7, 4, 5, 6, 8, 4, 5]
    assert proposer(suffix_min_token_prob=0.6).propose("e", tokens, len(tokens), 4) == [6]
    assert proposer(suffix_min_token_prob=0.5).propose("f", tokens, len(tokens), 4)[:2] == [6, 7]


def test_tree_depth_bounds_match_plus_proposal() -> None:
    p = proposer(suffix_max_tree_depth=4)
    tokens = list(range(10)) + list(range(6))
    # The longest usable match is 3 tokens, leaving one to propose; shorter matches propose more.
    out = p.propose("r", tokens, len(tokens), 8)
    assert out == [6, 7, 8][: len(out)] and 1 <= len(out) <= 3


def test_incremental_updates_match_a_fresh_proposer() -> None:
    rng = random.Random(1)
    p = proposer(suffix_cache_max_tokens=0)
    tokens = [rng.randrange(6) for _ in range(30)]
    for _ in range(150):
        tokens.append(rng.randrange(6))
        fresh = proposer(suffix_cache_max_tokens=0)
        assert p.propose("r", tokens, 30, 4) == fresh.propose("x", tokens, 30, 4)


def test_finished_outputs_become_a_corpus_for_later_requests() -> None:
    p = proposer()
    prompt = [100, 101, 102]
    output = [7, 8, 9, 10, 11, 12]
    assert p.propose("a", [*prompt, 7, 8], 3, 4) == []
    p.finish("a", [*prompt, *output], 3)
    assert "a" not in p._requests
    assert p.cached_tokens == len(output)
    # Another request, another prompt: its output starts like a's did.
    assert p.propose("b", [200, 201, 7, 8], 2, 4) == [9, 10, 11, 12]
    # The prompt is not part of the corpus: only the request itself holds it.
    assert p.propose("c", [300, 100, 101], 3, 2) == []


def test_running_requests_share_their_outputs_as_they_grow() -> None:
    p = proposer()
    p.propose("a", [100, 7, 8, 9, 10], 1, 4)  # a is still running
    assert p.propose("b", [200, 7, 8], 1, 4) == [9, 10]
    # a's tokens since its last proposal are counted when it ends.
    p.finish("a", [100, 7, 8, 9, 10, 11, 12], 1)
    assert p.cached["a"] == [7, 8, 9, 10, 11, 12]
    assert p.propose("c", [300, 10, 11], 1, 4) == [12]
    # Once every request ended, the global tree holds the cached outputs and nothing else.
    p.finish("b", [200, 7, 8], 1)
    p.finish("c", [300, 10, 11], 1)
    assert p.global_tree.num_nodes == len(substring_counts(list(p.cached.values()), 24))


def test_global_corpus_is_bounded_and_evicts_oldest_requests_whole() -> None:
    p = proposer(suffix_cache_max_tokens=10)
    p.finish("a", [0, 1, 2, 3, 4, 5], 1)  # 5 output tokens
    p.finish("b", [0, 11, 12, 13, 14], 1)  # 4
    assert list(p.cached) == ["a", "b"] and p.cached_tokens == 9
    p.finish("c", [0, 21, 22, 23], 1)  # 3: over the bound, a goes
    assert list(p.cached) == ["b", "c"] and p.cached_tokens == 7
    assert p.global_tree.num_nodes == len(substring_counts([[11, 12, 13, 14], [21, 22, 23]], 24))
    assert p.propose("x", [9, 1, 2], 1, 2) == []  # a's output is gone
    assert p.propose("y", [9, 11, 12], 1, 2) == [13, 14]
    # An output larger than the whole cache keeps its tail only.
    p.finish("d", [0, *range(30, 45)], 1)
    assert list(p.cached) == ["d"] and p.cached_tokens == 10
    assert p.cached["d"] == list(range(35, 45))
    running = [[1, 2], [11, 12]]  # x's and y's outputs so far
    assert p.global_tree.num_nodes == len(substring_counts([list(range(35, 45)), *running], 24))
    # The same, for a request that proposed while it ran (its output was counted as it grew).
    p.propose("e", [0, *range(50, 60)], 1, 2)
    p.finish("e", [0, *range(50, 65)], 1)
    assert list(p.cached) == ["e"] and p.cached["e"] == list(range(55, 65))
    assert p.global_tree.num_nodes == len(substring_counts([list(range(55, 65)), *running], 24))


def test_eviction_while_a_request_is_matching_is_safe() -> None:
    p = proposer(suffix_cache_max_tokens=6)
    p.finish("a", [0, 1, 2, 3, 4, 5, 6], 1)
    assert p.propose("r", [50, 1, 2], 1, 3) == [3, 4, 5]
    p.finish("b", [0, 31, 32, 33, 34, 35, 36], 1)  # evicts a, whose nodes r's cursor holds
    assert p.propose("r", [50, 1, 2, 3], 1, 3) == []
    assert p.propose("r", [50, 1, 2, 3, 31, 32], 1, 3) == [33, 34, 35]


def test_no_global_corpus_when_disabled() -> None:
    p = proposer(suffix_cache_max_tokens=0)
    assert p.propose("a", [0, 1, 2, 3], 1, 2) == []
    assert p.global_tree.num_nodes == 0
    p.finish("a", [0, 1, 2, 3], 1)
    assert p.cached_tokens == 0 and p.global_tree.num_nodes == 0 and not p._requests


def test_a_shorter_sequence_under_the_same_id_starts_over() -> None:
    p = proposer()
    assert p.propose("r", [1, 2, 3, 1, 2], 5, 2) == [3, 1]
    assert p.propose("r", [4, 5, 4], 3, 2) == [5, 4]
    assert p.global_tree.num_nodes == 0  # the first sequence's output [3, 1, 2] is gone


def test_make_proposer() -> None:
    p = make_proposer(EngineConfig(speculative_method="suffix", suffix_cache_max_tokens=7))
    assert isinstance(p, SuffixProposer) and p.cache_max_tokens == 7


def test_config_is_validated() -> None:
    for bad in (
        {"suffix_max_tree_depth": 1},
        {"suffix_cache_max_tokens": -1},
        {"suffix_max_spec_factor": 0.0},
        {"suffix_min_token_prob": 1.5},
    ):
        with pytest.raises(ValueError):
            EngineConfig(**bad)  # type: ignore[arg-type]
