"""model.py: the two networks CLO needs, written from scratch in PyTorch.

1. A Llama-family decoder-only chat model (Llama 2/3.x, Mistral, Qwen2/2.5, SmolLM), the model CLO adapts.
2. The M2M100 / NLLB-200 encoder-decoder network and its decoding (greedy, beam search); the text side of translation
   (language codes, sentence splitting, batching, retries) is data.py's Translator.
Plus what both need: safetensors loading from a folder or a Hugging Face hub id (never pickle), the tokenizer and a
sandboxed chat template, KV-cached generation, and LoRA adapters written by hand.

Parameter names follow the Hugging Face checkpoints exactly (model.layers.0.self_attn.q_proj.weight, ...), so a
checkpoint loads with no renaming and what we save loads back into transformers and peft.

Read top to bottom: config -> layers -> model -> LoRA -> PEFT adapter folders -> loading (load_model, the folder
rule, hub files, safetensors, dtype and device) -> tokenizer and template -> generation -> translator network.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------------
# Llama-family config

SUPPORTED_DECODERS = ("llama", "mistral", "qwen2")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000          # rows of the embedding and of the output projection
    hidden_size: int = 4096          # d_model, the width of the residual stream
    intermediate_size: int = 11008   # width of the SwiGLU MLP
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32    # fewer than num_attention_heads = grouped-query attention
    head_dim: int = 0                # 0: hidden_size // num_attention_heads (SmolLM and Mistral-Nemo set it)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0      # base of the rotary frequencies
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ...}; None = plain RoPE
    max_position_embeddings: int = 4096  # informational: caches are sized by the actual request, never by this
    tie_word_embeddings: bool = False  # output projection shares the embedding matrix (SmolLM, Llama 3.2 1B/3B)
    attention_bias: bool = False     # Llama's switch: a bias on q, k, v and o
    qkv_bias: bool = False           # Qwen2's layout: a bias on q, k, v only
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: attend to at most this many previous positions

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "LlamaConfig":
        """Reads a transformers config.json dict (both the v4 `rope_theta`/`rope_scaling` and v5 `rope_parameters`).
        ValueError (one line naming `source`) on a model_type, activation or rope scaling this file does not build."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_DECODERS:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported. Supported decoder types: "
                             f"{', '.join(SUPPORTED_DECODERS)} (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, SmolLM).")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (silu).")
        kwargs = {f.name: cfg[f.name] for f in fields(cls) if cfg.get(f.name) is not None}
        rope = dict(cfg.get("rope_parameters") or {})  # transformers v5 keeps theta and scaling together here
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"{source}: rope scaling type {kind!r} is not supported (llama3, linear).")
            scaling = None if kind == "default" else {**scaling, "rope_type": kind}
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            raise ValueError(f"{source}: Qwen2 with use_sliding_window=true is not supported (Qwen2.5 releases "
                             "ship it off).")
        kwargs.update(rope_scaling=scaling, sliding_window=cfg.get("sliding_window") if model_type == "mistral"
                      else None, rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
                      qkv_bias=model_type == "qwen2", head_dim=cfg.get("head_dim") or 0)
        kwargs.setdefault("num_key_value_heads", kwargs.get("num_attention_heads", cls.num_attention_heads))
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Llama-family layers


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as the reference implementation does, then cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """theta_i = base^(-2i/d) for i < d/2, then the checkpoint's context-extension rule, if any.

    linear (position interpolation): every frequency divided by `factor`.
    llama3 (Llama 3.1/3.2): long wavelengths (> original_ctx / low_freq_factor) divided by `factor`, short ones
    (< original_ctx / high_freq_factor) kept, and a smooth blend between the two."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    factor = float(s["factor"])
    if s["rope_type"] == "linear":
        return inv_freq / factor
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


def apply_rope(x, cos, sin):
    """x (B, n_heads, T, head_dim) rotated by cos, sin (B, 1, T, head_dim), in the rotate-half layout of HF
    checkpoints: the pairs are (x_i, x_{i+d/2}), not adjacent elements."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """One attention layer's static key/value buffers, sized for one request: (B, n_kv_heads, prompt + new tokens, hd).
    A model's cache is one per layer. Beam search reorders rows to follow the surviving beams."""

    def __init__(self, batch, n_heads, length, head_dim, dtype, device):
        self.k = torch.zeros(batch, n_heads, length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, start, k, v):
        """Writes k, v at slots [start, start+T) and returns the keys/values of slots [0, start+T)."""
        end = start + k.shape[2]
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index):
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, start=0):
        B, T, _ = x.shape  # (B, T, d_model)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, n_heads, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, n_kv, start+T, hd)
        # mask None: plain causal attention (no padding, no cache offset) lets SDPA take its fastest kernel.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() and gate.requires_grad:  # recompute silu(gate) in backward: keeps 2 of 3 tensors
            return self.down_proj(torch.utils.checkpoint.checkpoint(swiglu, gate, up, use_reentrant=False))
        return self.down_proj(swiglu(gate, up))


def swiglu(gate, up):
    return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


def visible_keys(query_seq, key_seq, start: int, window: int | None):
    """The attention rule, for every layout: (B, 1, T, S) bool, True where the query at slot start + t may attend to
    the key at slot s. query_seq (B, T) and key_seq (B, S) give the sequence each slot belongs to (-1: padding);
    queries sit at slots [start, start + T), keys at slots [0, S).

    A query sees a key when the key is at or before it (causal), belongs to the same sequence, is not padding, and
    (sliding_window, Mistral) is fewer than `window` slots back: a sequence fills consecutive slots, so the slot
    distance is the position distance. Every slot sees itself, so that a padding query's row is never empty (which
    would give NaN); real tokens never read padding rows. A new window pattern changes this function only."""
    device = key_seq.device
    q = torch.arange(start, start + query_seq.shape[1], device=device)[:, None]  # (T, 1)
    k = torch.arange(key_seq.shape[1], device=device)[None, :]                   # (1, S)
    see = k <= q
    if window is not None:
        see = see & (q - k < window)
    same = (query_seq[:, :, None] == key_seq[:, None, :]) & (key_seq[:, None, :] >= 0)  # (B, T, S)
    return (see[None] & same | (k == q)[None])[:, None]


