"""The README's function-calling example runs as written against sluice, only its base URL
and key pointed at the test server."""

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


def test_function_calling_example_runs():
    code = readme_block("get_weather")
    assert 'base_url="http://127.0.0.1:8080/v1", api_key="unused"' in code
    code = code.replace("http://127.0.0.1:8080/v1", os.environ["SLUICE_BASE_URL"])
    code = code.replace('api_key="unused"', f'api_key="{os.environ["SLUICE_API_KEY"]}"')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue().strip(), "the example prints the model's final answer"
