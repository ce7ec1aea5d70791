"""A scratch directory on a disk for the disk-tier tests (the system temp dir unless it is RAM)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

from fpdt_ext.memory.disk import check_offload_dir
from tests.helpers import ROOT


def disk_scratch_dir() -> str:
    """A fresh directory the disk tier accepts: under the temp dir, /var/tmp or the repository."""
    for parent in (tempfile.gettempdir(), "/var/tmp", os.path.join(ROOT, "runs")):
        try:
            os.makedirs(parent, exist_ok=True)
            check_offload_dir(parent)
        except (OSError, ValueError):
            continue
        path = tempfile.mkdtemp(prefix="fpdt-disk-test-", dir=parent)
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        return path
    raise RuntimeError("no directory on a disk for the disk-tier tests")


shared_disk_scratch_dir = functools.lru_cache(maxsize=None)(disk_scratch_dir)
shared_disk_scratch_dir.__doc__ = "One :func:`disk_scratch_dir` per process."
