"""Two identical deterministic requests at once share one upstream reply: the second joins
the first while the mock is still streaming it, and both clients get the same chunks."""

from helpers import MODEL, WEATHER_TOOL, mock_stats, scenario, sluice

REQUEST = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Weather in Paris and Tokyo?"}],
    "tools": [WEATHER_TOOL],
    "temperature": 0,
    # Slow enough that the first reply is still streaming when the second request arrives.
    "extra_body": scenario("parallel_tool_calls", token_ms=50),
}


def test_concurrent_pair_shares_one_upstream_reply():
    client = sluice()
    first = iter(client.chat.completions.create(stream=True, **REQUEST))
    # The first chunk means the flight is open upstream; only then does the second start.
    a = [next(first).model_dump()]
    second = iter(client.chat.completions.create(stream=True, **REQUEST))
    b = [next(second).model_dump()]
    stats = mock_stats()
    assert stats["completed_streams"] == 0, "the first reply ended before the second joined"
    a += [c.model_dump() for c in first]
    b += [c.model_dump() for c in second]
    assert b == a
    assert any(c["delta"].get("tool_calls") for chunk in a for c in chunk["choices"])
    assert mock_stats()["chat_requests"] == 1
