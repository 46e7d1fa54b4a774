"""Suffix decoding (SuffixDecoding, Oliaro et al.; vLLM's `suffix` method): propose the most
frequent continuation of the request's latest tokens, from suffix trees over the request's own
prompt and output and over recent requests' outputs.

Each tree is a depth-bounded suffix trie: every substring of up to `max_depth` tokens of the
sequences added is a path from the root, and each node counts the occurrences of its
substring. The proposal for a match of length m follows the most frequent child from the
match's node, multiplying each step's empirical probability (the child's share of the
node's continuations) and stopping when that product drops below `min_token_prob`, after
`max_spec_factor * m` tokens (a longer match is more trustworthy, so it may speculate
more), or after k. Of all the matches (every suffix length, in both trees) the one whose
path has the highest expected number of accepted tokens (the sum of the path's
probabilities) wins.

Everything is incremental: a request's own tree and the global one are extended by the
tokens added since its last step, and the node matching each of its suffixes is carried
from step to step, so a step costs O(max_depth + k * candidates) whatever the request's
length. Memory: up to max_depth nodes per token of the running requests' prompts and
outputs and of the cached outputs (suffix_cache_max_tokens bounds the latter).

arctic-inference's C++ SuffixDecodingCache is the reference implementation; it is not used
because it ships only as a source distribution that needs a C++/CUDA toolchain to build.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

from shared.config import EngineConfig


class _Node:
    """One substring: its occurrence count and the tokens that followed it (`total`: their
    counts' sum, less than `count` where the substring ends a sequence, as the request's
    latest tokens always do).

    Most nodes of a suffix trie have a single child, so the first child is held in two slots
    and a dict is made only for the second."""

    __slots__ = ("best", "best_tok", "child", "count", "more", "tok", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0
        self.tok = -1
        self.child: _Node | None = None
        self.more: dict[int, _Node] | None = None
        # The most frequent child, kept on increments; None after a decrement (recomputed when read).
        self.best_tok = -1
        self.best: _Node | None = None

    def get(self, tok: int) -> _Node | None:
        if self.tok == tok:
            return self.child
        more = self.more
        return more.get(tok) if more is not None else None

    def children(self) -> Iterator[tuple[int, _Node]]:
        if self.child is not None:
            yield self.tok, self.child
        if self.more is not None:
            yield from self.more.items()

    def add(self, tok: int) -> _Node:
        node = _Node()
        if self.child is None:
            self.tok, self.child = tok, node
        else:
            if self.more is None:
                self.more = {}
            self.more[tok] = node
        return node

    def remove(self, tok: int) -> None:
        if self.tok == tok:
            if self.more:
                self.tok, self.child = self.more.popitem()
            else:
                self.tok, self.child = -1, None
        elif self.more is not None:
            del self.more[tok]
        if not self.more:
            self.more = None

    def most_frequent(self) -> tuple[int, _Node | None]:
        if self.best is None and self.child is not None:
            for tok, node in self.children():
                if self.best is None or node.count > self.best.count:
                    self.best_tok, self.best = tok, node
        return self.best_tok, self.best


class SuffixTrie:
    """Occurrence counts of every substring of up to max_depth tokens of the sequences added.

    A cursor is the list of nodes of the suffixes ending at a sequence's latest token, by
    length (cursor[0] is the root); `append` moves it on by one token."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root = _Node()
        self.num_nodes = 0

    def append(self, cursor: list[_Node], tok: int) -> list[_Node]:
        """Count tok after every suffix in cursor; the cursor after tok."""
        new = [self.root]
        for node in cursor:
            # node.get(tok), inlined: this loop is the cost of every token a request adds.
            child = node.child if node.tok == tok else node.more.get(tok) if node.more is not None else None
            if child is None:
                child = node.add(tok)
                self.num_nodes += 1
            child.count += 1
            node.total += 1
            best = node.best
            if best is not None and child is not best and child.count > best.count:
                node.best_tok, node.best = tok, child
            elif best is None and node.child is child and node.more is None:
                node.best_tok, node.best = tok, child  # an only child is the most frequent one
            new.append(child)
        del new[self.max_depth :]
        return new

    def add(self, tokens: Sequence[int]) -> None:
        cursor = [self.root]
        for tok in tokens:
            cursor = self.append(cursor, tok)

    def remove(self, tokens: Sequence[int]) -> None:
        """Undo add(tokens): decrement what it counted, dropping the nodes no sequence uses."""
        cursor = [self.root]
        for tok in tokens:
            new = [self.root]
            for node in cursor:
                child = node.get(tok)
                assert child is not None, "removing a sequence that was not added"
                child.count -= 1
                node.total -= 1
                if node.best is child:
                    node.best = None
                if child.count == 0:
                    # Its descendants all came from this sequence too: they reach 0 on the
                    # following tokens, through the cursor, which still holds this node.
                    node.remove(tok)
                    self.num_nodes -= 1
                new.append(child)
            del new[self.max_depth :]
            cursor = new

    def follow(self, cursor: list[_Node], tok: int) -> list[_Node]:
        """Match-only cursor (nothing counted): the suffixes ending at tok that the trie holds."""
        new = [self.root]
        for node in cursor:
            child = node.get(tok)
            # count 0: a node another sequence's removal dropped since the cursor was made.
            if child is None or child.count == 0 or len(new) == self.max_depth:
                break
            new.append(child)
        return new


