"""How many drafts a request proposes this step: the k that buys the most tokens per second.

A verification row with k drafts is not free: on a CPU the target model is compute-bound
past a few rows, and the int4 kernel of the default CPU mode costs more with every row, so a
single stream pays 10-40 % of a step per draft; in a batch running dense bf16 matmuls a draft
token costs ~1 % of the step; on a GPU drafts are nearly free until the batch is large. So the
draft length is chosen per request and step from two online estimates:

- b, what one draft token adds to a step, f, what a step pays once for verifying any drafts
  at all, and t0(B), the step of B decode rows without drafts, fitted over the steps that only
  decode and verify (StepCost). f is for a step with drafts that takes another path than one
  without (it was the CPU default's while only decode-only steps ran as one fused C++ call,
  fused_cpu/: the first draft of a step cost most of a step); where both take the same path
  the fit finds it near 0;
- the request's acceptance rate alpha: the chance a draft is accepted given the ones before
  it were (AcceptanceTracker), so a draft run of k yields 1 + alpha + ... + alpha^k tokens.

With B decode rows in the step, request r drafting k makes the step yield B + g(k) tokens
(g(k) = alpha + ... + alpha^k) in t0(B) + f + b k seconds: k is the argmax of that rate, 0 (a
plain decode) when no draft pays for itself. Each request counts f in full, as if it alone
drafted: when several do they share it, so this errs toward drafting less, never toward a
step that costs more than it yields. This is the "expected gain vs cost" rule of dynamic
speculation lengths (e.g. DISCO, and SGLang's/vLLM's acceptance-driven draft lengths), with
the cost measured on the machine rather than assumed.
"""

from __future__ import annotations

_DECAY = 0.97
"""Weight of the history per step recorded: about the last 30 steps count."""
_PRIOR_SLOPE = 0.1
"""Before the fit has seen consecutive steps of different draft counts: a token (a draft, or a
decode row) costs this share of a step's fixed part (a CPU's rough figure), so b / t0(B) =
0.1 / (1 + 0.1 B)."""
_MIN_SLOPE = 0.01
"""b / t0 is at least this: a draft token is a row through every matmul, the LM head and the
sampler, never free. A fit reading ~0 (noise around a small cost) would otherwise make any
acceptance above 0 worth drafting for, and drafts that keep failing would never stop."""
_MAX_SLOPE = 1.0
"""b / t0 is capped here: a draft token costing more than a whole step is noise."""
_MAX_FIXED = 2.0
"""f / t0 is capped here: verifying any drafts costing more than two steps is noise."""


class StepCost:
    """t(B, D) = t0(B) + f [D > 0] + b D: the time of a step of B decode rows that verifies D
    draft tokens.

    f and b are fitted on the differences between consecutive steps with the same B
    (dt = f d[D > 0] + b dD, least squares with exponential forgetting), not on raw times: a CPU
    shared with other processes drifts between fast and slow periods, and a raw fit reads a
    slow period that happened to verify more drafts as a steep slope; and a step of more
    requests costs more for reasons a draft does not (each request's own context to attend
    over, its sampling), so steps where B changed say nothing about a draft's cost.
    Consecutive steps see about the same machine. Only pairs whose draft counts differ update
    the fit, so long runs without drafts keep what was learnt. Where the data cannot tell f
    from b (every change was between 0 and the same D) f is 0 and b carries both."""

    __slots__ = ("_by_batch", "_last", "_s")

    def __init__(self) -> None:
        self._s = [0.0] * 5  # decayed sums of dI dI, dI dD, dD dD, dI dt, dD dt
        self._last: tuple[int, int, float] | None = None
        self._by_batch: dict[int, list[float]] = {}
        """B -> decayed [count, draft tokens, steps with drafts, seconds] of its steps."""

    def record(self, num_decodes: int, num_drafts: int, seconds: float) -> None:
        d = _DECAY
        if self._last is not None and self._last[0] == num_decodes and num_drafts != self._last[1]:
            dd, dt = num_drafts - self._last[1], seconds - self._last[2]
            di = (num_drafts > 0) - (self._last[1] > 0)
            for i, v in enumerate((di * di, di * dd, dd * dd, di * dt, dd * dt)):
                self._s[i] = self._s[i] * d + v
        self._last = (num_decodes, num_drafts, seconds)
        sums = self._by_batch.setdefault(num_decodes, [0.0, 0.0, 0.0, 0.0])
        for i, v in enumerate((1.0, num_drafts, num_drafts > 0, seconds)):
            sums[i] = sums[i] * d + v

    def fit(self) -> tuple[float, float] | None:
        """(f, b) in seconds, or None before draft counts were seen to change."""
        sii, sid, sdd, sit, sdt = self._s
        if sdd < 1.0:
            return None
        det = sii * sdd - sid * sid
        if sii >= 1.0 and det > 1e-6 * sii * sdd:
            f, b = (sdd * sit - sid * sdt) / det, (sii * sdt - sid * sit) / det
            if f >= 0.0 and b >= 0.0:
                return f, b
        return 0.0, max(sdt / sdd, 0.0)

    def slope(self) -> float | None:
        """b in seconds per draft token, or None before draft counts were seen to change."""
        fit = self.fit()
        return None if fit is None else fit[1]

    def base(self, num_decodes: int) -> float | None:
        """t0: the step of num_decodes decode rows without drafts (from the nearest B recorded)."""
        if not self._by_batch:
            return None
        batch = min(self._by_batch, key=lambda n: (abs(n - num_decodes), n))
        w, drafts, drafting, seconds = self._by_batch[batch]
        f, b = self.fit() or (0.0, 0.0)
        return (seconds - b * drafts - f * drafting) / w

    def relative_slope(self, num_decodes: int) -> float:
        """b / t0(num_decodes): what one more draft token costs, as a share of the step without drafts."""
        b, t0 = self.slope(), self.base(num_decodes)
        if b is None or t0 is None:
            return _PRIOR_SLOPE / (1.0 + _PRIOR_SLOPE * num_decodes)
        if t0 <= b:
            return _MAX_SLOPE
        return min(max(b / t0, _MIN_SLOPE), _MAX_SLOPE)

    def relative_fixed(self, num_decodes: int) -> float:
        """f / t0(num_decodes): what verifying any drafts at all costs a step, as a share of it."""
        fit, t0 = self.fit(), self.base(num_decodes)
        if fit is None or t0 is None or t0 <= 0.0:
            return 0.0
        return min(fit[0] / t0, _MAX_FIXED)


def best_draft_length(
    alpha: float, max_k: int, num_decodes: int, relative_slope: float, relative_fixed: float = 0.0
) -> int:
    """argmax over k in [0, max_k] of (num_decodes + alpha + ... + alpha^k) /
    (1 + relative_fixed [k > 0] + relative_slope k)."""
    best_k, best_rate = 0, float(num_decodes)
    gain, term = 0.0, 1.0
    for k in range(1, max_k + 1):
        term *= alpha
        gain += term
        rate = (num_decodes + gain) / (1.0 + relative_fixed + relative_slope * k)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k
