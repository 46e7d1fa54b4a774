"""Stored responses, for `previous_response_id` and GET/DELETE /v1/responses/{id}.

In the gateway's memory, bounded by count (least recently used goes first): per gateway
process and lost when it restarts. A client that needs durable history keeps it itself
and sends it as `input` items.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.gateway.openai_api import Message


@dataclass
class StoredResponse:
    response: dict[str, Any]
    """The Response object as the create call returned it."""
    conversation: list[Message]
    """Its input turns (with earlier responses' ones) and its output, as chat messages."""
    input_items: list[dict[str, Any]]
    """Its own input items (not earlier responses'), for GET /v1/responses/{id}/input_items."""


class ResponseStore:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None
