"""The decoder forward pass over the frozen model's own modules, with our cache: every family of
app/model/families.py (Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3), their differences read from one
table of traits.

Owning this loop (rather than calling the model's ``forward``) lets one batch mix sequences of different
lengths and prefixes without padding, and keeps us independent of transformers' cache API, which
changes between releases. Weights are the loaded model's; with packing, packed copies may replace them
(`release_model_weights`: the weights are then held once).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from app.model.families import Family, family_of
from app.model.linear import (
    SMALL_BATCH_MAX_ROWS,
    SMALL_BATCH_ROWS,
    Linear,
    PackedLinear,
    SmallBatchLinear,
    linear,
    release_weight,
)

# attend(layer_index, q [B, H, T, D], k [B, KVH, T, D], v) -> attention output [B, H, T, D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# attend_joined(layer_index, qkv [N, (H + 2 KVH) D] unrotated, cos, sin [N, D]) -> [N, H*D] for the N tokens
# that run (B*T, or the packed real ones): rotary, the cache write and attention (the native path, decode
# and prefill)
AttendJoined = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _eps(module: torch.nn.Module) -> float:
    return getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)


def rms_norm(module: torch.nn.Module, x: torch.Tensor, style: str = "llama") -> torch.Tensor:
    """The model's RMSNorm with torch's fused kernel, normalizing in float32 as the modules do.
    llama (LlamaRMSNorm, Qwen3RMSNorm, ...): back to the input dtype, then scaled by the weight;
    bit-identical to the module in float32 and bfloat16, in 4 operations instead of 8 (each of which, on a
    small decode batch, costs more in dispatch and threading than in arithmetic).
    gemma (GemmaRMSNorm): scaled by (1 + weight) in float32, then back to the input dtype."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, _eps(module))
    if style == "gemma":
        return (normed * (1.0 + module.weight.float())).to(x.dtype)
    return module.weight * normed.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb (q, k [B, heads, T, D]; cos, sin [B, T, R]); with R < D (a partial
    rotary factor) only the first R dimensions turn, as in Phi-3's."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    if r == q.shape[-1]:
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q_rot, k_rot = q[..., :r], k[..., :r]
    return (torch.cat([q_rot * cos + rotate_half(q_rot) * sin, q[..., r:]], dim=-1),
            torch.cat([k_rot * cos + rotate_half(k_rot) * sin, k[..., r:]], dim=-1))


# (x, delta, weight, eps) -> (x + delta, RMSNorm(x + delta)): the native kernel (kernels/add_rms_norm.cpp)
AddRmsNorm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
# every decoder layer of a 1-4 token decode step in one native op (kernels/decode_layers.cpp; its arguments there)
DecodeLayers = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class DecodeCache(NamedTuple):
    """The KV cache as the native decode op reads it: the cache tensors, each token's row and position, the
    contiguous rows [start, start + count) and positions [0, width) attention reads, and (a speculative check,
    several tokens of a row) each token's row within them; None: token i is row start + i."""
    k: torch.Tensor
    v: torch.Tensor
    rows: torch.Tensor
    at: torch.Tensor
    start: int
    count: int
    width: int
    in_batch: torch.Tensor | None = None


def _joined(modules: list[torch.nn.Module]) -> Linear:
    """Several projections of the same input as one output, side by side (the model's own modules)."""
    if len(modules) == 1:
        return modules[0]
    return lambda h: torch.cat([m(h) for m in modules], dim=-1)


