"""Adaptive draft lengths: the step-cost fit, the rate-maximizing k, and the tracker's alpha and backoff."""

from __future__ import annotations

import pytest

from services.engine_core.speculative.acceptance import AcceptanceTracker
from services.engine_core.speculative.draft_length import StepCost, best_draft_length


def test_step_cost_fits_the_cost_of_a_draft() -> None:
    cost = StepCost()
    assert cost.slope() is None and cost.base(1) is None
    assert cost.relative_slope(1) == pytest.approx(0.1 / 1.1)  # the prior before any step
    assert cost.relative_slope(8) == pytest.approx(0.1 / 1.8)
    for _ in range(5):
        for drafts in (0, 1, 4, 8):
            cost.record(1, drafts, 0.06 + 0.01 * drafts)
    assert cost.slope() == pytest.approx(0.01)
    assert cost.base(1) == pytest.approx(0.06)
    assert cost.relative_slope(1) == pytest.approx(0.01 / 0.06)


def test_step_cost_ignores_drift_between_slow_and_fast_periods() -> None:
    """A shared machine: a slow period that happens to verify more drafts is not a steep slope."""
    cost = StepCost()
    for i in range(60):
        slow = 3.0 if (i // 10) % 2 else 1.0  # 10 steps fast, 10 slow, ...
        drafts = 4 if slow > 1 and i % 2 else 0  # drafts verified mostly in the slow periods
        cost.record(1, drafts, slow * (0.055 + 0.005 * drafts))
    assert 0.05 < cost.relative_slope(1) < 0.2  # the true ~0.09 at the fast periods' cost, where a raw fit reads ~1


def test_step_cost_of_more_requests_is_not_the_cost_of_drafts() -> None:
    """Steps of 1 to 8 requests: each request costs a decode row (its own context, its
    sampling), a draft only a few percent of the step. Only steps of the same batch size are
    compared, and each batch size has its own base."""
    cost = StepCost()
    for i in range(80):
        batch = 1 + (i // 10) % 8
        drafts = batch * (i % 3)
        cost.record(batch, drafts, 0.02 + 0.005 * batch + 0.001 * drafts)
    assert cost.slope() == pytest.approx(0.001)
    assert cost.base(8) == pytest.approx(0.06) and cost.base(1) == pytest.approx(0.025)
    assert cost.relative_slope(8) == pytest.approx(0.001 / 0.06)
    assert cost.base(20) == cost.base(8)  # an unseen size: the nearest one recorded


def test_step_cost_of_one_size_uses_the_prior_slope() -> None:
    cost = StepCost()
    for _ in range(10):
        cost.record(1, 0, 0.11)
    assert cost.slope() is None and cost.base(1) == pytest.approx(0.11)
    assert cost.relative_slope(1) == pytest.approx(0.1 / 1.1)


def test_drafts_are_never_free() -> None:
    """A fit reading 0 (noise around a small cost): a draft still costs _MIN_SLOPE of the step,
    so drafts that are rarely accepted stop."""
    cost = StepCost()
    for i in range(40):
        cost.record(4, 4 * (i % 2), 0.05)
    assert cost.slope() == 0.0
    assert cost.relative_slope(4) == pytest.approx(0.01)
    assert best_draft_length(0.01, 8, 4, cost.relative_slope(4)) == 0


def test_best_draft_length() -> None:
    # Free drafts (a GPU): as many as allowed, whatever the acceptance.
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


def test_a_failed_probe_backs_off_at_once() -> None:
    """Cheap drafts (1 % of a step each): a probe that fails does not start a run of single
    drafts while alpha fades from the prior; the next backoff is twice as long."""
    t = AcceptanceTracker(adaptive=True)
    for _ in range(10):
        t.record(4, 0)
    lengths = [t.draft_length(8, 1, 0.01) for _ in range(5)]
    assert lengths == [0, 0, 0, 0, 1]
    t.record(1, 0)
    assert [t.draft_length(8, 1, 0.01) for _ in range(9)] == [0] * 8 + [1]
    t.record(1, 0)
    assert [t.draft_length(8, 1, 0.01) for _ in range(17)] == [0] * 16 + [1]


def test_always_wrong_drafts_cost_few_verifications() -> None:
    """From a fresh request (the prior alpha) with cheap drafts: failures until alpha no longer
    pays, then only probes."""
    t = AcceptanceTracker(adaptive=True)
    drafted = []
    for _ in range(128):
        k = t.draft_length(4, 8, 0.01)
        if k:
            t.record(k, 0)
        drafted.append(k)
    assert sum(drafted) <= 20
    assert sum(1 for k in drafted if k) <= 12


def test_step_cost_fits_a_fixed_cost_of_verifying_any_drafts() -> None:
    """The CPU default: a decode-only step is one fused call, a step with drafts runs eagerly,
    so the first draft costs 70 % of a step and each one after it 1 %."""
    cost = StepCost()
    for _ in range(6):
        for drafts in (0, 2, 8, 0, 4, 1):
            cost.record(8, drafts, 0.05 + (0.035 + 0.0005 * drafts if drafts else 0.0))
    fit = cost.fit()
    assert fit is not None and fit[0] == pytest.approx(0.035) and fit[1] == pytest.approx(0.0005)
    assert cost.base(8) == pytest.approx(0.05)
    assert cost.relative_fixed(8) == pytest.approx(0.7)
    # Eight decode rows: no request's drafts make up for 70 % of a step, even at alpha 0.9.
    assert best_draft_length(0.9, 8, 8, cost.relative_slope(8), cost.relative_fixed(8)) == 0
    # One stream: accepted drafts still pay for it.
    assert best_draft_length(0.9, 8, 1, 0.01, 0.7) == 8


def test_step_cost_without_drafts_keeps_its_fit() -> None:
    """Long runs without drafts (backed off) do not fade the fit back to the prior."""
    cost = StepCost()
    for drafts in (0, 4, 0, 8, 0, 2) * 3:
        cost.record(1, drafts, 0.01 + 0.001 * drafts)
    for _ in range(300):
        cost.record(1, 0, 0.01)
    assert cost.slope() == pytest.approx(0.001)


def test_step_cost_cannot_tell_a_fixed_cost_from_drafts_of_one_size() -> None:
    """Steps alternating between 0 and 4 drafts: the fixed part and the slope are one
    unknown, carried by the slope as before."""
    cost = StepCost()
    for i in range(20):
        drafts = 4 * (i % 2)
        cost.record(1, drafts, 0.05 + (0.02 + 0.001 * drafts if drafts else 0.0))
    assert cost.fit() == (0.0, pytest.approx(0.006))
    assert cost.relative_fixed(1) == 0.0
