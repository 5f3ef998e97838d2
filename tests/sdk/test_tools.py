"""A two-turn function-calling loop, as a user's agent runs it: the model asks for several
calls at once, the client answers each with a `tool` message, the model answers in text.
Through sluice the SDK must rebuild exactly what it rebuilds from the mock directly."""

import json

from helpers import (
    MODEL,
    WEATHER_TOOL,
    assistant_with_calls,
    check_tool_calls,
    direct,
    one_reply,
    scenario,
    sluice,
    stream_with_helper,
    tool_results,
)

QUESTION = [{"role": "user", "content": "What is the weather in Paris and in Tokyo?"}]
REQUEST = {"model": MODEL, "tools": [WEATHER_TOOL], "extra_body": scenario("parallel_tool_calls")}


def answer(message):
    """The conversation after the model's calls: its turn, then one result per call."""
    return QUESTION + [assistant_with_calls(message)] + tool_results(message)


def check_calls_turn(message, finish_reason):
    check_tool_calls(message.tool_calls, at_least=2)
    assert finish_reason == "tool_calls"


def check_final_turn(message, finish_reason):
    assert isinstance(message.content, str) and message.content
    assert not message.tool_calls
    assert finish_reason == "stop"


def test_streamed_loop_matches_direct():
    via_chunks, via = stream_with_helper(sluice(), messages=QUESTION, **REQUEST)
    straight_chunks, straight = stream_with_helper(direct(), messages=QUESTION, **REQUEST)
    assert one_reply(via_chunks) == one_reply(straight_chunks)
    assert one_reply(via.model_dump()) == one_reply(straight.model_dump())
    turn = via.choices[0]
    check_calls_turn(turn.message, turn.finish_reason)
    # The helper parsed each call's arguments for the strict tool.
    for call in turn.message.tool_calls:
        assert call.function.parsed_arguments == json.loads(call.function.arguments)

    via_chunks, via_final = stream_with_helper(
        sluice(), messages=answer(via.choices[0].message), **REQUEST
    )
    straight_chunks, straight_final = stream_with_helper(
        direct(), messages=answer(straight.choices[0].message), **REQUEST
    )
    assert one_reply(via_chunks) == one_reply(straight_chunks)
    assert one_reply(via_final.model_dump()) == one_reply(straight_final.model_dump())
    check_final_turn(via_final.choices[0].message, via_final.choices[0].finish_reason)


def test_streamed_tool_call_deltas_are_fragments_of_the_calls():
    # What a client that accumulates ChatCompletionChunks itself relies on: every call
    # announces its id and name once, at its index, and its arguments arrive in pieces.
    chunks, final = stream_with_helper(sluice(), messages=QUESTION, **REQUEST)
    calls = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for d in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
                if d.get("id"):
                    assert call["id"] is None, f"call {d['index']} named twice"
                    call["id"] = d["id"]
                fn = d.get("function") or {}
                if fn.get("name"):
                    call["name"] = fn["name"]
                call["arguments"] += fn.get("arguments") or ""
    message = final.choices[0].message
    assert [calls[i] for i in sorted(calls)] == [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in message.tool_calls
    ]


def test_non_streamed_loop_matches_direct():
    via = sluice().chat.completions.create(messages=QUESTION, **REQUEST)
    straight = direct().chat.completions.create(messages=QUESTION, **REQUEST)
    assert one_reply(via.model_dump()) == one_reply(straight.model_dump())
    check_calls_turn(via.choices[0].message, via.choices[0].finish_reason)

    via_final = sluice().chat.completions.create(messages=answer(via.choices[0].message), **REQUEST)
    straight_final = direct().chat.completions.create(
        messages=answer(straight.choices[0].message), **REQUEST
    )
    assert one_reply(via_final.model_dump()) == one_reply(straight_final.model_dump())
    check_final_turn(via_final.choices[0].message, via_final.choices[0].finish_reason)
