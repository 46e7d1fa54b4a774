"""Paged KV-cache block allocation with automatic prefix caching.

Physical blocks are ref-counted. A FULL block whose K/V has been computed is registered
in the prefix cache under the key (parent chain id, its token ids); the chain id of the
first block's parent is ROOT. Keying the dict by the token tuple itself (not by a hash
of it) means a lookup verifies the tokens on every hit, and chain ids are unique
integers that are never reused, so neither a token-hash collision nor a recycled parent
block can ever hand out K/V computed for a different prefix. `req.chain_ids` holds these
chain ids, one per full cached block of the request.

Admission is a pure lookup (`get_computed_blocks`) and an all-or-nothing commit
(`allocate_slots` with the blocks found), as vLLM's KV-cache manager splits them: a
request that does not fit changes nothing, hit counters included.

Block states:
  in use     ref > 0 (may or may not be registered in the cache)
  evictable  ref == 0, registered: kept for reuse, evicted least recently freed first
  free       ref == 0, not registered: handed out before any evictable block

With record_events, every change to the set of cached blocks is also recorded as a
vLLM-format KV-cache event (BlockStored / BlockRemoved / AllBlocksCleared, keyed by
chain id) for the engine to publish: replaying them rebuilds exactly the set of
cached blocks.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from services.engine_core.request import Request
from shared.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvents

ROOT = -1
"""Chain id of the (virtual) parent of a sequence's first block."""

