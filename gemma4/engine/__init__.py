"""The engine: KV caches, sampling, the generation loop, batching. Knows nothing of HTTP."""
