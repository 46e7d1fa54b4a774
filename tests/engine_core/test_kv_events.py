"""KV-cache events in vLLM's format: a subscriber decoding them with vLLM's own struct
definitions rebuilds exactly the set of blocks the engine holds in its prefix cache,
across evictions, live and through the replay socket."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from services.engine_core.block_manager import BlockManager
from services.engine_core.kv_event_publisher import END_SEQ, offset_endpoint
from services.engine_core.request import Request
from services.engine_core.server import EngineCoreServer
from shared.config import Config, EngineConfig, ServeConfig
from shared.protocol import EngineOutputs, EngineRequest, KVEventBatch, SamplingParams, decoder, encode

# --- a vLLM subscriber's view: vLLM's structs (vllm/distributed/kv_events.py, array-like) --


class VEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class VKVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(VKVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(VKVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(VKVCacheEvent):
    pass


class VKVEventBatch(VEventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


class CacheMirror:
    """What a KV-aware router keeps per engine: block hash -> (parent, token ids)."""

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[int | None, tuple[int, ...]]] = {}
        self.decode = msgspec.msgpack.Decoder(VKVEventBatch)
        self.next_seq = 0
        self.removed = 0

    def apply(self, seq: int, payload: bytes) -> None:
        if seq < self.next_seq:
            return  # already applied (a replay overlapping the live stream)
        assert seq == self.next_seq, f"gap: expected batch {self.next_seq}, got {seq}"
        self.next_seq = seq + 1
        for event in self.decode.decode(payload).events:
            if isinstance(event, BlockStored):
                parent = event.parent_block_hash
                bs = event.block_size
                for i, h in enumerate(event.block_hashes):
                    assert h not in self.blocks, f"block {h} stored twice"
                    self.blocks[h] = (parent, tuple(event.token_ids[i * bs : (i + 1) * bs]))
                    parent = h
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    del self.blocks[h]
                    self.removed += 1
            else:
                self.blocks.clear()


def engine_cache(bm: BlockManager) -> dict[int, tuple[int, ...]]:
    """The engine's cached blocks: chain id -> token ids."""
    return {bm._chain_id[block]: key[1] for key, block in bm._cache.items()}


def assert_mirrors(mirror: CacheMirror, bm: BlockManager) -> None:
    assert {h: toks for h, (_, toks) in mirror.blocks.items()} == engine_cache(bm)
    # Parents are the chain ids the engine chains on (ROOT = None).
    for h, (parent, _) in mirror.blocks.items():
        block = next(b for k, b in bm._cache.items() if bm._chain_id[b] == h)
        assert (parent if parent is not None else -1) == bm._key[block][0]  # type: ignore[index]


def test_block_manager_events_rebuild_cache_and_clear() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, record_events=True)
    mirror = CacheMirror()
    enc = msgspec.msgpack.Encoder()

    def flush() -> None:
        mirror.apply(mirror.next_seq, enc.encode(KVEventBatch(ts=0.0, events=bm.take_events())))

    shared = list(range(100, 108))
    tails = [
        [1, 2, 3, 4, 5],
        [6, 7, 8, 9],
        [10, 11, 12, 13, 14, 15, 16, 17, 18],
        [1, 2, 3, 4, 5],
        [20] * 9,
        [6, 7, 8, 9],
    ]
    for n, tail in enumerate(tails):
        req = Request(f"r{n}", shared + tail, SamplingParams(max_tokens=1), [2], None, max_tokens=1)
        computed = bm.get_computed_blocks(req)
        assert bm.allocate_slots(req, req.num_tokens - len(computed) * bm.block_size, computed)
        req.num_computed_tokens = req.num_tokens
        bm.cache_full_blocks(req)
        bm.free(req)
        flush()
        assert_mirrors(mirror, bm)
    assert mirror.removed > 0, "the workload must evict"
    bm.reset_prefix_cache()
    flush()
    assert mirror.blocks == {} == engine_cache(bm)
    assert BlockManager(4, 4).take_events() == []


