"""What one request asks for: its plan, tool calls, constraint, logprobs, stop strings and sampler."""