class LlamaForCausalLM(nn.Module):
    """A Llama-family decoder. `model(input_ids, attention_mask)` returns logits (B, T, vocab)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # model.embed_tokens, model.layers, model.norm: the checkpoint's names
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False  # recompute each layer in backward: less memory, ~30% more compute
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self):
        """Recomputes the rotary frequencies in float32 (after building on the meta device or casting to bf16)."""
        self.inv_freq = rope_inverse_frequencies(self.config).to(self.model.embed_tokens.weight.device)

    def new_kv_cache(self, batch: int, length: int) -> list[KVCache]:
        w, c = self.model.embed_tokens.weight, self.config
        return [KVCache(batch, c.num_key_value_heads, length, c.head_dim, w.dtype, w.device)
                for _ in range(c.num_hidden_layers)]

    def forward(self, input_ids, attention_mask=None, cache: list[KVCache] | None = None, start: int = 0,
                last_only: bool = False, score_mask=None, positions=None, segments=None):
        """input_ids (B, T) -> logits (B, T, vocab); (B, 1, vocab) with last_only; (n, vocab) for the n positions
        where score_mask (B, T) is True: training projects only the positions it scores onto the vocabulary, which
        saves most of the vocabulary-sized work on prompts. See hidden_states() for the masks."""
        x = self.hidden_states(input_ids, attention_mask, cache, start, positions, segments)
        if score_mask is not None:
            return self.lm_head(x[score_mask])
        return self.lm_head(x[:, -1:] if last_only else x)

    def hidden_states(self, input_ids, attention_mask=None, cache: list[KVCache] | None = None, start: int = 0,
                      positions=None, segments=None):
        """input_ids (B, T) -> final normed hidden states (B, T, d_model), before the output projection.

        attention_mask (B, S) marks real tokens (1) and padding (0) over every key position from slot 0: the T inputs
        without a cache, or all slots of the cache with one (the inputs then sit at slots [start, start+T)).
        None means no padding. Padding may sit on the left (generation) or the right (training): positions count
        real tokens only, so a padded row computes what the same row computes alone.
        Packed rows (training, no cache): positions (B, T) and segments (B, T) give each token's position in its own
        sequence and that sequence's id (-1 for padding); a token attends only to earlier tokens of its sequence.
        """
        (B, T), device = input_ids.shape, input_ids.device
        end, window = start + T, self.config.sliding_window
        if segments is not None:  # packed rows: sequences as given
            mask = visible_keys(segments, segments, 0, window)
        else:  # one sequence per row (0), padding keys -1; every query, padding too, counts as the row's sequence
            key_valid = (torch.ones(B, end, dtype=torch.bool, device=device) if attention_mask is None
                         else attention_mask[:, :end].bool())
            positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:end]
            # None: plain causal attention (no padding, no cache offset, no window reached), SDPA's fastest kernel
            plain = attention_mask is None and not ((start > 0 and T > 1) or (window is not None and end > window))
            mask = None if plain else visible_keys(torch.zeros(B, T, dtype=torch.long, device=device),
                                                   key_valid.long() - 1, start, window)
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]      # (B, 1, T, hd)
        # the residual stream in the norms' dtype: fp32 under mixed precision, whose embedding is held in bf16
        x = self.model.embed_tokens(input_ids).to(self.model.norm.weight.dtype)  # (B, T, d_model)
        if mask is not None:  # SDPA would make a bool mask additive in every layer, each copy kept for backward
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=device).masked_fill_(~mask, float("-inf"))
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, None if cache is None else cache[i], start)
        return self.model.norm(x)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA, by hand


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (Hu et al. 2021, "LoRA", eq. 3):

        y = x W^T + b + scaling * dropout(x) A^T B^T,     A: (r, in), B: (out, r), scaling = alpha / r

    A starts random (Kaiming-uniform, as peft does) and B at zero, so a fresh adapter changes nothing: the model at
    step 0 is exactly the base model, which is what makes pi_ref = pi at the start of CLO training.
    merged_linear() folds the update into W (W + scaling B A) for inference at the base model's speed.
    Parameter names (lora_A.weight, lora_B.weight) are peft's, so the saved adapter loads in peft and vLLM.
    `scaling` overrides alpha / r for adapters trained elsewhere (rsLoRA, Kalajdzievski 2023: alpha / sqrt(r)).
    `dtype`: A's and B's (default W's; clo trains fp32 adapters on a bf16 W, see clo.float32_weights).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, scaling: float | None = None,
                 dtype=None):
        super().__init__()
        self.base = base
        self.r, self.scaling = r, alpha / r if scaling is None else scaling
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=w.device, dtype=dtype or w.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=w.device, dtype=dtype or w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """scaling B A (out, in), in fp32: what merging adds to the base weight."""
        return (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()) * self.scaling

    def merged_linear(self, untie: bool = False) -> nn.Linear:
        """The base Linear with the update folded in: W + scaling B A. untie: W is shared with another module
        (lm_head tied to embed_tokens), so the sum goes into a new parameter of this layer alone and the other
        module keeps W, which is what the adapter computes (its update acts on this layer's output only)."""
        w = self.base.weight
        with torch.no_grad():
            if untie:
                self.base.weight = nn.Parameter(torch.empty_like(w), requires_grad=w.requires_grad)
            self.base.weight.copy_((w.float() + self.delta()).to(w.dtype))
        return self.base


def wrap_linear(model: nn.Module, name: str, r: int, alpha: float, dropout: float = 0.0,
                scaling: float | None = None, dtype=None) -> LoRALinear:
    """Replaces the nn.Linear at `name` (e.g. model.layers.0.self_attn.q_proj) by a LoRALinear around it."""
    layer = LoRALinear(model.get_submodule(name), r, alpha, dropout, scaling, dtype)
    model.set_submodule(name, layer)
    return layer


def check_lora_targets(model: nn.Module, targets):
    """Raises ValueError (one line) unless every target names an nn.Linear of the model (by attribute name).
    A target that names nothing, or names an nn.Embedding (embed_tokens: LoRA on embeddings is not implemented),
    would otherwise be left untrained without a word."""
    found = {}
    for name, module in model.named_modules():
        found.setdefault(name.rpartition(".")[2], (name, module))
    for t in targets:
        if t not in found:
            raise ValueError(f"LoRA target {t!r} names no layer of the model; use linear layer names such as "
                             "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head.")
        if not isinstance(found[t][1], (nn.Linear, LoRALinear)):
            raise ValueError(f"LoRA target {t!r} ({found[t][0]}, {type(found[t][1]).__name__}) is not a "
                             "linear layer: clo puts LoRA on nn.Linear layers only (q_proj, ..., down_proj, lm_head).")


def apply_lora(model: nn.Module, targets=("q_proj", "k_proj", "v_proj", "o_proj"), r: int = 16,
               alpha: float = 32.0, dropout: float = 0.0, dtype=None) -> list[str]:
    """Wraps every nn.Linear whose attribute name is in `targets` (A and B in dtype, default their base's); freezes
    everything else. Returns wrapped names. Errors: check_lora_targets'. lm_head is allowed on models with tied
    embeddings: the adapter then changes the output projection only, and merge_lora unties it (see there)."""
    check_lora_targets(model, targets)
    model.requires_grad_(False)
    wrapped = [name for name, module in model.named_modules()
               if name.rpartition(".")[2] in targets and type(module) is nn.Linear]
    for name in wrapped:
        wrap_linear(model, name, r, alpha, dropout, dtype=dtype)
    if not wrapped:
        raise ValueError(f"LoRA targets {list(targets)} match no linear layer of the model.")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight and puts the plain nn.Linear back (in place).

    A base weight shared with another module (lm_head tied to embed_tokens) is untied: the merged layer gets its own
    weight W + scaling B A, the embedding keeps W, and model.config.tie_word_embeddings becomes False, so that the
    merged model (and the checkpoint save_merged writes from it) computes the adapter's logits. Folding the update
    into the shared matrix instead would also shift every input embedding."""
    untied = False
    for name, m in lora_modules(model).items():
        shared = sum(p is m.base.weight for _, p in model.named_parameters(remove_duplicate=False)) > 1
        untied |= shared
        model.set_submodule(name, m.merged_linear(untie=shared))
    if untied and hasattr(getattr(model, "config", None), "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under peft's names: base_model.model.<module>.lora_A.weight (no adapter name in the key)."""
    return {f"base_model.model.{name}.{ab}.weight": getattr(m, ab).weight.detach().contiguous()
            for name, m in lora_modules(model).items() for ab in ("lora_A", "lora_B")}


# ----------------------------------------------------------------------------------------------------------------------
# PEFT adapter folders (adapter_config.json + adapter_model.safetensors), ours or anyone's: plain LoRA only

ADAPTER_INFO_FIELDS = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                       "inference_mode", "lora_dropout", "megatron_core", "runtime_config", "qalora_group_size",
                       "loftq_config", "eva_config", "corda_config", "lora_ga_config"}  # training, provenance
