"""The official Anthropic SDK against sluice's `/v1/messages`, served by an OpenAI-compatible
upstream (the mock, its scenario picked per request through `extra_body`): text, a whole
tool-use loop, thinking, and the SDK's error classes."""

import json

import anthropic
import pytest

from helpers import (
    ANTHROPIC_WEATHER_TOOL,
    MODEL,
    anthropic_sluice,
    last_request,
    scenario,
)

HELLO = [{"role": "user", "content": "Hello!"}]


def test_create_and_stream_text():
    client = anthropic_sluice()
    m = client.messages.create(model=MODEL, max_tokens=64, messages=HELLO)
    assert m.type == "message" and m.role == "assistant" and m.model == MODEL
    assert m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text
    assert m.stop_reason == "end_turn"
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0

    with client.messages.stream(model=MODEL, max_tokens=64, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == m.content[0].text, "streamed and whole replies agree"
    assert final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == m.usage.output_tokens


def check_tool_use(m):
    assert m.stop_reason == "tool_use", m
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1, m.content
    assert uses[0].name == "get_weather"
    assert isinstance(uses[0].input, dict) and uses[0].input, uses[0]
    return uses[0]


def answer(m, use):
    return HELLO + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "18°C and clear"}
            ],
        },
    ]


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_use_loop(streamed):
    client = anthropic_sluice()
    request = dict(
        model=MODEL,
        max_tokens=256,
        tools=[ANTHROPIC_WEATHER_TOOL],
        extra_body=scenario("tool_call"),
    )
    if streamed:
        with client.messages.stream(messages=HELLO, **request) as stream:
            first = stream.get_final_message()
    else:
        first = client.messages.create(messages=HELLO, **request)
    use = check_tool_use(first)

    final = client.messages.create(messages=answer(first, use), **request)
    # The upstream got the call and its result in OpenAI's shape.
    saw = last_request()["messages"]
    assert saw[-2]["role"] == "assistant"
    call = saw[-2]["tool_calls"][0]
    assert call["id"] == use.id and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == use.input
    assert saw[-1] == {"role": "tool", "tool_call_id": use.id, "content": "18°C and clear"}
    assert final.stop_reason == "end_turn"
    assert [b.type for b in final.content] == ["text"] and final.content[0].text


def test_thinking_streams_before_the_answer():
    client = anthropic_sluice()
    request = dict(
        model=MODEL,
        max_tokens=1024,
        messages=[{"role": "user", "content": "What is 17 × 23?"}],
        thinking={"type": "enabled", "budget_tokens": 10000},
        extra_body=scenario("reasoning"),
    )
    with client.messages.stream(**request) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "thinking" in kinds and "text" in kinds
    assert kinds.index("thinking") < kinds.index("text")
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert "17 × 23" in final.content[0].thinking
    assert final.content[1].text == "17 × 23 = **391**"
    assert last_request()["reasoning_effort"] == "medium"

    whole = client.messages.create(**request)
    assert [b.type for b in whole.content] == ["thinking", "text"]
    assert whole.content[0].thinking == final.content[0].thinking


def test_wrong_key_is_an_authentication_error():
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic_sluice("sk-sluice-not-a-key").messages.create(
            model=MODEL, max_tokens=16, messages=HELLO
        )
    assert e.value.status_code == 401
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "authentication_error"


def test_a_bad_request_is_a_bad_request_error_naming_the_field():
    with pytest.raises(anthropic.BadRequestError) as e:
        anthropic_sluice().messages.create(
            model=MODEL,
            max_tokens=16,
            messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}],
        )
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0].source.type" in e.value.body["error"]["message"]
