"""A conversation with every message shape the Chat Completions API knows, and a request
with many fields, reach the upstream through sluice as the SDK sent them."""

from helpers import MODEL, WEATHER_TOOL, direct, last_request, sluice

# 1x1 PNG and a few bytes of WAV header: content need not be meaningful, only carried.
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9Q"
    "DwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
WAV = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAIA+AAACABAAZGF0YQAAAAA="

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "developer", "content": [{"type": "text", "text": "Prefer metric units."}]},
    {
        "role": "user",
        "name": "alice",
        "content": [
            {"type": "text", "text": "Ça va? What is in this picture and this clip — 世界 🦀"},
            {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
            {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_paris",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_tokyo",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Tokyo"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_paris", "content": '{"temperature_c": 18}'},
    {
        "role": "tool",
        "tool_call_id": "call_tokyo",
        "content": [{"type": "text", "text": '{"temperature_c": 25}'}],
    },
    {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    },
    {"role": "function", "name": "get_weather", "content": '{"temperature_c": 3}'},
    {"role": "assistant", "audio": {"id": "audio_abc123"}},
    {
        "role": "user",
        "content": "And tomorrow?",
        "x_client_trace": {"span": "7f3a", "tags": ["sdk", None, 1.5]},
    },
]

REQUEST = {
    "model": MODEL,
    "messages": MESSAGES,
    "tools": [WEATHER_TOOL],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "temperature": 0.7,
    "top_p": 0.9,
    "max_tokens": 64,
    "max_completion_tokens": 64,
    "stop": "END",
    "seed": 7,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.25,
    "logit_bias": {"50256": -100},
    "user": "user-1",
    "metadata": {"suite": "sdk"},
    "response_format": {"type": "text"},
    "n": 1,
    "extra_body": {"vendor_option": {"k": [1, "two", None]}},
}

# What sluice may change: it always asks the upstream for usage and always streams from it.
SLUICE_SETS = {"stream", "stream_options"}


def upstream_saw(client, stream):
    reply = client.chat.completions.create(stream=stream, **REQUEST)
    if stream:
        list(reply)
    return last_request()


def sent_and_relayed(stream):
    """What the SDK put on the wire (the mock's view of a direct request) and what the mock
    got of the same request through sluice."""
    return upstream_saw(direct(), stream), upstream_saw(sluice(), stream)


def check_relayed(sent, relayed):
    assert sent["messages"] == MESSAGES, "the SDK sends the messages as written"
    assert relayed["messages"] == sent["messages"]
    for field, value in sent.items():
        if field not in SLUICE_SETS:
            assert relayed.get(field) == value, field
    assert set(relayed) - set(sent) <= SLUICE_SETS
    assert relayed["stream"] is True
    assert relayed["stream_options"]["include_usage"] is True
    assert relayed["vendor_option"] == REQUEST["extra_body"]["vendor_option"]


def test_streamed_request_reaches_upstream_as_sent():
    sent, relayed = sent_and_relayed(stream=True)
    check_relayed(sent, relayed)
    assert sent["stream"] is True


def test_non_streamed_request_reaches_upstream_as_sent():
    check_relayed(*sent_and_relayed(stream=False))
