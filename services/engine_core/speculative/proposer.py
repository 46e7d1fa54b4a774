"""The interface every draft-token proposer implements, and the factory the engine calls.

A proposer is model-free and deterministic: given a request's tokens it guesses the next k.
The engine scores the guesses in the normal batch and keeps only what the target model
would have produced itself, so a proposer can change speed but never the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shared.config import EngineConfig


class Proposer(Protocol):
    def propose(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int, k: int) -> list[int]:
        """Up to k draft tokens continuing token_ids (prompt + output so far); [] when nothing matches."""
        ...

    def finish(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int) -> None:
        """The request ended (finished or aborted); a proposer may keep its output as a corpus for later requests."""
        ...


def make_proposer(config: EngineConfig) -> Proposer | None:
    """The proposer for config.speculative_method; None when speculation is off."""
    method = config.speculative_method
    if method == "none":
        return None
    if method == "ngram":
        from services.engine_core.speculative.ngram import NgramProposer

        return NgramProposer(config.ngram_prompt_lookup_min, config.ngram_prompt_lookup_max)
    if method == "suffix":
        from services.engine_core.speculative.suffix import SuffixProposer

        return SuffixProposer(config)
    raise ValueError(f"unknown speculative_method {method!r}")