class _LayerLinears:
    """One decoder layer's projections: the model's modules, or packed copies of them (q/k/v and gate/up
    each one matmul, as Phi-3 stores them anyway)."""

    def __init__(self, layer: torch.nn.Module, family: Family, pack: bool, small: SmallBatchLinear | None,
                 release: bool, any_rows: bool = False):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [getattr(attn, name) for name in family.qkv]
        gate_up = [getattr(mlp, name) for name in family.gate_up]
        if pack:
            # q, k and v side by side in one tensor [..., q + k + v]
            self.qkv_joined: Linear = PackedLinear.concat(qkv, small, any_rows)
            fused = PackedLinear.concat(gate_up, small, any_rows)
            self.gate_up_joined: PackedLinear | None = fused
            self._gate_up: Callable[[torch.Tensor], tuple] = lambda x: fused(x).chunk(2, dim=-1)
        else:
            self.gate_up_joined = None
            self.qkv_joined = _joined(qkv)
            if len(gate_up) == 1:
                self._gate_up = lambda x: gate_up[0](x).chunk(2, dim=-1)
            else:
                self._gate_up = lambda x: (gate_up[0](x), gate_up[1](x))
        self.o: Linear = linear(attn.o_proj, pack, small, any_rows)
        self.down: Linear = linear(mlp.down_proj, pack, small, any_rows)
        if pack and release:  # the packed copies replace the model's weights: held once
            for module in [*qkv, *gate_up, attn.o_proj, mlp.down_proj]:
                release_weight(module)
        self.act = getattr(mlp, family.act)

    def plain_weights(self) -> list[torch.Tensor] | None:
        """The weights the native small-batch kernel reads, in the order of kernels/decode_layers.cpp (q/k/v,
        o, gate/up, down), when every projection of the layer runs on it; else None."""
        linears = [self.qkv_joined, self.o, self.gate_up_joined, self.down]
        if not all(isinstance(lin, PackedLinear) and lin.small_batch_weight is not None for lin in linears):
            return None
        return [lin.small_batch_weight for lin in linears]

    def mlp(self, x: torch.Tensor) -> torch.Tensor:  # LlamaMLP.forward (Phi3MLP's product, same factors)
        gate, up = self._gate_up(x)
        return self.down(self.act(gate) * up)


