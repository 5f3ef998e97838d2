"""A plain text reply through sluice is, to the OpenAI SDK, the mock's own reply."""

from helpers import (
    MODEL,
    direct,
    one_reply,
    sluice,
    stream_chunks,
    stream_with_helper,
    streamed_text,
)

REQUEST = {"model": MODEL, "messages": [{"role": "user", "content": "Say something plain."}]}


def test_streamed_chunks_match_direct():
    via = stream_chunks(sluice(), **REQUEST)
    straight = stream_chunks(direct(), **REQUEST)
    assert one_reply(via) == one_reply(straight)
    assert streamed_text(via)
    assert via[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in via), "usage only when asked"


def test_usage_chunk_when_asked_matches_direct():
    asked = {**REQUEST, "stream_options": {"include_usage": True}}
    via = stream_chunks(sluice(), **asked)
    straight = stream_chunks(direct(), **asked)
    assert one_reply(via) == one_reply(straight)
    assert via[-1]["choices"] == [] and via[-1]["usage"]["completion_tokens"] > 0


def test_stream_helper_final_completion_matches_direct():
    via_chunks, via = stream_with_helper(sluice(), **REQUEST)
    straight_chunks, straight = stream_with_helper(direct(), **REQUEST)
    assert one_reply(via_chunks) == one_reply(straight_chunks)
    assert one_reply(via.model_dump()) == one_reply(straight.model_dump())
    assert via.choices[0].message.content == streamed_text(via_chunks)


def test_non_streamed_completion_matches_direct():
    via = sluice().chat.completions.create(**REQUEST)
    straight = direct().chat.completions.create(**REQUEST)
    assert one_reply(via.model_dump()) == one_reply(straight.model_dump())
    assert via.object == "chat.completion"
    assert via.choices[0].message.content