def test_offset_endpoint() -> None:
    assert offset_endpoint("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset_endpoint("tcp://*:5557", 2) == "tcp://*:5559"
    assert offset_endpoint("ipc:///tmp/kv", 1) == "ipc:///tmp/kv_dp1"
    with pytest.raises(ValueError):
        offset_endpoint("udp://x:1", 1)


def fetch_replay(ctx: zmq.Context, endpoint: str, start: int) -> list[tuple[int, bytes]]:
    """vLLM's replay protocol from a DEALER: [b"", start] -> [b"", seq, payload]* + [b"", -1, b""]."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    sock.send_multipart((b"", start.to_bytes(8, "big")))
    out = []
    while True:
        _, seq_bytes, payload = sock.recv_multipart()
        if seq_bytes == END_SEQ:
            sock.close(linger=0)
            return out
        out.append((int.from_bytes(seq_bytes, "big"), payload))


def test_engine_core_publishes_events_a_subscriber_can_follow(tmp_path: Path) -> None:
    d = f"ipc://{tmp_path}"
    config = Config(
        # ~48 blocks of 4 tokens: the workload below evicts.
        engine=EngineConfig(model="tiny-llama", block_size=4, kv_cache_bytes=48 * 1536, max_num_batched_tokens=64),
        serve=ServeConfig(
            engine_addrs=[f"{d}/engine-0"],
            tokenizer_addrs=[f"{d}/tok-0"],
            gateway_addr=f"{d}/gateway",
            kv_events_endpoint=f"{d}/kv",
            kv_events_replay_endpoint=f"{d}/kv-replay",
            kv_events_topic="kv@engine-0@tiny",
            heartbeat_s=0.2,
        ),
    )
    ctx = zmq.Context()
    outputs = ctx.socket(zmq.PULL)
    outputs.bind(config.serve.tokenizer_addrs[0])
    server = EngineCoreServer(config)
    bm = server.engine.block_manager
    assert bm.num_blocks < 80
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.connect(config.serve.kv_events_endpoint)
    requests = ctx.socket(zmq.PUSH)
    requests.connect(config.serve.engine_addrs[0])
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    mirror = CacheMirror()
    out_decoder = decoder(EngineOutputs)
    try:
        time.sleep(0.3)  # let the subscription reach the publisher (the replay covers any gap anyway)
        systems = [[(7 * s + i) % 500 + 3 for i in range(24)] for s in range(3)]
        for round_ in range(6):
            ids = []
            for c in range(4):
                rid = f"q{round_}-{c}"
                prompt = systems[(round_ + c) % 3] + [(round_ * 31 + c * 7 + i) % 500 + 3 for i in range(10 + c)]
                requests.send(
                    encode(
                        EngineRequest(
                            request_id=rid,
                            prompt_token_ids=prompt,
                            sampling_params=SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                            worker=0,
                        )
                    )
                )
                ids.append(rid)
            pending = set(ids)
            while pending:
                msg = out_decoder.decode(outputs.recv())
                pending -= {o.request_id for o in msg.outputs if o.finish_reason is not None}
            # Follow the live stream up to what the engine has published, filling gaps by replay.
            deadline = time.monotonic() + 10
            while mirror.next_seq < server.kv_events.seq:  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "event stream stalled"
                if sub.poll(200):
                    topic, seq_bytes, payload = sub.recv_multipart()
                    assert topic == b"kv@engine-0@tiny"
                    seq = int.from_bytes(seq_bytes, "big")
                    if seq > mirror.next_seq:
                        for s, p in fetch_replay(ctx, config.serve.kv_events_replay_endpoint, mirror.next_seq):
                            if s < seq:
                                mirror.apply(s, p)
                    mirror.apply(seq, payload)
            assert_mirrors(mirror, bm)
        assert mirror.removed > 0, "the workload must evict"
        # A router that starts late rebuilds the same cache from the replay buffer alone.
        late = CacheMirror()
        for s, p in fetch_replay(ctx, config.serve.kv_events_replay_endpoint, 0):
            late.apply(s, p)
        assert late.blocks == mirror.blocks
        first = msgspec.msgpack.Decoder(VKVEventBatch).decode(
            fetch_replay(ctx, config.serve.kv_events_replay_endpoint, 0)[0][1]
        )
        assert first.data_parallel_rank == 0
        assert all(e.medium == "CPU" for e in first.events if not isinstance(e, AllBlocksCleared))
    finally:
        server.stop()
        thread.join(10)
        ctx.destroy(linger=0)
