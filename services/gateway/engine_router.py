"""Which engine core serves a request, when the gateway has several (--num-engines > 1).

Prefix affinity with a load guard, the cache-aware policy of sglang's router adapted to
one process: each engine has its own prefix cache, so a request whose prompt shares its
leading text with one served before should go where that text's KV blocks already are.
The gateway never tokenizes, so prompts are compared as text: the prompt's canonical
text (the chat messages, the completion prompt, or its token ids) is cut into CHUNK_CHARS
chunks, each hashed with everything before it, and a bounded LRU table maps chunk hashes
to the engines that served them. A request goes to the engine holding its longest
matching prefix (the least busy of them when several do, as for a shared system prompt),
unless that engine is much busier than the least busy one overall (more than
IMBALANCE_ABS requests and IMBALANCE_REL times as many in flight); with no match, or when
imbalanced, it goes to the least busy engine, and among equally busy ones to the one
whose remembered prefixes are fewest (so that a trickle of new conversations, arriving
when every engine is idle, is spread over the caches rather than piled onto engine 0).
Load is counted here, per engine, as the requests dispatched and not yet finished: exact
and immediate, unlike the engines' periodic stats.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from shared.protocol import GenerateRequest

CHUNK_CHARS = 64
"""Granularity of prefix matching (about 16 tokens of English text: one KV block)."""
MAX_ENTRIES = 1 << 18
"""Chunk hashes remembered (~16 M characters of prompts)."""
IMBALANCE_ABS = 4
IMBALANCE_REL = 1.5


def prompt_text(req: GenerateRequest) -> str:
    """The prompt as text whose prefixes are shared exactly when the prompts' are."""
    if req.messages is not None:
        return "".join(f"{m.role}\x00{m.content}\x00" for m in req.messages)
    if req.prompt is not None:
        return req.prompt
    return ",".join(map(str, req.prompt_token_ids or []))


class EngineRouter:
    def __init__(self, num_engines: int, policy: str = "prefix-affinity") -> None:
        self.num_engines = num_engines
        self.policy = policy
        self.in_flight = [0] * num_engines
        self._holders: OrderedDict[int, int] = OrderedDict()
        """chunk-prefix hash -> bit mask of the engines that served it; LRU order."""
        self._remembered = [0] * num_engines
        """Entries of _holders naming each engine: how much of the table's text it holds."""
        self._round_robin = itertools.cycle(range(num_engines))
        self.affinity_hits = 0
        """Requests routed to the engine of their longest matching prefix."""

    def route(self, text: str) -> int:
        """The engine for a request with this prompt text; counts it in flight there."""
        if self.num_engines == 1:
            engine = 0
        elif self.policy == "round-robin":
            engine = next(self._round_robin)
        else:
            engine = self._affinity(text)
        self.in_flight[engine] += 1
        return engine

    def finished(self, engine: int) -> None:
        self.in_flight[engine] -= 1

    def _affinity(self, text: str) -> int:
        hashes = _chunk_hashes(text)
        holders = self._holders
        load = self.in_flight
        mask = 0
        # Chunk hashes chain, so the longest match is the deepest hash still known.
        for h in reversed(hashes):
            mask = holders.get(h, 0)
            if mask:
                break
        remembered = self._remembered
        least = min(range(self.num_engines), key=lambda e: (load[e], remembered[e]))
        candidates = [e for e in range(self.num_engines) if mask >> e & 1]
        match = min(candidates, key=load.__getitem__) if candidates else None
        if match is not None and not self._imbalanced(match, least):
            engine = match
            self.affinity_hits += 1
        else:
            engine = least
        bit = 1 << engine
        for h in hashes:
            old = holders.get(h, 0)
            if not old & bit:
                remembered[engine] += 1
            holders[h] = old | bit
            holders.move_to_end(h)
        while len(holders) > MAX_ENTRIES:
            _, evicted = holders.popitem(last=False)
            for e in range(self.num_engines):
                if evicted >> e & 1:
                    remembered[e] -= 1
        return engine

    def _imbalanced(self, engine: int, least: int) -> bool:
        busy, idle = self.in_flight[engine], self.in_flight[least]
        return busy - idle > IMBALANCE_ABS and busy > IMBALANCE_REL * idle


def _chunk_hashes(text: str) -> list[int]:
    """Hashes of every whole-chunk prefix of text (a partial last chunk is included: two
    prompts that share it share its KV blocks too)."""
    out = []
    h = 0
    for i in range(0, len(text), CHUNK_CHARS):
        h = hash((h, text[i : i + CHUNK_CHARS]))
        out.append(h)
    return out