_Key = tuple[int, tuple[int, ...]]


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        record_events: bool = False,
        medium: str = "GPU",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._key: list[_Key | None] = [None] * num_blocks
        self._chain_id = [ROOT] * num_blocks
        self._cache: dict[_Key, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        # Insertion order == order freed, so popitem(last=False) evicts the LRU block.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._num_used = 0
        self._next_chain_id = 0
        self.prefix_queries_total = 0
        self.prefix_hits_total = 0
        self._events: list[KVCacheEvents] | None = [] if record_events and enable_prefix_caching else None
        self._medium = medium

    # --- gauges ----------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: free plus evictable cached ones."""
        return self.num_blocks - self._num_used

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cache)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return self._num_used / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def take_events(self) -> list[KVCacheEvents]:
        """The KV-cache events recorded since the last call (always [] without record_events)."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    # --- allocation ------------------------------------------------------------------

    def get_computed_blocks(self, req: Request) -> list[int]:
        """The cached blocks holding the longest prefix of the request's full blocks. Changes
        nothing. Never the whole sequence: the last token must run through the model to
        produce the logits we sample from."""
        if not self.enable_prefix_caching:
            return []
        tokens = req.all_token_ids
        bs = self.block_size
        blocks: list[int] = []
        parent = ROOT
        for i in range((len(tokens) - 1) // bs):
            block = self._cache.get((parent, tuple(tokens[i * bs : (i + 1) * bs])))
            if block is None:
                break
            blocks.append(block)
            parent = self._chain_id[block]
        return blocks

    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Grow req.block_table to hold num_computed_tokens + num_new_tokens tokens.

        computed_blocks: get_computed_blocks' answer for a request being admitted (it holds
        no blocks): they are attached first, its num_computed_tokens starts after them, and
        the lookup counts in the hit rate. All or nothing: on False nothing changed.
        """
        computed = computed_blocks or []
        bs = self.block_size
        num_computed = req.num_computed_tokens + len(computed) * bs
        need = self.blocks_needed(num_computed + num_new_tokens) - len(req.block_table) - len(computed)
        # Cached blocks nobody holds count as free until this request takes them back.
        revived = sum(1 for block in computed if self._ref[block] == 0)
        if need > self.num_free_blocks - revived:
            return False
        for block in computed:  # before any fresh block: eviction must not pick these
            self._take_ref(block)
            req.block_table.append(block)
            req.chain_ids.append(self._chain_id[block])
        req.num_computed_tokens = num_computed
        if computed_blocks is not None and self.enable_prefix_caching:
            self.prefix_queries_total += req.num_tokens
            self.prefix_hits_total += len(computed) * bs
        for _ in range(max(need, 0)):
            block = self._take_fresh_block()
            self._ref[block] = 1
            self._num_used += 1
            req.block_table.append(block)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(req.num_computed_tokens // bs, len(req.block_table))
        parent = req.chain_ids[-1] if req.chain_ids else ROOT
        tokens = req.all_token_ids
        first_new = len(req.chain_ids)
        stored: list[int] = []
        for i in range(first_new, num_full):
            key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
            existing = self._cache.get(key)
            if existing is not None:
                # Another request computed the same block first: keep its entry (ours
                # stays unregistered and goes to the free list when released) and chain
                # on from it, since that is the id a later lookup will follow.
                parent = self._chain_id[existing]
            else:
                block = req.block_table[i]
                if self._key[block] is not None:  # cannot happen: fresh blocks are unkeyed
                    raise AssertionError(f"block {block} is already cached")
                parent = self._next_chain_id
                self._next_chain_id += 1
                self._cache[key] = block
                self._key[block] = key
                self._chain_id[block] = parent
                if self._events is not None:
                    stored.append(i)
            req.chain_ids.append(parent)
        if stored:
            self._record_stored(req, stored)

    def _record_stored(self, req: Request, indices: list[int]) -> None:
        """One BlockStored per run of consecutive newly registered blocks (each event is a
        chain: its first block's parent, then each block the parent of the next)."""
        assert self._events is not None
        bs = self.block_size
        start = 0
        for j in range(1, len(indices) + 1):
            if j == len(indices) or indices[j] != indices[j - 1] + 1:
                run = indices[start:j]
                first = run[0]
                self._events.append(
                    BlockStored(
                        block_hashes=[req.chain_ids[i] for i in run],
                        parent_block_hash=req.chain_ids[first - 1] if first > 0 else None,
                        token_ids=req.all_token_ids[first * bs : (run[-1] + 1) * bs],
                        block_size=bs,
                        medium=self._medium,
                    )
                )
                start = j

    def free(self, req: Request) -> None:
        # Tail first: the tail is then older in the LRU order and evicted before the
        # head, which is the part other requests are likelier to share.
        for block in reversed(req.block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._num_used -= 1
                if self._key[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        req.block_table = []
        req.chain_ids = []

    def release_unused_blocks(self, req: Request) -> None:
        """Free the blocks past the request's tokens (those only rejected draft tokens used).
        They hold no computed token, so none is registered in the prefix cache."""
        keep = self.blocks_needed(req.num_tokens)
        while len(req.block_table) > keep:
            block = req.block_table.pop()
            self._ref[block] -= 1
            assert self._ref[block] == 0 and self._key[block] is None, "a draft block is shared or cached"
            self._num_used -= 1
            self._free.appendleft(block)  # hot in caches: hand it out next

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (e.g. after weights changed). Blocks in use stay
        allocated, merely unregistered; requests keep running unaffected."""
        for block in self._cache.values():
            self._key[block] = None
            self._chain_id[block] = ROOT
        self._cache.clear()
        if self._events is not None:
            self._events.append(AllBlocksCleared())
        self._free.extend(self._evictable)
        self._evictable.clear()

    # --- internals -------------------------------------------------------------------

    def _take_ref(self, block: int) -> None:
        if self._ref[block] == 0:
            del self._evictable[block]
            self._num_used += 1
        self._ref[block] += 1

    def _take_fresh_block(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)
        key = self._key[block]
        assert key is not None
        del self._cache[key]
        if self._events is not None:
            self._events.append(BlockRemoved(block_hashes=[self._chain_id[block]], medium=self._medium))
        self._key[block] = None
        self._chain_id[block] = ROOT
        return block
