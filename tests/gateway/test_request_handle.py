"""services/gateway/request_handle.py: a handle hands its HTTP handler every delta received
since the last call in one batch (one wake-up for a burst), and waits when there is none."""

from __future__ import annotations

import asyncio

from services.gateway.metrics import RequestTimer
from services.gateway.request_handle import ChildState, RequestHandle
from shared.protocol import GenerateRequest, RequestDelta, SamplingParams


def test_deltas_come_in_batches() -> None:
    async def scenario() -> None:
        handle = RequestHandle("cmpl-1", ["cmpl-1-0"])
        for i in range(3):
            handle.push(RequestDelta(request_id="cmpl-1-0", text=str(i)))
        assert [d.text for d in await handle.next_batch()] == ["0", "1", "2"]
        waiting = asyncio.ensure_future(handle.next_batch())
        await asyncio.sleep(0)
        assert not waiting.done()  # nothing new: it waits
        handle.push(RequestDelta(request_id="cmpl-1-0", text="3"))
        assert [d.text for d in await asyncio.wait_for(waiting, 5)] == ["3"]

    asyncio.run(scenario())


def test_child_state_starts_sent_under_its_own_id() -> None:
    request = GenerateRequest(request_id="cmpl-1-0", sampling_params=SamplingParams(), prompt="hi")
    child = ChildState(RequestHandle("cmpl-1", ["cmpl-1-0"]), request, worker=1, engine=0, timer=RequestTimer(0.0, 0.0))
    assert child.wire_id == "cmpl-1-0" and not child.parked
    child.parked_at = 3.0
    assert child.parked