ADAPTER_FIELDS = {"peft_type": ("LORA",), "r": None, "lora_alpha": None, "use_rslora": None, "target_modules": None,
                  "bias": ("none",), "init_lora_weights": (True, "gaussian", "eva")}  # field -> allowed (None: any)


def adapter_config(folder: str) -> dict:
    """Reads and checks FOLDER/adapter_config.json (peft's LoraConfig as JSON) -> the dict. Plain LoRA is applied:
    r, lora_alpha, use_rslora (scaling alpha / sqrt(r)), target_modules (names or name suffixes, a regex, "all-linear");
    fields of training and provenance are ignored. Any other field that is set (use_dora, rank_pattern,
    layers_to_transform, exclude_modules, an init that rewrites the base weights, ...): ValueError, one line."""
    path = os.path.join(folder, "adapter_config.json")
    cfg = read_json(path)
    for key, value in cfg.items():
        if key in ADAPTER_INFO_FIELDS or value is False or value in (None, "", [], {}) or (  # 0 is a layer index
                key in ADAPTER_FIELDS and (ADAPTER_FIELDS[key] is None or value in ADAPTER_FIELDS[key])):
            continue
        raise ValueError(f"{path}: {key} = {json.dumps(value)} is not supported: clo applies plain LoRA adapters only "
                         "(r, lora_alpha, use_rslora, target_modules, bias \"none\"); merge this one into its base "
                         "model with peft (merge_and_unload) and pass the merged model instead.")
    if not cfg.get("target_modules"):
        raise ValueError(f"{path}: target_modules is missing or empty.")
    return cfg


def adapter_targets(model: nn.Module, targets, path: str) -> list[str]:
    """Module names a peft target_modules selects (peft.tuners.tuners_utils.check_target_module_exists): a string is
    a regex that must match the whole name, "all-linear" every linear layer but the output projection; list entries
    match the name or its last dotted parts. ValueError (one line, naming `path`) when one is not an nn.Linear."""
    out = []
    for name, module in model.named_modules():
        if targets == "all-linear":
            hit = isinstance(module, nn.Linear) and name != "lm_head"
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith(f".{t}") for t in targets)
        if hit and name and type(module) is not nn.Linear:
            raise ValueError(f"{path}: target_modules selects {name} ({type(module).__name__}); clo applies LoRA "
                             "to nn.Linear layers only.")
        out += [name] if hit and name else []
    if not out:
        raise ValueError(f"{path}: target_modules {targets!r} matches no linear layer of the base model.")
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter"):
    """Copies peft-named adapter tensors into the model's LoRA layers; every layer must get both A and B."""
    mods = lora_modules(model)
    seen = set()
    for key, t in state.items():
        base = re.fullmatch(r"base_model\.model\.(.+)\.base_layer\.weight", key)
        if base and base.group(1) in mods:
            # peft saves the base weight of an adapted lm_head / embedding too (save_embedding_layers="auto"), in
            # case the vocabulary was resized; the same values as the base model's mean nothing to apply
            w = mods[base.group(1)].base.weight
            if t.shape != w.shape or not torch.allclose(t.to(w.dtype), w, rtol=0, atol=1e-6):
                raise ValueError(f"{source}: tensor {key!r} replaces the base model's {base.group(1)} weight (a "
                                 "resized or retrained vocabulary?); clo does not load changed base weights.")
            continue
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_[AB])(?:\.[\w-]+)?\.weight", key)
        if m is None or m.group(1) not in mods:
            raise ValueError(f"{source}: tensor {key!r} matches no LoRA layer of this model; was the adapter "
                             "trained with other --lora-targets or on another model?")
        target = getattr(mods[m.group(1)], m.group(2)).weight
        if t.shape != target.shape:
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(target.shape)}; does adapter_config.json give this layer's rank?")
        with torch.no_grad():
            target.copy_(t)
        seen.add((m.group(1), m.group(2)))
    missing = [f"{n}.{ab}" for n in mods for ab in ("lora_A", "lora_B") if (n, ab) not in seen]
    if missing:
        raise ValueError(f"{source}: the adapter lacks {len(missing)} tensors its config targets, e.g. {missing[:2]}.")


def load_adapter(model: nn.Module, folder: str) -> list[str]:
    """Applies the PEFT LoRA adapter in `folder` (adapter_config.json + adapter_model.safetensors) to `model` in
    place, computing what peft computes on the same base model; returns the wrapped module names. Errors: see
    adapter_config(); a pickle-only adapter (adapter_model.bin) is refused."""
    from safetensors.torch import load_file
    cfg = adapter_config(folder)
    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.exists(weights):
        other = "adapter_model.bin is a pickle, which clo never loads; " if os.path.exists(
            os.path.join(folder, "adapter_model.bin")) else ""
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors; {other}save the adapter with peft's "
                                "save_pretrained(..., safe_serialization=True).")
    model.requires_grad_(False)
    names = adapter_targets(model, cfg["target_modules"], os.path.join(folder, "adapter_config.json"))
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    for name in names:
        wrap_linear(model, name, r, alpha, scaling=alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)
    load_lora_state_dict(model, load_file(weights), weights)
    return names


# ----------------------------------------------------------------------------------------------------------------------
# Loading checkpoints: a local folder or a hub id; safetensors only

HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "chat_template.json"]  # besides the weights
SENTENCEPIECE_FILES = ["sentencepiece.bpe.model", "vocab.json"]  # M2M100's tokenizer as released (no tokenizer.json)
HUB_INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_CHOICES = ["auto"] + sorted(DTYPES)  # --dtype of clo.py and eval.py


def load_model(path_or_id: str, dtype=torch.float32, device="cpu", float32=None, layout: str = "train"):
    """Loads a Llama-family chat model and its tokenizer: returns (model, tokenizer), model in eval mode. Weights in
    `dtype` (or a DTYPES name), but those float32(name, parameter) picks in fp32 (clo.float32_weights). layout
    "decode", for callers that only generate or score: on CPU, wide projections column-major (see
    column_major_wide_weights); "train": row-major, as FSDP expects. Errors: check_checkpoint_folder, before loading."""
    folder = resolve_checkpoint(path_or_id)
    raw = check_checkpoint_folder(folder)
    tok = Tokenizer(folder, raw)
    model = build_on_meta(LlamaForCausalLM, LlamaConfig.from_hf(raw, os.path.join(folder, "config.json")),
                          DTYPES.get(dtype, dtype), device, column_major=layout == "decode", float32=float32)
    load_weights(model, folder, ignore=(r"rotary_emb\.inv_freq$",))
    model.reset_rope()
    model.source = folder
    return model.eval(), tok


