"""Tool-call parsing of recorded model outputs, whole and split across stream chunks; the
default tool prompt."""

from __future__ import annotations

import json

import pytest

from services.tokenizer_pool.tool_parser import ToolCallParser, detect_family
from services.tokenizer_pool.tool_prompt import messages_for_template, template_renders_tools
from shared.protocol import ToolCallDelta

QWEN_OUTPUT = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
)
LLAMA_OUTPUT = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'


def run(parser: ToolCallParser, chunks: list[str]) -> tuple[str, list[dict]]:
    text = ""
    deltas: list[ToolCallDelta] = []
    for chunk in chunks:
        t, c = parser.feed(chunk)
        text += t
        deltas += c
    t, c = parser.finish()
    text += t
    deltas += c
    calls: list[dict] = []
    for d in deltas:
        if d.id is not None:
            assert d.id.startswith("call_") and d.index == len(calls)
            calls.append({"name": d.name, "arguments": d.arguments})
        else:
            calls[d.index]["arguments"] += d.arguments
    return text, [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in calls]


def splits(text: str) -> list[list[str]]:
    return [[text], list(text), [text[i : i + 3] for i in range(0, len(text), 3)], [text[:20], text[20:]]]


@pytest.mark.parametrize("chunks", splits(QWEN_OUTPUT))
def test_hermes_calls_any_split(chunks: list[str]) -> None:
    text, calls = run(ToolCallParser("auto", "hermes"), chunks)
    assert text.strip() == "Let me check."
    assert calls == [
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
        {"name": "get_time", "arguments": {"tz": "CET"}},
    ]


@pytest.mark.parametrize("chunks", splits("The answer is <b>42</b>, a < b and <tool"))
def test_hermes_plain_text_is_content(chunks: list[str]) -> None:
    parser = ToolCallParser("auto", "hermes")
    assert run(parser, chunks) == ("The answer is <b>42</b>, a < b and <tool", [])
    assert parser.num_calls == 0


def test_hermes_holds_back_only_a_possible_tag() -> None:
    parser = ToolCallParser("auto", "hermes")
    assert parser.feed("Hello <tool_") == ("Hello ", [])
    assert parser.feed("x") == ("<tool_x", [])


def test_hermes_unclosed_call_at_eos_and_malformed_call() -> None:
    assert run(ToolCallParser("auto", "hermes"), ['<tool_call>\n{"name": "f", "arguments": {}}'])[1] == [
        {"name": "f", "arguments": {}}
    ]
    text, calls = run(ToolCallParser("auto", "hermes"), ["<tool_call>not json</tool_call>"])
    assert text == "<tool_call>not json</tool_call>" and calls == []


@pytest.mark.parametrize("chunks", splits(LLAMA_OUTPUT))
def test_llama3_call(chunks: list[str]) -> None:
    assert run(ToolCallParser("auto", "llama3"), chunks) == (
        "",
        [{"name": "get_weather", "arguments": {"city": "Paris"}}],
    )


def test_llama3_plain_text_streams_and_two_calls() -> None:
    parser = ToolCallParser("auto", "llama3")
    assert parser.feed("Paris is ") == ("Paris is ", [])
    assert run(parser, ["nice."]) == ("nice.", [])
    two = '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    assert run(ToolCallParser("auto", "llama3"), [two])[1] == [
        {"name": "a", "arguments": {"x": 1}},
        {"name": "b", "arguments": {}},
    ]


@pytest.mark.parametrize("chunks", splits('[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]'))
def test_required_array(chunks: list[str]) -> None:
    assert run(ToolCallParser("required"), chunks) == (
        "",
        [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}],
    )


def test_named_streams_name_then_argument_fragments() -> None:
    parser = ToolCallParser("named", tool_name="get_weather")
    _, first = parser.feed('{"city": ')
    assert first[0].name == "get_weather" and first[0].arguments == "" and first[0].id
    assert first[1] == ToolCallDelta(index=0, arguments='{"city": ')
    whole = run(ToolCallParser("named", tool_name="get_weather"), ['{"city": ', '"Paris"}'])
    assert whole == ("", [{"name": "get_weather", "arguments": {"city": "Paris"}}])


def test_family_from_template() -> None:
    assert detect_family("{{ '<tool_call>' }} {% for tool in tools %}") == "hermes"
    assert detect_family("<|python_tag|> ipython {{ tools }} tool_calls") == "llama3"
    assert detect_family(None) == "hermes"


def test_default_tool_prompt_for_templates_without_tools() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    assert not template_renders_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    out, template_tools = messages_for_template(msgs, tools, renders_tools=False)
    assert template_tools is None
    assert out[0]["content"].startswith("Be brief.\n\nYou are a function calling AI model")
    assert '"name": "f"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    # a template with a tool section gets the tools and the arguments as objects
    out, template_tools = messages_for_template(msgs, tools, renders_tools=True)
    assert template_tools == tools and out[2]["tool_calls"][0]["function"]["arguments"] == {"a": 1}


@pytest.mark.parametrize("chunks", splits(QWEN_OUTPUT))
def test_parallel_tool_calls_false_keeps_the_first_call(chunks: list[str]) -> None:
    text, calls = run(ToolCallParser("auto", "hermes", max_calls=1), chunks)
    assert text.strip() == "Let me check."
    assert calls == [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]
    two = '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    assert run(ToolCallParser("auto", "llama3", max_calls=1), [two])[1] == [{"name": "a", "arguments": {"x": 1}}]
