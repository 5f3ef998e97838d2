"""An SDK with a placeholder key, as every SDK needs one, against a local sluice with the
default settings: chats, lists and retrieves models; a mistyped sluice key is refused."""

import openai
import pytest
from openai import OpenAI

from helpers import SLUICE_BASE_URL


def client(api_key):
    return OpenAI(base_url=SLUICE_BASE_URL, api_key=api_key, max_retries=0, timeout=30)


def test_placeholder_key_streams_a_reply():
    chunks = client("unused").chat.completions.create(
        model="mock-model", stream=True, messages=[{"role": "user", "content": "Hi"}]
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_placeholder_key_lists_and_retrieves_models():
    c = client("unused")
    ids = [m.id for m in c.models.list()]
    assert "demo" in ids and "mock" in ids, ids
    for name in ids:
        m = c.models.retrieve(name)
        assert m.id == name and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")


def test_a_mistyped_sluice_key_is_refused():
    with pytest.raises(openai.AuthenticationError):
        client("sk-sluice-mistyped").models.list()
