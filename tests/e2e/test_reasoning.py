"""Reasoning content through the official client against the launched service: a random-weight
Qwen3 that thinks (tests/engine_core/thinking_model.py; its tokens forced with logit_bias), the
reasoning parser chosen from its template, streaming and not; the schema and tool calls apply to
the answer only; Qwen3's enable_thinking through chat_template_kwargs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.e2e.conftest import Server, start_server
from tests.engine_core import thinking_model
from tests.engine_core.thinking_model import END_THINK, THINK

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
ASK = [{"role": "user", "content": "Yes or no?"}]
FILLER = 56  # "H" in the bundled vocabulary; masked by the schema
# <think> beats the schema's first tokens, the filler beats </think> (so the thinking lasts a while)
BIAS = {str(THINK): 99, str(FILLER): 100, str(END_THINK): 97}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    root = tmp_path_factory.mktemp("thinking")
    model, tokenizer = thinking_model.build(root / "model", thinking_model.QWEN3_TEMPLATE)
    s = start_server(
        str(root),
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        "--num-tokenizer-workers",
        "1",
        "--served-model-name",
        "thinking",
    )
    yield s, "thinking"
    s.stop()
    assert s.proc.returncode == 0


@pytest.fixture(scope="module")
def client(served: tuple[Server, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0].base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def create(client: openai.OpenAI, served: tuple[Server, str], **kw: Any) -> Any:
    args: dict[str, Any] = {"max_tokens": 200, "temperature": 1.0, "seed": 7, "logit_bias": BIAS, **kw}
    return client.chat.completions.create(model=served[1], messages=ASK, **args)


def test_reasoning_split_and_schema_on_the_answer(client: openai.OpenAI, served: tuple[Server, str]) -> None:
    resp = create(client, served, response_format=FORMAT)
    choice = resp.choices[0]
    reasoning = choice.message.reasoning_content  # type: ignore[attr-defined]
    assert choice.finish_reason == "stop"
    assert reasoning and set(reasoning.replace("<think>", "")) <= {"H"}, reasoning
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)

    details = resp.usage.completion_tokens_details
    assert details is not None and 0 < details.reasoning_tokens < resp.usage.completion_tokens

    stream = create(client, served, response_format=FORMAT, stream=True, stream_options={"include_usage": True})
    streamed_reasoning = content = ""
    finish = usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        streamed_reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (streamed_reasoning, content, finish) == (reasoning, choice.message.content, "stop")
    assert usage == resp.usage  # the same seed: the same output, the same counts


def test_enable_thinking_false_constrains_from_the_first_token(
    client: openai.OpenAI, served: tuple[Server, str]
) -> None:
    """The template closes the thinking in the prompt: <think> is no longer offered."""
    resp = create(
        client, served, response_format=FORMAT, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    msg = resp.choices[0].message
    assert getattr(msg, "reasoning_content", None) is None
    jsonschema.validate(json.loads(msg.content), SCHEMA)


def test_named_tool_call_after_the_thinking(client: openai.OpenAI, served: tuple[Server, str]) -> None:
    tools = [{"type": "function", "function": {"name": "answer", "parameters": SCHEMA}}]
    resp = create(client, served, tools=tools, tool_choice={"type": "function", "function": {"name": "answer"}})
    msg = resp.choices[0].message
    assert msg.reasoning_content  # type: ignore[attr-defined]
    (call,) = msg.tool_calls
    assert call.function.name == "answer"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
