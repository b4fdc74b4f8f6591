"""The worker's wire: frame codec, the shm/stdio/http transports, and when tokens are flushed."""
