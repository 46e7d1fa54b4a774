"""Batched token sampling: penalties, logit_bias, grammar masks, min_tokens, temperature, top-k/p, seeds, logprobs.

Per-request parameters become a few small per-batch tensors once per step
(SamplingBatch.build); the sampler itself runs only batched tensor ops, and a
feature no request of the batch uses costs nothing.

Sampling is inverse-CDF with ONE uniform per row rather than Gumbel/exponential
noise over [B, V]: drawing V random numbers per row costs ~10x the rest of the
sampler on CPU, while exp + cumsum + searchsorted is a few cheap passes. It also
makes seeding trivial: a seeded row's uniform is a hash of (seed, number of output
tokens so far), and every op after it is row-wise, so the token depends only on
the request's own logits and that pair: not on the batch around it, its position
in the batch, or whether it was preempted and recomputed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from services.engine_core.structured_output import apply_bitmask
from shared.protocol import SamplingParams

_M64 = (1 << 64) - 1
_NUCLEUS_TRY = 256
_NUCLEUS_GROWTH = 8
"""Top-p looks for the nucleus among the top-256 tokens first, then 2048, then all: at V=49k
topk(256) costs ~5% of a full sort and topk(2048) ~15%."""
_ARGMAX_BLOCK = 1024
_ARGMAX_PLAIN_MAX = 98304
"""first_argmax: logits per block, and up to how many logits (2 rows of a 49k vocabulary) the
plain max(dim) is as fast."""
_NEG_INF = float("-inf")
_LOG_FLOOR = -80.0
_P_FLOOR = math.exp(-79.0)
"""Tokens below e^-79 of the most likely one get probability 0 (exp(-87) is already subnormal)."""


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, step: int) -> float:
    """A uniform in (0, 1], a pure function of (seed, step): the draw of a seeded request."""
    h = _splitmix64(_splitmix64(seed & _M64) ^ (step & _M64))
    return ((h >> 11) + 1) * 2.0**-53


def _t(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


@dataclass
class _Group:
    rows: Tensor | None
    """Indices into the sampled rows; None when the group is all of them."""
    uniform: Tensor
    """One draw in (0, 1] per row."""
    min_p: Tensor | None
    top_k: Tensor | None = None
    """0 when disabled; set for the filtered group only."""
    top_p: Tensor | None = None
    """1.0 when disabled; None when no row of the group has top-p."""
    k_try: int = 0
    """Candidates taken with topk() (clamped to V)."""


@dataclass
class SamplingBatch:
    """Row indices named *_rows index the full batch; the sampling-stage fields
    (temperature onwards) index the sampled rows, i.e. the non-greedy ones."""

    batch_size: int
    greedy_rows: Tensor | None
    """Greedy rows when the batch is mixed; None when all or none are greedy."""
    sample_rows: Tensor | None
    """Sampled rows when the batch is mixed; None when all or none are sampled."""
    num_sampled: int
    # penalties, as (row, token) pairs with no duplicate pair
    rep_rows: Tensor | None = None
    rep_tokens: Tensor | None = None
    rep_penalty: Tensor | None = None
    """Per pair: the row's repetition penalty."""
    freq_rows: Tensor | None = None
    freq_tokens: Tensor | None = None
    freq_sub: Tensor | None = None
    """Per pair: frequency_penalty * count + presence_penalty, subtracted from the logit."""
    ban_rows: Tensor | None = None
    ban_tokens: Tensor | None = None
    """min_tokens not reached: these (row, token) are masked to -inf."""
    bias_rows: Tensor | None = None
    bias_tokens: Tensor | None = None
    bias_values: Tensor | None = None
    """logit_bias: added to these (row, token) logits."""
    grammar_bitmask: Tensor | None = None
    """Structured outputs: [B, ceil(V/32)] int32 allowed-token bits (set by the model runner)."""
    grammar_rows: list[int] | None = None
    """The rows grammar_bitmask constrains; the others pay nothing."""
    # sampling stage, over the sampled rows
    temperature: Tensor | None = None
    plain: _Group | None = None
    """Rows without top-k/top-p: drawn over the whole vocabulary."""
    filtered: _Group | None = None
    """Rows with top-k or top-p: drawn among the top candidates."""
    # logprobs
    logprob_rows: Tensor | None = None
    """Rows that asked for logprobs; None when all of them did."""
    num_top_logprobs: int = -1
    """Max requested top alternatives; -1 when no row asked for logprobs."""

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        eos_token_ids: Sequence[Sequence[int]],
        device: torch.device | str,
        num_output_tokens: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> SamplingBatch:
        """num_output_tokens defaults to the lengths of output_token_ids; generator (CPU)
        draws the unseeded rows' uniforms, torch's global one by default."""
        dev = torch.device(device)
        i64, f32 = torch.int64, torch.float32
        B = len(params)
        n_out = list(num_output_tokens) if num_output_tokens is not None else [len(o) for o in output_token_ids]
        # top_k == 1 is argmax whatever the temperature
        is_greedy = [p.greedy or p.top_k == 1 for p in params]
        sampled = [i for i in range(B) if not is_greedy[i]]
        mixed = 0 < len(sampled) < B
        b = cls(
            batch_size=B,
            greedy_rows=_t([i for i in range(B) if is_greedy[i]], i64, dev) if mixed else None,
            sample_rows=_t(sampled, i64, dev) if mixed else None,
            num_sampled=len(sampled),
        )

        # Repetition penalty: over prompt + output; dedup (row, token) via a packed int64 key.
        rep = [i for i in range(B) if params[i].repetition_penalty != 1.0]
        if rep:
            rows, toks, _ = _unique_pairs(rep, [itertools.chain(prompt_token_ids[i], output_token_ids[i]) for i in rep])
            pen = torch.tensor([p.repetition_penalty for p in params], dtype=f32)[rows]
            b.rep_rows, b.rep_tokens, b.rep_penalty = rows.to(dev), toks.to(dev), pen.to(dev)
        # Frequency / presence: over output tokens only (OpenAI semantics).
        fp = [
            i for i in range(B) if (params[i].frequency_penalty or params[i].presence_penalty) and output_token_ids[i]
        ]
        if fp:
            rows, toks, counts = _unique_pairs(fp, [output_token_ids[i] for i in fp])
            freq = torch.tensor([params[i].frequency_penalty for i in range(B)], dtype=f32)[rows]
            pres = torch.tensor([params[i].presence_penalty for i in range(B)], dtype=f32)[rows]
            b.freq_rows, b.freq_tokens = rows.to(dev), toks.to(dev)
            b.freq_sub = (freq * counts + pres).to(dev)
        # min_tokens: stop ids always, EOS only when it would stop the request.
        ban_r: list[int] = []
        ban_t: list[int] = []
        for i, p in enumerate(params):
            if n_out[i] < p.min_tokens:
                ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids[i]))
                ban_r += [i] * len(ids)
                ban_t += ids
        if ban_r:
            b.ban_rows, b.ban_tokens = _t(ban_r, i64, dev), _t(ban_t, i64, dev)
        bias = [(i, t, v) for i, p in enumerate(params) if p.logit_bias for t, v in p.logit_bias.items()]
        if bias:
            b.bias_rows = _t([i for i, _, _ in bias], i64, dev)
            b.bias_tokens = _t([t for _, t, _ in bias], i64, dev)
            b.bias_values = _t([v for _, _, v in bias], f32, dev)

        if sampled:
            sp = [params[i] for i in sampled]
            if any(p.temperature != 1.0 for p in sp):
                b.temperature = _t([p.temperature for p in sp], f32, dev)
            u = 1.0 - torch.rand(len(sp), dtype=torch.float64, generator=generator)  # (0, 1]
            seeded = [(j, p.seed) for j, p in enumerate(sp) if p.seed is not None]
            if seeded:
                u[[j for j, _ in seeded]] = torch.tensor(
                    [seeded_uniform(seed, n_out[sampled[j]]) for j, seed in seeded], dtype=torch.float64
                )
            u = u.float()
            filt = [j for j, p in enumerate(sp) if p.top_k > 0 or p.top_p < 1.0]
            plain = [j for j, p in enumerate(sp) if not (p.top_k > 0 or p.top_p < 1.0)]
            for group in (plain, filt):
                if not group:
                    continue
                gp = [sp[j] for j in group]
                g = _Group(
                    rows=_t(group, i64, dev) if len(group) < len(sp) else None,
                    uniform=u[group].to(dev),
                    min_p=_t([p.min_p for p in gp], f32, dev) if any(p.min_p > 0 for p in gp) else None,
                )
                if group is filt:
                    g.top_k = _t([max(p.top_k, 0) for p in gp], i64, dev)
                    if any(p.top_p < 1.0 for p in gp):
                        g.top_p = _t([p.top_p for p in gp], f32, dev)
                    # one candidate more than any top-k, to see a tie across the cut;
                    # rows with top-p but no top-k need room to find their nucleus
                    k_max = max(max(p.top_k, 0) for p in gp)
                    g.k_try = k_max + 1 if all(p.top_k > 0 for p in gp) else max(k_max + 1, _NUCLEUS_TRY)
                    b.filtered = g
                else:
                    b.plain = g

        lp = [i for i in range(B) if params[i].logprobs is not None]
        if lp:
            b.num_top_logprobs = max(params[i].logprobs or 0 for i in lp)
            b.logprob_rows = _t(lp, i64, dev) if len(lp) < B else None
        return b


