"""Shared pytest configuration: hypothesis profiles and the example photos."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Local runs: the hypothesis defaults, without a deadline (the first call of a torch op can be
# slow on a shared machine, and no test here is about wall-clock time).
settings.register_profile("default", deadline=None)
# CI: a moderate number of examples, drawn the same way on every run (a CI verdict should not
# depend on the draw; local runs keep exploring), and no health check that fails merely because a
# shared machine is slow.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=50,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> Iterator[None]:
    """One intra-op thread per test process.

    The suite runs under ``pytest -n 2`` on 2-core machines: with two threads per worker, every
    tiny op pays for thread hand-offs (tens of milliseconds each on a busy machine).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EXAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    """The real photos in ``examples/images``, keyed by file stem (``"coffee"``, ``"page"``)."""
    found = {
        p.stem: p
        for p in sorted(EXAMPLE_IMAGES.iterdir())
        if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    }
    if not found:
        raise FileNotFoundError(f"no example images found in {EXAMPLE_IMAGES}")
    return found