class _RequestState:
    __slots__ = ("global_cursor", "local", "local_cursor", "num_tokens", "output", "output_cursor")

    def __init__(self, max_depth: int, global_root: _Node) -> None:
        self.local = SuffixTrie(max_depth)
        self.local_cursor = [self.local.root]
        self.global_cursor = [global_root]  # matches in the global tree (counts nothing)
        self.output: list[int] = []  # the output tokens counted in the global tree so far
        self.output_cursor = [global_root]  # where the next output token is counted
        self.num_tokens = 0


class SuffixProposer:
    def __init__(self, config: EngineConfig) -> None:
        self.max_depth = config.suffix_max_tree_depth
        self.max_spec_factor = config.suffix_max_spec_factor
        self.min_token_prob = config.suffix_min_token_prob
        self.cache_max_tokens = config.suffix_cache_max_tokens
        # The global tree counts the outputs of the running requests as they grow (concurrent
        # requests doing the same task help each other) and of the finished ones in `cached`,
        # oldest first, evicted whole past cache_max_tokens (FIFO, as vLLM's suffix method).
        self.global_tree = SuffixTrie(self.max_depth)
        self.cached: OrderedDict[str, list[int]] = OrderedDict()
        self.cached_tokens = 0
        self._requests: dict[str, _RequestState] = {}

    def propose(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int, k: int) -> list[int]:
        state = self._update(request_id, token_ids, num_prompt_tokens)
        if k < 1:
            return []
        best: list[int] = []
        best_score = 0.0
        for cursor in (state.local_cursor, state.global_cursor):
            # Longest matches first: the most each may propose only shrinks from there on.
            for m in range(len(cursor) - 1, 0, -1):
                limit = min(k, int(self.max_spec_factor * m), self.max_depth - m)
                if limit <= best_score:
                    break
                tokens, score = self._path(cursor[m], limit)
                if score > best_score:
                    best, best_score = tokens, score
        return best

    def finish(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int) -> None:
        if self.cache_max_tokens <= 0:
            self._requests.pop(request_id, None)
            return
        if request_id in self._requests:  # count the tokens added since its last proposal
            self._update(request_id, token_ids, num_prompt_tokens)
            output = self._requests.pop(request_id).output
        else:  # it never proposed: nothing of it is counted yet
            output = list(token_ids[num_prompt_tokens:])
            self.global_tree.add(output)
        if not output:
            return
        old = self.cached.pop(request_id, None)  # a request id reused after it ended
        if old is not None:
            self.global_tree.remove(old)
            self.cached_tokens -= len(old)
        if len(output) > self.cache_max_tokens:  # alone over the bound: keep its tail
            self.global_tree.remove(output)
            output = output[-self.cache_max_tokens :]
            self.global_tree.add(output)
        self.cached[request_id] = output
        self.cached_tokens += len(output)
        while self.cached_tokens > self.cache_max_tokens:
            _, evicted = self.cached.popitem(last=False)
            self.global_tree.remove(evicted)
            self.cached_tokens -= len(evicted)

    def _update(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int) -> _RequestState:
        state = self._requests.get(request_id)
        if state is None or len(token_ids) < state.num_tokens:  # only ever appended; else a new sequence
            if state is not None:
                self.global_tree.remove(state.output)
            state = self._requests[request_id] = _RequestState(self.max_depth, self.global_tree.root)
        local_tree, global_tree = state.local, self.global_tree
        local_cursor, global_cursor = state.local_cursor, state.global_cursor
        output_cursor, output = state.output_cursor, state.output
        share = self.cache_max_tokens > 0
        for i in range(state.num_tokens, len(token_ids)):
            tok = token_ids[i]
            local_cursor = local_tree.append(local_cursor, tok)
            global_cursor = global_tree.follow(global_cursor, tok)
            if share and i >= num_prompt_tokens:
                output_cursor = global_tree.append(output_cursor, tok)
                output.append(tok)
        state.local_cursor, state.global_cursor, state.output_cursor = local_cursor, global_cursor, output_cursor
        state.num_tokens = len(token_ids)
        return state

    def _path(self, node: _Node, limit: int) -> tuple[list[int], float]:
        """The most frequent continuation from node, up to limit tokens, and its expected
        number of accepted tokens (the sum of the cumulative probabilities)."""
        tokens: list[int] = []
        prob = 1.0
        score = 0.0
        while len(tokens) < limit:
            tok, child = node.most_frequent()
            if child is None:
                break
            prob *= child.count / node.total
            if prob < self.min_token_prob:
                break
            tokens.append(tok)
            score += prob
            node = child
        return tokens, score
