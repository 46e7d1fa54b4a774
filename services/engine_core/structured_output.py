"""Constrained decoding with xgrammar: grammars compiled beside the step loop, one token
mask per step for the constrained rows of the batch.

A request with a `GrammarSpec` waits in the engine (not the scheduler) while a thread of
this process compiles its grammar; xgrammar releases the GIL while it compiles, so the
step loop keeps running everyone else. Compiled grammars are cached by xgrammar's
compiler (keyed by the spec text, LRU within --grammar-cache-mb); specs that failed are
remembered so a client repeating a bad schema costs nothing. A compile past
--grammar-compile-timeout-s fails its request with a 400 (the thread finishes in the
background: xgrammar cannot be interrupted).

Each admitted request owns a RequestGrammar (its GrammarMatcher). Every step the model
runner fills one bitmask row per constrained request, the sampler applies the mask to
exactly those rows (xgrammar's kernel: C++ on CPU, Triton on CUDA), and the scheduler
advances the matcher with the sampled token.

Speculative decoding (as vLLM's StructuredOutputManager): the engine cuts a request's drafts
at the first token the grammar rejects (`validate`), since the target could never sample
it; a row verifying k drafts gets k + 1 mask rows, each the matcher's state after the
drafts before it (`fill`: the matcher is advanced through the drafts and rolled back), so
every position samples exactly as plain decoding would there; and the scheduler advances
the matcher by the accepted tokens only. Lookahead never outlives the call that makes it:
the matcher always holds exactly the request's output tokens. A reasoning model's request (ReasoningTokens)
is constrained in its answer only: while it thinks, its row allows every token but EOS (a
constrained output may not end before its answer) and the matcher does not move; the answer
starts after `</think>`, as vLLM's `reasoning_parser.is_reasoning_end`. The marker is found in
the bytes of the tokens (the vocabulary's, from xgrammar), not as one token sequence: a model
may spell a multi-token `</think>` in other tokens than its standard encoding (`</` `think>`
or one character at a time), and the answer must still be constrained.
Preemption keeps the matcher: it already holds every emitted token, and a re-prefill
samples only at its end.

xgrammar is imported in the compile thread, never on the step loop, and only once a
tokenizer worker has sent the vocabulary (TokenizerVocab) or a request needs it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch

from shared.config import EngineConfig
from shared.errors import InvalidRequest
from shared.protocol import GrammarSpec, ReasoningTokens

if TYPE_CHECKING:
    import xgrammar as xgr

log = logging.getLogger(__name__)

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: ": the client needs the rest.
_CPP_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+:\d+:\s*")
_MAX_REMEMBERED_FAILURES = 1024
# Compact JSON, spaced as models were trained on (json.dumps' default): a small model left
# free to choose whitespace can emit newlines until max_tokens runs out.
_JSON_SEPARATORS = (", ", ": ")


class GrammarError(InvalidRequest):
    """The client's grammar cannot be served (invalid, unsupported or too slow to compile): a 400."""


