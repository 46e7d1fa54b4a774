"""Model-free speculative decoding: proposers of draft tokens (the engine verifies them)."""
