"""What the SDK tests share: clients for sluice and for the mock directly, the mock's own
endpoints, and the one normalisation the direct-versus-sluice comparisons need."""

import copy
import json
import os
import urllib.error
import urllib.request

from openai import OpenAI

SLUICE_BASE_URL = os.environ["SLUICE_BASE_URL"]
SLUICE_API_KEY = os.environ["SLUICE_API_KEY"]
MOCK_BASE_URL = os.environ["MOCK_BASE_URL"]
MOCK_ROOT = os.environ["MOCK_ROOT"]

MODEL = "mock-model"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        # The SDK's stream helper only accumulates strict tools.
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def _client(base_url, api_key):
    # No SDK retries: a retried request would hide a failure and skew the mock's counts.
    return OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)


def sluice():
    return _client(SLUICE_BASE_URL, SLUICE_API_KEY)


def direct():
    return _client(MOCK_BASE_URL, "unused")


def anthropic_sluice(api_key=None):
    """The Anthropic SDK pointed at sluice (it adds `/v1/messages` to its base URL and sends
    the key as `x-api-key`)."""
    import anthropic

    return anthropic.Anthropic(
        base_url=SLUICE_BASE_URL.removesuffix("/v1"),
        api_key=api_key or SLUICE_API_KEY,
        max_retries=0,
        timeout=30,
    )


ANTHROPIC_WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def scenario(name, **knobs):
    """The `extra_body` that picks a mock scenario; sluice forwards it to the mock."""
    return {"mock": {"scenario": name, **knobs}}


def mock_get(path):
    with urllib.request.urlopen(MOCK_ROOT + path, timeout=10) as resp:
        return json.load(resp)


def mock_stats():
    return mock_get("/_mock/stats")


def last_request():
    """The last chat request body the mock received, as JSON."""
    try:
        return mock_get("/mock/requests/last")
    except urllib.error.HTTPError as e:
        # A mock without that endpoint reports the same body inside its stats.
        if e.code != 404:
            raise
        return mock_stats()["last_request"]


def stream_chunks(client, **request):
    """Every chunk of a streamed reply, as the SDK parsed it."""
    stream = client.chat.completions.create(stream=True, **request)
    return [c.model_dump() for c in stream]


def stream_with_helper(client, **request):
    """The chunks and the final completion of the SDK's own streaming helper."""
    with client.chat.completions.stream(**request) as stream:
        chunks = [event.chunk.model_dump() for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    return chunks, final


def one_reply(objs):
    """`objs` (a reply's chunks, or one completion) with `id` and `created` blanked.

    The mock names every reply it makes (a per-process counter) and stamps it with the second
    it made it, so a reply fetched through sluice and one fetched directly are two replies
    that differ there whatever sluice does. Those two fields are the only ones ignored, and
    only after checking that each is one value across the reply."""
    objs = copy.deepcopy(objs)
    items = objs if isinstance(objs, list) else [objs]
    assert items, "an empty reply"
    assert len({o["id"] for o in items}) == 1, [o["id"] for o in items]
    assert len({o["created"] for o in items}) == 1, [o["created"] for o in items]
    for o in items:
        o["id"] = "<reply id>"
        o["created"] = 0
    return objs


def deltas(chunks, index=0):
    """The deltas of choice `index`, in order."""
    return [
        c["delta"] for chunk in chunks for c in chunk["choices"] if c["index"] == index
    ]


def streamed_text(chunks, field="content", index=0):
    return "".join(d.get(field) or "" for d in deltas(chunks, index))


def check_tool_calls(calls, tools=(WEATHER_TOOL,), at_least=1):
    """Tool calls a client can act on: distinct ids, an offered function's name, and
    arguments that are a JSON object."""
    assert calls is not None and len(calls) >= at_least, calls
    ids = [c.id for c in calls]
    assert all(isinstance(i, str) and i for i in ids), ids
    assert len(set(ids)) == len(ids), f"duplicate tool call ids: {ids}"
    names = {t["function"]["name"] for t in tools}
    for c in calls:
        assert c.type == "function", c
        assert c.function.name in names, c
        args = json.loads(c.function.arguments)
        assert isinstance(args, dict), c.function.arguments


def assistant_with_calls(message, content=None):
    """The assistant turn to send back: the calls as the client got them."""
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in message.tool_calls
        ],
    }


def tool_results(message):
    """One `tool` message per call, answering it."""
    out = []
    for c in message.tool_calls:
        args = json.loads(c.function.arguments)
        result = {"city": args.get("city", "?"), "temperature_c": 21, "sky": "clear"}
        out.append({"role": "tool", "tool_call_id": c.id, "content": json.dumps(result)})
    return out
