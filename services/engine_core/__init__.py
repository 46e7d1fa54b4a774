"""The engine core: scheduler, paged KV cache, model runner, sampler."""
