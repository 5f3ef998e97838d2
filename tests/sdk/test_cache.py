"""A deterministic request (`temperature: 0`) asked twice is answered the second time from
sluice's response cache, and a reply with tool calls replays exactly as it streamed live."""

from helpers import (
    MODEL,
    WEATHER_TOOL,
    check_tool_calls,
    mock_stats,
    scenario,
    sluice,
    stream_chunks,
)

REQUEST = {
    "model": MODEL,
    "tools": [WEATHER_TOOL],
    "temperature": 0,
    "extra_body": scenario("parallel_tool_calls"),
}


def upstream_calls():
    return mock_stats()["chat_requests"]


def test_streamed_replay_is_the_live_reply():
    messages = [{"role": "user", "content": "Weather in Paris and Tokyo? (streamed)"}]
    before = upstream_calls()
    usage = {"include_usage": True}
    live = stream_chunks(sluice(), messages=messages, stream_options=usage, **REQUEST)
    replayed = stream_chunks(sluice(), messages=messages, stream_options=usage, **REQUEST)
    assert upstream_calls() == before + 1, "the second reply came from the cache"
    # Nothing ignored: a replay is the live reply's own chunks, ids and timestamps included.
    assert replayed == live
    assert any(c["delta"].get("tool_calls") for chunk in live for c in chunk["choices"])
    assert live[-1]["usage"] is not None


def test_non_streamed_replay_is_the_live_reply():
    messages = [{"role": "user", "content": "Weather in Paris and Tokyo? (whole)"}]
    before = upstream_calls()
    live = sluice().chat.completions.create(messages=messages, **REQUEST)
    replayed = sluice().chat.completions.create(messages=messages, **REQUEST)
    assert upstream_calls() == before + 1, "the second reply came from the cache"
    assert replayed.model_dump() == live.model_dump()
    check_tool_calls(live.choices[0].message.tool_calls, at_least=2)
