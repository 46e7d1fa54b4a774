"""Adaptive draft lengths: the step-cost fit, the rate-maximizing k, and the tracker's alpha and backoff."""

from __future__ import annotations

import pytest

from services.engine_core.speculative.acceptance import AcceptanceTracker
from services.engine_core.speculative.draft_length import StepCost, best_draft_length


def test_step_cost_fits_a_line() -> None:
    cost = StepCost()
    assert cost.fit() is None
    assert cost.relative_slope(1) == pytest.approx(0.1 / 1.1)  # the prior before any step
    for _ in range(5):
        for n in (1, 2, 5, 9):
            cost.record(n, 0.05 + 0.01 * n)
    a, b = cost.fit()  # type: ignore[misc]
    assert a == pytest.approx(0.05) and b == pytest.approx(0.01)
    assert cost.relative_slope(1) == pytest.approx(0.01 / 0.06)


def test_step_cost_ignores_drift_between_slow_and_fast_periods() -> None:
    """A shared machine: a slow period that happens to verify more drafts is not a steep slope."""
    cost = StepCost()
    for i in range(60):
        slow = 3.0 if (i // 10) % 2 else 1.0  # 10 steps fast, 10 slow, ...
        n = 5 if slow > 1 and i % 2 else 1  # drafts verified mostly in the slow periods
        cost.record(n, slow * (0.05 + 0.005 * n))
    a, b = cost.fit()  # type: ignore[misc]
    assert 0.05 < b / a < 0.2  # the true 0.1, where a raw least squares fit reads ~1
    assert cost.relative_slope(1) < 0.2


def test_step_cost_of_one_size_uses_the_prior_slope() -> None:
    cost = StepCost()
    for _ in range(10):
        cost.record(1, 0.11)
    a, b = cost.fit()  # type: ignore[misc]
    assert a + b == pytest.approx(0.11) and b / a == pytest.approx(0.1)


def test_best_draft_length() -> None:
    # Free drafts: as many as allowed, whatever the acceptance.
    assert best_draft_length(0.3, 8, 1, 0.0) == 8
    # Costly drafts that are never accepted: none.
    assert best_draft_length(0.0, 8, 1, 0.1) == 0
    # One decode row, each draft +17% of the step: alpha 0.5 pays for 1-2 drafts, 0.9 for more.
    assert best_draft_length(0.5, 8, 1, 0.17) in (1, 2)
    assert best_draft_length(0.9, 8, 1, 0.17) >= 4
    # The same draft is worth less in a batch of 8 decode rows (their tokens come anyway).
    assert best_draft_length(0.5, 8, 8, 0.17) == 0
    assert best_draft_length(0.9, 8, 8, 0.02) > 0


def test_alpha_follows_recent_verifications() -> None:
    t = AcceptanceTracker(adaptive=True)
    assert t.alpha == 0.5
    for _ in range(6):
        t.record(4, 4)
    assert t.alpha > 0.9
    for _ in range(12):
        t.record(4, 0)  # each rejection at the first draft is one position tried
    assert t.alpha < 0.06  # no floor: the prior fades too


def test_adaptive_backoff_then_probe() -> None:
    t = AcceptanceTracker(adaptive=True)
    for _ in range(8):
        t.record(4, 0)
    # Not worth a draft: 4 steps without, then a probe of one draft from the prior alpha,
    # single drafts while alpha still pays, then 8 steps without ...
    assert [t.draft_length(8, 1, 0.17) for _ in range(5)] == [0, 0, 0, 0, 1]
    t.record(1, 0)
    singles = 0
    while (k := t.draft_length(8, 1, 0.17)) > 0 and singles < 5:
        assert k == 1
        t.record(1, 0)
        singles += 1
    assert k == 0 and singles <= 2
    assert [t.draft_length(8, 1, 0.17) for _ in range(8)] == [0] * 7 + [1]
    # ... until a probe is accepted and alpha pays for drafts again.
    t.record(1, 1)
    assert t.alpha > 0.5 and t.draft_length(8, 1, 0.17) >= 2
    # The window rule of fixed draft lengths does not apply.
    assert t.should_propose()
