"""Trainable prompt parameters (and an optional task head) around a frozen DecoderForward.

input: P virtual-token embeddings prepended to the input embeddings.
deep:  per-layer key/value prefixes, the P-Tuning v2 formulation. With reparameterization (the paper's
       MLP over the prefix) the prefixes are produced by an MLP during training; export runs it once and
       ships only its output, so serving never sees the MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from app.model.forward import DecoderForward
from app.model.spec import ModelSpec
from prompt_store.format import PromptSet, PromptSetMeta


class PromptModule(nn.Module):
    def __init__(self, forward: DecoderForward, spec: ModelSpec, kind: str | None, num_virtual_tokens: int,
                 head_rows: int | None = None, reparam: bool = False, reparam_hidden: int = 512,
                 init_ids: list[int] | None = None):
        super().__init__()
        self.f = forward
        self.spec = spec
        self.kind = kind  # None: no prompt (full fine-tuning or the bare model with a head)
        self.p = num_virtual_tokens if kind else 0
        self.reparam = reparam
        hidden = spec.hidden_size
        kv_width = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
        device = forward.embed.weight.device
        # the init text's tokens, repeated to fill the P slots, as the embedding module gives them (Gemma's
        # scales its rows by sqrt(hidden): virtual tokens live where the module's outputs do)
        with torch.no_grad():
            text = forward.embed(torch.tensor([init_ids[i % len(init_ids)] for i in range(self.p)], device=device)) \
                if init_ids and kind else None
        if kind == "input":
            if text is not None:  # start from real token embeddings (prompt tuning's vocabulary init)
                init = text.float().cpu().clone()
            else:
                scale = float(getattr(forward.embed, "scalar_embed_scale", 1.0))  # Gemma's sqrt(hidden)
                init = torch.randn(self.p, hidden) * forward.embed.weight.detach().float().std().item() * scale
            self.embeddings = nn.Parameter(init)
        elif kind == "deep":
            if reparam:
                if text is not None:
                    raise ValueError("a deep prompt set with reparameterization cannot start from an init text")
                self.prefix_tokens = nn.Parameter(torch.randn(self.p, hidden) * 0.02)
                self.mlp = nn.Sequential(nn.Linear(hidden, reparam_hidden), nn.Tanh(),
                                         nn.Linear(reparam_hidden, kv_width))
            elif text is not None:
                # the text's own keys and values at every layer: the set starts out exactly as the text
                # written before the request (an `input` set at its init, as a prefix)
                self.prefix = nn.Parameter(self._flat_prefix(*forward.prefix_kv(text)))
            else:
                self.prefix = nn.Parameter(torch.randn(self.p, kv_width) * 0.02)
        self.head = nn.Linear(hidden, head_rows) if head_rows else None

    @classmethod
    @torch.no_grad()
    def from_prompt_set(cls, forward: DecoderForward, spec: ModelSpec, ps: PromptSet) -> "PromptModule":
        """A stored prompt set as a module (to score it on a validation file): export()'s inverse."""
        head = ps.tensors.get("head.weight")
        module = cls(forward, spec, ps.kind, ps.meta.num_virtual_tokens, None if head is None else head.shape[0])
        if ps.kind == "input":
            module.embeddings.copy_(ps.tensors["embeddings"])
        else:
            module.prefix.copy_(cls._flat_prefix(ps.tensors["keys"], ps.tensors["values"]))
        if head is not None:
            module.head.weight.copy_(head)
            module.head.bias.copy_(ps.tensors["head.bias"])
        return module.to(forward.embed.weight.device)

    # -- the prompt as the server will see it ----------------------------------------------------
    def deep_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.mlp(self.prefix_tokens) if self.reparam else self.prefix
        s = self.spec
        kv = flat.view(self.p, 2 * s.num_layers, s.num_kv_heads, s.head_dim).permute(1, 2, 0, 3)
        return kv[0::2], kv[1::2]  # [L, KVH, P, D] each, the PEFT prefix layout

    @staticmethod
    @torch.no_grad()
    def _flat_prefix(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """keys, values [L, KVH, P, D] -> the [P, L*2*KVH*D] parameter layout deep_kv() reads back."""
        layers, kv_heads, p, d = keys.shape
        kv = torch.stack([keys, values], dim=1).reshape(2 * layers, kv_heads, p, d)
        return kv.permute(2, 0, 1, 3).reshape(p, -1).float().cpu().clone()

    # -- training forward ------------------------------------------------------------------------
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] right-padded -> final hidden states of the T request positions [B, T, hidden]."""
        f = self.f
        dtype = f.embed.weight.dtype
        b, t = ids.shape
        x = f.embed(ids)
        p = self.p
        if self.kind == "input":
            x = torch.cat([self.embeddings.to(dtype).unsqueeze(0).expand(b, -1, -1), x], dim=1)
        total = x.shape[1]
        offset = p if self.kind == "deep" else 0
        positions = torch.arange(offset, offset + total, device=ids.device).unsqueeze(0).expand(b, -1)
        # causal; a deep prefix's p slots come first and are visible to every position. Right padding
        # needs no extra mask: real tokens never attend to the pads after them.
        q_idx = torch.arange(total, device=ids.device).unsqueeze(1) + offset
        k_idx = torch.arange(total + offset, device=ids.device).unsqueeze(0)
        mask = f.group_mask((k_idx <= q_idx).unsqueeze(0), dtype)
        if self.kind == "deep":
            keys, values = (t_.to(dtype) for t_ in self.deep_kv())

            def attend(i, q, k, v):
                k = torch.cat([keys[i].unsqueeze(0).expand(b, -1, -1, -1), k], dim=2)
                v = torch.cat([values[i].unsqueeze(0).expand(b, -1, -1, -1), v], dim=2)
                return f.grouped_attention(q, k, v, mask)
        else:
            def attend(i, q, k, v):
                return f.grouped_attention(q, k, v, mask)

        h = f.hidden(x, positions, attend)
        return h[:, p:] if self.kind == "input" else h

    # -- export ----------------------------------------------------------------------------------
    @torch.no_grad()
    def export(self, meta: PromptSetMeta) -> PromptSet:
        tensors: dict[str, torch.Tensor] = {}
        if self.kind == "input":
            tensors["embeddings"] = self.embeddings.detach().float().cpu()
        else:
            keys, values = self.deep_kv()
            tensors["keys"], tensors["values"] = keys.float().cpu().contiguous(), values.float().cpu().contiguous()
        if self.head is not None:
            tensors["head.weight"] = self.head.weight.detach().float().cpu()
            tensors["head.bias"] = self.head.bias.detach().float().cpu()
        return PromptSet(meta, tensors)
