"""Acceptance of draft tokens against what the target model sampled at each draft position.

The proposers are deterministic: a draft is a point mass (q(d) = 1). Rejection sampling
(Leviathan et al.; vLLM's RejectionSampler) then accepts d with probability
min(1, p(d) / q(d)) = p(d) and, on rejection, samples from norm(max(0, p - q)), which is p
with d removed and renormalized. The token this yields at the position is d with
probability p(d) and any other y with probability (1 - p(d)) * p(y) / (1 - p(d)) = p(y):
exactly one draw from p. So the engine draws x ~ p at every position with the ordinary
sampler (top-k/top-p/min-p, penalties, logit_bias, seeds all as without speculation),
accepts d when x == d and otherwise ends the run with x. Greedy requests are the case
where x is the argmax. A seeded request draws each position with the uniform of that
output index, so it produces the same tokens with speculation on or off.
"""

from __future__ import annotations

from collections.abc import Sequence


def verify_drafts(drafts: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """sampled[j] is the target's token at draft position j (len(drafts) + 1 of them, the
    last after every draft). Returns the accepted drafts followed by the target's token at
    the first rejected position (or after the last draft): 1 to len(drafts) + 1 tokens."""
    if len(sampled) != len(drafts) + 1:
        raise ValueError(f"{len(sampled)} sampled tokens for {len(drafts)} drafts")
    a = 0
    while a < len(drafts) and sampled[a] == drafts[a]:
        a += 1
    return list(sampled[: a + 1])
