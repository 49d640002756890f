"""Random per-request KV-Compress options (``SamplingParams.extra_args``),
shared by the randomized tests: the engine soak and the scheduler-worker fuzz."""

from kvcompress_vllm.config import SCORERS


def random_options(rng, *, window: int, windows: list[int], window_p: float,
                   cache_extra: list[int]) -> dict:
    """Rate, scorer, allocation, protected window (``window`` is the server's;
    one of ``windows`` with probability ``window_p``) and ``max_cache_tokens``
    (the window + 4 + one of ``cache_extra``), each only sometimes."""
    extra = {}
    if rng.random() < 0.7:
        extra["kv_compress_rate"] = rng.choice([0.1, 0.25, 0.5, 0.9, 1.0])
    if rng.random() < 0.4:
        extra["kv_compress_scorer"] = rng.choice(SCORERS)
    if rng.random() < 0.2:
        extra["kv_compress_allocation"] = "uniform"
    if rng.random() < window_p:
        extra["protected_window"] = window = rng.choice(windows)
    if rng.random() < 0.15:
        extra["max_cache_tokens"] = window + 4 + rng.choice(cache_extra)
    return extra
