"""N-gram prompt lookup: propose what followed the latest earlier occurrence of the last n tokens.

The drafts are the k tokens after that occurrence, read as if the drafts were already part of
the text: when the occurrence is close to the end, the text is repeating itself and the drafts
go on repeating (for a loop of one token, k copies of it).

Helps where the output repeats its input (editing code, quoting or summarizing a document,
continuing a table). Longer n-grams are tried first, as they predict better.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n} and {max_n}")
        self.min_n = min_n
        self.max_n = max_n
        # Each request's tokens as an int64 array grown in place, so a step converts only the
        # tokens added since the last one rather than the whole prompt.
        self._tokens: dict[str, tuple[np.ndarray, int]] = {}

    def propose(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int, k: int) -> list[int]:
        del num_prompt_tokens  # the prompt and the output are one corpus here
        if k < 1:
            return []
        t = self._array(request_id, token_ids)
        last = len(t) - 1
        # Earlier positions j (j < last, so each has a next token to propose) whose token is the
        # latest one: matches of length 1. Extend all of them backwards a token at a time,
        # keeping those that still match, up to max_n: what is left are the longest matches.
        ends = np.flatnonzero(t[:last] == t[last])
        n = 1
        while n < self.max_n and len(ends):
            room = ends[ends >= n]
            longer = room[t[room - n] == t[last - n]]
            if not len(longer):
                break
            ends, n = longer, n + 1
        if n < self.min_n or not len(ends):
            return []
        begin = int(ends[-1]) + 1  # the most recent of the longest matches
        follow = t[begin : begin + k].tolist()
        # A match near the end means the text is looping with period len(follow): the
        # drafts continue the loop, as the lookup would once they were accepted.
        return [follow[j % len(follow)] for j in range(k)]

    def finish(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int) -> None:
        self._tokens.pop(request_id, None)

    def _array(self, request_id: str, token_ids: Sequence[int]) -> np.ndarray:
        buf, filled = self._tokens.get(request_id, (np.empty(0, np.int64), 0))
        n = len(token_ids)
        if n < filled:  # tokens are only ever appended; anything else is a new sequence
            filled = 0
        if n > len(buf):
            grown = np.empty(max(n, 2 * len(buf), 64), np.int64)
            grown[:filled] = buf[:filled]
            buf = grown
        if n > filled:
            buf[filled:n] = np.asarray(token_ids[filled:n], dtype=np.int64)
        self._tokens[request_id] = (buf, n)
        return buf[:n]