def is_local_path(path: str) -> bool:
    """The one rule for "a local path, not a hub id": it exists, starts with ".", "/" or "~", has more than one "/",
    or its parent folder is here (models/smol when models/ exists). Anything else is a hub id (owner/name)."""
    local = os.path.expanduser(path)
    return (os.path.exists(local) or path.startswith((".", "/", "~")) or local.count("/") > 1
            or ("/" in local and os.path.isdir(os.path.dirname(local))))


def check_checkpoint_folder(path: str, flag: str = "--model", chat: bool = True) -> dict:
    """The one "what is this folder" rule, of clo's and eval's argument checks and of the loaders, before any weights
    load: a folder with config.json and safetensors weights; chat=True: of a chat model (no translator) whose
    tokenizer and chat template work (Tokenizer). Returns config.json's dict. ValueError, one line "FLAG PATH: ..." (a
    flag ending in "=" is joined: "--models c=runs/x: ..."): no such folder, an adapter or clo run folder, no config."""
    at, local = flag + path if flag.endswith("=") else f"{flag} {path}", os.path.expanduser(path)
    get = "`hf download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir models/smollm2`, say"
    if not os.path.isdir(local):
        raise ValueError(f"{at}: no such folder. Give a local checkpoint folder (config.json, *.safetensors, "
                         f"tokenizer.json; {get}) or a hub id.")
    config = os.path.join(local, "config.json")
    if not os.path.exists(config):
        if os.path.exists(os.path.join(local, "adapter_config.json")):
            raise ValueError(f"{at}: holds a LoRA adapter, not a model; pass the model it was trained on "
                             "(base_model_name_or_path in its adapter_config.json), or the merged/ folder of a run "
                             "trained with --merge.")
        if os.path.exists(os.path.join(local, "args.json")):
            raise ValueError(f"{at}: a clo run folder without a model in it; pass its merged/ folder (a run trained "
                             "with --merge), or the model it was trained on.")
        raise ValueError(f"{at}: no config.json there; give a Hugging Face checkpoint folder (config.json, "
                         f"*.safetensors, tokenizer.json; {get}).")
    raw = read_json(config)
    if chat and raw.get("model_type") in ("m2m_100", "nllb", "nllb-moe"):
        hint = f"; pass it as --translator {path}, and the chat model to adapt as --model" if flag == "--model" else ""
        raise ValueError(f"{at}: an M2M100/NLLB translator, not a chat model{hint}.")
    safetensors_files(local)  # refuses a folder without safetensors weights, or with pickles only
    if chat:
        Tokenizer(local, raw)  # no tokenizer.json, no chat template, or one that fails
    return raw


def weight_files(names: list[str], read_index) -> list[str]:
    """The safetensors files holding a checkpoint's weights, from its file names (a folder's or a hub repository's):
    the shards the index names (read_index() -> its parsed JSON), or model.safetensors, or else the top-level
    *.safetensors but adapter_* and consolidated* (Mistral's native copy, as large as all the shards); or []."""
    if HUB_INDEX in names:
        return sorted(set(read_index()["weight_map"].values()))
    if "model.safetensors" in names:
        return ["model.safetensors"]
    return sorted(f for f in names if f.endswith(".safetensors") and "/" not in f
                  and not f.startswith(("consolidated", "adapter_")))


def hub_files_to_fetch(listing: list[str], read_index) -> list[str]:
    """The files of a hub repository that loading needs, given its file list: HUB_FILES that exist, the index if any
    and weight_files(); SENTENCEPIECE_FILES where there is no tokenizer.json (M2M100). Not pickles nor original/."""
    spm = SENTENCEPIECE_FILES if "tokenizer.json" not in listing else []
    wanted = [f for f in HUB_FILES + spm + [HUB_INDEX] if f in listing]
    if not (weights := weight_files(listing, read_index)):  # refused before any download, naming what there is
        other = sorted(f for f in listing if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")))
        raise ValueError(f"the repository has no Hugging Face-layout safetensors weights (it has: "
                         f"{', '.join(other[:6]) or 'no weight files'}{', ...' if len(other) > 6 else ''}). clo "
                         "loads model.safetensors or an index with its shards, never pickles (*.bin): use a release "
                         "in that layout, or convert the weights you trust to safetensors and pass the folder.")
    return wanted + weights


def resolve_checkpoint(path_or_id: str) -> str:
    """A local path (is_local_path) as is; anything else is a hub id: lists the repository and fetches exactly
    hub_files_to_fetch() into the Hugging Face cache, returning the snapshot folder (pickle-only main: the weights from
    safetensors_pr()). Listing failed (offline, HF_HUB_OFFLINE=1): the cached snapshot if it holds those files."""
    path = os.path.expanduser(str(path_or_id))
    if is_local_path(str(path_or_id)):  # check_checkpoint_folder says what is wrong with it, if anything
        return path
    import huggingface_hub as hub
    try:
        listing = hub.list_repo_files(path)
    except Exception as e:  # offline, unknown repo, gated repo: a cached snapshot, else one message naming the id
        try:
            folder, listing = hub.snapshot_download(repo_id=path, local_files_only=True), []
        except Exception as partial:  # huggingface_hub 2.x: clo's files alone are "incomplete", at snapshot_path
            folder = getattr(partial, "snapshot_path", None)
            listing = [f.path for f in getattr(hub, "get_cached_repo_tree", lambda _: [])(path)] if folder else []
        try:  # what clo would fetch, given the file list cached with the snapshot (if any) and the snapshot's files
            missing = folder and [f for f in hub_files_to_fetch(sorted(set(listing + os.listdir(folder))), lambda: (
                read_json(os.path.join(folder, HUB_INDEX)))) if not os.path.isfile(os.path.join(folder, f))]
        except (ValueError, OSError):  # no safetensors weights, or no index of the shards
            missing = ["its *.safetensors weights"]
        if folder and not missing:
            return folder
        raise OSError(f"{path_or_id}: the hub is unreachable ({type(e).__name__}) and its cached snapshot "
                      f"{folder} lacks {', '.join(missing)}: run once with network access (HF_HUB_OFFLINE unset) to "
                      "fetch them." if folder else f"{path_or_id}: could not fetch it from the Hugging Face hub "
                      f"({type(e).__name__}: {e}). Check the id and your network, log in with `hf auth login` for "
                      f"gated models, or pass a local folder (there is no folder {path_or_id} here).") from e
    read_index = lambda rev=None: read_json(hub.hf_hub_download(path, HUB_INDEX, revision=rev))  # noqa: E731
    try:
        files, pr = hub_files_to_fetch(listing, read_index), None
    except ValueError as e:
        if not (pr := (pickles := [f for f in listing if f.endswith(".bin")]) and safetensors_pr(hub, path, pickles)):
            raise ValueError(f"{path_or_id}: {e}" + (" No safetensors conversion of them exists on the Hub (no open "
                             "pull request by SFconvertbot of main's pickles): make one with https://huggingface.co/"
                             "spaces/safetensors/convert, then run again." if pickles else "")) from None
        files = hub_files_to_fetch(listing + hub.list_repo_files(path, revision=pr), lambda: read_index(pr))
        print(f"{path_or_id}: main has only pickle weights; the safetensors weights come from the Hub's automatic "
              f"conversion, pull request {pr} by SFconvertbot (config and tokenizer from main)", file=sys.stderr)
    # allow_patterns are fnmatch patterns: escape "[" so that each pattern is exactly one file name
    fetch = lambda names, rev=None: hub.snapshot_download(  # noqa: E731
        repo_id=path, revision=rev, allow_patterns=[f.replace("[", "[[]") for f in names])
    folder = fetch([f for f in files if f in listing])
    if pr:  # the converted weights are linked into main's snapshot, beside its config: one checkpoint folder
        pr_folder = fetch(weights := [f for f in files if f not in listing], pr)
        for f in (f for f in weights if not os.path.lexists(os.path.join(folder, f))):
            os.symlink(os.path.relpath(os.path.realpath(os.path.join(pr_folder, f)), folder), os.path.join(folder, f))
    return folder


def safetensors_pr(hub, repo_id: str, pickles: list[str]) -> str | None:
    """"refs/pr/N" of the newest open pull request by SFconvertbot (the Hub's automatic safetensors conversion, which
    transformers >= 4.46 loads: transformers#34731) whose `pickles` are main's own git blobs, else None."""
    bot, blobs = "SFconvertbot", lambda rev: sorted((f.path, f.blob_id) for f in hub.get_paths_info(
        repo_id, pickles, revision=rev))
    prs = sorted((d.num for d in hub.get_repo_discussions(repo_id, author=bot, discussion_type="pull_request",
                  discussion_status="open") if d.author == bot and d.is_pull_request), reverse=True)
    return next((f"refs/pr/{n}" for n in prs if blobs(f"refs/pr/{n}") == blobs(None)), None)


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}).") from e


