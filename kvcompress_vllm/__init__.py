"""KV-Compress for vLLM: paged KV-cache eviction with a variable number of KVs
per (layer, KV head).

Importing this package is cheap (it does not import torch or vLLM); it makes
``vllm.LLM(model, kv_compress_rate=R)`` accepted.  The plugin itself is loaded
by vLLM through the ``vllm.general_plugins`` entry point ``kvcompress``.
"""

__version__ = "0.1.0"

from kvcompress_vllm import _startup

_startup.install()