def _unique_pairs(rows: list[int], seqs: list) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct (row, token) pairs over rows[i] x seqs[i], with their counts (on CPU)."""
    toks = [torch.tensor(list(s), dtype=torch.int64) for s in seqs]
    row_ids = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), torch.tensor([len(t) for t in toks]))
    keys, counts = torch.unique(row_ids * (1 << 32) + torch.cat(toks), return_counts=True)
    return keys >> 32, keys & 0xFFFFFFFF, counts.to(torch.float32)


@dataclass
class SamplerOutput:
    token_ids: Tensor
    """[B] int64."""
    logprobs: Tensor | None = None
    """[B] float32: log_softmax of the raw logits at the sampled token (before penalties and
    temperature, as vLLM's default); meaningful only for rows that asked; None if none did."""
    top_logprobs: tuple[Tensor, Tensor] | None = None
    """(values [B, K], token ids [B, K]), most likely first, K = max requested; a row that
    asked for fewer uses a prefix. None when K is 0 or nobody asked."""


class Sampler:
    @torch.inference_mode()
    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [B, V]. It is modified in place (penalties, masks, and the sampling stage
        too when no row is greedy): the caller must not reuse it."""
        logits = logits.float().contiguous()  # no-ops for contiguous float32 logits
        B = logits.shape[0]

        # Raw logprobs are taken before anything edits the logits.
        lp = None
        if batch.num_top_logprobs >= 0:
            src = logits if batch.logprob_rows is None else logits.index_select(0, batch.logprob_rows)
            lp = src.log_softmax(-1)

        apply_penalties(logits, batch)
        if batch.grammar_bitmask is not None and batch.grammar_rows:
            apply_bitmask(logits, batch.grammar_bitmask, batch.grammar_rows)
        if batch.num_sampled == 0:
            tokens = first_argmax(logits)
        elif batch.sample_rows is None or batch.greedy_rows is None:  # both set, or neither
            tokens = self._sample(logits, batch)
        else:
            tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
            tokens[batch.greedy_rows] = first_argmax(logits.index_select(0, batch.greedy_rows))
            tokens[batch.sample_rows] = self._sample(logits.index_select(0, batch.sample_rows), batch)

        out = SamplerOutput(token_ids=tokens)
        if lp is not None:
            idx = batch.logprob_rows
            tok = tokens if idx is None else tokens.index_select(0, idx)
            chosen = lp.gather(1, tok[:, None])[:, 0]
            top = lp.topk(batch.num_top_logprobs, -1) if batch.num_top_logprobs > 0 else None
            if idx is None:
                out.logprobs = chosen
                out.top_logprobs = (top.values, top.indices) if top is not None else None
            else:
                out.logprobs = logits.new_zeros(B).index_copy_(0, idx, chosen)
                if top is not None:
                    K = batch.num_top_logprobs
                    vals = logits.new_zeros(B, K).index_copy_(0, idx, top.values)
                    ids = torch.zeros(B, K, dtype=torch.int64, device=logits.device).index_copy_(0, idx, top.indices)
                    out.top_logprobs = (vals, ids)
        return out

    def _sample(self, x: Tensor, batch: SamplingBatch) -> Tensor:
        """x: [S, V] logits of the sampled rows, consumed in place. Returns [S] token ids."""
        if batch.temperature is not None:
            x.div_(batch.temperature[:, None])
        # Work on unnormalized probs (max exactly 1). The clamp keeps exp() off its underflow
        # path, which is 10-100x slower on CPU (-inf masks and low temperatures hit it);
        # threshold_ then turns the floor, masked tokens included, into exact zeros.
        p = x.sub_(x.amax(-1, keepdim=True)).clamp_(min=_LOG_FLOOR).exp_()
        F.threshold(p, _P_FLOOR, 0.0, inplace=True)
        groups = [g for g in (batch.plain, batch.filtered) if g is not None]
        if len(groups) == 1:
            return _draw_group(p, groups[0])
        tokens = torch.empty(p.shape[0], dtype=torch.int64, device=p.device)
        for g in groups:
            assert g.rows is not None  # two groups: each holds some of the rows
            tokens[g.rows] = _draw_group(p.index_select(0, g.rows), g)
        return tokens


def first_argmax(logits: Tensor) -> Tensor:
    """[B, V] -> [B] int64: per row, the index of the first maximal value (argmax's and
    max(dim)'s choice, so greedy tokens do not depend on which path ran).

    On a CPU, max(dim) with indices is a scalar loop where amax is vectorized, and a
    speculative step samples 1 + k rows per request: so the maximum of each block of
    _ARGMAX_BLOCK logits is taken with amax, the first block holding the row's maximum with
    max(dim) over those, and the index within that block with max(dim) over its logits. In
    the engine (SmolLM2's 49k vocabulary, fresh logits, 1 thread) that is 0.45 vs 0.61 ms for
    9 rows (one request verifying 8 drafts) and 2.3 vs 4.1 ms for 72. Its few small ops cost
    ~0.1 ms, so up to 2 rows, and on GPUs, the plain call is kept: on fresh 49k-logit rows,
    1 thread, CPU time (AVX2 EPYC, benchmarks/first_argmax.py), plain / blocked 0.08 / 0.13 ms
    at 1 row, 0.13 / 0.13 at 2, 0.18 / 0.15 at 3, 0.32 / 0.19 at 5 (a request verifying 2-4
    drafts)."""
    B, V = logits.shape
    if logits.device.type != "cpu" or B * V <= _ARGMAX_PLAIN_MAX or V < 2 * _ARGMAX_BLOCK:
        return logits.max(-1).indices
    C = _ARGMAX_BLOCK
    n = V // C
    block_max = logits[:, : n * C].reshape(B, n, C).amax(-1)
    if n * C < V:
        block_max = torch.cat([block_max, logits[:, n * C :].amax(-1, keepdim=True)], 1)
    first_block = block_max.max(-1).indices
    # The last block may be short: its window repeats index V - 1, which only ever follows
    # the true positions, so the first maximum found in the window is still the row's.
    window = (first_block * C)[:, None] + torch.arange(C, device=logits.device)
    window.clamp_(max=V - 1)
    return window.gather(1, logits.gather(1, window).max(-1).indices[:, None])[:, 0]


def _draw(w: Tensor, u: Tensor) -> Tensor:
    """Inverse CDF: per row, the first index whose cumulative weight reaches u * total.
    Never a zero-weight index since u > 0. Consumes w."""
    cdf = w.cumsum_(-1)
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:])[:, 0].clamp_(max=w.shape[1] - 1)


def _draw_group(p: Tensor, g: _Group) -> Tensor:
    if g.top_k is None:
        if g.min_p is not None:  # the max prob is 1 here, so min_p is the floor itself
            p.masked_fill_(p < g.min_p[:, None], 0.0)
        return _draw(p, g.uniform)
    V = p.shape[1]
    k = torch.where(g.top_k > 0, g.top_k.clamp(max=V), V)  # V: no top-k
    return _draw_filtered(p, k, g.top_p, g.min_p, g.uniform, min(g.k_try, V))


def _draw_filtered(p: Tensor, k: Tensor, top_p: Tensor | None, min_p: Tensor | None, u: Tensor, k_try: int) -> Tensor:
    """top-k, then top-p renormalized over the top-k (as HF/vLLM), then min-p, drawn among the
    k_try most likely tokens. The kept set is {p >= threshold}, ties included, and is drawn
    in vocabulary order: how topk orders equal probs never changes a seeded draw."""
    V = p.shape[1]
    vals, idx = p.topk(k_try, -1) if k_try < V else p.sort(-1, descending=True)
    n_keep = k.clamp(max=k_try)
    wide = None
    if top_p is not None:
        in_k = torch.arange(k_try, device=p.device)[None, :] < k[:, None]
        cum = vals.masked_fill(~in_k, 0.0).cumsum_(-1)
        no_k = k >= V
        # without top-k, mass is relative to the whole vocabulary, not just the candidates
        mass = top_p * torch.where(no_k, p.sum(-1), cum[:, -1])
        if k_try < V:  # nucleus wider than the candidates: its threshold is unknown here
            wide = no_k & (cum[:, -1] < mass)
        # keep a token while the mass before it is below top_p (so the first is always kept)
        nucleus = ((cum.sub_(vals) < mass[:, None]) & in_k).sum(-1)
        n_keep = torch.where(top_p < 1.0, nucleus, n_keep)
    thr = vals.gather(1, (n_keep - 1)[:, None])
    if min_p is not None:
        thr = torch.maximum(thr, min_p[:, None])
    keep = vals >= thr
    order = idx.masked_fill(~keep, V).argsort(-1)
    tokens = idx.gather(1, order).gather(1, _draw(vals.mul_(keep).gather(1, order), u)[:, None])[:, 0]
    if k_try < V and bool(keep[:, -1].any()):
        # The kept set may go past the candidates: a wide nucleus needs more of them (its
        # threshold is not known yet), a tie at the cut only a full-row compare.
        spill = keep[:, -1]
        if wide is not None and top_p is not None and bool((wide & spill).any()):
            w = (wide & spill).nonzero()[:, 0]
            spill = spill & ~wide
            tokens[w] = _draw_filtered(
                p[w], k[w], top_p[w], None if min_p is None else min_p[w], u[w], min(V, k_try * _NUCLEUS_GROWTH)
            )
        if bool(spill.any()):
            s = spill.nonzero()[:, 0]
            ps = p[s]
            tokens[s] = _draw(ps.masked_fill_(ps < thr[s], 0.0), u[s])
    return tokens


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> None:
    """Repetition (HF), frequency/presence (OpenAI) penalties, logit_bias and the min_tokens mask, in place.
    Each touches only the (row, token) pairs it lists, never a [B, V] mask."""
    if batch.rep_rows is not None:
        v = logits[batch.rep_rows, batch.rep_tokens]
        pen = batch.rep_penalty
        assert pen is not None  # set with rep_rows
        logits[batch.rep_rows, batch.rep_tokens] = torch.where(v > 0, v / pen, v * pen)
    if batch.freq_rows is not None:
        assert batch.freq_tokens is not None and batch.freq_sub is not None  # set with freq_rows
        logits.index_put_((batch.freq_rows, batch.freq_tokens), -batch.freq_sub, accumulate=True)
    if batch.bias_rows is not None:
        assert batch.bias_tokens is not None and batch.bias_values is not None  # set with bias_rows
        logits.index_put_((batch.bias_rows, batch.bias_tokens), batch.bias_values, accumulate=True)
    if batch.ban_rows is not None:
        logits[batch.ban_rows, batch.ban_tokens] = _NEG_INF
