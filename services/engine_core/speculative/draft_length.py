"""How many drafts a request proposes this step: the k that buys the most tokens per second.

A verification row with k drafts is not free, and what it costs is not a straight line in
k: in the CPU default mode one stream's step costs the same with 0, 1 or 2 drafts, 1.1x with
3 and 1.6-2.4x with 4-8 (the int4 kernel's rows come in tiles; verify_step_cost.py); in a
batch running dense bf16 matmuls a draft token costs ~1 % of the step; on a GPU drafts are
nearly free until the batch is large. So the draft length is chosen per request and step
from two online estimates:

- the cost of a step of B decode rows verifying D draft tokens, relative to the same step
  without drafts: a table over D per B, learnt from the machine's own steps (StepCost);
- the request's acceptance rate alpha: the chance a draft is accepted given the ones before
  it were (AcceptanceTracker), so a draft run of k yields g(k) = alpha + ... + alpha^k
  tokens beyond the target's own.

The requests of a step choose in turn (StepPlan): with B decode rows and the drafts chosen
before it (D drafts, G expected tokens), request r drafting k makes the step yield
B + G + g(k) tokens at a cost of 1 + c(D + k) plain steps; k is the argmax of that rate, 0 (a
plain decode) when no draft pays for itself. This is the "expected gain vs cost" rule of
dynamic speculation lengths (e.g. DISCO, and SGLang's/vLLM's acceptance-driven draft
lengths), with the cost measured on the machine rather than assumed.
"""

from __future__ import annotations

import bisect
import math

_PRIOR_SLOPE = 0.1
"""Where nothing was measured: a token (a draft, or a decode row) costs this share of a step's
fixed part (a CPU's rough figure), so a draft costs 0.1 / (1 + 0.1 B) of a step of B rows;
a draft count not measured costs at most that per draft over the count below it. The optimism
is what explores a count: one step with it measures it."""
_MIN_SLOPE = 0.01
"""c(D) is at least this times D: a draft token is a row through every matmul, the LM head and
the sampler, never free. A measured ~0 (noise around a small cost) would otherwise make any
acceptance above 0 worth drafting for, and drafts that keep failing would never stop."""
_MIN_RATE = 0.15
"""Each measured cost moves by at least this share of what a new pair of steps says (the first
measurements are averaged in equally, 1/n): it follows the machine as it changes."""
_MAX_STEP = 0.4
"""A pair of steps moves a log cost by at most this: one step slowed by the machine (another
process, a page fault) is not taken for the cost of its drafts."""


