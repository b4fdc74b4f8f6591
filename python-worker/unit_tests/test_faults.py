"""Fault injection is off unless a preset asks, and does what its fields say."""

from __future__ import annotations

import pytest

from mlxd_worker.faults import Faults, InjectedFault


def test_no_faults_by_default() -> None:
    f = Faults.from_options({})
    assert f == Faults()
    f.in_load()  # returns at once
    for step in range(1, 50):
        f.before_step(step)
        assert not f.garbage_due(step)


def test_each_fault_fires_where_asked() -> None:
    f = Faults.from_options({"faults": {"raise_in_step": 3, "garbage_after_step": 2, "step_delay_ms": 1}})
    assert f.step_delay_s == pytest.approx(0.001)
    f.before_step(1)
    f.before_step(2)
    assert f.garbage_due(2) and not f.garbage_due(3)
    with pytest.raises(InjectedFault, match="decode step 3"):
        f.before_step(3)