class CompileJob:
    """One grammar being compiled for one request."""

    def __init__(self, spec: GrammarSpec) -> None:
        self.spec = spec
        self.started: float | None = None
        """When a compile thread picked it up (the timeout counts from here, not from a queue)."""
        self.future: Future[Any] | None = None
        self.error: str | None = None
        """Set instead of future when the spec failed before."""


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF accepting exactly one of the strings (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def clean_error(e: BaseException) -> str:
    return _CPP_PREFIX.sub("", str(e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class StructuredOutputManager:
    def __init__(self, config: EngineConfig, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        """The model's logits width: the mask covers every id the sampler can draw."""
        self.timeout_s = config.grammar_compile_timeout_s
        self._cache_bytes = config.grammar_cache_mb << 20
        self._executor = ThreadPoolExecutor(max(1, config.grammar_compile_threads), thread_name_prefix="grammar")
        self._compiler: Future[xgr.GrammarCompiler] | None = None
        self._token_bytes: list[bytes] = []
        """Every token's bytes (set with the compiler): where a reasoning request's `</think>` is."""
        self._failed: OrderedDict[GrammarSpec, str] = OrderedDict()

    # --- vocabulary ---------------------------------------------------------------------

    def set_vocab(self, tokenizer_json: str, eos_token_ids: Sequence[int]) -> None:
        """The first vocabulary wins: every tokenizer worker sends the same one."""
        if self._compiler is None:
            self._compiler = self._executor.submit(self._build_compiler, tokenizer_json, list(eos_token_ids))

    @property
    def has_vocab(self) -> bool:
        return self._compiler is not None

    def _build_compiler(self, tokenizer_json: str, eos_token_ids: list[int]) -> xgr.GrammarCompiler:
        import tokenizers
        import xgrammar as xgr

        # As xgr.TokenizerInfo.from_huggingface does, from the tokenizers JSON alone.
        backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        encoded = [""] * self.vocab_size
        for token, idx in backend.get_vocab(with_added_tokens=True).items():
            if idx < self.vocab_size:
                encoded[idx] = token
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer_json)
        info = xgr.TokenizerInfo(
            encoded,
            vocab_type=meta["vocab_type"],
            vocab_size=self.vocab_size,
            stop_token_ids=[t for t in eos_token_ids if t < self.vocab_size] or None,
            add_prefix_space=meta["add_prefix_space"],
        )
        self._token_bytes = info.decoded_vocab
        log.info("grammar compiler ready (%s vocabulary of %d tokens)", meta["vocab_type"].name, self.vocab_size)
        return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True, cache_limit_bytes=self._cache_bytes)

    # --- compiling ----------------------------------------------------------------------

    def submit(self, spec: GrammarSpec) -> CompileJob:
        job = CompileJob(spec)
        if spec in self._failed:
            job.error = self._failed[spec]
        elif self._compiler is None:
            job.error = "structured outputs are unavailable: the engine has no tokenizer vocabulary"
        else:
            job.future = self._executor.submit(self._compile, job)
        return job

    def poll(self, job: CompileJob, now: float | None = None) -> Any | None:
        """The compiled grammar, None while compiling; raises GrammarError."""
        if job.error is not None:
            raise GrammarError(job.error)
        assert job.future is not None
        if job.future.done():
            try:
                return job.future.result()
            except Exception as e:
                raise self._fail(job.spec, f"invalid {job.spec.kind}: {clean_error(e)}") from None
        now = time.monotonic() if now is None else now
        if job.started is not None and now - job.started > self.timeout_s:
            raise self._fail(job.spec, f"the {job.spec.kind} took longer than {self.timeout_s:g} s to compile")
        return None

    def _fail(self, spec: GrammarSpec, message: str) -> GrammarError:
        self._failed[spec] = message
        while len(self._failed) > _MAX_REMEMBERED_FAILURES:
            self._failed.popitem(last=False)
        return GrammarError(message)

    def _compile(self, job: CompileJob) -> xgr.CompiledGrammar:
        assert self._compiler is not None
        compiler = self._compiler.result()
        job.started = time.monotonic()
        spec = job.spec
        if spec.kind == "json_schema":
            return compiler.compile_json_schema(spec.spec, any_whitespace=False, separators=_JSON_SEPARATORS)
        if spec.kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=_JSON_SEPARATORS)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.spec)
        if spec.kind == "choice":
            return compiler.compile_grammar(choice_grammar(json.loads(spec.spec)))
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.spec)
        raise ValueError(f"unknown grammar kind {spec.kind!r}")

    # --- per request --------------------------------------------------------------------

    def matcher(
        self, compiled: xgr.CompiledGrammar, eos_token_ids: Sequence[int], reasoning: ReasoningTokens | None = None
    ) -> RequestGrammar:
        """A request's grammar state (its grammar compiled, so the vocabulary's bytes are known)."""
        import xgrammar as xgr

        m = xgr.GrammarMatcher(compiled, override_stop_tokens=list(eos_token_ids) or None)
        return RequestGrammar(m, eos_token_ids, reasoning, self._token_bytes)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _set_bit(bitmask: torch.Tensor, row: int, token: int, allowed: bool) -> None:
    word, bit = divmod(token, 32)
    if word >= bitmask.shape[1]:
        return
    value = int(bitmask[row, word]) & 0xFFFFFFFF
    value = value | (1 << bit) if allowed else value & ~(1 << bit)
    bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value  # back to int32