def safetensors_files(folder: str) -> list[str]:
    """The paths of a checkpoint folder's weight_files(); refused: a shard the index names is missing, pickles only."""
    names, index = os.listdir(folder), os.path.join(folder, HUB_INDEX)
    files = weight_files(names, lambda: read_json(index))
    if missing := [f for f in files if not os.path.exists(os.path.join(folder, f))]:
        raise FileNotFoundError(f"{index}: names shards that are not in the folder: {missing}.")
    if files:
        return [os.path.join(folder, f) for f in files]
    if pickles := sorted(f for f in names if f.endswith((".bin", ".pt", ".pth", ".ckpt"))):
        raise ValueError(f"{folder}: has only pickle weights ({', '.join(pickles)}). clo never unpickles: "
                         "a pickle file can run arbitrary code when loaded. Convert it once, in an environment you "
                         "trust, to safetensors (e.g. `AutoModel.from_pretrained(folder).save_pretrained(out, "
                         "safe_serialization=True)` in transformers), or use a hub release that has .safetensors.")
    raise FileNotFoundError(f"{folder}: no *.safetensors weights found.")


def load_weights(model: nn.Module, folder: str, ignore=()):
    """Copies each tensor of the checkpoint into the (already allocated) parameter of the same name, one tensor at a
    time, so memory never holds a second copy of the model. Every parameter must be found."""
    from safetensors import safe_open
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights answer to both names
    buffers = dict(model.named_buffers())
    seen = set()
    for path in safetensors_files(folder):
        with safe_open(path, framework="pt", device="cpu") as st:
            for key in st.keys():
                target = params.get(key, buffers.get(key))
                if target is None:
                    if any(re.search(p, key) for p in ignore):
                        continue
                    raise ValueError(f"{path}: tensor {key!r} has no place in this model; is config.json the one "
                                     "that belongs to these weights?")
                t = st.get_tensor(key)
                if t.shape != target.shape:
                    raise ValueError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, the model expects "
                                     f"{tuple(target.shape)} (from config.json).")
                with torch.no_grad():
                    target.copy_(t)
                seen.add(key)
    loaded = {id(params[k]) for k in seen if k in params}
    missing = [k for k in params if id(params[k]) not in loaded]
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}.")


def build_on_meta(cls, cfg, dtype, device, column_major: bool = False, float32=None):
    """Builds the module without allocating or initialising weights, then allocates them once on `device`: in
    `dtype`, but the parameters for which float32(name, parameter) is true in fp32."""
    with torch.device("meta"):
        model = cls(cfg).to(dtype)
    for name, p in model.named_parameters():
        p.data = p.data.float() if float32 and float32(name, p) else p.data
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty gives tied parameters separate storage: tie them again
    if column_major and torch.device(device).type == "cpu":
        column_major_wide_weights(model)
    return model


def column_major_wide_weights(model: nn.Module):
    """Stores every projection with out_features >= in_features as the transpose of a contiguous (in, out) matrix:
    same shape and values, another memory order, in which the CPU matmul kernel streams the weights of one row of
    activations in order: for batch-1 decoding (load_model(layout="decode")), not for compute-bound batched work
    such as training or the translator's beam search (README, *Measured*). Call it on empty weights, before loading."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features >= module.in_features:
            w = module.weight
            w.data = torch.empty(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device).t()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware, from /proc/cpuinfo's flags (or the given text).

    x86: avx512_bf16 (Cooper Lake, Sapphire Rapids, AMD Zen 4/5) or amx_bf16; AArch64: bf16 (Armv8.6: Graviton3,
    Neoverse V1/V2); no /proc/cpuinfo (macOS): no. Not torch.ops.mkldnn._is_mkldnn_bf16_supported(), which says True
    on any AVX512-F CPU, where oneDNN emulates bf16, slower than fp32 (README, *Measured*)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = {flag for key, _, value in (line.partition(":") for line in cpuinfo.splitlines())
             if key.strip().lower() in ("flags", "features") for flag in value.split()}  # x86, AArch64
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_dtype(device, cpuinfo: str | None = None) -> tuple[str, str]:
    """The dtype --dtype auto picks on `device`, and why: ("bfloat16" | "float32", reason). bf16 where the hardware
    computes it natively (then every matmul and decoding step reads half the bytes): CUDA GPUs with bf16 (Ampere and
    later), CPUs with native bf16 matmul (cpu_has_native_bf16). fp32 where bf16 is emulated, and on other devices."""
    kind = torch.device(device).type
    if kind == "cuda":
        native = not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)
        return ("bfloat16", "CUDA") if native else ("float32", "this GPU has no native bf16")
    if kind == "cpu":
        return (("bfloat16", "this CPU has native bf16 matmul: avx512_bf16/amx_bf16/bf16") if cpu_has_native_bf16(
            cpuinfo) else ("float32", "this CPU has no native bf16 matmul: avx512_bf16/amx absent"))
    return "float32", f"bf16 is not chosen automatically on {kind}"


def resolve_dtype(requested: str | None, device) -> tuple[str, str]:
    """--dtype as given ("auto"/None: default_dtype) -> (a DTYPES name, reason), e.g. ("float32", "--dtype float32").
    Raises ValueError (one line) on a name DTYPES does not know."""
    if requested in (None, "auto"):
        return default_dtype(device)
    if requested not in DTYPES:
        raise ValueError(f"--dtype {requested}: unknown dtype; use auto, float32 or bfloat16 (or {', '.join(DTYPES)}).")
    return str(DTYPES[requested]).removeprefix("torch."), f"--dtype {requested}"


def check_device(name: str) -> torch.device:
    """--device as a torch.device; one line for a name torch does not know, or CUDA where there is none."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch has no CUDA build" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"--device {name}: CUDA is not available ({why}); use --device cpu, or install a CUDA "
                         "build of torch on a machine with a GPU.")
    return device


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and chat template


