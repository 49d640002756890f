"""Per-platform KV-cache layouts: how vLLM's per-layer cache views become
head-pages.

Everything downstream of the layout (page tables, eviction, compaction,
migration, the kernels) works on one view of the whole KV storage,

    kv_pages [P = L*B*H, 2, N, D],   page_id(l, b, h) = (l*B + b)*H + h

where page ``p`` holds the ``N`` keys (``[p, 0]``) and ``N`` values
(``[p, 1]``) of one (layer, block, KV head).  A layout's only job is to check
that the caches vLLM allocated for a backend can be viewed that way and to
build the view; ``HeadPool`` (``worker/state.py``) adds the per-slot metric
and position tensors next to it.

vLLM 0.32 negotiates one physical layout per model from what the attention
backends declare (``AttentionBackend.supported_kv_cache_layouts``) and
allocates all layers of a KV-cache group in **one** backing buffer
(``vllm/v1/worker/utils.py: allocate_kv_cache``), each layer viewed as
``[B, H, N, C]`` (``C = 2*D`` elements: a token's K and V).  With layout
``LBHNC`` (layer outermost, then block, head, token) layer ``l`` is one
contiguous ``[B, H, N, 2D]`` region and every (block, head) row is one
contiguous ``N * 2D`` run, which we read as ``[2, N, D]``: the head-page.

* **CPU**: vLLM's own CPU backend only supports ``LBHNC`` and our CPU backend
  subclasses it (``attention/cpu_backend.py``).  vLLM's writer lays a page
  out its own way (``attention/cpu_packed.PagePacking``); a block holds one of
  two layouts, that of the requests that own it: vLLM's for never-compressed
  requests and for compressed ones kept in it (``RequestPages.packed``), our
  plain rows for the others.  With prefix caching a block can be read by
  several requests, so every request must then be in one layout
  (``attention.cpu_prefill.PageLayouts.check_prefix_caching``, run by
  ``create_engine_config`` and by the worker; see docs/design.md).
* **CUDA**: our backend (``attention/cuda_backend.py``) declares
  ``supported_kv_cache_layouts() == (LBHNC,)``, so vLLM allocates exactly the
  same shape; the Triton kernels take ``kv_pages`` and its strides.

Another layout (say block-outermost ``BLHNC``) would need a different
``page_id`` formula in ``HeadPageTable`` as well, so a new layout class must
keep the page order above or come with that change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.kv_cache_layout import KVCacheLayout


@dataclass
class HeadPageView:
    """The whole KV storage as head-pages, plus its geometry."""

    kv_pages: torch.Tensor  # [P = L*B*H, 2, N, D] view of vLLM's KV storage
    num_layers: int
    num_blocks: int
    num_kv_heads: int
    layer_numel: int  # elements of one layer region (B * H * N * 2D)


class LBHNCLayout:
    """Layer-major ``[L, B, H, N, 2D]`` in one storage (vLLM's ``LBHNC``)."""

    name: ClassVar[str] = "LBHNC"
    vllm_layout: ClassVar[KVCacheLayout] = KVCacheLayout.LBHNC

    def head_pages(self, layer_caches: list[torch.Tensor]) -> HeadPageView:
        """View the per-layer ``[B, H, N, 2D]`` caches (in layer order) as
        head-pages.  Raises, naming the offending shape/stride/offset, unless
        all layers share one storage, are contiguous, equally shaped and lie
        back to back (in any order: the region index is the offset)."""
        if not layer_caches:
            raise RuntimeError("KV-Compress: the model has no KV cache layers")
        first = layer_caches[0]
        if first.dim() != 4 or first.shape[-1] % 2:
            raise RuntimeError(
                f"KV-Compress ({self.name}): expected per-layer caches [B, H, N, 2D], "
                f"got shape {tuple(first.shape)}"
            )
        num_blocks, num_kv_heads, block_size, two_d = first.shape
        head_dim = two_d // 2
        layer_numel = first.numel()
        storage = first.untyped_storage()
        base = min(c.storage_offset() for c in layer_caches)
        for cache in layer_caches:
            if cache.untyped_storage().data_ptr() != storage.data_ptr():
                raise RuntimeError("KV-Compress needs all layers in one KV storage")
            if not cache.is_contiguous() or cache.shape != first.shape:
                raise RuntimeError(
                    f"KV-Compress ({self.name}): unexpected KV cache view "
                    f"{tuple(cache.shape)} stride {cache.stride()} (first layer "
                    f"{tuple(first.shape)})"
                )
            if (cache.storage_offset() - base) % layer_numel:
                raise RuntimeError(
                    f"KV cache layers are not laid out back to back: offset "
                    f"{cache.storage_offset() - base} is not a multiple of {layer_numel}"
                )
        num_layers = len(layer_caches)
        regions = sorted((c.storage_offset() - base) // layer_numel for c in layer_caches)
        if regions != list(range(num_layers)):
            raise RuntimeError(f"KV cache layer regions {regions} are not 0..L-1")
        flat = torch.empty(0, dtype=first.dtype, device=first.device)
        flat.set_(storage, base, (num_layers * layer_numel,), (1,))
        num_pages = num_layers * num_blocks * num_kv_heads
        return HeadPageView(
            kv_pages=flat.view(num_pages, 2, block_size, head_dim),
            num_layers=num_layers,
            num_blocks=num_blocks,
            num_kv_heads=num_kv_heads,
            layer_numel=layer_numel,
        )

    @staticmethod
    def layer_head_pages(layer_cache: torch.Tensor) -> torch.Tensor:
        """One layer's ``[B, H, N, 2D]`` cache as ``[B, H, 2, N, D]`` (a view)."""
        b, h, n, two_d = layer_cache.shape
        return layer_cache.view(b, h, 2, n, two_d // 2)


LBHNC = LBHNCLayout()


def layout_for_platform(platform=None) -> LBHNCLayout:
    """The head-page layout of ``platform`` (default: vLLM's current one).

    CPU and CUDA both use ``LBHNC`` (see the module docstring for why each
    gets it); other platforms raise."""
    if platform is None:
        from vllm.platforms import current_platform as platform
    if platform.is_cpu() or platform.is_cuda():
        return LBHNC
    raise RuntimeError(
        f"KV-Compress has no KV-cache layout for the {platform.device_name} platform"
    )


def to_kvcompress_spec(spec):
    """``FullAttentionSpec`` -> ``KVCompressSpec`` with identical fields (the
    spec every KV-Compress backend reports: same page bytes, vLLM sizes the
    pool as before, and the registry maps it to ``KVCompressManager``)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvcompress_vllm.scheduler.kv_cache_manager import KVCompressSpec

    if isinstance(spec, KVCompressSpec):
        return spec
    if type(spec) is not FullAttentionSpec or spec.sliding_window or spec.attention_chunk_size:
        raise ValueError(
            f"KV-Compress supports plain full attention only; this model has "
            f"{type(spec).__name__} (sliding window/chunked/MLA/hybrid layers "
            "are not supported)"
        )
    return KVCompressSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})
