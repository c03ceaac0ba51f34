"""The smoke recipe trained once per session, shared by the integration tests."""

import pytest
from smoke import run_recipe  # tests/integration/smoke.py


@pytest.fixture(scope="session")
def smoke_run(repo_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("smoke")
    out, data = base / "out", base / "data"
    proc = run_recipe(repo_root, out, data)
    return out, data, proc
