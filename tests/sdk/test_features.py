"""Reply features beyond plain text, each in its mock scenario: reasoning deltas, logprobs
and several choices (`n`). Through sluice each reaches the SDK as the mock sent it."""

from helpers import (
    MODEL,
    direct,
    one_reply,
    scenario,
    sluice,
    stream_chunks,
    streamed_text,
)

QUESTION = [{"role": "user", "content": "Think it over, then answer briefly."}]


def both_streamed(**request):
    """The chunks through sluice, after checking they match the mock's own."""
    via = stream_chunks(sluice(), model=MODEL, messages=QUESTION, **request)
    straight = stream_chunks(direct(), model=MODEL, messages=QUESTION, **request)
    assert one_reply(via) == one_reply(straight)
    return via


def both_whole(**request):
    """The completion through sluice, after checking it matches the mock's own."""
    via = sluice().chat.completions.create(model=MODEL, messages=QUESTION, **request)
    straight = direct().chat.completions.create(model=MODEL, messages=QUESTION, **request)
    assert one_reply(via.model_dump()) == one_reply(straight.model_dump())
    return via


def test_reasoning_content_streams_as_direct():
    chunks = both_streamed(extra_body=scenario("reasoning"))
    # Not a field of the SDK's delta type: it is kept as an extra field, as sent.
    assert streamed_text(chunks, "reasoning_content")
    assert streamed_text(chunks)


def test_reasoning_content_non_streamed_as_direct():
    reply = both_whole(extra_body=scenario("reasoning"))
    message = reply.choices[0].message.model_dump()
    assert message["reasoning_content"] and message["content"]


def test_logprobs_stream_as_direct():
    chunks = both_streamed(logprobs=True, top_logprobs=2, extra_body=scenario("logprobs"))
    tokens = [
        t
        for chunk in chunks
        for c in chunk["choices"]
        if c["logprobs"]
        for t in c["logprobs"]["content"] or []
    ]
    assert tokens, "no logprobs in any chunk"
    assert all(len(t["top_logprobs"]) == 2 for t in tokens), tokens


def test_logprobs_non_streamed_as_direct():
    reply = both_whole(logprobs=True, top_logprobs=2, extra_body=scenario("logprobs"))
    content = reply.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 for t in content)


def test_two_choices_stream_as_direct():
    chunks = both_streamed(n=2, extra_body=scenario("n"))
    indexes = {c["index"] for chunk in chunks for c in chunk["choices"]}
    assert indexes == {0, 1}
    for i in (0, 1):
        assert streamed_text(chunks, index=i)
        finishes = [
            c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["index"] == i
        ]
        assert [f for f in finishes if f] == ["stop"]


def test_two_choices_non_streamed_as_direct():
    reply = both_whole(n=2, extra_body=scenario("n"))
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content and c.finish_reason == "stop" for c in reply.choices)