def today() -> str:
    """The date chat templates write (strftime_now), YYYY-MM-DD; clo.py and eval.py fix it once per run."""
    return datetime.date.today().isoformat()


def _chat_environment(tok):
    """jinja2's immutable sandbox (templates cannot touch Python internals or mutate inputs), configured as
    transformers renders chat templates, with the helpers checkpoints' templates call; strftime_now writes tok.date
    (transformers: the clock at each render), so that a run and its --resume agree."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        tok.dated = True
        return datetime.date.fromisoformat(tok.date).strftime(fmt)

    class Generation(jinja2.ext.Extension):  # TRL's assistant-only-loss marks: the body, unchanged (a call block
        tags = {"generation"}                  # of its own scope, as transformers' AssistantTracker)

        def parse(self, parser):
            lineno, body = next(parser.stream).lineno, parser.parse_statements(("name:endgeneration",), True)
            return jinja2.nodes.CallBlock(self.call_method("body"), [], [], body).set_lineno(lineno)

        def body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


class Tokenizer:
    """The checkpoint's tokenizer.json through `tokenizers`, plus its special tokens and chat template.

    encode(text) returns the text's tokens only (no BOS/EOS): chat formatting, including any BOS, is the template's
    job, exactly as transformers' apply_chat_template tokenizes the rendered text. A template that fails, or renders
    no message content, does so here (a probe render), as a ValueError naming template_file. strftime_now writes
    `date` (YYYY-MM-DD; set it to the run's): `dated` says whether the template called it."""

    def __init__(self, folder: str, model_config: dict | None = None):
        from tokenizers import Tokenizer as HFTokenizer
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder}: no tokenizer.json. clo reads fast-tokenizer files only; save one with "
                                    "transformers' `AutoTokenizer.from_pretrained(folder).save_pretrained(folder)`.")
        self.tok = HFTokenizer.from_file(path)
        tcfg_path, gen_path = (os.path.join(folder, f) for f in ("tokenizer_config.json", "generation_config.json"))
        tcfg, gen = (read_json(p) if os.path.exists(p) else {} for p in (tcfg_path, gen_path))
        model_config = model_config or {}
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (  # a string or {"content": ...}
            t.get("content") if isinstance(t := tcfg.get(f"{k}_token"), dict) else t
            for k in ("bos", "eos", "unk", "pad"))
        # Generation stops on any of these: chat models often end turns with a token other than the tokenizer's eos
        # (Llama 3: <|eot_id|>), which generation_config.json lists.
        sources = (gen.get("eos_token_id"), model_config.get("eos_token_id"), self.token_to_id(self.eos_token))
        self.eos_ids = list(dict.fromkeys(int(i) for s in sources for i in (s if isinstance(s, list) else [s])
                                          if i is not None))
        self.bos_id = self.token_to_id(self.bos_token)
        pad = self.token_to_id(self.pad_token)
        pad = gen.get("pad_token_id", model_config.get("pad_token_id")) if pad is None else pad
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.chat_template, self.template_file = self._find_template(folder, tcfg, tcfg_path)
        if not self.chat_template:  # transformers (v5) has no default template either: a base model, not a chat one
            raise ValueError(f"{folder}: its tokenizer has no chat template (chat_template.jinja, chat_template.json "
                             "or tokenizer_config.json 'chat_template'); clo needs a chat model, such as the -Instruct "
                             "release of this one.")
        self.date, self.dated = today(), False
        text = self.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], False)
        if "Hi" not in text or "Hello" not in text:  # e.g. "   \n": every pair would train an empty response
            raise ValueError(f"{self.template_file}: its chat template renders no message content ({text!r} for a user "
                             "'Hi', assistant 'Hello' exchange); fix the template there, or use another checkpoint.")

    @staticmethod
    def _find_template(folder, tcfg, tcfg_path):
        """(template text or None, the file it is in)."""
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                return f.read(), jinja_path
        json_path = os.path.join(folder, "chat_template.json")
        if os.path.exists(json_path):
            return read_json(json_path).get("chat_template"), json_path
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t["name"]: t["template"] for t in template}
            if "default" not in named:  # transformers refuses too, unless told a name
                raise ValueError(f"{tcfg_path}: 'chat_template' is a list of named templates "
                                 f"({', '.join(sorted(named))}) without a 'default' one, so which to use is not "
                                 "said; name the one to use 'default', or save it as chat_template.jinja beside it.")
            template = named["default"]
        return template, tcfg_path

    def token_to_id(self, token):
        return None if token is None else self.tok.token_to_id(token)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        try:
            if not hasattr(self, "_template"):
                self._template = _chat_environment(self).from_string(self.chat_template)
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                         unk_token=self.unk_token or "", pad_token=self.pad_token or "", **extra)
        except Exception as e:  # jinja2's errors, and a template's own TypeError and the like
            at = f" (line {e.lineno} of the template)" if getattr(e, "lineno", None) else ""
            raise ValueError(f"{self.template_file}: its chat template fails{at}: {str(e).rstrip('.')}; fix the "
                             "template there, or use another checkpoint.") from e

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, **extra))


# ----------------------------------------------------------------------------------------------------------------------
# Generation: prefill the prompt into a static KV cache, then decode one token at a time


