"""The worker's KV accounting (engines/kv_budget.py) and what the engine takes
for a failed allocation: pure arithmetic, no model."""

from __future__ import annotations

import pytest

from mlxd_worker.engines.engine import is_out_of_memory
from mlxd_worker.engines.kv_budget import KvBudget, KvShape, KvTooLarge
from mlxd_worker.faults import Faults

MIB = 1 << 20


def test_a_sequence_costs_its_tokens_its_windows_and_its_state() -> None:
    shape = KvShape.from_options(
        {
            "kv_shape": {
                "bytes_per_token": 100,
                "windows": [{"tokens": 128, "bytes_per_token": 10}],
                "bytes_per_sequence": 5000,
            }
        }
    )
    assert shape == KvShape(100, ((128, 10),), 5000)
    assert shape.sequence_bytes(1000) == 100 * 1000 + 10 * 128 + 5000
    assert shape.sequence_bytes(50) == 100 * 50 + 10 * 50 + 5000
    # A window also holds the prefill chunk being fed into it.
    chunked = KvShape.from_options(
        {"prefill_step": 512, "kv_shape": {"bytes_per_token": 100, "windows": [{"tokens": 128, "bytes_per_token": 10}]}}
    )
    assert chunked == KvShape(100, ((640, 10),), 0)
    assert KvShape.from_options({}) is None


def test_nothing_is_enforced_without_a_share_or_before_the_baseline() -> None:
    shape = KvShape(46_080)
    assert KvBudget(shape, None).capacity is None
    budget = KvBudget(shape, 100 * MIB)
    assert budget.capacity is None  # loading: the baseline is not measured yet
    budget.check_ever_fits(10**6)  # nothing refused
    assert KvBudget(None, 100 * MIB, started=True).capacity is None  # replay: no KV


def test_the_budget_reserves_as_the_batch_holds_and_refuses_what_could_never_fit() -> None:
    budget = KvBudget(KvShape(46_080), 100 * MIB, baseline=40 * MIB, started=True)
    assert budget.capacity == 60 * MIB
    assert budget.need(1000) == 46_080 * 1000
    budget.reserve(1, 1000)
    budget.reserve(2, 100)
    # mlx-lm's batch pads every row to the longest: two rows of 1,000 tokens.
    assert budget.reserved == 2 * budget.need(1000)
    assert budget.reserved_with(1200) == 3 * budget.need(1200)
    budget.release(1)
    budget.release(1)  # twice is once
    assert budget.reserved == budget.need(100)
    with pytest.raises(KvTooLarge) as refused:
        budget.check_ever_fits(2000)
    assert refused.value.code == "kv_cache_too_large"
    message = str(refused.value)
    assert "needs 2000 tokens of KV cache (88 MiB" in message and "60 MiB for KV of a 100 MiB share" in message
    assert budget.refused_total == 1
    budget.check_ever_fits(1300)  # fits alone: it may wait, not be refused
    assert budget.stats(in_use=123, waiting=2) == {
        "weights_bytes": 0,
        "baseline_bytes": 40 * MIB,
        "in_use_bytes": 123,
        "reserved_bytes": budget.need(100),
        "capacity_bytes": 60 * MIB,
        "waiting": 2,
        "refused_total": 1,
        "evicted_for_room_total": 0,
    }
    # A share of 0 is a share of 0, not "no limit".
    assert KvBudget(KvShape(1), 0, baseline=10, started=True).capacity == 0


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[metal::malloc] Resource limit (499000) exceeded."),
        RuntimeError("[metal::malloc] Attempting to allocate 68719476736 bytes which is greater than the maximum"),
        RuntimeError("cudaMallocAsync(&data, size, stream) failed: out of memory"),
        RuntimeError("[malloc] Unable to allocate 1073741824 bytes."),
        MemoryError(),
    ],
)
def test_mlx_allocation_failures_are_out_of_memory(error: Exception) -> None:
    assert is_out_of_memory(error)


def test_other_errors_are_not_out_of_memory() -> None:
    assert not is_out_of_memory(RuntimeError("[broadcast_shapes] Shapes (1,2) and (1,3) cannot be broadcast."))


def test_the_injected_out_of_memory_fault_reads_as_mlx_words_it() -> None:
    faults = Faults.from_options({"faults": {"out_of_memory_in_step": 2}})
    faults.before_step(1)
    with pytest.raises(RuntimeError) as raised:
        faults.before_step(2)
    assert is_out_of_memory(raised.value)
    faults.before_step(3)