class StepCost:
    """c_B(D) = t(B, D) / t(B, 0) - 1: what D draft tokens add to a step of B decode rows, as
    a share of that step without drafts, learnt per B and D from the machine's steps.

    It is learnt from the ratios of consecutive steps with the same B, not from raw times: a
    CPU shared with other processes drifts between fast and slow periods, and consecutive
    steps see about the same machine; a step of more requests costs more for reasons a draft
    does not (each request's own context to attend over, its sampling), so steps where B
    changed say nothing about a draft's cost. Each pair (D1, D2) says log(t2 / t1) =
    L(D2) - L(D1), L = log(1 + c), L(0) = 0; L is moved toward that by least mean squares
    (at least _MIN_RATE of the error, the error clipped at _MAX_STEP). Pairs whose draft
    counts are the same say nothing, so long runs without drafts keep what was learnt.

    c is read monotone in D (more drafts never cost less); a count not measured costs at most
    the one below it plus the prior slope per draft, and at most the straight line between the
    measured counts around it."""

    __slots__ = ("_last", "_log", "_updates")

    def __init__(self) -> None:
        self._log: dict[int, dict[int, float]] = {}
        """B -> D -> L(D), the draft counts measured."""
        self._updates: dict[tuple[int, int], int] = {}
        self._last: tuple[int, int, float] | None = None

    def record(self, num_decodes: int, num_drafts: int, seconds: float) -> None:
        last, self._last = self._last, (num_decodes, num_drafts, seconds)
        if last is None or last[0] != num_decodes or last[1] == num_drafts or seconds <= 0.0 or last[2] <= 0.0:
            return
        d1, d2 = last[1], num_drafts
        l1, l2 = self._read_log(num_decodes, d1), self._read_log(num_decodes, d2)
        error = math.log(seconds / last[2]) - (l2 - l1)
        table = self._log.setdefault(num_decodes, {})
        n1, n2 = self._updates.get((num_decodes, d1), 0), self._updates.get((num_decodes, d2), 0)
        c1, c2 = self._confidence(num_decodes, d1), self._confidence(num_decodes, d2)
        # The less known end carries the error, the other is the reference (the no-draft step
        # always is: 0 by definition); of two measured ends, the one measured less often, and
        # two measured as often share it; of two ends as unknown, the larger count is measured
        # against the smaller one's estimate.
        if c1 == c2 == 2 and n1 == n2:
            ends = [(d2, l2, 0.5, True), (d1, l1, -0.5, True)]
        elif (c2, -n2, -d2) < (c1, -n1, -d1):
            ends = [(d2, l2, 1.0, c1 == 2)]
        else:
            ends = [(d1, l1, -1.0, c2 == 2)]
        for d, value, share, anchored in ends:
            # A count measured only against estimates (a batch where some request always
            # drafts) keeps no weight: the first measurement against a known step replaces it.
            n = self._updates.get((num_decodes, d), 0)
            if n > 0:  # one step slowed by the machine is not the cost of its drafts
                error = min(max(error, -_MAX_STEP), _MAX_STEP)
            n += anchored
            self._updates[num_decodes, d] = n
            table[d] = value + share * max(1.0 / max(n, 1), _MIN_RATE) * error

    def _confidence(self, num_decodes: int, num_drafts: int) -> int:
        """2: measured against a plain step or a measured count (or 0 drafts); 1: estimated from
        estimates only; 0: never seen."""
        if num_drafts == 0 or self._updates.get((num_decodes, num_drafts), 0) > 0:
            return 2
        return int(num_drafts in self._log.get(num_decodes, {}))

    def _read_log(self, num_decodes: int, num_drafts: int) -> float:
        return math.log1p(self.relative(num_decodes, num_drafts))

    def relative(self, num_decodes: int, num_drafts: int) -> float:
        """c_B(D): what num_drafts draft tokens add to a step of num_decodes decode rows, as a share of it."""
        if num_drafts <= 0:
            return 0.0
        prior = _PRIOR_SLOPE / (1.0 + _PRIOR_SLOPE * num_decodes)
        floor = _MIN_SLOPE * num_drafts
        table = self._log.get(num_decodes)
        if not table:
            return max(prior * num_drafts, floor)
        ds = sorted(table)
        cs: list[float] = []  # measured costs, made monotone in D
        for d in ds:
            cs.append(max(math.expm1(table[d]), cs[-1] if cs else 0.0))
        i = bisect.bisect_left(ds, num_drafts)
        if i < len(ds) and ds[i] == num_drafts:
            return max(cs[i], floor)
        # Not measured: at most the prior's slope past the count below it (optimism, so that
        # one step tries it: a cost curve can be flat, then jump), and, below the most
        # measured, at most the straight line between the counts around it.
        d0, c0 = (ds[i - 1], cs[i - 1]) if i > 0 else (0, 0.0)
        c = c0 + prior * (num_drafts - d0)
        if i < len(ds):
            c = min(c, c0 + (cs[i] - c0) * (num_drafts - d0) / (ds[i] - d0))
        return max(c, floor)


class StepPlan:
    """One step's drafts as its decode requests choose them in turn: each picks the k that
    gives the whole step the most tokens per unit of time, given the drafts chosen before it."""

    __slots__ = ("cost", "drafts", "num_decodes", "tokens")

    def __init__(self, cost: StepCost, num_decodes: int) -> None:
        self.cost = cost
        self.num_decodes = num_decodes
        self.drafts = 0
        """Draft tokens chosen so far."""
        self.tokens = float(num_decodes)
        """Tokens the step is expected to yield so far: one per decode row and the drafts' g(k)."""

    def best(self, alpha: float, max_k: int) -> int:
        """argmax over k in [0, max_k] of (tokens + alpha + ... + alpha^k) / (1 + c(drafts + k))."""
        best_k = 0
        best_rate = self.tokens / (1.0 + self.cost.relative(self.num_decodes, self.drafts))
        gain, term = 0.0, 1.0
        for k in range(1, max_k + 1):
            term *= alpha
            gain += term
            rate = (self.tokens + gain) / (1.0 + self.cost.relative(self.num_decodes, self.drafts + k))
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def add(self, num_drafts: int, alpha: float) -> None:
        """A request's drafts (as many as its proposer found, at most what it chose)."""
        self.drafts += num_drafts
        self.tokens += sum(alpha**j for j in range(1, num_drafts + 1))
