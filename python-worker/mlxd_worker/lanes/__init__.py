"""Decoding lanes outside the batch: a lone sequence, a speculative one, and the draft policy."""
