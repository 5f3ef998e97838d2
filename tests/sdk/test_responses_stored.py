"""Stored, chained and background responses through the official SDK: retrieve, delete
and list a stored response's input; continue a conversation with previous_response_id;
run a response in the background, drop its stream after a few events and resume it with
starting_after — on this instance, and (when SLUICE_OTHER_URL names one) on another
instance of the cluster; cancel one."""

import os

import openai
import pytest
from openai import OpenAI

from helpers import MODEL, SLUICE_API_KEY, SLUICE_BASE_URL, last_request, sluice

# A long, slow reply: the stream is dropped and resumed while it still runs.
SLOW = {"mock": {"tokens": 40, "token_ms": 25}}
OTHER_URL = os.environ.get("SLUICE_OTHER_URL")
OTHER_KEY = os.environ.get("SLUICE_OTHER_KEY")
FINAL = {"response.completed", "response.failed", "response.incomplete"}


def client(base_url=SLUICE_BASE_URL, api_key=SLUICE_API_KEY):
    return OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)


def check_sequence(events, first):
    """Sequence numbers count up by one from `first`, and only the last event is final."""
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(first, first + len(events))), numbers
    assert events[-1].type in FINAL, [e.type for e in events]
    assert not any(e.type in FINAL for e in events[:-1])


def text_of(events):
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_a_stored_response_is_retrieved_listed_and_deleted():
    c = sluice()
    r = c.responses.create(model=MODEL, input="Hello there", metadata={"k": "v"})
    assert r.status == "completed" and r.output_text
    got = c.responses.retrieve(r.id)
    assert got.id == r.id and got.status == "completed"
    assert got.output_text == r.output_text and got.metadata == {"k": "v"}
    items = c.responses.input_items.list(r.id)
    assert [i.type for i in items.data] == ["message"]
    assert items.data[0].role == "user"
    assert items.data[0].content[0].text == "Hello there"
    deleted = c.responses.delete(r.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)


def test_store_false_keeps_nothing():
    c = sluice()
    r = c.responses.create(model=MODEL, input="Not kept", store=False)
    assert r.status == "completed" and r.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)


def test_previous_response_id_continues_the_conversation():
    c = sluice()
    first = c.responses.create(model=MODEL, input="My name is Ada.", instructions="Be terse.")
    second = c.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id
    )
    assert second.previous_response_id == first.id
    sent = last_request()["messages"]
    # The earlier turn and its answer reach the model before the new input; the earlier
    # instructions are not carried over.
    assert [m["role"] for m in sent] == ["user", "assistant", "user"], sent
    assert "Ada" in str(sent[0]["content"])
    assert first.output_text in str(sent[1]["content"])
    items = c.responses.input_items.list(second.id, order="asc")
    assert [i.type for i in items.data] == ["message", "message", "message"]
    # Streamed, a chained response is the same.
    with c.responses.stream(
        model=MODEL, input="And again?", previous_response_id=second.id
    ) as s:
        final = s.get_final_response()
    assert final.status == "completed"
    assert len(last_request()["messages"]) == 5


def test_previous_response_id_of_another_user_is_not_found():
    if not OTHER_KEY:
        pytest.skip("no second key")
    mine = sluice().responses.create(model=MODEL, input="Secret")
    other = client(api_key=OTHER_KEY)
    with pytest.raises((openai.UnprocessableEntityError, openai.BadRequestError, openai.NotFoundError)):
        other.responses.create(model=MODEL, input="x", previous_response_id=mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)


def test_a_background_response_runs_on_and_is_retrieved():
    c = sluice()
    r = c.responses.create(model=MODEL, input="Take your time", background=True, extra_body=SLOW)
    assert r.status in ("queued", "in_progress") and r.background is True
    # The stream from its start holds every event; its end is the response retrieved.
    with c.responses.stream(response_id=r.id) as s:
        events = list(s)
    check_sequence(events, 0)
    done = c.responses.retrieve(r.id)
    assert done.status == "completed"
    assert done.output_text == text_of(events)


def resume_case(resume_client):
    c = sluice()
    stream = c.responses.create(
        model=MODEL, input="A long story", background=True, stream=True, extra_body=SLOW
    )
    head = []
    for event in stream:
        head.append(event)
        if event.type == "response.output_text.delta" and len(head) >= 8:
            break
    # The connection is dropped mid-response; the response goes on.
    stream.close()
    rid = head[0].response.id
    assert head[0].type == "response.created"
    last = head[-1].sequence_number
    tail = list(resume_client.responses.retrieve(rid, stream=True, starting_after=last))
    assert tail, "nothing after the resume point"
    check_sequence(head + tail, 0)
    final = tail[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == text_of(head + tail)
    assert resume_client.responses.retrieve(rid).status == "completed"
    # Resumed again from further on: exactly the rest, again.
    again = list(resume_client.responses.retrieve(rid, stream=True, starting_after=last + 3))
    assert [e.sequence_number for e in again] == [e.sequence_number for e in tail[3:]]


def test_a_dropped_background_stream_resumes_with_starting_after():
    resume_case(sluice())


def test_a_dropped_background_stream_resumes_on_another_instance():
    if not OTHER_URL:
        pytest.skip("no second instance")
    resume_case(client(base_url=OTHER_URL))


def test_a_background_response_is_cancelled():
    c = sluice()
    r = c.responses.create(
        model=MODEL,
        input="Never mind",
        background=True,
        extra_body={"mock": {"tokens": 400, "token_ms": 25}},
    )
    stream = c.responses.retrieve(r.id, stream=True)
    for event in stream:
        if event.type == "response.output_text.delta":
            break
    canceller = client(base_url=OTHER_URL) if OTHER_URL else c
    cancelled = canceller.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    rest = list(stream)
    assert rest and rest[-1].response.status == "cancelled"
    assert c.responses.retrieve(r.id).status == "cancelled"


def test_a_foreground_response_cannot_be_cancelled_or_streamed_again():
    c = sluice()
    r = c.responses.create(model=MODEL, input="Quick")
    with pytest.raises(openai.BadRequestError):
        c.responses.cancel(r.id)
    with pytest.raises(openai.BadRequestError):
        list(c.responses.retrieve(r.id, stream=True))
