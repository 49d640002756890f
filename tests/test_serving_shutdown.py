"""serving.py's shutdown hook without a server: the order of events that a
real ``vllm serve`` only shows now and then (CI, stop 29).

``serve_http`` runs ``AsyncLLM.shutdown`` in an executor thread while the
event loop goes on.  In abort mode (``--shutdown-timeout 0``) the engine core
answers the stop with a ``finish_reason="abort"`` output per request; if the
output handler delivers one before it is cancelled, that stream ends with
"abort" instead of the plugin's 503.  Here a fake engine core delivers the
abort output from inside ``engine_core.shutdown`` -- the worst case -- and the
request waiting on it must still get the 503.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from vllm.exceptions import GracefulHTTPError  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: E402
from vllm.v1.engine.output_processor import RequestOutputCollector  # noqa: E402

from kvcompress_vllm.serving import SHUTDOWN_MESSAGE, patch_async_shutdown  # noqa: E402


def _abort_output(request_id: str) -> RequestOutput:
    return RequestOutput(
        request_id=request_id, prompt="p", prompt_token_ids=[1, 2], prompt_logprobs=None,
        outputs=[CompletionOutput(index=0, text="", token_ids=[], cumulative_logprob=None,
                                  logprobs=None, finish_reason="abort")],
        finished=True)


class _LoopThread:
    """An event loop on a thread of its own, as the API server's."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.mark.parametrize("shutdown_timeout", [0, 30])
@pytest.mark.parametrize("enabled", [True, False])
def test_open_request_gets_the_503_even_if_the_abort_output_comes_first(
        enabled, shutdown_timeout):
    patch_async_shutdown()
    lt = _LoopThread()
    try:
        async def setup():
            collector = RequestOutputCollector(RequestOutputKind.DELTA, "req-0")

            async def consumer():  # AsyncLLM.generate's wait on the request
                try:
                    return await collector.get()
                except Exception as e:  # noqa: BLE001
                    return e

            async def output_handler():
                await asyncio.Event().wait()

            return (collector, asyncio.ensure_future(consumer()),
                    asyncio.ensure_future(output_handler()))

        collector, consumer, handler = lt.run(setup())
        output_processor = SimpleNamespace(
            request_states={"req-0": SimpleNamespace(queue=collector)})
        output_processor.propagate_error = lambda e: [
            s.queue.put(e) for s in output_processor.request_states.values()]

        def engine_core_shutdown(timeout=None):
            # The output handler delivers the engine core's abort output while
            # the stop is under way (what it sometimes does on a real server).
            async def deliver():
                collector.put(_abort_output("req-0"))
                await asyncio.sleep(0.05)  # the consumer runs
            lt.run(deliver())

        additional = {"kv_compress": {"rate": 0.5}} if enabled else {}
        fake = SimpleNamespace(
            vllm_config=SimpleNamespace(additional_config=additional,
                                        shutdown_timeout=shutdown_timeout),
            engine_core=SimpleNamespace(shutdown=engine_core_shutdown),
            output_handler=handler, output_processor=output_processor, renderer=None)
        AsyncLLM.shutdown(fake, timeout=shutdown_timeout)  # from this (executor) thread

        result = lt.run(asyncio.wait_for(asyncio.shield(consumer), 5))
        if enabled and shutdown_timeout == 0:
            # The 503 came first; the later abort output was dropped.
            assert isinstance(result, GracefulHTTPError), result
            assert str(result) == SHUTDOWN_MESSAGE or SHUTDOWN_MESSAGE in str(result)
        else:
            # Drain mode: requests that the engine ends keep their own ending
            # (the 503 is only for those still open when the engine is gone);
            # stock servers keep vLLM's behaviour.
            assert isinstance(result, RequestOutput), result
            assert result.outputs[0].finish_reason == "abort"
        lt.run(asyncio.sleep(0.05))
        assert handler.cancelled()
    finally:
        lt.close()


def test_call_in_loop_and_wait_never_hangs():
    """The early call runs at once on a loop that is not running, not at all
    on a closed one, and returns after the call on a running one."""
    from kvcompress_vllm.serving import _call_in_loop_and_wait

    calls = []
    idle = asyncio.new_event_loop()  # created, never run
    _call_in_loop_and_wait(idle, calls.append, "idle")
    idle.close()
    _call_in_loop_and_wait(idle, calls.append, "closed")
    lt = _LoopThread()
    try:
        _call_in_loop_and_wait(lt.loop, calls.append, "running")
        assert calls == ["idle", "running"]  # "running" was appended before the return
        blocked = threading.Event()
        lt.loop.call_soon_threadsafe(blocked.wait, 5)  # the loop is busy for up to 5 s
        _call_in_loop_and_wait(lt.loop, calls.append, "late", timeout_s=0.2)
        assert calls == ["idle", "running"]  # gave up waiting; the call stays queued
        blocked.set()
        lt.run(asyncio.sleep(0.05))
        assert calls == ["idle", "running", "late"]
    finally:
        lt.close()
