"""Publishes the engine's KV-cache events the way vLLM does, so KV-aware routers built
for vLLM (llm-d's precise prefix scorer, vLLM's kv_events_subscriber example) can follow
this engine's cache.

- PUB socket: one multipart message per engine step that changed the cache:
  [topic, seq (8-byte big-endian), msgpack KVEventBatch].
- ROUTER replay socket: a subscriber that missed batches sends [b"", start_seq (8 bytes)]
  (a REQ/DEALER socket adds the empty frame) and gets back every buffered batch from that
  sequence on as [b"", seq, payload], then [b"", -1 (8 bytes, signed), b""].

Everything runs on the engine's thread: publishing is a non-blocking send, and replay
requests are served between steps (the engine loop polls the replay socket).
"""

from __future__ import annotations

import logging
import time
from collections import deque

import msgspec
import zmq

from shared.protocol import KVCacheEvents, KVEventBatch

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def offset_endpoint(endpoint: str, index: int) -> str:
    """Engine i's address: port + i for tcp:// (vLLM's rule for data-parallel ranks), a
    _dp<i> suffix for ipc:// and inproc://."""
    if index == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        return f"{base}:{int(port) + index}"
    if endpoint.startswith(("ipc://", "inproc://")):
        return f"{endpoint}_dp{index}"
    raise ValueError(f"KV events endpoint must be tcp://, ipc:// or inproc://, got {endpoint!r}")


class KVEventPublisher:
    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        replay_endpoint: str | None,
        engine_index: int,
        topic: str = "",
        buffer_steps: int = 10000,
    ) -> None:
        self.engine_index = engine_index
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.endpoint = offset_endpoint(endpoint, engine_index)
        self.pub.bind(self.endpoint)
        self.replay: zmq.Socket | None = None
        if replay_endpoint:
            self.replay = ctx.socket(zmq.ROUTER)
            self.replay.setsockopt(zmq.LINGER, 0)
            self.replay.bind(offset_endpoint(replay_endpoint, engine_index))
        self.topic = topic.encode()
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.seq = 0
        self.encoder = msgspec.msgpack.Encoder()
        log.info("publishing KV-cache events on %s", self.endpoint)

    def publish(self, events: list[KVCacheEvents]) -> None:
        if not events:
            return
        batch = KVEventBatch(ts=time.time(), events=events, data_parallel_rank=self.engine_index)
        payload = self.encoder.encode(batch)
        seq = self.seq.to_bytes(8, "big")
        try:
            self.pub.send_multipart((self.topic, seq, payload), flags=zmq.NOBLOCK)
        except zmq.Again:  # a subscriber past its high-water mark: it can replay
            log.warning("KV event batch %d dropped on a slow subscriber", self.seq)
        self.buffer.append((self.seq, payload))
        self.seq += 1

    def serve_replay(self) -> None:
        """Answer every waiting replay request (call when the replay socket is readable)."""
        assert self.replay is not None
        while True:
            try:
                frames = self.replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3:
                log.warning("ignoring a malformed KV-event replay request (%d frames)", len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in self.buffer:
                if seq >= start_seq:
                    self.replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            self.replay.send_multipart((client, b"", END_SEQ, b""))

    def close(self) -> None:
        self.pub.close(linger=0)
        if self.replay is not None:
            self.replay.close(linger=0)
