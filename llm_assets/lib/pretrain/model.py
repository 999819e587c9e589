"""The base model: a small Llama-style decoder built from a config, with one size dial.

    >>> import torch
    >>> from llm_assets.lib.pretrain.model import (MODEL_SIZES, build_model, count_parameters,
    ...     estimate_parameters, matmul_peak_flops, training_flops, training_memory_bytes)
    >>> _ = torch.manual_seed(0)                         # a reproducible init
    >>> model = build_model("tiny", vocab_size=512, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    >>> n = count_parameters(model)
    >>> n, n == estimate_parameters(MODEL_SIZES["tiny"], 512)
    (139584, True)
    >>> training_memory_bytes(n), training_flops(n, tokens=1_000_000)  # AdamW fp32 bytes; 6·N·D FLOPs
    (2233344, 837504000000.0)
    >>> model(torch.tensor([[0, 5, 6]])).logits.shape   # (batch, tokens, vocab)
    torch.Size([1, 3, 512])
    >>> matmul_peak_flops(torch.device("cpu"), torch.float32, seconds=0.05) > 1e8  # the MFU denominator
    True

The model is `transformers.LlamaForCausalLM` (RMSNorm, rotary positions, SwiGLU MLP) with tied input
and output embeddings, so every checkpoint loads with `AutoModelForCausalLM.from_pretrained` and
works with `generate`, PEFT, TRL and bitsandbytes downstream. Sizes:

- tiny:  tests only; trains in milliseconds per step.
- demo:  `make demo` on a 2-core CPU (~5 minutes of pretraining in bf16: configs/demo.yaml).
- large: GPT-2-small scale for real use on a GPU; never run in tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelSize:
    n_layers: int  # decoder blocks
    d_model: int  # hidden width (embedding dimension)
    n_heads: int  # attention heads; head dim = d_model / n_heads
    d_ff: int  # SwiGLU inner width: ~8/3·d_model rounded up to a multiple of 64, as in Llama
    # (bitsandbytes' CPU 4-bit kernel also needs every Linear's out_features divisible by 32)
    context: int  # maximum sequence length in tokens (rotary positions need no table)


MODEL_SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(n_layers=2, d_model=64, n_heads=2, d_ff=192, context=128),
    "demo": ModelSize(n_layers=4, d_model=256, n_heads=4, d_ff=704, context=256),
    "large": ModelSize(n_layers=12, d_model=768, n_heads=12, d_ff=2048, context=1024),
}


def model_config(size: str, vocab_size: int, bos_token_id: int, eos_token_id: int,
                 pad_token_id: int):
    """The `LlamaConfig` of a named size; unknown sizes raise ValueError naming `size`."""
    from transformers import LlamaConfig  # not at import: transformers' modelling code takes ~2.5 s

    if size not in MODEL_SIZES:
        raise ValueError(f"size: unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    s = MODEL_SIZES[size]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.d_model,
        intermediate_size=s.d_ff,
        num_hidden_layers=s.n_layers,
        num_attention_heads=s.n_heads,
        num_key_value_heads=s.n_heads,  # plain multi-head attention; GQA saves little at this scale
        max_position_embeddings=s.context,
        tie_word_embeddings=True,  # the embedding matrix is most of a small model's parameters
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        attention_dropout=0.0,  # no dropout: one pass over the data never overfits
    )


def build_model(size: str, vocab_size: int, bos_token_id: int, eos_token_id: int,
                pad_token_id: int):
    """A freshly initialized fp32 model (seed torch before calling for a reproducible init)."""
    from transformers import LlamaForCausalLM

    config = model_config(size, vocab_size, bos_token_id, eos_token_id, pad_token_id)
    return LlamaForCausalLM(config).to(torch.float32)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct trainable parameters (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def estimate_parameters(size: ModelSize, vocab_size: int) -> int:
    """Parameters from the shape alone: embeddings + per block (attention 4·d², SwiGLU 3·d·d_ff, two
    RMSNorm gains) + the final norm. Tied output head: no extra matrix."""
    d = size.d_model
    per_block = 4 * d * d + 3 * d * size.d_ff + 2 * d
    return vocab_size * d + size.n_layers * per_block + d


def training_memory_bytes(parameters: int) -> int:
    """AdamW in fp32: weights, gradients and two moments, 4 bytes each = 16 bytes per parameter.
    Activations come on top and scale with micro_batch × seq_len."""
    return 16 * parameters


def training_flops(parameters: int, tokens: int) -> float:
    """Training compute by the 6·N·D rule (2 forward + 4 backward FLOPs per parameter per token;
    attention's own O(seq_len) term is left out, small while seq_len ≪ 6·d_model)."""
    return 6.0 * parameters * tokens


def matmul_shapes(size: ModelSize, vocab_size: int, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the model's own training matmuls for `tokens` rows per micro-batch: attention
    projections, SwiGLU in and out, the tied output head; plus 1024³ and 2048³ squares."""
    d = size.d_model
    return [(tokens, d, d), (tokens, d, size.d_ff), (tokens, size.d_ff, d), (tokens, d, vocab_size),
            (1024, 1024, 1024), (2048, 2048, 2048)]


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5,
                      shapes: list[tuple[int, int, int]] | None = None) -> float:
    """FLOP/s of the fastest dense matmul in `dtype` measured here and now: the MFU denominator.
    For each (m, k, n) shape (default 1024³) the best single matmul within `seconds` counts, and
    the best shape wins, so neither a moment of contention nor an unlucky shape lowers it. A
    training loop runs these very matmuls plus other work, so it cannot beat this peak on a quiet
    machine; callers take the max over measurements before and after training (contention)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)  # leave the global RNG alone
    peak = 0.0
    for m, k, n in shapes or [(1024, 1024, 1024)]:
        a = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
        b = torch.randn(k, n, device=device, dtype=dtype, generator=gen)
        a @ b  # warm-up: thread pools, kernel selection
        sync()
        best, t_end = float("inf"), time.perf_counter() + seconds / len(shapes or [0])
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
        peak = max(peak, 2 * m * k * n / best)
    return peak
