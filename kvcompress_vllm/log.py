"""Loggers under vLLM's ``vllm`` logger tree, so the plugin's messages use
vLLM's handlers, format and ``VLLM_LOGGING_LEVEL``."""

from __future__ import annotations

import logging


def get_logger(module: str) -> logging.Logger:
    from vllm.logger import init_logger

    return init_logger("vllm.kvcompress." + module.removeprefix("kvcompress_vllm."))
