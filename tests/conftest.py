"""Shared test set-up: the data directory, and no network, ever."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# One BLAS thread: small matrices gain nothing from two, a loaded machine loses a lot, and the summation
# order (hence the last bits of every float) stays the same from run to run. Must precede importing numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Tests must never touch the network; point the package at ../shared/data unless told otherwise.
os.environ["SCRATCHLM_OFFLINE"] = "1"
os.environ.setdefault("SCRATCHLM_DATA", str(SHARED_DATA))


def require_data(*relative: str) -> Path:
    """The data directory, or skip the test (fail under CI=true, where the data must be present)."""
    data = Path(os.environ["SCRATCHLM_DATA"])
    missing = [r for r in relative if not (data / r).is_file()]
    if missing:
        message = f"data not found: {', '.join(missing)} under {data}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must have ../shared/data)")
        pytest.skip(message)
    return data
