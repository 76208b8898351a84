"""Fixtures of the formats tests."""

import pytest

from mxptq.formats import kernels


@pytest.fixture(autouse=True)
def own_gluon_failures(monkeypatch):
    """Each test starts with no recorded Gluon launch failures and leaves none behind:
    `kernels.GLUON_FAILURES` is module state that outlives `clear_caches`, so a test asserting
    that its own kernels launched would otherwise see an earlier test's failure in the same
    process (as on the H200: benchmarks/h200/walsh_ring_sweep.md)."""
    monkeypatch.setattr(kernels, "GLUON_FAILURES", {})
