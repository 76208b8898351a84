"""MX attention for the Llama family of transformers 5.x.

`MXAttention` replaces a model's `self_attn` module. Its forward mirrors the source class's
forward (transformers 5.17 - 5.24 `LlamaAttention.forward`) step by step, and inserts the five
stages of the tutorial's attention selector (`['...self_attn$'.<stage>]`), each `bypass`-able:

  stage       quantizer          what is quantized                     blocks along
  ---------   ----------------   -----------------------------------   ------------
  rope        rope_quantizer     Q and K entering RoPE                 head_dim
  kv_cache    k_quantizer,       K after RoPE, V -- before the cache   head_dim
              v_quantizer        update, so prefill and every decode
                                 step see the same quantized K/V
  qk_matmul   q_quantizer        Q, the other operand of Q.K^T         head_dim
  softmax     scores_quantizer   the scores entering softmax           key axis
  av_matmul   p_quantizer        the probabilities, operand of P.V     key axis

The K and V operands of the two matmuls are the cached K/V, quantized (once) by `kv_cache`; they
are not quantized a second time by `qk_matmul`/`av_matmul` -- MX re-quantization is not
idempotent (the tutorial rule clips a block whose maximum is exactly 2^(e-1)), so doing both
would silently change K/V twice.

Quantizing along head_dim acts on each token's vector alone, so quantizing new K/V before they
enter the cache gives bit-for-bit what quantizing the whole cache would, in prefill and in decode.

The q/k/v/o projections stay whatever modules they are (`MXLinear` after the transform), under
the same qualified names (`...self_attn.q_proj`).

Attention kernel: as long as `softmax` and `av_matmul` are bypassed nothing needs the score
matrix, so the model's configured attention interface (SDPA, eager, ...) is called exactly as
the source class calls it. Otherwise an eager path computes scores and probabilities in the same
order and dtypes as transformers' `eager_attention_forward`; it understands the masks the "eager"
(additive float) and "sdpa" (boolean, or None = causal) implementations produce.

Supported source classes (their forwards are LlamaAttention's plus the noted difference; verified
in transformers 5.17 and 5.24, and by the bit-identity tests in tests/nn/test_attention.py):
LlamaAttention, MistralAttention (passes `sliding_window` from the config), Qwen2Attention
(per-layer `sliding_window`), Qwen3Attention (plus per-head RMSNorm `q_norm`/`k_norm`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mxptq.errors import ModelError
from mxptq.nn.quantizer import ActQuantizer

ATTENTION_STAGES = ("rope", "kv_cache", "qk_matmul", "softmax", "av_matmul")
# The eager fallback reads the masks these implementations build (module docstring).
SCORE_PATH_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class _Family:
    """How one supported attention class differs from LlamaAttention."""

    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on Q and K before RoPE
    sliding_window: str = "none"  # "none" | "config" (Mistral) | "module" (Qwen2/3) -> kwarg to the kernel


SUPPORTED_ATTENTION: dict[str, _Family] = {
    "LlamaAttention": _Family(),
    "MistralAttention": _Family(sliding_window="config"),
    "Qwen2Attention": _Family(sliding_window="module"),
    "Qwen3Attention": _Family(qk_norm=True, sliding_window="module"),
}


def is_supported_attention(module: nn.Module) -> bool:
    return type(module).__name__ in SUPPORTED_ATTENTION


def _attention_interface(implementation: str, default: Callable) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, default)


class MXAttention(nn.Module):
    """MX-quantized replacement for a supported attention module (see module docstring).

    Args:
        attn: the source module (LlamaAttention, ...); its projections are moved, not copied.
        config: a `recipe.AttentionConfig` (rope, kv_cache, qk_matmul, softmax, av_matmul:
            Format | None, None = bypass).
        name: qualified module name, for error messages.
    """

    def __init__(self, attn: nn.Module, config: Any, name: str = "") -> None:
        super().__init__()
        source_class = type(attn).__name__
        if source_class not in SUPPORTED_ATTENTION:
            raise ModelError(
                f"{name or 'module'}: attention class {source_class} is not supported; "
                f"supported: {', '.join(SUPPORTED_ATTENTION)}"
            )
        self.source_class = source_class
        self.family = SUPPORTED_ATTENTION[source_class]
        # The helpers of the source's own modeling file (apply_rotary_pos_emb & co.), so each
        # architecture keeps its exact arithmetic.
        modeling = sys.modules[type(attn).__module__]
        self._apply_rotary_pos_emb = modeling.apply_rotary_pos_emb
        self._eager_attention_forward = modeling.eager_attention_forward

        self.config = attn.config
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.num_key_value_groups = attn.num_key_value_groups
        self.scaling = attn.scaling
        self.attention_dropout = attn.attention_dropout
        self.is_causal = attn.is_causal
        self.layer_type = getattr(attn, "layer_type", None)
        self.sliding_window = getattr(attn, "sliding_window", None)
        self.training = attn.training

        self.q_proj = attn.q_proj
        self.k_proj = attn.k_proj
        self.v_proj = attn.v_proj
        self.o_proj = attn.o_proj
        if self.family.qk_norm:
            self.q_norm = attn.q_norm
            self.k_norm = attn.k_norm

        self.rope_quantizer = ActQuantizer(getattr(config, "rope", None))
        self.k_quantizer = ActQuantizer(getattr(config, "kv_cache", None))
        self.v_quantizer = ActQuantizer(getattr(config, "kv_cache", None))
        self.q_quantizer = ActQuantizer(getattr(config, "qk_matmul", None))
        self.scores_quantizer = ActQuantizer(getattr(config, "softmax", None))
        self.p_quantizer = ActQuantizer(getattr(config, "av_matmul", None))

        implementation = self.config._attn_implementation
        if self.needs_scores and implementation not in SCORE_PATH_IMPLEMENTATIONS:
            raise ModelError(
                f"{name or 'attention'}: the softmax/av_matmul stages need the attention scores, which the "
                f"{implementation!r} attention implementation does not expose; load the model with "
                f"attn_implementation = one of {', '.join(SCORE_PATH_IMPLEMENTATIONS)}"
            )

    @property
    def needs_scores(self) -> bool:
        """True when a stage quantizes the score or probability matrix, i.e. fused kernels cannot run."""
        return self.scores_quantizer.enabled or self.p_quantizer.enabled

    @property
    def quantizers(self) -> dict[str, ActQuantizer]:
        return {
            "rope": self.rope_quantizer,
            "k_cache": self.k_quantizer,
            "v_cache": self.v_quantizer,
            "qk_matmul": self.q_quantizer,
            "softmax": self.scores_quantizer,
            "av_matmul": self.p_quantizer,
        }

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # transformers 5.17 passes the cache as `past_key_values`; 5.24 renamed it to `cache`.
        if cache is None:
            cache = past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if self.family.qk_norm:
            query_states = self.q_norm(query_states)
            key_states = self.k_norm(key_states)
        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        query_states = self.rope_quantizer(query_states)
        key_states = self.rope_quantizer(key_states)
        cos, sin = position_embeddings
        query_states, key_states = self._apply_rotary_pos_emb(query_states, key_states, cos, sin)

        # Before the cache update: the cache then only ever holds quantized K/V (module docstring).
        key_states = self.k_quantizer(key_states)
        value_states = self.v_quantizer(value_states)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        query_states = self.q_quantizer(query_states)
        dropout = 0.0 if not self.training else self.attention_dropout
        if self.needs_scores:
            attn_output, attn_weights = self._score_path_attention(
                query_states, key_states, value_states, attention_mask, dropout
            )
        else:
            attention_interface = _attention_interface(
                self.config._attn_implementation, self._eager_attention_forward
            )
            attn_output, attn_weights = attention_interface(
                self,
                query_states,
                key_states,
                value_states,
                attention_mask,
                dropout=dropout,
                scaling=self.scaling,
                **self._sliding_window_kwargs(),
                **kwargs,
            )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights

    def _sliding_window_kwargs(self) -> dict[str, Any]:
        if self.family.sliding_window == "config":
            return {"sliding_window": getattr(self.config, "sliding_window", None)}
        if self.family.sliding_window == "module":
            return {"sliding_window": self.sliding_window}
        return {}

    def _score_path_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager attention with the softmax and av_matmul quantizers; same operations, order and
        dtypes as transformers' `eager_attention_forward` when both are bypassed."""
        key = _repeat_kv(key, self.num_key_value_groups)
        value = _repeat_kv(value, self.num_key_value_groups)
        scores = torch.matmul(query, key.transpose(2, 3)) * self.scaling
        q_len, kv_len = scores.shape[-2], scores.shape[-1]
        additive_mask, allowed = _split_mask(attention_mask, q_len, kv_len, scores.device)

        if self.scores_quantizer.enabled:
            # Masked-out scores are zeroed before quantizing: they must not set a block's shared
            # exponent (and in prefill they are future tokens that decode never sees).
            if allowed is not None:
                scores = scores.masked_fill(~allowed, 0.0)
            scores = self.scores_quantizer(scores)
        if additive_mask is not None:
            scores = scores + additive_mask
        elif allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)

        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = self.p_quantizer(probs)
        probs = nn.functional.dropout(probs, p=dropout, training=self.training)
        attn_output = torch.matmul(probs, value).transpose(1, 2).contiguous()
        return attn_output, probs

    def extra_repr(self) -> str:
        stages = ", ".join(f"{stage}={q.describe()}" for stage, q in self.quantizers.items())
        return f"source={self.source_class}, {stages}"


def _repeat_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, kv_heads, seq, head_dim] -> [batch, kv_heads * n_rep, seq, head_dim] (GQA)."""
    if n_rep == 1:
        return states
    batch, kv_heads, seq, head_dim = states.shape
    return states[:, :, None].expand(batch, kv_heads, n_rep, seq, head_dim).reshape(batch, -1, seq, head_dim)


def _split_mask(
    attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """-> (additive float mask or None, boolean "may attend" mask or None = everything allowed).

    - float (the "eager" implementation's mask): 0 = attend, dtype-min = masked.
    - bool (the "sdpa" implementation's mask): True = attend.
    - None under SDPA means "let the kernel apply causality": sdpa_attention_forward then uses
      `is_causal = q_len > 1`, i.e. top-left aligned causal for a prefill and nothing masked for
      a single decode token. We reproduce exactly that.
    """
    if attention_mask is None:
        if q_len == 1:
            return None, None
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
        return None, allowed
    mask = attention_mask[..., :kv_len]
    if mask.dtype == torch.bool:
        return None, mask
    return mask, mask > torch.finfo(mask.dtype).min / 2
