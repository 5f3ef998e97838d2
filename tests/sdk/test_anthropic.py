"""The same function-calling loop through sluice's Anthropic provider: the mock speaks the
Messages API (scenario `tool_use`: text, then two tool_use blocks), and the OpenAI SDK must
get tool calls it can act on, and have its tool results reach the mock as tool_result
blocks."""

import json

from helpers import (
    WEATHER_TOOL,
    assistant_with_calls,
    check_tool_calls,
    last_request,
    sluice,
    stream_with_helper,
    tool_results,
)

QUESTION = [{"role": "user", "content": "What is the weather in Paris and in Tokyo?"}]
REQUEST = {"model": "claude-test", "tools": [WEATHER_TOOL]}


def check_calls_turn(choice):
    check_tool_calls(choice.message.tool_calls, at_least=2)
    assert choice.finish_reason == "tool_calls"
    # The text block before the tool_use blocks is the message's content.
    assert isinstance(choice.message.content, str) and choice.message.content


def answer(message):
    # The assistant turn goes back as the client got it, text and calls together.
    return QUESTION + [assistant_with_calls(message, message.content)] + tool_results(message)


def check_mock_got_results(message):
    """The mock's last request ends with the assistant's tool_use blocks, then a user turn
    of tool_result blocks answering each, with what the tool messages said."""
    saw = last_request()
    calls = {c.id: c for c in message.tool_calls}
    results = {r["tool_call_id"]: r["content"] for r in tool_results(message)}
    assistant, user = saw["messages"][-2], saw["messages"][-1]
    assert assistant["role"] == "assistant", saw["messages"]
    used = [b for b in assistant["content"] if b["type"] == "tool_use"]
    assert [b["id"] for b in used] == list(calls), used
    for b in used:
        assert b["name"] == calls[b["id"]].function.name
        assert b["input"] == json.loads(calls[b["id"]].function.arguments)
    assert user["role"] == "user", saw["messages"]
    blocks = [b for b in user["content"] if b["type"] == "tool_result"]
    assert [b["tool_use_id"] for b in blocks] == list(calls), user
    for b in blocks:
        content = b["content"]
        text = content if isinstance(content, str) else "".join(p["text"] for p in content)
        assert json.loads(text) == json.loads(results[b["tool_use_id"]])


def check_final_turn(choice):
    assert isinstance(choice.message.content, str) and choice.message.content
    assert not choice.message.tool_calls
    assert choice.finish_reason == "stop"


def test_streamed_loop():
    chunks, first = stream_with_helper(sluice(), messages=QUESTION, **REQUEST)
    check_calls_turn(first.choices[0])
    for call in first.choices[0].message.tool_calls:
        assert call.function.parsed_arguments == json.loads(call.function.arguments)
    assert len({c["id"] for c in chunks}) == 1, "one reply, one id"

    _, final = stream_with_helper(sluice(), messages=answer(first.choices[0].message), **REQUEST)
    check_mock_got_results(first.choices[0].message)
    check_final_turn(final.choices[0])


def test_non_streamed_loop():
    first = sluice().chat.completions.create(messages=QUESTION, **REQUEST)
    check_calls_turn(first.choices[0])

    final = sluice().chat.completions.create(messages=answer(first.choices[0].message), **REQUEST)
    check_mock_got_results(first.choices[0].message)
    check_final_turn(final.choices[0])