class DecoderForward:
    def __init__(self, model: torch.nn.Module, pack_weights: bool = False, small_linear: SmallBatchLinear | None = None,
                 add_rms_norm: AddRmsNorm | None = None, release_model_weights: bool = False,
                 decode_layers: DecodeLayers | None = None, small_any_rows: bool = False):
        """pack_weights: use oneDNN-packed copies of the linear weights (CPU; see linear.py); small_linear:
        with them, the native kernel for bfloat16 inputs of 1-2 rows; add_rms_norm: the native residual
        add + RMSNorm (kernels/); release_model_weights: with pack_weights, the model's own linear weights
        are dropped as their packed copies are made (one copy held, and the loading peak stays one layer
        above the weights), so the model's own forward no longer runs: for an owner that serves only
        through this class (the server); decode_layers: the native op that runs every layer of a 1-2 token
        decode step (kernels/decode_layers.cpp), used where this model's layers are what it implements;
        small_any_rows: small_linear takes inputs of any number of rows (kernels' bf16_linear: no packed copy)."""
        cfg = model.config
        self.family = family_of(cfg)
        # the native fused add + norm implements Llama's rounding only
        self._add_rms_norm = add_rms_norm if self.family.norm == "llama" else None
        self.model = model
        self.embed = model.get_input_embeddings()
        self.vocab_size = self.embed.num_embeddings
        self.layers = list(model.model.layers)
        self.norm = model.model.norm
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.num_heads // self.num_kv_heads
        self.scale = self.head_dim ** -0.5
        self.qkv_sizes = [self.num_heads * self.head_dim, *[self.num_kv_heads * self.head_dim] * 2]
        self.linears = [_LayerLinears(layer, self.family, pack_weights, small_linear, release_model_weights,
                                      small_any_rows) for layer in self.layers]
        tied = model.lm_head.weight is self.embed.weight  # the embedding still needs a tied head's weight
        self.lm_head = linear(model.lm_head, pack_weights, small_linear, small_any_rows)
        if pack_weights and release_model_weights and not tied:
            release_weight(model.lm_head)
        self.rotary = model.model.rotary_emb
        # dimensions of each head that rotate (Phi-3's partial_rotary_factor; all of them elsewhere)
        self.rotary_dim = 2 * int(self.rotary.inv_freq.numel())
        self.norms_after = self._norms_after()  # fixed modules: listed once, not on every forward pass
        self._decode_layers = self._native_decode(decode_layers)

    def _native_decode(self, op: DecodeLayers | None) -> Callable | None:
        """The native decode op bound to this model's weights, when its layers are what the op implements:
        Llama's norm (the native add + norm), no q/k norm, SiLU, whole-head rotary, every projection on
        the small-batch kernel. None otherwise (the layer-by-layer path)."""
        weights = [lin.plain_weights() for lin in self.linears]
        act_is_silu = all(type(lin.act).__name__ in ("SiLU", "SiLUActivation") for lin in self.linears)
        if (op is None or self._add_rms_norm is None or self.family.qk_norm or not act_is_silu
                or self.rotary_dim != self.head_dim or any(w is None for w in weights)):
            return None
        flat = [w for layer in weights for w in layer]
        norms = self.norms_after
        norm_weights, eps = [m.weight for m in norms], [_eps(m) for m in norms]

        def run(x, h, cos, sin, cache: DecodeCache):
            return op(x, h, flat, norm_weights, eps, cos, sin, cache.k, cache.v, cache.rows, cache.at, cache.start,
                      cache.count, cache.width, self.num_heads, self.num_kv_heads, self.scale, cache.in_batch)
        return run

    @property
    def speculative_rows(self) -> int:
        """Tokens one decode pass may check at once such that each token's logits are bit-identical to a pass
        of its own (the native decode op and the head's small-batch kernel compute every row alone, in a fixed
        order): SMALL_BATCH_MAX_ROWS there; 1 elsewhere (no speculation: oneDNN's and torch's matmuls may
        round a row differently beside other rows, and speculation must not change an output)."""
        head = self.lm_head
        exact_head = isinstance(head, PackedLinear) and head.small_batch_weight is not None
        return SMALL_BATCH_MAX_ROWS if self._decode_layers is not None and exact_head else 1

    def _norms_after(self) -> list[torch.nn.Module]:
        """The norm each sublayer's residual add feeds: the layer's post-attention norm, then the next
        layer's input norm (the model's final norm after the last)."""
        norms = [m for layer in self.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
        return norms[1:] + [self.norm]

    def norm_of(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(module, x, self.family.norm)

    def _qk_norm(self, i: int, qkv: torch.Tensor) -> torch.Tensor:
        """Qwen3: each head's query and key RMS-normalized (q_norm, k_norm) before the rotary embedding."""
        attn = self.layers[i].self_attn
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        lead = q.shape[:-1]
        q = self.norm_of(attn.q_norm, q.reshape(*lead, self.num_heads, self.head_dim)).reshape(*lead, -1)
        k = self.norm_of(attn.k_norm, k.reshape(*lead, self.num_kv_heads, self.head_dim)).reshape(*lead, -1)
        return torch.cat([q, k, v], dim=-1)

    def hidden(self, x: torch.Tensor, positions: torch.Tensor, attend: Attend | None,
               packed: torch.Tensor | None = None, attend_joined: AttendJoined | None = None,
               decode_cache: tuple | None = None) -> torch.Tensor:
        """Run all layers on embeddings x [B, T, hidden] at rotary positions [B, T]; final norm applied.

        packed: when some rows are padded, the indices of the real tokens in the flattened [B*T]. All but
        attention then runs on those tokens only, packed into one [N, hidden] matrix (a prefill of prompts
        of 40 to 130 tokens padded to the longest spends a third of its matmuls on pads); `attend` sees
        the padded layout, `attend_joined` the packed one. The pads' outputs are zeros.
        attend_joined, instead of attend: takes each layer's projection unrotated (the native path).
        decode_cache: with attend_joined, for a decode step reading contiguous cache rows, the cache as the
        native decode op reads it: 1-2 tokens in bfloat16 (up to SMALL_BATCH_MAX_ROWS for a speculative check,
        which must run there) run all layers in that op, the same kernels in the same order."""
        cos, sin = self.rotary(x, positions)
        b, t, c = x.shape
        if packed is not None:
            x = x.reshape(b * t, c)[packed]
        if attend_joined is not None:  # the rotary tables of the tokens that run, one row each
            cos, sin = cos.reshape(b * t, -1), sin.reshape(b * t, -1)
            if packed is not None:
                cos, sin = cos[packed], sin[packed]
        # each residual add is fused with the norm that reads its result: the next sublayer's input norm
        norms_after = self.norms_after
        h = self.norm_of(self.layers[0].input_layernorm, x)
        if (decode_cache is not None and attend_joined is not None and self._decode_layers is not None
                and packed is None and x.dtype == torch.bfloat16
                and b * t <= (SMALL_BATCH_ROWS if decode_cache.in_batch is None else SMALL_BATCH_MAX_ROWS)):
            return self._decode_layers(x, h, cos, sin, decode_cache)[1]
        for i, lin in enumerate(self.linears):
            qkv = lin.qkv_joined(h)
            if self.family.qk_norm:
                qkv = self._qk_norm(i, qkv)
            if attend_joined is not None:
                o = attend_joined(i, qkv.reshape(-1, qkv.shape[-1]), cos, sin)
            else:
                o = self._attend_split(i, qkv, self.qkv_sizes, cos, sin, b, t, packed, attend)
            x, h = self.add_norm(x, lin.o(o.view(*x.shape[:-1], -1)), norms_after[2 * i])
            x, h = self.add_norm(x, lin.mlp(h), norms_after[2 * i + 1])
        if packed is not None:
            return h.new_zeros(b * t, c).index_copy_(0, packed, h).view(b, t, c)
        return h

    def _attend_split(self, i: int, qkv: torch.Tensor, sizes: list[int], cos: torch.Tensor, sin: torch.Tensor,
                      b: int, t: int, packed: torch.Tensor | None, attend: Attend) -> torch.Tensor:
        """torch's path: q, k, v in the padded [B, heads, T, D] layout, rotated, to `attend`; its output
        back in the layout of the tokens that run ([B*T] or packed), [.., H*D]."""
        if packed is not None:  # into the padded layout for attention
            qkv = qkv.new_zeros(b * t, qkv.shape[-1]).index_copy_(0, packed, qkv)
        q, k, v = qkv.view(b, t, -1).split(sizes, dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        o = attend(i, q, k, v).transpose(1, 2).reshape(b * t, -1)
        return o[packed] if packed is not None else o

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor,
                 norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)): the residual stream and the next sublayer's normalized input."""
        if self._add_rms_norm is not None and x.dtype == torch.bfloat16:
            return self._add_rms_norm(x.contiguous(), delta.contiguous(), norm.weight, _eps(norm))
        x = x + delta
        return x, self.norm_of(norm, x)

    def logits(self, hidden: torch.Tensor, exact_rows: bool = False) -> torch.Tensor:
        """exact_rows: each row's logits as a pass of its own gives them (a speculative check; see
        speculative_rows), on the small-batch kernel."""
        if exact_rows:
            return self.lm_head(hidden, small_rows=SMALL_BATCH_MAX_ROWS).float()
        return self.lm_head(hidden).float()

    def group_mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """allowed [B or 1, T, S] (True = may attend) -> the additive mask grouped_attention takes,
        [B, 1, group*T, S]. Built once per forward pass rather than in each of the layers."""
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        return mask.repeat(1, self.group, 1).unsqueeze(1)

    def grouped_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention without repeating K/V.

        q [B, H, T, D]; k, v [B, KVH, S, D]; mask from group_mask(). The query heads that share a KV head
        are folded into the query-length axis, so K/V are read in place.
        """
        b, _, t, d = q.shape
        qg = q.reshape(b, self.num_kv_heads, self.group * t, d)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=self.scale)
        return o.reshape(b, self.num_heads, t, d)

    def prefix_kv(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of an `input` prompt set's virtual tokens at every layer: [L, KVH, P, D].

        Under causal attention virtual tokens see only each other, so this is the same for every
        request and turns the prompt set into a per-layer prefix, computed once.
        """
        p = embeddings.shape[0]
        x = embeddings.unsqueeze(0)
        positions = torch.arange(p, device=x.device).unsqueeze(0)
        causal = self.group_mask(torch.ones(p, p, dtype=torch.bool, device=x.device).tril().unsqueeze(0), x.dtype)
        keys, values = [], []

        def attend(i, q, k, v):
            keys.append(k[0])
            values.append(v[0])
            return self.grouped_attention(q, k, v, causal)

        self.hidden(x, positions, attend)
        return torch.stack(keys), torch.stack(values)
