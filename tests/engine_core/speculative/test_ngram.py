import random

import pytest

from services.engine_core.speculative.ngram import NgramProposer
from services.engine_core.speculative.proposer import make_proposer
from shared.config import EngineConfig


def test_proposes_continuation_of_the_longest_then_latest_match() -> None:
    p = NgramProposer(1, 3)
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 8, 2, 3, 7, 5, 2, 3]
    # "2 3" occurs at 1 and 5; the latest (5) is followed by 7 5 2 3.
    assert p.propose("r", tokens, 4, 3) == [7, 5, 2]
    # A 3-gram beats a later 2-gram: "1 2 3" at 0 is followed by 9.
    assert p.propose("s", [1, 2, 3, 9, 4, 2, 3, 6, 1, 2, 3], 0, 2) == [9, 4]


def test_short_continuations_and_no_match() -> None:
    p = NgramProposer(2, 4)
    # a match near the end: the text loops, and so do the drafts
    assert p.propose("r", [5, 6, 7, 5, 6], 5, 8) == [7, 5, 6, 7, 5, 6, 7, 5]
    assert p.propose("l", [1, 2, 4, 4, 4], 5, 3) == [4, 4, 4]
    assert p.propose("q", [1, 2, 3, 4], 4, 3) == []
    assert p.propose("q", [1], 1, 3) == []
    assert p.propose("q", [1, 2, 3, 4], 4, 0) == []
    # min_n = 2: a lone repeated token is not enough
    assert p.propose("z", [1, 7, 2, 7], 4, 2) == []
    assert NgramProposer(1, 2).propose("z", [1, 7, 2, 7], 4, 2) == [2, 7]
    assert NgramProposer(1, 2).propose("z", [1, 7, 2, 7], 4, 3) == [2, 7, 2]


def test_incremental_growth_matches_a_fresh_proposer() -> None:
    p = NgramProposer(1, 4)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    for _ in range(200):
        tokens.append((tokens[-1] * 7 + tokens[-3]) % 11)
        assert p.propose("r", tokens, 3, 4) == NgramProposer(1, 4).propose("x", tokens, 3, 4)
    p.finish("r", tokens, 3)
    assert "r" not in p._tokens


def test_make_proposer() -> None:
    assert make_proposer(EngineConfig()) is None
    assert isinstance(make_proposer(EngineConfig(speculative_method="ngram")), NgramProposer)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        EngineConfig(speculative_method="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError):
        EngineConfig(ngram_prompt_lookup_min=3, ngram_prompt_lookup_max=2)


def reference(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Brute force: the longest n in [min_n, max_n] whose last n tokens occur earlier, its latest occurrence."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[len(tokens) - n :]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                follow = tokens[start + n : start + n + k]
                return [follow[j % len(follow)] for j in range(k)] if k > 0 else []
    return []


def test_lookup_equals_the_brute_force_definition() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 8)
        tokens = [rng.randrange(rng.choice((2, 3, 5))) for _ in range(rng.randint(1, 40))]
        k = rng.randint(0, 6)
        assert NgramProposer(min_n, max_n).propose("r", tokens, 0, k) == reference(tokens, min_n, max_n, k)
