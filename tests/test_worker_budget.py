"""``worker.common.kv_budget_after_plugin``: the KV budget both workers report."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvcompress_vllm.core.geometry import head_table_bytes, max_pages_per_head
from kvcompress_vllm.worker.common import kv_budget_after_plugin
from kvcompress_vllm.worker.state import METADATA_BYTES_PER_SLOT


def _config(max_model_len=4096, block=128, max_seqs=16, layers=30, kv_heads=3, head=64):
    model = SimpleNamespace(
        max_model_len=max_model_len, dtype=torch.bfloat16,
        get_num_layers=lambda p: layers, get_num_kv_heads=lambda p: kv_heads,
        get_head_size=lambda: head,
    )
    return SimpleNamespace(
        model_config=model, parallel_config=None,
        cache_config=SimpleNamespace(block_size=block),
        scheduler_config=SimpleNamespace(max_num_seqs=max_seqs),
    )


@pytest.mark.parametrize("workspace", [0, 5 << 20])
def test_budget_splits_rest_between_kv_and_metadata(workspace):
    cfg = _config()
    available = 300 << 20
    tables = head_table_bytes(16, 90, max_pages_per_head(4096, 128))
    got = kv_budget_after_plugin(available, cfg, workspace)
    rest = available - tables - workspace
    kv_bytes = 2 * 64 * 2
    assert got == rest * kv_bytes // (kv_bytes + METADATA_BYTES_PER_SLOT)
    # What is returned plus its metadata fits in what was left.
    slots = got // kv_bytes
    assert slots * (kv_bytes + METADATA_BYTES_PER_SLOT) <= rest


def test_budget_too_small_names_the_knobs():
    cfg = _config(max_seqs=4096)
    with pytest.raises(ValueError, match=r"max_num_seqs=4096.*lower max_num_seqs or max_model_len"):
        kv_budget_after_plugin(1 << 20, cfg, 0)
