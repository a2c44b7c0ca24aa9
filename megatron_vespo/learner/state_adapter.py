"""Tensor names and layouts between HF checkpoints, megatron-core and SGLang, one adapter per model
family (torchtitan's state-dict adapters are the model).

The canonical megatron state uses the local-spec parameter names of an unsharded, unpipelined
GPTModel: global layer indices in `decoder.layers.{l}` and global expert ids in
`mlp.experts.local_experts.{e}`; it has no `output_layer.weight` when embeddings are tied. Each
canonical tensor is made of one or more HF tensors by a `Rule`; `QwenAdapter.split` and `merge` turn
one canonical tensor into its HF tensors and back, bit-exactly, so the gather / export / sync paths
can convert tensor by tensor without a full state. `engine_name` says which SGLang parameter an HF
tensor is loaded into (SGLang fuses q/k/v, gate/up and stacks experts), which the update-equality
check needs to compare the servers' checksums with the learner's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Dict, List, Mapping, Tuple

import torch

from ..parallel.sharded_state import Canonical
from .hf_config import ARCHITECTURES, CheckpointError, check_tensor_shapes
from .model import ModelConfig


@dataclass(frozen=True)
class Rule:
    """One canonical megatron tensor and the HF tensors it is made of."""

    megatron: str
    hf: Tuple[str, ...]
    kind: str  # "copy" (one HF tensor), "qkv" (q, k, v grouped per query group), "gated" ([gate; up])


class QwenAdapter:
    """Qwen2, Qwen3, Qwen2-MoE and Qwen3-MoE: one layout, told apart by the config's flags (QKV bias,
    QK layernorm, experts, a gated shared expert)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg

    # -- names and shapes ---------------------------------------------------------------------------

    @cached_property
    def rules(self) -> List[Rule]:
        cfg = self.cfg
        rules = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy")]
        for layer in range(cfg.num_hidden_layers):
            hf, mg = f"model.layers.{layer}.", f"decoder.layers.{layer}."
            attn = hf + "self_attn."
            rules.append(Rule(mg + "input_layernorm.weight", (hf + "input_layernorm.weight",), "copy"))
            rules.append(Rule(mg + "self_attention.linear_qkv.weight",
                              tuple(f"{attn}{p}_proj.weight" for p in "qkv"), "qkv"))
            if cfg.qkv_bias:
                rules.append(Rule(mg + "self_attention.linear_qkv.bias",
                                  tuple(f"{attn}{p}_proj.bias" for p in "qkv"), "qkv"))
            if cfg.qk_layernorm:
                rules.append(Rule(mg + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), "copy"))
                rules.append(Rule(mg + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), "copy"))
            rules.append(Rule(mg + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), "copy"))
            rules.append(Rule(mg + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",),
                              "copy"))
            mlp = hf + "mlp."
            if not cfg.is_moe:
                rules += _ffn_rules(mg + "mlp.", mlp)
                continue
            rules.append(Rule(mg + "mlp.router.weight", (mlp + "gate.weight",), "copy"))
            for expert in range(cfg.num_experts):
                rules += _ffn_rules(f"{mg}mlp.experts.local_experts.{expert}.", f"{mlp}experts.{expert}.")
            if cfg.shared_expert_intermediate_size:
                rules += _ffn_rules(mg + "mlp.shared_experts.", mlp + "shared_expert.")
                rules.append(Rule(mg + "mlp.shared_experts.gate_weight",
                                  (mlp + "shared_expert_gate.weight",), "copy"))
        rules.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"))
        if not cfg.tie_word_embeddings:
            rules.append(Rule("output_layer.weight", ("lm_head.weight",), "copy"))
        return rules

    @cached_property
    def rule_of(self) -> Dict[str, Rule]:
        """Canonical megatron name -> its rule."""
        return {rule.megatron: rule for rule in self.rules}

    @cached_property
    def hf_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Every HF tensor name of the checkpoint, in checkpoint order, with its shape."""
        cfg = self.cfg
        H, d = cfg.hidden_size, cfg.head_dim
        nq, nkv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, H)}

        def ffn(prefix: str, width: int) -> None:
            shapes[prefix + "gate_proj.weight"] = (width, H)
            shapes[prefix + "up_proj.weight"] = (width, H)
            shapes[prefix + "down_proj.weight"] = (H, width)

        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}."
            shapes[p + "input_layernorm.weight"] = (H,)
            for proj, rows in (("q", nq), ("k", nkv), ("v", nkv)):
                shapes[f"{p}self_attn.{proj}_proj.weight"] = (rows, H)
                if cfg.qkv_bias:
                    shapes[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
            if cfg.qk_layernorm:
                shapes[p + "self_attn.q_norm.weight"] = (d,)
                shapes[p + "self_attn.k_norm.weight"] = (d,)
            shapes[p + "self_attn.o_proj.weight"] = (H, nq)
            shapes[p + "post_attention_layernorm.weight"] = (H,)
            if not cfg.is_moe:
                ffn(p + "mlp.", cfg.intermediate_size)
                continue
            shapes[p + "mlp.gate.weight"] = (cfg.num_experts, H)
            for expert in range(cfg.num_experts):
                ffn(f"{p}mlp.experts.{expert}.", cfg.moe_intermediate_size)
            if cfg.shared_expert_intermediate_size:
                ffn(p + "mlp.shared_expert.", cfg.shared_expert_intermediate_size)
                shapes[p + "mlp.shared_expert_gate.weight"] = (1, H)
        shapes["model.norm.weight"] = (H,)
        if not cfg.tie_word_embeddings:
            shapes["lm_head.weight"] = (cfg.vocab_size, H)
        return shapes

    @cached_property
    def megatron_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Every canonical (full) megatron tensor name, in order, with its shape."""
        shapes = {}
        for rule in self.rules:
            parts = [self.hf_shapes[name] for name in rule.hf]
            shapes[rule.megatron] = parts[0] if rule.kind == "copy" else (
                sum(p[0] for p in parts),) + parts[0][1:]
        return shapes

    # -- one canonical tensor <-> its HF tensors ------------------------------------------------------

    def _qkv_groups(self) -> Tuple[int, int, int]:
        """(query groups, query heads per group, head dim)."""
        cfg = self.cfg
        return cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim

    def merge(self, rule: Rule, hf_state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The canonical tensor of `rule` from its HF tensors in `hf_state`. QKV: [q; k; v] (HF) ->
        megatron's fused layout, per query group [its q heads, its k, its v]."""
        parts = [hf_state[name] for name in rule.hf]
        if len({p.dtype for p in parts}) > 1:
            raise CheckpointError(f"{rule.hf}: mixed dtypes {[p.dtype for p in parts]} cannot be "
                                  f"fused into {rule.megatron}")
        if rule.kind == "copy":
            return parts[0]
        if rule.kind == "gated":
            return torch.cat(parts, dim=0)
        groups, per_group, d = self._qkv_groups()
        q, k, v = parts
        rest = q.shape[1:]
        return torch.cat([q.reshape(groups, per_group * d, *rest), k.reshape(groups, d, *rest),
                          v.reshape(groups, d, *rest)], dim=1).reshape(-1, *rest)

    def split(self, name: str, tensor: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
        """The HF tensors (name, tensor) of canonical tensor `name`, in checkpoint order; inverse
        of `merge`, bit-exact. Copies only where the HF tensor is not a view of contiguous rows."""
        rule = self.rule_of[name]
        if rule.kind == "copy":
            return [(rule.hf[0], tensor)]
        if rule.kind == "gated":
            return list(zip(rule.hf, tensor.chunk(2, dim=0)))
        groups, per_group, d = self._qkv_groups()
        rest = tensor.shape[1:]
        parts = tensor.reshape(groups, (per_group + 2) * d, *rest).split([per_group * d, d, d], dim=1)
        return [(hf, part.reshape(-1, *rest)) for hf, part in zip(rule.hf, parts)]

    # -- SGLang ----------------------------------------------------------------------------------------

    def engine_name(self, hf_name: str) -> str:
        """The SGLang parameter HF tensor `hf_name` is loaded into. SGLang concatenates the HF
        tensors of one parameter in checkpoint order (q, k, v; gate, up; expert by expert, w13 as
        [gate_e; up_e]), so that parameter's bytes are theirs in the order the stream yields them."""
        prefix, _, leaf = hf_name.rpartition(".")  # leaf: weight / bias
        head, _, proj = prefix.rpartition(".")
        if proj in ("q_proj", "k_proj", "v_proj"):
            return f"{head}.qkv_proj.{leaf}"
        if ".mlp.experts." in hf_name:
            layer_mlp = hf_name.split(".experts.")[0]
            return f"{layer_mlp}.experts.{'w2' if proj == 'down_proj' else 'w13'}_weight"
        if proj in ("gate_proj", "up_proj"):
            return f"{head}.gate_up_proj.{leaf}"
        return hf_name


def _ffn_rules(mg: str, hf: str) -> List[Rule]:
    return [Rule(mg + "linear_fc1.weight", (hf + "gate_proj.weight", hf + "up_proj.weight"), "gated"),
            Rule(mg + "linear_fc2.weight", (hf + "down_proj.weight",), "copy")]


ADAPTERS = {family: QwenAdapter for family in ARCHITECTURES}


def state_adapter(cfg: ModelConfig) -> QwenAdapter:
    """The adapter of `cfg`'s model family."""
    return ADAPTERS[cfg.family](cfg)


def hf_tensor_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every HF tensor name of `cfg`'s checkpoint, in checkpoint order, with its shape."""
    return state_adapter(cfg).hf_shapes


def megatron_tensor_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every canonical (full) megatron tensor name of `cfg`, in order, with its shape."""
    return state_adapter(cfg).megatron_shapes


def drop_ignored(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Tensors HF checkpoints may carry that are not weights of the model: rotary caches, and
    `lm_head.weight` duplicated next to tied embeddings."""
    return {name: t for name, t in hf_state.items()
            if not name.endswith("rotary_emb.inv_freq")
            and not (cfg.tie_word_embeddings and name == "lm_head.weight")}


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Canonical full megatron state from a HF state dict (validated first: names and shapes)."""
    adapter = state_adapter(cfg)
    hf_state = drop_ignored(hf_state, cfg)
    check_tensor_shapes({n: t.shape for n, t in hf_state.items()}, adapter.hf_shapes, "HF state")
    return {rule.megatron: adapter.merge(rule, hf_state) for rule in adapter.rules}


def megatron_to_hf(full_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """HF state dict from a canonical full megatron state (validated first); inverse of
    `hf_to_megatron`, bit-exact. Every HF tensor is its own contiguous copy."""
    adapter = state_adapter(cfg)
    check_tensor_shapes({n: t.shape for n, t in full_state.items()}, adapter.megatron_shapes,
                        "megatron full state")
    hf = {}
    for rule in adapter.rules:
        hf.update((n, t.clone(memory_format=torch.contiguous_format))
                  for n, t in adapter.split(rule.megatron, full_state[rule.megatron]))
    return {name: hf[name] for name in adapter.hf_shapes}


def canonical_state(cfg: ModelConfig) -> Canonical:
    """What `parallel.sharded_state` needs to know of `cfg`'s canonical state."""
    return Canonical(megatron_tensor_shapes(cfg), cfg.tie_word_embeddings,
                     cfg.num_experts if cfg.is_moe else 0)
