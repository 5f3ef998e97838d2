"""The Responses API through sluice, as the official SDK's `client.responses` uses it: plain
text (the mock's own reply, as its chat endpoint sends it directly), a function-calling loop,
reasoning, and the request's fields reaching the upstream as their chat counterparts."""

import json

import openai
import pytest

from helpers import MODEL, WEATHER_TOOL, direct, last_request, scenario, sluice

QUESTION = "What is the weather in Paris and in Tokyo?"

# The same tool as the chat tests', in the Responses API's flat shape.
WEATHER = {"type": "function", **WEATHER_TOOL["function"]}


def direct_text(prompt, **extra_body):
    """What the mock answers on its chat endpoint for `prompt`, with no sluice between."""
    reply = direct().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], extra_body=extra_body or None
    )
    return reply.choices[0].message.content


def streamed(**request):
    """Every event of a streamed response, and the final response, from the SDK's helper."""
    with sluice().responses.stream(**request) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    return events, final


def test_plain_text_matches_direct():
    want = direct_text("Say something plain.")
    resp = sluice().responses.create(model=MODEL, input="Say something plain.")
    assert resp.object == "response" and resp.status == "completed"
    assert resp.output_text == want
    assert resp.usage.output_tokens > 0
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens


def test_streamed_text_matches_direct():
    want = direct_text("Say something plain.")
    events, final = streamed(model=MODEL, input="Say something plain.")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == want
    assert final.output_text == want
    done = [e for e in events if e.type == "response.output_text.done"]
    assert len(done) == 1 and done[0].text == want
    assert final.output[0].type == "message" and final.output[0].status == "completed"


def check_calls(output):
    calls = [o for o in output if o.type == "function_call"]
    assert len(calls) >= 2, output
    assert len({c.call_id for c in calls}) == len(calls)
    for c in calls:
        assert c.name == "get_weather"
        assert isinstance(json.loads(c.arguments), dict)
    return calls


def results(calls):
    return [
        {
            "type": "function_call_output",
            "call_id": c.call_id,
            "output": json.dumps({"city": json.loads(c.arguments).get("city", "?"), "temperature_c": 21}),
        }
        for c in calls
    ]


def check_mock_got_results(calls):
    """The mock's last chat request: the calls as one assistant turn, then a tool message
    answering each."""
    messages = last_request()["messages"]
    n = len(calls)
    assistant, tools = messages[-n - 1], messages[-n:]
    assert assistant["role"] == "assistant"
    assert [c["id"] for c in assistant["tool_calls"]] == [c.call_id for c in calls]
    assert [t["tool_call_id"] for t in tools] == [c.call_id for c in calls]
    assert all(t["role"] == "tool" for t in tools)


@pytest.mark.parametrize("stream", [False, True])
def test_function_calling_loop(stream):
    request = {"model": MODEL, "tools": [WEATHER], "extra_body": scenario("parallel_tool_calls")}
    conversation = [{"role": "user", "content": QUESTION}]
    if stream:
        events, first = streamed(input=conversation, **request)
        kinds = [e.type for e in events]
        assert "response.function_call_arguments.delta" in kinds
        assert "response.function_call_arguments.done" in kinds
    else:
        first = sluice().responses.create(input=conversation, **request)
    calls = check_calls(first.output)
    if stream:
        # The helper parsed each strict tool's arguments.
        for c in calls:
            assert c.parsed_arguments == json.loads(c.arguments)

    # As the docs show it: the output items go back as input, then one result per call.
    conversation += [o.model_dump(exclude_none=True) for o in first.output] + results(calls)
    if stream:
        _, final = streamed(input=conversation, **request)
    else:
        final = sluice().responses.create(input=conversation, **request)
    check_mock_got_results(calls)
    assert final.output_text
    assert not [o for o in final.output if o.type == "function_call"]


def test_reasoning_streams_as_a_reasoning_item():
    want = direct_text("Think it over.", mock={"scenario": "reasoning"})
    events, final = streamed(model=MODEL, input="Think it over.", extra_body=scenario("reasoning"))
    kinds = [e.type for e in events]
    assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    reasoning = final.output[0]
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    assert reasoning.content[0].text == thought and thought
    assert final.output_text == want
    assert final.usage.output_tokens_details.reasoning_tokens > 0


def test_instructions_limits_and_format_reach_the_upstream():
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    resp = sluice().responses.create(
        model=MODEL,
        input="Answer in JSON.",
        instructions="You answer in JSON.",
        max_output_tokens=64,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
    )
    assert resp.instructions == "You answer in JSON."
    assert resp.max_output_tokens == 64
    assert resp.text.format.type == "json_schema"
    got = last_request()
    assert got["messages"][0] == {"role": "system", "content": "You answer in JSON."}
    assert got["messages"][1]["role"] == "user"
    assert got["max_tokens"] == 64
    assert got["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }


def test_an_unsupported_tool_is_refused_naming_it():
    with pytest.raises(openai.UnprocessableEntityError) as e:
        sluice().responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}])
    assert "tools[0].type" in str(e.value)
