"""KV caches: the prefix cache (memory and disk tiers) and the preset's KV options (quantized, rotating)."""
