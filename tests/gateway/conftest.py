"""Fixtures: a running gateway against fake tokenizer workers (see fakes.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.gateway.fakes import Gateway, GatewayFactory, start_gateway


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    """Start gateways on demand (keyword arguments override ServeConfig fields); stop them after."""
    stops: list[Callable[[], Awaitable[None]]] = []

    async def start(**serve: Any) -> Gateway:
        gw, stop = await start_gateway(**serve)
        stops.append(stop)
        return gw

    yield start
    for stop in reversed(stops):
        await stop()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()
