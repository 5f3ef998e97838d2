"""The README's Python examples run as written against sluice, only their base URL pointed
at the test server: their `api_key="unused"` included, which a local sluice takes as the
local user."""

import contextlib
import io
import os
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def readme_block(marker):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"one README python block with {marker!r}"
    return found[0]


def run_block(marker):
    code = readme_block(marker)
    assert 'base_url="http://127.0.0.1:8080/v1", api_key="unused"' in code
    code = code.replace("http://127.0.0.1:8080/v1", os.environ["SLUICE_BASE_URL"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    return out.getvalue()


def test_function_calling_example_runs():
    assert run_block("get_weather").strip(), "the example prints the model's final answer"


def test_streaming_example_runs():
    printed = run_block("delta.content")
    assert "built-in demo model" in printed, printed


def test_responses_example_runs():
    printed = run_block("client.responses.stream")
    assert "built-in demo model" in printed, printed


def test_anthropic_example_runs():
    # The Anthropic SDK takes the server's root as its base URL and adds /v1/messages.
    code = readme_block("text_stream")
    assert 'base_url="http://127.0.0.1:8080", api_key="unused"' in code
    root = os.environ["SLUICE_BASE_URL"].removesuffix("/v1")
    code = code.replace('"http://127.0.0.1:8080"', f'"{root}"')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert "built-in demo model" in out.getvalue(), out.getvalue()


def test_background_resume_example_runs():
    printed = run_block("starting_after")
    assert "built-in demo model" in printed, printed
