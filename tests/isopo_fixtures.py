"""A tiny random Qwen3 and padded micro-batches, shared by the ISOPO tests."""

from __future__ import annotations

import types

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

VOCAB = 37


def tiny_qwen3(seed: int = 0, dtype=torch.float64, tie: bool = True, layers: int = 2) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    # Random init is tiny; larger weights make every statistic non-trivial. Drawn before the cast so that
    # the float32 and float64 models hold the same weights.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.to(dtype)
    if dtype == torch.float64:
        # The library's RMSNorm computes in float32 whatever the model's dtype, which would round the
        # backward signal to float32 and cap every float64 comparison near 1e-7.
        for m in model.modules():
            if type(m).__name__ == "Qwen3RMSNorm":
                m.forward = types.MethodType(_rms_norm_same_dtype, m)
    return model


def _rms_norm_same_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def make_batch(seed: int, prompt_lens, response_lens, adv=None, pad_id: int = 0):
    """Right-padded rows, one sequence per row; response_mask marks positions predicting response tokens."""
    g = torch.Generator().manual_seed(seed)
    lens = [p + r for p, r in zip(prompt_lens, response_lens)]
    b, s = len(lens), max(lens)
    input_ids = torch.full((b, s), pad_id, dtype=torch.long)
    attention = torch.zeros(b, s, dtype=torch.long)
    response_mask = torch.zeros(b, s, dtype=torch.float64)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        input_ids[i, : p + r] = torch.randint(1, VOCAB, (p + r,), generator=g)
        attention[i, : p + r] = 1
        response_mask[i, p - 1 : p + r - 1] = 1.0
    if adv is None:
        adv = torch.randn(b, generator=g, dtype=torch.float64)
    seq_ids = torch.where(attention.bool(), torch.arange(b).unsqueeze(1), -1)
    return dict(input_ids=input_ids, attention_mask=attention, response_mask=response_mask, seq_ids=seq_ids,
                advantages=torch.as_tensor(adv, dtype=torch.float64), lens=lens)


def token_log_probs(model, input_ids, attention_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def masked_sum(logp, response_mask, weight=None):
    m = response_mask[:, :-1]
    if weight is not None:
        m = m * weight.unsqueeze(1)
    return (logp * m).sum()
