"""Thinking through sluice's Anthropic provider with the Anthropic SDK: the mock plays a
signed thinking block, then text (scenario `thinking`); the SDK gets the block with its
signature, and sent back, the block reaches Anthropic signed, so thinking carries on."""

from helpers import anthropic_sluice, last_request

QUESTION = [{"role": "user", "content": "What is 17 × 23?"}]
REQUEST = dict(
    model="claude-test", max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1500}
)


def test_thinking_round_trip():
    client = anthropic_sluice()
    with client.messages.stream(messages=QUESTION, **REQUEST) as stream:
        thoughts = [e.thinking for e in stream if e.type == "thinking"]
        first = stream.get_final_message()
    assert [b.type for b in first.content] == ["thinking", "text"]
    thinking = first.content[0]
    assert "".join(thoughts) == thinking.thinking and "17 × 23" in thinking.thinking
    assert thinking.signature.startswith("Eq1pCAkYkQGMT1YTLUe2IVt2")
    assert "391" in first.content[1].text
    assert first.usage.input_tokens == 46
    assert last_request()["thinking"] == {"type": "enabled", "budget_tokens": 1500}

    messages = QUESTION + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": "And 17 × 24?"},
    ]
    again = client.messages.create(messages=messages, **REQUEST)
    assert [b.type for b in again.content] == ["thinking", "text"]
    sent = last_request()["messages"][1]["content"][0]
    assert sent == {
        "type": "thinking",
        "thinking": thinking.thinking,
        "signature": thinking.signature,
    }