def pad_batch(sequences: list[list[int]], pad_id: int, device="cpu"):
    """Id lists -> (input_ids (B, longest) with pad_id in the padding, attention_mask (B, longest): 1 real, 0 pad),
    both long, on `device`, left-padded: every row's last token in the last column, where generation continues."""
    S = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), S, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, S - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, S - len(s):] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits, temperature: float, top_p: float, generator=None, top_k: int = 0,
                repetition_penalty: float = 1.0, seen=None):
    """logits (B, vocab) -> token ids (B,), as transformers' logits processors in its order: the `seen` ((B, vocab)
    bool) tokens' logits divided by repetition_penalty where positive, else multiplied (even when greedy); temperature
    0 is greedy; otherwise softmax(logits / T) over the top_k (0: all) most likely tokens, restricted to the smallest
    set of tokens whose probability reaches top_p (nucleus sampling)."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = torch.where(seen, torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty),
                             logits)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k)[0][:, -1:], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # mass before this token already reached top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, top_k: int = 0,
             repetition_penalty: float = 1.0) -> list[list[int]]:
    """Continues each prompt (a list of token ids); returns only the new tokens of each, without the stop token.
    Decoding as sample_next (defaults: greedy, no penalty); the penalty counts each row's prompt, not its padding.

    Prompts are left-padded into one batch; positions and the attention mask skip the padding, so each row equals
    its own unbatched generation. The KV cache holds exactly max prompt length + max_new_tokens slots.
    """
    device = model.model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("generate: every prompt needs at least one token.")
    ids, prompt_mask = pad_batch(prompts, tokenizer.pad_id, device)
    valid = torch.cat((prompt_mask.bool(), torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)), 1)
    mask = None if bool(valid.all()) else valid  # no padding: the mask-free fast path (generated slots are real)
    cache = model.new_kv_cache(B, P + max_new_tokens)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor(tokenizer.eos_ids or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    logits = model(ids, mask, cache=cache, start=0, last_only=True)  # prefill: (B, 1, vocab)
    V = logits.shape[-1]  # the tokens repetition_penalty counts; padding goes to one spare column
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=device).scatter_(1, ids.masked_fill(prompt_mask < 1, V), True)
    for step in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_p, generator, top_k, repetition_penalty, seen[:, :V])
        seen.scatter_(1, token[:, None], True)
        token = torch.where(done, torch.full_like(token, tokenizer.pad_id), token)
        out.append(token)
        done = done | torch.isin(token, eos)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits = model(token[:, None], mask, cache=cache, start=P + step, last_only=True)  # decode: one token
    tokens = torch.stack(out, 1).tolist() if out else [[] for _ in range(B)]
    eos_set = set(tokenizer.eos_ids)
    return [row[:next((j for j, t in enumerate(row) if t in eos_set), len(row))] for row in tokens]


# ----------------------------------------------------------------------------------------------------------------------
# The M2M100 / NLLB-200 encoder-decoder translator


@dataclass
class M2M100Config:
    vocab_size: int = 256206        # NLLB-200: SentencePiece pieces + 202 language codes + <mask>
    d_model: int = 1024             # width of the residual stream
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "relu"
    scale_embedding: bool = True    # token embeddings are multiplied by sqrt(d_model)
    pad_token_id: int = 1           # also the offset of the sinusoidal positions (fairseq's convention)
    eos_token_id: int = 2
    decoder_start_token_id: int = 2  # decoding starts from </s>, then the forced target-language code

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "M2M100Config":
        if cfg.get("model_type") != "m2m_100":
            raise ValueError(f"{source}: model_type {cfg.get('model_type')!r} is not a translator; clo translates "
                             "with M2M100 / NLLB-200 checkpoints (model_type 'm2m_100').")
        if (act := cfg.get("activation_function", "relu")) not in ACTIVATIONS:
            raise ValueError(f"{source}: activation_function {act!r} is not supported ({', '.join(ACTIVATIONS)}).")
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if cfg.get(f.name) is not None})


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu}


def sinusoidal_positions(n_positions: int, dim: int, padding_idx: int) -> torch.Tensor:
    """fairseq's table (tensor2tensor variant): [sin(p w_i) | cos(p w_i)] with w_i = 10000^(-i / (dim/2 - 1)),
    halves concatenated rather than interleaved; the padding row is zero."""
    half = dim // 2
    w = torch.exp(torch.arange(half, dtype=torch.float32, device="cpu") * -(math.log(10000) / (half - 1)))
    angles = torch.arange(n_positions, dtype=torch.float32, device="cpu")[:, None] * w[None]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(n_positions, 1)], dim=1)
    table[padding_idx] = 0
    return table


class M2M100Attention(nn.Module):
    """Multi-head attention with biases, for self-attention (encoder, decoder) and cross-attention."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def heads(self, x):  # (B, T, d_model) -> (B, n_heads, T, hd)
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x):
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def forward(self, x, k, v, mask=None, is_causal=False):
        B, T, D = x.shape
        y = F.scaled_dot_product_attention(self.heads(self.q_proj(x)), k, v, attn_mask=mask, is_causal=is_causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class M2M100EncoderLayer(nn.Module):
    def __init__(self, cfg: M2M100Config, n_heads: int | None = None, ffn_dim: int | None = None):
        super().__init__()
        self.self_attn = M2M100Attention(cfg.d_model, n_heads or cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, ffn_dim or cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(ffn_dim or cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x, mask):
        h = self.self_attn_layer_norm(x)  # pre-LayerNorm
        x = x + self.self_attn(h, *self.self_attn.project_kv(h), mask=mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class M2M100DecoderLayer(M2M100EncoderLayer):
    """Decoder layer: causal self-attention (KV cached), cross-attention to the encoder, feed-forward."""

    def __init__(self, cfg: M2M100Config):
        super().__init__(cfg, cfg.decoder_attention_heads, cfg.decoder_ffn_dim)
        self.encoder_attn = M2M100Attention(cfg.d_model, cfg.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x, self_kv, cross_kv, cross_mask, start):
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.project_kv(h)
        k_all, v_all = self_kv.update(start, k, v)
        x = x + self.self_attn(h, k_all, v_all, is_causal=x.shape[1] > 1)
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), *cross_kv, mask=cross_mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


def m2m100_stack(cfg: M2M100Config, n_layers: int, layer_cls) -> nn.Module:
    """The encoder's or decoder's layers and final norm, under transformers' names. Its embed_tokens is the shared
    matrix (see tie_weights); embedding and positions are applied in M2M100ForConditionalGeneration.encode/decode."""
    stack = nn.Module()
    stack.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
    stack.layers = nn.ModuleList(layer_cls(cfg) for _ in range(n_layers))
    stack.layer_norm = nn.LayerNorm(cfg.d_model)
    return stack


class M2M100ForConditionalGeneration(nn.Module):
    """The encoder-decoder. encode() once per source, then decode() one step at a time over a KV cache."""

    def __init__(self, cfg: M2M100Config):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # model.shared, model.encoder, model.decoder: the checkpoint's names
        self.model.shared = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.model.encoder = m2m100_stack(cfg, cfg.encoder_layers, M2M100EncoderLayer)
        self.model.decoder = m2m100_stack(cfg, cfg.decoder_layers, M2M100DecoderLayer)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.register_buffer("positions", torch.zeros(0), persistent=False)

    def tie_weights(self):
        """One matrix serves as encoder and decoder embeddings and as the output projection."""
        m = self.model
        m.encoder.embed_tokens.weight = m.shared.weight
        m.decoder.embed_tokens.weight = m.shared.weight
        self.lm_head.weight = m.shared.weight

    def position_table(self, n):
        """Sinusoidal positions, grown on demand (fairseq numbers real tokens from pad_token_id + 1)."""
        need = n + self.config.pad_token_id + 1
        if self.positions.shape[0] < need:
            w = self.model.shared.weight
            table = sinusoidal_positions(max(need, 256), self.config.d_model, self.config.pad_token_id)
            self.positions = table.to(device=w.device, dtype=w.dtype)
        return self.positions

    def encode(self, input_ids, attention_mask):
        """input_ids (B, S) left- or right-padded -> encoder states (B, S, d_model)."""
        pad = self.config.pad_token_id
        real = attention_mask.bool()
        positions = (real.long().cumsum(-1) * real) + pad  # padding sits at row pad_token_id, which is zero
        x = self.model.shared(input_ids) * self.embed_scale + self.position_table(input_ids.shape[1])[positions]
        mask = real[:, None, None, :]  # (B, 1, 1, S): every token may see every real token
        for layer in self.model.encoder.layers:
            x = layer(x, mask)
        return self.model.encoder.layer_norm(x)

    def cross_kv(self, enc):
        """Keys/values of the encoder states for every decoder layer's cross-attention: computed once per source."""
        return [layer.encoder_attn.project_kv(enc) for layer in self.model.decoder.layers]

    def new_cache(self, batch, length):
        w, c = self.model.shared.weight, self.config
        hd = c.d_model // c.decoder_attention_heads
        return [KVCache(batch, c.decoder_attention_heads, length, hd, w.dtype, w.device)
                for _ in range(c.decoder_layers)]

    def decode(self, tokens, start, cache, cross, cross_mask, last_only=True):
        """tokens (B, T) at decoder positions [start, start+T) -> logits (B, vocab) of the last, or (B, T, vocab)."""
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device) + self.config.pad_token_id + 1
        x = self.model.shared(tokens) * self.embed_scale + self.position_table(start + tokens.shape[1])[pos]
        for layer, kv, ckv in zip(self.model.decoder.layers, cache, cross):
            x = layer(x, kv, ckv, cross_mask, start)
        return self.lm_head(self.model.decoder.layer_norm(x[:, -1] if last_only else x))

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        """Teacher-forced logits (B, T, vocab), for tests and scoring; generation uses encode + decode."""
        enc = self.encode(input_ids, attention_mask)
        cache = self.new_cache(input_ids.shape[0], decoder_input_ids.shape[1])
        cross_mask = attention_mask.bool()[:, None, None, :]
        return self.decode(decoder_input_ids, 0, cache, self.cross_kv(enc), cross_mask, last_only=False)


@torch.inference_mode()
def seq2seq_greedy(model, input_ids, attention_mask, forced_id: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding from [decoder_start, forced_id]; returns the tokens after forced_id, without eos."""
    cfg, B = model.config, input_ids.shape[0]
    cross = model.cross_kv(model.encode(input_ids, attention_mask))
    cross_mask = attention_mask.bool()[:, None, None, :]
    cache = model.new_cache(B, max_new_tokens + 2)
    prefix = torch.tensor([[cfg.decoder_start_token_id, forced_id]], device=input_ids.device).expand(B, 2)
    logits = model.decode(prefix, 0, cache, cross, cross_mask)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = []
    for step in range(max_new_tokens):
        token = torch.where(done, cfg.pad_token_id, logits.argmax(-1))
        out.append(token)
        done |= token == cfg.eos_token_id
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits = model.decode(token[:, None], 2 + step, cache, cross, cross_mask)
    return _strip(torch.stack(out, 1).tolist() if out else [[]] * B, cfg)


def _strip(rows, cfg):  # each row up to its first eos, without padding
    eos, pad = cfg.eos_token_id, cfg.pad_token_id
    return [[t for t in (row[:row.index(eos)] if eos in row else row) if t != pad] for row in rows]


@torch.inference_mode()
def seq2seq_beam_search(model, input_ids, attention_mask, forced_id: int, num_beams: int = 4,
                        max_new_tokens: int = 200):
    """Beam search as transformers (v4.50+) runs it with its defaults (length_penalty 1.0, early_stopping False), so
    that both return the same tokens.

    Each step scores every continuation of every running beam by its summed log-probability and keeps the best
    2 * num_beams candidates. Candidates ending in eos among the top num_beams become finished hypotheses, scored
    sum_logprob / generated_length; the best num_beams candidates that did not end go on running. A source is done
    when its best running beam, scored at the current length, cannot beat its worst kept hypothesis.
    """
    cfg, device = model.config, input_ids.device
    B, K = input_ids.shape[0], num_beams
    NEG = -1.0e9  # transformers' "impossible" score, kept identical so ties break the same way
    enc = model.encode(input_ids, attention_mask).repeat_interleave(K, 0)     # (B*K, S, d_model)
    cross = model.cross_kv(enc)
    cross_mask = attention_mask.bool().repeat_interleave(K, 0)[:, None, None, :]
    max_len = 2 + max_new_tokens  # decoder_start + forced language code + new tokens
    cache = model.new_cache(B * K, max_len)
    running = torch.full((B, K, max_len), cfg.pad_token_id, dtype=torch.long, device=device)
    running[:, :, 0], running[:, :, 1] = cfg.decoder_start_token_id, forced_id
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = NEG  # all beams start identical: only the first may expand at the first step
    hyps, hyp_scores = running.clone(), torch.full((B, K), NEG, device=device)
    hyp_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    in_top_k = torch.arange(2 * K, device=device) < K
    logits = model.decode(running[:, :, :2].reshape(B * K, 2), 0, cache, cross, cross_mask)
    cur = 2  # the position being generated
    while True:
        V = logits.shape[-1]
        logp = F.log_softmax(logits.float(), dim=-1).view(B, K, V) + running_scores[:, :, None]
        top_scores, top_index = logp.view(B, K * V).topk(2 * K)            # (B, 2K)
        from_beam, token = top_index // V, top_index % V
        cand = running.gather(1, from_beam[:, :, None].expand(B, 2 * K, max_len)).clone()
        cand[:, :, cur] = token
        ends = (token == cfg.eos_token_id) | (cur + 1 >= max_len)
        # the best K candidates that did not end keep running
        go_on = (top_scores + ends.float() * NEG).topk(K).indices
        running = cand.gather(1, go_on[:, :, None].expand(B, K, max_len))
        running_scores = (top_scores + ends.float() * NEG).gather(1, go_on)
        parent = from_beam.gather(1, go_on) + torch.arange(B, device=device)[:, None] * K
        # candidates that ended in the top K join the hypotheses (of a source still improvable), scored per token
        new_done = ends & in_top_k
        new_scores = top_scores / cur + (~improvable).float() * NEG + (~new_done).float() * NEG
        best = torch.cat((hyp_scores, new_scores), 1).topk(K).indices
        hyps = torch.cat((hyps, cand), 1).gather(1, best[:, :, None].expand(B, K, max_len))
        hyp_scores = torch.cat((hyp_scores, new_scores), 1).gather(1, best)
        hyp_done = torch.cat((hyp_done, new_done), 1).gather(1, best)
        cur += 1
        best_possible = running_scores[:, :1] / (cur - 1)
        worst_kept = torch.where(hyp_done, hyp_scores.min(1, keepdim=True).values, NEG)
        improvable = improvable & (best_possible > worst_kept).any(-1, keepdim=True)
        if not bool(improvable.any()) or bool(ends.all()):
            break
        for kv in cache:
            kv.reorder(parent.view(-1))
        logits = model.decode(running[:, :, cur - 1].reshape(B * K, 1), cur - 1, cache, cross, cross_mask)
    return _strip(hyps[:, 0, 2:].tolist(), cfg)


def load_m2m100(path_or_id: str, dtype=torch.float32, device="cpu") -> M2M100ForConditionalGeneration:
    """Loads an M2M100 / NLLB-200 network (same loader rules as load_model), in eval mode. Its tokenizer and the
    Translator around both: data.load_translator."""
    folder = resolve_checkpoint(path_or_id)
    cfg = M2M100Config.from_hf(check_checkpoint_folder(folder, "--translator", chat=False),
                               os.path.join(folder, "config.json"))
    model = build_on_meta(M2M100ForConditionalGeneration, cfg, DTYPES.get(dtype, dtype), device)
    load_weights(model, folder, ignore=(r"embed_positions",))
    model.positions = torch.zeros(0, device=device)
    return model.eval()

