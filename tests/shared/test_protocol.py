from __future__ import annotations

import pytest

from shared.protocol import (
    EngineInput,
    EngineOutput,
    EngineOutputs,
    EngineRequest,
    EngineStats,
    SamplingParams,
    TokenizerInput,
    TokenLogprob,
    decoder,
    encode,
    shard,
)


def test_roundtrip_tagged_union() -> None:
    req = EngineRequest(
        request_id="r1", prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams(max_tokens=5, stop=["x"]), worker=1
    )
    assert decoder(EngineInput).decode(encode(req)) == req
    outs = EngineOutputs(
        engine_index=0,
        outputs=[
            EngineOutput(request_id="r1", new_token_ids=[7], logprobs=[TokenLogprob(7, -0.1, [(7, -0.1), (8, -2.0)])])
        ],
        stats=EngineStats(num_running=1),
    )
    assert decoder(TokenizerInput).decode(encode(outs)) == outs


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=0),
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_k=-2),
        dict(min_p=2),
        dict(presence_penalty=3),
        dict(logprobs=21),
        dict(n=0),
        dict(min_tokens=5, max_tokens=2),
        dict(stop=[""]),
    ],
)
def test_validate_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs).validate()


def test_shard_is_stable() -> None:
    assert shard("abc", 4) == shard("abc", 4)
    assert {shard(f"r{i}", 4) for i in range(100)} == {0, 1, 2, 3}
