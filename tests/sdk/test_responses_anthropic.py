"""The Responses API served by sluice's Anthropic provider: the mock speaks the Messages API
(scenario `tool_use`: a text block, then two tool_use blocks). The SDK must get a message
item and function_call items it can act on, and its results must reach the mock as
tool_result blocks."""

import json

import pytest

from helpers import last_request, sluice

MODEL = "claude-test"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
}


@pytest.mark.parametrize("stream", [False, True])
def test_function_calling_loop(stream):
    conversation = [{"role": "user", "content": "What is the weather in Paris and in Tokyo?"}]

    def ask():
        if not stream:
            return sluice().responses.create(model=MODEL, input=conversation, tools=[WEATHER])
        with sluice().responses.stream(model=MODEL, input=conversation, tools=[WEATHER]) as s:
            events = list(s)
            assert [e.sequence_number for e in events] == list(range(len(events)))
            return s.get_final_response()

    first = ask()
    assert first.status == "completed"
    assert first.output[0].type == "message" and first.output_text
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 2, first.output
    for c in calls:
        assert c.name == "get_weather" and isinstance(json.loads(c.arguments), dict)

    conversation += [o.model_dump(exclude_none=True) for o in first.output]
    conversation += [
        {"type": "function_call_output", "call_id": c.call_id, "output": "21C, clear"} for c in calls
    ]
    final = ask()
    assert final.output_text
    assert not [o for o in final.output if o.type == "function_call"]

    saw = last_request()["messages"]
    assistant, user = saw[-2], saw[-1]
    used = [b for b in assistant["content"] if b["type"] == "tool_use"]
    assert [b["id"] for b in used] == [c.call_id for c in calls]
    assert [b["input"] for b in used] == [json.loads(c.arguments) for c in calls]
    blocks = [b for b in user["content"] if b["type"] == "tool_result"]
    assert [b["tool_use_id"] for b in blocks] == [c.call_id for c in calls]
