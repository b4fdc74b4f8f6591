"""The shared-sampler cache stays bounded whatever values clients send; a model's
generation_config.json gives the defaults."""

from __future__ import annotations

import json
from pathlib import Path

from mlxd_worker.requests.sampling import MAX_SHARED, SamplerCache, SamplingDefaults


def test_the_cache_is_bounded_and_keeps_recent_pairs() -> None:
    cache = SamplerCache()
    first = cache.get(0.5, 1.0, None)
    for i in range(MAX_SHARED * 3):
        cache.get(0.5, 1.0, None)  # used again and again: stays
        cache.get(1.0 + i / 1000, 0.9, None)
    assert len(cache) == MAX_SHARED
    assert cache.get(0.5, 1.0, None) is first
    assert cache.get(0.0, 1.0, None) is None, "greedy needs no sampler"


def test_sampling_defaults_come_from_the_models_generation_config(tmp_path: Path) -> None:
    assert SamplingDefaults.of_model(str(tmp_path)) == SamplingDefaults(0.0, 1.0)  # none: greedy
    config = tmp_path / "generation_config.json"
    config.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    assert SamplingDefaults.of_model(str(tmp_path)) == SamplingDefaults(0.6, 0.95)
    # do_sample false: greedy by the model's own word, whatever its temperature.
    config.write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert SamplingDefaults.of_model(str(tmp_path)) == SamplingDefaults(0.0, 1.0)
    # Values a request could not ask for, or a broken file, leave the fallback.
    config.write_text(json.dumps({"temperature": 7, "top_p": 0}))
    assert SamplingDefaults.of_model(str(tmp_path)) == SamplingDefaults(0.0, 1.0)
    config.write_text("{not json")
    assert SamplingDefaults.of_model(str(tmp_path)) == SamplingDefaults(0.0, 1.0)
