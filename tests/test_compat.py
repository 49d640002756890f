"""The start-up self-check fails loudly on a vLLM that differs from 0.32."""

import pytest

from kvcompress_vllm import compat


def test_installed_vllm_passes():
    compat.check_engine_hooks()
    compat.check_runtime_hooks()


def test_wrong_version_is_rejected(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    with pytest.raises(compat.IncompatibleVLLMError, match=r"supports vLLM 0\.32\.x.*0\.33\.1"):
        compat.check_version()


def test_changed_signature_is_reported(monkeypatch):
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

    monkeypatch.setattr(SingleTypeKVCacheManager, "pop_blocks_for_free", lambda self, req: None)
    with pytest.raises(compat.IncompatibleVLLMError) as err:
        compat.check_runtime_hooks()
    assert "pop_blocks_for_free" in str(err.value)


def test_missing_hook_is_reported(monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.delattr(Scheduler, "_connector_finished")
    with pytest.raises(compat.IncompatibleVLLMError, match="_connector_finished: missing"):
        compat.check_runtime_hooks()
