"""How many drafts a request proposes this step: the k that buys the most tokens per second.

A verification row with k drafts is not free: on a CPU the target model is compute-bound
past one row (a 135M model in fp32 on 2 cores: a row of 1 + 4 tokens costs ~1.8x a decode
row, 1 + 8 ~2.3x), on a GPU it is nearly free until the batch is large. So the draft
length is chosen per request and step from two online estimates:

- the step cost, t(n) = a + b n in the step's number of tokens, fitted by least squares
  (with exponential forgetting) over the steps that only decode and verify (StepCost);
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
"""Weight of the fit's history per step recorded: about the last 30 steps count."""
_PRIOR_SLOPE = 0.1
"""b / a before the fit has seen steps of different sizes (a CPU's rough figure)."""
_MIN_VARIANCE = 0.05
"""Below this (weighted) variance of step sizes the slope cannot be fitted: the prior is used."""


class StepCost:
    """t(n) = a + b n, the time of a step of n tokens that only decodes and verifies."""

    __slots__ = ("_sw", "_sx", "_sxx", "_sxy", "_sy")

    def __init__(self) -> None:
        self._sw = self._sx = self._sy = self._sxx = self._sxy = 0.0

    def record(self, num_tokens: int, seconds: float) -> None:
        d = _DECAY
        x = float(num_tokens)
        self._sw = self._sw * d + 1.0
        self._sx = self._sx * d + x
        self._sy = self._sy * d + seconds
        self._sxx = self._sxx * d + x * x
        self._sxy = self._sxy * d + x * seconds

    def fit(self) -> tuple[float, float] | None:
        """(a, b), or None before any step was recorded."""
        if self._sw == 0.0:
            return None
        mx, my = self._sx / self._sw, self._sy / self._sw
        var = self._sxx / self._sw - mx * mx
        if var >= _MIN_VARIANCE:
            b = max((self._sxy / self._sw - mx * my) / var, 0.0)
        else:  # every step the same size: only their mean time is known
            b = _PRIOR_SLOPE * my / (1.0 + _PRIOR_SLOPE * mx)
        a = max(my - b * mx, 1e-9)
        return a, b

    def relative_slope(self, num_decodes: int) -> float:
        """b / t(num_decodes): what one more token costs, as a share of the step without drafts."""
        fit = self.fit()
        if fit is None:
            return _PRIOR_SLOPE / (1.0 + _PRIOR_SLOPE * num_decodes)
        a, b = fit
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