class RequestGrammar:
    """One request's grammar state: its matcher, and whether it is still thinking."""

    def __init__(
        self,
        matcher: xgr.GrammarMatcher,
        eos_token_ids: Sequence[int],
        reasoning: ReasoningTokens | None = None,
        token_bytes: Sequence[bytes] = (),
    ) -> None:
        self.matcher = matcher
        self._eos = list(eos_token_ids)
        self._token_bytes = token_bytes
        self._end = b""
        """The bytes of `</think>` (of its standard tokens): the answer starts after them."""
        if reasoning is not None and all(0 <= t < len(token_bytes) for t in reasoning.end):
            self._end = b"".join(token_bytes[t] for t in reasoning.end)
        self._start = reasoning.start if reasoning is not None else None
        self.phase: Literal["reasoning", "maybe", "answer"] = "answer"
        """reasoning: thinking, unconstrained; maybe: the first token may open the thinking
        (`start`) or begin the answer; answer: constrained."""
        if reasoning is not None and self._end:
            if reasoning.inside:
                self.phase = "reasoning"
            elif reasoning.start is not None:
                self.phase = "maybe"
        self._tail = b""
        """The last len(end) - 1 bytes of the thinking: a marker that ends in the next token
        may begin in them."""
        self._moves = 0
        """Tokens the matcher has accepted, lookahead included (what a rollback undoes)."""

    def fill(self, bitmask: torch.Tensor, row: int, drafts: Sequence[int] = ()) -> None:
        """This request's rows of the step's mask (they start all allowed): row for the next
        token, then one per draft, each for the token after the drafts before it. A row
        after a draft the grammar rejects, or after its end, stays all allowed: the target
        never samples a rejected draft, so nothing after one is ever kept."""
        with self._lookahead():
            for j in range(len(drafts) + 1):
                self._fill_row(bitmask, row + j)
                if j == len(drafts) or not self.accept(drafts[j]) or self.is_terminated():
                    break

    def validate(self, drafts: Sequence[int]) -> int:
        """How many leading drafts the grammar accepts in a row (the matcher is left as it was)."""
        n = 0
        with self._lookahead():
            for token in drafts:
                if self.is_terminated() or not self.accept(token):
                    break
                n += 1
        return n

    def _fill_row(self, bitmask: torch.Tensor, row: int) -> None:
        if self.phase == "reasoning":
            for t in self._eos:
                _set_bit(bitmask, row, t, allowed=False)
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.phase == "maybe" and self._start is not None:
            _set_bit(bitmask, row, self._start, allowed=True)

    def accept(self, token: int) -> bool:
        """Advance by one token; False if the grammar rejects it (the state is then unchanged).
        Thinking accepts every token but EOS, as its mask row allows."""
        if self.phase == "maybe":
            if token == self._start:
                self.phase = "reasoning"
                return True
            if not self.matcher.accept_token(token):
                return False
            self._moves += 1
            self.phase = "answer"
            return True
        if self.phase == "reasoning":
            if token in self._eos:
                return False
            text = self._tail + (self._token_bytes[token] if 0 <= token < len(self._token_bytes) else b"")
            if self._end in text:
                self.phase = "answer"
            else:
                self._tail = text[max(0, len(text) - len(self._end) + 1) :]
            return True
        if not self.matcher.accept_token(token):
            return False
        self._moves += 1
        return True

    @contextmanager
    def _lookahead(self) -> Iterator[None]:
        """Whatever the block accepts is undone when it exits (the matcher rolled back)."""
        phase, tail, moves = self.phase, self._tail, self._moves
        try:
            yield
        finally:
            if self._moves > moves:
                self.matcher.rollback(self._moves - moves)
            self.phase, self._tail, self._moves = phase, tail, moves

    def is_terminated(self) -> bool:
        """The answer is complete and an end token was accepted."""
        return self.phase == "answer" and bool(self.matcher.is_terminated())


def fill_bitmask(
    grammars: Sequence[tuple[int, RequestGrammar, Sequence[int]]], batch_size: int, vocab_size: int
) -> torch.Tensor:
    """A [batch_size, ceil(V/32)] int32 mask (all allowed) with each (first row, grammar,
    drafts) filled: len(drafts) + 1 rows from its first row on."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(batch_size, vocab_size)
    for row, g, drafts in grammars:
        g.fill(bitmask, row, drafts)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Masked tokens of the given rows become -inf, in place (on the logits' device)."""
    import xgrammar as xgr

    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
