from __future__ import annotations

import pytest

from tests.deploy.metric_names import exported_metric_names


@pytest.fixture(scope="session")
def exported_metrics() -> set[str]:
    return exported_metric_names()
