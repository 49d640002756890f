"""Per-request options are checked when the OpenAI endpoint calls
``AsyncLLM.generate``, i.e. before a streaming response starts (unit level;
tests/test_server_robustness.py checks the HTTP 400s on a real server)."""

import inspect
from types import SimpleNamespace

import pytest


def _config(kv_compress=None):
    additional = {"kv_compress": kv_compress} if kv_compress is not None else {}
    return SimpleNamespace(additional_config=additional,
                           cache_config=SimpleNamespace(block_size=128))


def test_generate_validates_before_the_stream_starts():
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.async_llm import AsyncLLM

    from kvcompress_vllm import plugin

    plugin.register()
    engine = SimpleNamespace(vllm_config=_config({"rate": 0.5}))
    bad = SamplingParams(max_tokens=4, extra_args={"kv_compress_rate": 1.5})
    # Raised by the call itself: nothing has been iterated (the endpoint has
    # not started its response yet).
    with pytest.raises(VLLMValidationError) as err:
        AsyncLLM.generate(engine, "hi", bad, "req-1")
    assert err.value.parameter == "extra_args.kv_compress_rate"
    typo = SamplingParams(max_tokens=4, extra_args={"kv_compress_rte": 0.25})
    with pytest.raises(VLLMValidationError, match="unknown KV-Compress option") as err:
        AsyncLLM.generate(engine, "hi", typo, "req-5")
    assert err.value.parameter == "extra_args.kv_compress_rte"

    good = SamplingParams(max_tokens=4, extra_args={"kv_compress_rate": 0.25})
    gen = AsyncLLM.generate(engine, "hi", good, "req-2")
    assert inspect.isasyncgen(gen) and gen.ag_frame.f_lasti <= 0  # vLLM's, not started

    stock = SimpleNamespace(vllm_config=_config())
    with pytest.raises(VLLMValidationError, match="not enabled") as err:
        AsyncLLM.generate(stock, "hi", good, "req-3")
    assert err.value.parameter == "extra_args"
    plain = SamplingParams(max_tokens=4, extra_args={"other": 1})
    assert inspect.isasyncgen(AsyncLLM.generate(stock, "hi", plain, "req-4"))


def test_stats_route_check_names_a_changed_field(monkeypatch):
    from vllm.v1.metrics.stats import SchedulerStats

    from kvcompress_vllm import compat

    compat.check_stats_route()
    field = SchedulerStats.__dataclass_fields__["kv_connector_stats"]
    monkeypatch.setattr(field, "type", dict[str, int] | None)
    with pytest.raises(compat.IncompatibleVLLMError, match="kv_connector_stats is dict"):
        compat.check_stats_route()


@pytest.mark.parametrize("shutdown_timeout", [0, 30])  # abort mode, drain mode
@pytest.mark.parametrize("compressed", [True, False])
def test_shutdown_ends_open_requests_with_a_503(compressed, shutdown_timeout):
    """AsyncLLM.shutdown on a compressed server fails every request still open
    with a 503 "shutting down" error on the frontend's loop (vLLM alone leaves
    them waiting); a stock server keeps vLLM's behaviour.  In abort mode the
    requests are failed before the engine stops and again after (for any
    added meanwhile), in drain mode after."""
    import asyncio

    from vllm.exceptions import GracefulHTTPError
    from vllm.v1.engine.async_llm import AsyncLLM

    from kvcompress_vllm import plugin

    plugin.register()
    failed = []

    async def scenario():
        handler = asyncio.create_task(asyncio.sleep(3600))  # vLLM's output handler
        engine = SimpleNamespace(
            vllm_config=SimpleNamespace(**vars(_config({"rate": 0.5} if compressed else None)),
                                        shutdown_timeout=shutdown_timeout),
            output_handler=handler,
            output_processor=SimpleNamespace(request_states={"r1": None},
                                             propagate_error=failed.append),
        )
        # vLLM calls shutdown from an executor thread while the loop runs.
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: AsyncLLM.shutdown(engine, timeout=shutdown_timeout))
        await asyncio.sleep(0.05)
        return handler.cancelled()

    assert asyncio.run(scenario())  # vLLM's own shutdown still ran
    if not compressed:
        assert failed == []
        return
    assert len(failed) == (2 if shutdown_timeout == 0 else 1), failed
    for err in failed:
        assert isinstance(err, GracefulHTTPError) and err.http_status == 503
        assert "shutting down" in str(err)
