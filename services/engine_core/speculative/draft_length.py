"""How many drafts a request proposes this step: the k that buys the most tokens per second.

A verification row with k drafts is not free: on a CPU the target model is compute-bound
past one row (a 135M model in fp32 on 2 cores: a row of 1 + 4 tokens costs ~1.8x a decode
row, 1 + 8 ~2.3x), on a GPU it is nearly free until the batch is large. So the draft
length is chosen per request and step from two online estimates:

- the step cost, t(n) = a + b n in the step's number of tokens, fitted over the steps that
  only decode and verify (StepCost);
- the request's acceptance rate alpha: the chance a draft is accepted given the ones before
  it were (AcceptanceTracker), so a draft run of k yields 1 + alpha + ... + alpha^k tokens.

With B decode rows in the step and t0 = t(B), request r drafting k makes the step yield
B + g(k) tokens in t0 + b k seconds (g(k) = alpha + ... + alpha^k): k is the argmax of that
rate, 0 (a plain decode) when no draft pays for itself. This is the "expected gain vs cost"
rule of dynamic speculation lengths (e.g. DISCO, and SGLang's/vLLM's acceptance-driven
draft lengths), with the cost measured on the machine rather than assumed.
"""

from __future__ import annotations

_DECAY = 0.97
"""Weight of the history per step recorded: about the last 30 steps count."""
_PRIOR_SLOPE = 0.1
"""b / a before the fit has seen consecutive steps of different sizes (a CPU's rough figure)."""
_MAX_SLOPE = 1.0
"""b / a is capped here: a draft token costing more than a whole decode row is noise."""


class StepCost:
    """t(n) = a + b n, the time of a step of n tokens that only decodes and verifies.

    b is fitted on the differences between consecutive steps (dt = b dn, least squares with
    exponential forgetting), not on the raw times: a CPU shared with other processes drifts
    between fast and slow periods, and a raw fit reads a slow period that happened to verify
    more drafts as a steep slope. Consecutive steps see about the same machine."""

    __slots__ = ("_last", "_sdd", "_sdt", "_sn", "_st", "_sw")

    def __init__(self) -> None:
        self._sw = self._sn = self._st = 0.0  # decayed count, sizes and times: the means
        self._sdd = self._sdt = 0.0  # decayed sums of dn * dn and dn * dt
        self._last: tuple[int, float] | None = None

    def record(self, num_tokens: int, seconds: float) -> None:
        d = _DECAY
        self._sw = self._sw * d + 1.0
        self._sn = self._sn * d + num_tokens
        self._st = self._st * d + seconds
        if self._last is not None:
            dn, dt = num_tokens - self._last[0], seconds - self._last[1]
            self._sdd = self._sdd * d + dn * dn
            self._sdt = self._sdt * d + dn * dt
        self._last = (num_tokens, seconds)

    def fit(self) -> tuple[float, float] | None:
        """(a, b), or None before any step was recorded."""
        if self._sw == 0.0:
            return None
        mn, mt = self._sn / self._sw, self._st / self._sw
        # The slope relative to a: prior until size changes were seen, then fitted and capped.
        rel = _PRIOR_SLOPE
        if self._sdd >= 1.0:
            b = max(self._sdt / self._sdd, 0.0)
            rel = min(b / max(mt - b * mn, 1e-9), _MAX_SLOPE) if mt > b * mn else _MAX_SLOPE
        a = mt / (1.0 + rel * mn)
        return a, rel * a

    def relative_slope(self, num_decodes: int) -> float:
        """b / t(num_decodes): what one more token costs, as a share of the step without drafts."""
        fit = self.fit()
        a, b = fit if fit is not None else (1.0, _PRIOR_SLOPE)
        return b / (a + b * num_decodes)


def best_draft_length(alpha: float, max_k: int, num_decodes: int, relative_slope: float) -> int:
    """argmax over k in [0, max_k] of (num_decodes + alpha + ... + alpha^k) / (1 + relative_slope k)."""
    best_k, best_rate = 0, float(num_decodes)
    gain, term = 0.0, 1.0
    for k in range(1, max_k + 1):
        term *= alpha
        gain += term
        rate = (num_decodes + gain) / (1.0 + relative_slope * k)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k
