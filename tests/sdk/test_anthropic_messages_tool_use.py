"""The Anthropic SDK's tool-use loop through sluice's Anthropic provider: the mock speaks the
Messages API (scenario `tool_use`: text, then two tool_use blocks), and every block, id and
input reaches the SDK, and the tool results reach the mock, as Anthropic itself would."""

import pytest

from helpers import ANTHROPIC_WEATHER_TOOL, anthropic_sluice, last_request

QUESTION = [{"role": "user", "content": "What is the weather in Paris and in Tokyo?"}]
REQUEST = dict(model="claude-test", max_tokens=512, tools=[ANTHROPIC_WEATHER_TOOL])


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_use_loop(streamed):
    client = anthropic_sluice()
    if streamed:
        with client.messages.stream(messages=QUESTION, **REQUEST) as stream:
            first = stream.get_final_message()
    else:
        first = client.messages.create(messages=QUESTION, **REQUEST)
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use", "tool_use"]
    uses = first.content[1:]
    assert [u.id for u in uses] == [
        "toolu_01JyDD9mNGIUcILO6jEap0Qd",
        "toolu_01QdFbr0DBGP6MHJF7rERBsu",
    ]
    # The recorded reply's inputs, as the model wrote them.
    assert [u.input for u in uses] == [{"location": "Paris, France"}, {"location": "Tokyo, Japan"}]
    assert all(u.name == "get_weather" for u in uses), uses

    results = [
        {"type": "tool_result", "tool_use_id": u.id, "content": f"18°C in {u.input['location']}"}
        for u in uses
    ]
    messages = QUESTION + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": results},
    ]
    final = client.messages.create(messages=messages, **REQUEST)
    assert final.stop_reason == "end_turn"
    assert [b.type for b in final.content] == ["text"] and final.content[0].text

    saw = last_request()["messages"]
    assert [b["type"] for b in saw[-2]["content"]] == ["text", "tool_use", "tool_use"]
    assert [b["input"] for b in saw[-2]["content"][1:]] == [u.input for u in uses]
    assert saw[-1] == {"role": "user", "content": results}
