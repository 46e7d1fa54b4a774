"""InvalidRequest and the one context-length check every hop uses."""

from __future__ import annotations

import pytest

from shared.errors import InvalidRequest, check_context_length
from shared.protocol import ErrorInfo, SamplingParams


def test_context_length_fits() -> None:
    check_context_length(9, None, 10, "prompt")
    check_context_length(6, 4, 10, "prompt")


def test_prompt_without_room_for_one_token() -> None:
    with pytest.raises(InvalidRequest, match="maximum context length is 10 tokens, but the prompt has 10") as exc:
        check_context_length(10, None, 10, "messages")
    assert (exc.value.param, exc.value.code) == ("messages", "context_length_exceeded")


def test_explicit_max_tokens_that_cannot_fit() -> None:
    with pytest.raises(
        InvalidRequest, match=r"you requested 11 tokens \(6 in the prompt, 5 in the completion\)"
    ) as exc:
        check_context_length(6, 5, 10, "prompt")
    assert (exc.value.param, exc.value.code) == ("max_tokens", "context_length_exceeded")


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (SamplingParams(top_p=0), "top_p"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(max_tokens=2, min_tokens=3), "min_tokens"),
        (SamplingParams(stop=[""]), "stop"),
        (SamplingParams(n=0), "n"),
    ],
)
def test_sampling_params_name_the_parameter(params: SamplingParams, param: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        params.validate()
    assert exc.value.param == param and exc.value.message.startswith(param)


def test_error_info_carries_message_param_and_code() -> None:
    info = ErrorInfo.invalid(InvalidRequest("bad", param="top_p", code="x"))
    assert info == ErrorInfo(message="bad", status=400, param="top_p", code="x")
