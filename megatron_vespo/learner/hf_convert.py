"""Hugging Face <-> megatron-core weights for the Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE families.

Three layers, each usable alone:

* Config: `model_config_from_hf` reads a HF `config.json` dict into a `ModelConfig`;
  `hf_config_from_model` writes one that `transformers.AutoConfig` / `AutoModelForCausalLM` load.
* Full (unsharded) state: `hf_to_megatron` / `megatron_to_hf` are exact inverses between HF tensor
  names and a canonical megatron state. The canonical state uses the local-spec parameter names of
  an unsharded, unpipelined GPTModel: global layer indices in `decoder.layers.{l}` and global expert
  ids in `mlp.experts.local_experts.{e}`. It has no `output_layer.weight` when embeddings are tied.
* Live model: `load_full_state` gives every local parameter of a (possibly TP/PP/VPP/EP/ETP
  sharded) list of model chunks its slice of a full state; `gather_full_state` is the inverse and
  returns the full state on global rank 0. Both accept the local spec and the TransformerEngine
  spec names (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`, grouped-GEMM
  `mlp.experts.linear_fc1.weight{j}`).

HF directories: `load_hf_checkpoint` / `save_hf_checkpoint` (safetensors, single file or sharded
with an index), and `load_hf_into_model` / `export_model_to_hf` combining the above. Every check
runs before anything is loaded into a model or written to the target directory; a mismatch raises
`CheckpointError` naming the field or tensor and the expected versus found shape.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ..parallel.layout import ParallelLayout
from .model import DTYPES, ModelConfig

ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
_FAMILY_OF_ARCHITECTURE = {arch: family for family, arch in ARCHITECTURES.items()}

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# Fields that decide the weights or the forward pass: a checkpoint must agree on all of them with
# the model it is loaded into. (spec, params_dtype, dispatcher, aux-loss coefficient and
# max_position_embeddings do not change what the weights mean.)
_ARCHITECTURE_FIELDS = (
    "family", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
)
_DENSE_FIELDS = ("intermediate_size",)
_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
               "shared_expert_intermediate_size", "norm_topk_prob")

_MAX_LISTED = 20  # names listed per category in an error message


class CheckpointError(ValueError):
    """A checkpoint, config or state that does not fit the model (the message names what)."""


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def _family_of(hf_config: Mapping[str, Any]) -> str:
    model_type = hf_config.get("model_type")
    if model_type in ARCHITECTURES:
        return model_type
    for arch in hf_config.get("architectures") or ():
        if arch in _FAMILY_OF_ARCHITECTURE:
            return _FAMILY_OF_ARCHITECTURE[arch]
    raise CheckpointError(
        f"config.json: model_type={model_type!r} / architectures={hf_config.get('architectures')!r} "
        f"is not supported; supported model_type: {sorted(ARCHITECTURES)}")


def _rope_theta(hf_config: Mapping[str, Any]) -> float:
    """RoPE base from `rope_parameters` (transformers >= 5) or the flat `rope_theta` field; only
    plain RoPE is supported (megatron's GPTModel has no YaRN / dynamic scaling here)."""
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise CheckpointError(f"config.json: rope_parameters={rope!r} is not a mapping")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"config.json: rope_type={rope_type!r} (RoPE scaling) is not "
                              "supported; only rope_type='default'")
    return float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def model_config_from_hf(hf_config: Mapping[str, Any], **overrides) -> ModelConfig:
    """`ModelConfig` for a HF `config.json` dict; `overrides` set any ModelConfig field (e.g.
    `spec`, `params_dtype`, `moe_token_dispatcher`). Features the megatron model does not realise
    (sliding window, RoPE scaling, non-SiLU activations, dense layers inside an MoE model, biases
    other than Qwen2's QKV bias) raise `CheckpointError` naming the field."""
    family = _family_of(hf_config)
    get = hf_config.get
    moe = family.endswith("_moe")

    def unsupported(bad: bool, what: str) -> None:
        if bad:
            raise CheckpointError(f"config.json: {what} is not supported by the megatron model")

    def required(name: str):
        if name not in hf_config or hf_config[name] is None:
            raise CheckpointError(f"config.json: required field {name!r} is missing")
        return hf_config[name]

    unsupported(get("hidden_act", "silu") != "silu", f"hidden_act={get('hidden_act')!r}")
    unsupported(bool(get("use_sliding_window", False)), "use_sliding_window=true")
    if family.startswith("qwen3"):
        unsupported(bool(get("attention_bias", False)), "attention_bias=true")
    if family == "qwen2_moe":
        unsupported(not get("qkv_bias", True), "qkv_bias=false")
    if moe:
        unsupported(get("decoder_sparse_step", 1) != 1,
                    f"decoder_sparse_step={get('decoder_sparse_step')} (dense layers in an MoE model)")
        unsupported(bool(get("mlp_only_layers")), f"mlp_only_layers={get('mlp_only_layers')}")

    hidden = int(required("hidden_size"))
    heads = int(required("num_attention_heads"))
    # transformers' per-family defaults for absent optional fields.
    default_kv_heads = 4 if family == "qwen3_moe" else heads
    default_head_dim = 128 if family == "qwen3" else hidden // heads
    values: Dict[str, Any] = dict(
        family=family,
        vocab_size=int(required("vocab_size")),
        hidden_size=hidden,
        num_hidden_layers=int(required("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("num_key_value_heads") or default_kv_heads),
        head_dim=int(get("head_dim") or default_head_dim),
        rope_theta=_rope_theta(hf_config),
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
    )
    if moe:
        num_experts = get("num_experts", get("num_local_experts"))
        if num_experts is None:
            raise CheckpointError("config.json: required field 'num_experts' is missing")
        values.update(
            num_experts=int(num_experts),
            num_experts_per_tok=int(required("num_experts_per_tok")),
            moe_intermediate_size=int(required("moe_intermediate_size")),
            norm_topk_prob=bool(get("norm_topk_prob", False)),
            router_aux_loss_coef=float(get("router_aux_loss_coef", 0.001) or 0.0),
        )
        if "intermediate_size" in hf_config:  # unused by the MoE layers, kept for the round trip
            values["intermediate_size"] = int(hf_config["intermediate_size"])
        if family == "qwen2_moe":
            values["shared_expert_intermediate_size"] = int(get("shared_expert_intermediate_size", 5632))
    else:
        values["intermediate_size"] = int(required("intermediate_size"))
    dtype = get("dtype") or get("torch_dtype")
    if dtype in DTYPES:
        values["params_dtype"] = dtype
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"model_config_from_hf: unknown ModelConfig field(s) {unknown}")
    values.update(overrides)
    return ModelConfig(**values)


def hf_config_from_model(cfg: ModelConfig, dtype: Optional[str] = None) -> Dict[str, Any]:
    """A complete HF `config.json` dict for `cfg` (transformers 4.x and 5.x both read it).
    `dtype` names the dtype of the saved tensors (default `cfg.params_dtype`)."""
    dtype = dtype or cfg.params_dtype
    config: Dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_hidden_layers,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if cfg.family.startswith("qwen3"):
        config["attention_bias"] = False
    if cfg.family == "qwen2_moe":
        config["qkv_bias"] = True
    if cfg.is_moe:
        config.update(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            output_router_logits=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        if cfg.family == "qwen2_moe":
            config["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    return config


def check_same_architecture(checkpoint: ModelConfig, model: ModelConfig) -> None:
    """Raise `CheckpointError` listing every architecture field where the two configs differ."""
    names = _ARCHITECTURE_FIELDS + (_MOE_FIELDS if model.is_moe or checkpoint.is_moe else _DENSE_FIELDS)
    diffs = [f"{name}: checkpoint has {getattr(checkpoint, name)!r}, model has {getattr(model, name)!r}"
             for name in names if getattr(checkpoint, name) != getattr(model, name)]
    if diffs:
        raise CheckpointError("checkpoint config.json does not match the model config:\n  "
                              + "\n  ".join(diffs))


# ------------------------------------------------------------------------------------------------
# Name and layout rules between HF and the canonical megatron state
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """One canonical megatron tensor and the HF tensors it is made of."""

    megatron: str
    hf: Tuple[str, ...]
    kind: str  # "copy" (one HF tensor), "qkv" (q, k, v grouped per query group), "gated" ([gate; up])


def _rules(cfg: ModelConfig) -> List[_Rule]:
    rules = [_Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy")]
    for layer in range(cfg.num_hidden_layers):
        hf, mg = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        attn = hf + "self_attn."
        rules.append(_Rule(mg + "input_layernorm.weight", (hf + "input_layernorm.weight",), "copy"))
        rules.append(_Rule(mg + "self_attention.linear_qkv.weight",
                           tuple(f"{attn}{p}_proj.weight" for p in "qkv"), "qkv"))
        if cfg.qkv_bias:
            rules.append(_Rule(mg + "self_attention.linear_qkv.bias",
                               tuple(f"{attn}{p}_proj.bias" for p in "qkv"), "qkv"))
        if cfg.qk_layernorm:
            rules.append(_Rule(mg + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), "copy"))
            rules.append(_Rule(mg + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), "copy"))
        rules.append(_Rule(mg + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), "copy"))
        rules.append(_Rule(mg + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",),
                           "copy"))
        mlp = hf + "mlp."
        if not cfg.is_moe:
            rules += _ffn_rules(mg + "mlp.", mlp)
            continue
        rules.append(_Rule(mg + "mlp.router.weight", (mlp + "gate.weight",), "copy"))
        for expert in range(cfg.num_experts):
            rules += _ffn_rules(f"{mg}mlp.experts.local_experts.{expert}.", f"{mlp}experts.{expert}.")
        if cfg.shared_expert_intermediate_size:
            rules += _ffn_rules(mg + "mlp.shared_experts.", mlp + "shared_expert.")
            rules.append(_Rule(mg + "mlp.shared_experts.gate_weight", (mlp + "shared_expert_gate.weight",),
                               "copy"))
    rules.append(_Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"))
    if not cfg.tie_word_embeddings:
        rules.append(_Rule("output_layer.weight", ("lm_head.weight",), "copy"))
    return rules


def _ffn_rules(mg: str, hf: str) -> List[_Rule]:
    return [_Rule(mg + "linear_fc1.weight", (hf + "gate_proj.weight", hf + "up_proj.weight"), "gated"),
            _Rule(mg + "linear_fc2.weight", (hf + "down_proj.weight",), "copy")]


def hf_tensor_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every HF tensor name of `cfg`'s checkpoint, in checkpoint order, with its shape."""
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


def megatron_tensor_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every canonical (full) megatron tensor name of `cfg`, in order, with its shape."""
    hf = hf_tensor_shapes(cfg)
    shapes = {}
    for rule in _rules(cfg):
        parts = [hf[name] for name in rule.hf]
        shapes[rule.megatron] = parts[0] if rule.kind == "copy" else (
            sum(p[0] for p in parts),) + parts[0][1:]
    return shapes


def _names_list(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def check_tensor_shapes(found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]],
                        what: str) -> None:
    """Raise `CheckpointError` naming missing / unexpected tensors and every shape mismatch."""
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    wrong = [f"{n}: expected shape {tuple(expected[n])}, found {tuple(found[n])}"
             for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_names_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_names_list(unexpected)}")
    if wrong:
        more = f"\n    ... and {len(wrong) - _MAX_LISTED} more" if len(wrong) > _MAX_LISTED else ""
        problems.append(f"shape mismatches ({len(wrong)}):\n    " + "\n    ".join(wrong[:_MAX_LISTED]) + more)
    if problems:
        raise CheckpointError(f"{what} does not match the model config:\n  " + "\n  ".join(problems))


def _qkv_groups(cfg: ModelConfig) -> Tuple[int, int, int]:
    """(query groups, query heads per group, head dim)."""
    return cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim


def _pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """[q; k; v] (HF) -> megatron's fused layout: per query group [its q heads, its k, its v]."""
    groups, per_group, d = _qkv_groups(cfg)
    rest = q.shape[1:]
    return torch.cat([q.reshape(groups, per_group * d, *rest), k.reshape(groups, d, *rest),
                      v.reshape(groups, d, *rest)], dim=1).reshape(-1, *rest)


def _unpack_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> List[torch.Tensor]:
    groups, per_group, d = _qkv_groups(cfg)
    rest = qkv.shape[1:]
    parts = qkv.reshape(groups, (per_group + 2) * d, *rest).split([per_group * d, d, d], dim=1)
    return [part.reshape(-1, *rest).clone() for part in parts]


def _drop_ignored(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Tensors HF checkpoints may carry that are not weights of the model: rotary caches, and
    `lm_head.weight` duplicated next to tied embeddings."""
    return {name: t for name, t in hf_state.items()
            if not name.endswith("rotary_emb.inv_freq")
            and not (cfg.tie_word_embeddings and name == "lm_head.weight")}


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Canonical full megatron state from a HF state dict (validated first: names and shapes)."""
    hf_state = _drop_ignored(hf_state, cfg)
    check_tensor_shapes({n: t.shape for n, t in hf_state.items()}, hf_tensor_shapes(cfg), "HF state")
    return {rule.megatron: _merge_rule(rule, hf_state, cfg) for rule in _rules(cfg)}


def _merge_rule(rule: _Rule, hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    parts = [hf_state[name] for name in rule.hf]
    if len({p.dtype for p in parts}) > 1:
        raise CheckpointError(f"{rule.hf}: mixed dtypes {[p.dtype for p in parts]} cannot be fused "
                              f"into {rule.megatron}")
    if rule.kind == "copy":
        return parts[0]
    if rule.kind == "qkv":
        return _pack_qkv(*parts, cfg)
    return torch.cat(parts, dim=0)


def megatron_to_hf(full_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """HF state dict from a canonical full megatron state (validated first); inverse of
    `hf_to_megatron`, bit-exact."""
    check_tensor_shapes({n: t.shape for n, t in full_state.items()}, megatron_tensor_shapes(cfg),
                        "megatron full state")
    hf = {}
    for rule in _rules(cfg):
        tensor = full_state[rule.megatron]
        if rule.kind == "copy":
            parts = [tensor]
        elif rule.kind == "qkv":
            parts = _unpack_qkv(tensor, cfg)
        else:
            parts = [part.clone() for part in tensor.chunk(2, dim=0)]
        hf.update(zip(rule.hf, parts))
    order = hf_tensor_shapes(cfg)
    return {name: hf[name] for name in order}


# ------------------------------------------------------------------------------------------------
# Live (sharded) models
# ------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
# TransformerEngine spec: the norm before attention / the dense MLP is fused into the next linear.
_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


@dataclass
class _Shard:
    """Where one local parameter sits in the canonical full state."""

    local_name: str
    canonical: str
    param: torch.nn.Parameter
    dim: Optional[int]  # split dimension, None when this rank holds the whole tensor
    size: int  # ranks the tensor is split over (TP, or ETP for experts)
    rank: int
    group: Any
    gated: bool  # linear_fc1 [gate; up]: each rank holds [gate_r; up_r]
    tied_copy: bool  # last stage's output layer under PP with tied embeddings


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def _check_layout(layout: ParallelLayout) -> None:
    from megatron.core import parallel_state as ps

    expert_tp = layout.tp if layout.etp is None else layout.etp  # etp None: the same as tp
    pairs = dict(
        tp=(layout.tp, ps.get_tensor_model_parallel_world_size()),
        pp=(layout.pp, ps.get_pipeline_model_parallel_world_size()),
        ep=(layout.ep, ps.get_expert_model_parallel_world_size()),
        etp=(expert_tp, ps.get_expert_tensor_parallel_world_size()),
        vpp=(layout.vpp, ps.get_virtual_pipeline_model_parallel_world_size()))
    wrong = [f"{k}: layout {mine}, parallel_state {theirs}" for k, (mine, theirs) in pairs.items()
             if mine != theirs]
    if wrong:
        raise ValueError("the parallel layout does not match megatron's initialised parallel_state "
                         f"(call layout.initialize() first): {'; '.join(wrong)}")


def _canonical_name(name: str, layer_offset: int, expert_offset: int, cfg: ModelConfig) -> str:
    """Canonical full-state name of a local parameter name (local spec or TE spec)."""
    if name == "output_layer.weight" and cfg.tie_word_embeddings:
        return "embedding.word_embeddings.weight"
    match = _LAYER.match(name)
    if not match:
        return name
    layer, rest = layer_offset + int(match.group(1)), match.group(2)
    rest = _TE_NORMS.get(rest, rest)
    expert = _LOCAL_EXPERT.match(rest)
    if expert:
        rest = f"mlp.experts.local_experts.{expert_offset + int(expert.group(1))}.{expert.group(2)}"
    expert = _GROUPED_EXPERT.match(rest)
    if expert:
        rest = f"mlp.experts.local_experts.{expert_offset + int(expert.group(2))}.{expert.group(1)}.weight"
    return f"decoder.layers.{layer}.{rest}"


def _local_shards(model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig,
                  layout: ParallelLayout) -> List[_Shard]:
    """Every parameter of this rank's chunks with its canonical name and slice; unknown names and
    shapes that do not fit `cfg` raise before anything is touched."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    _check_layout(layout)
    tp = (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
          ps.get_tensor_model_parallel_group())
    etp = (ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank(),
           ps.get_expert_tensor_parallel_group())
    expert_offset = 0
    if cfg.is_moe:
        ep_size = ps.get_expert_model_parallel_world_size()
        if cfg.num_experts % ep_size:
            raise ValueError(f"num_experts={cfg.num_experts} is not divisible by ep={ep_size}")
        expert_offset = ps.get_expert_model_parallel_rank() * (cfg.num_experts // ep_size)
    expected = megatron_tensor_shapes(cfg)
    shards, errors = [], []
    for chunk in model_chunks:
        model = _unwrap(chunk)
        layer_offset = get_transformer_layer_offset(model.config, vp_stage=getattr(model, "vp_stage", None))
        for name, param in model.named_parameters():
            canonical = _canonical_name(name, layer_offset, expert_offset, cfg)
            if canonical not in expected:
                errors.append(f"model parameter {name} (canonical {canonical}) has no counterpart in "
                              f"the {cfg.family} checkpoint layout")
                continue
            is_expert = ".mlp.experts." in canonical
            size, rank, group = etp if is_expert else tp
            split = bool(getattr(param, "tensor_model_parallel", False)) and size > 1
            dim = int(getattr(param, "partition_dim", 0)) if split else None
            shard = _Shard(name, canonical, param, dim, size if split else 1, rank if split else 0,
                           group, gated=split and dim == 0 and canonical.endswith("linear_fc1.weight"),
                           tied_copy=name == "output_layer.weight" and cfg.tie_word_embeddings)
            local_shape = list(expected[canonical])
            if dim is not None:
                if local_shape[dim] % size:
                    errors.append(f"{canonical}: dimension {dim} of {tuple(local_shape)} is not "
                                  f"divisible by the {'expert ' if is_expert else ''}TP size {size}")
                    continue
                local_shape[dim] //= size
            if tuple(param.shape) != tuple(local_shape):
                where = "" if name == canonical else f" (model parameter {name})"
                errors.append(f"{canonical}{where}: expected local shape {tuple(local_shape)} from "
                              f"the config, model has {tuple(param.shape)}")
                continue
            shards.append(shard)
    if errors:
        more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
        raise CheckpointError(f"the model does not match the model config ({len(errors)} "
                              "parameters):\n  " + "\n  ".join(errors[:_MAX_LISTED]) + more)
    return shards


def _take_slice(full: torch.Tensor, shard: _Shard) -> torch.Tensor:
    if shard.dim is None:
        return full
    if shard.gated:  # [gate; up] -> [gate_r; up_r]
        gate_up = full.reshape(2, shard.size, full.shape[0] // (2 * shard.size), *full.shape[1:])
        return gate_up[:, shard.rank].reshape(-1, *full.shape[1:])
    return full.chunk(shard.size, dim=shard.dim)[shard.rank]


def _join_slices(pieces: List[torch.Tensor], shard: _Shard) -> torch.Tensor:
    if shard.gated:
        rows = pieces[0].shape[0] // 2
        return torch.cat([p[:rows] for p in pieces] + [p[rows:] for p in pieces], dim=0)
    return torch.cat(pieces, dim=shard.dim)


def load_full_state(model_chunks: Sequence[torch.nn.Module], full_state: Mapping[str, torch.Tensor],
                    cfg: ModelConfig, layout: ParallelLayout) -> None:
    """Copy each local parameter's slice of the canonical `full_state` into the model chunks.

    No communication: every rank needs `full_state` (only its own slices are read). Everything is
    validated (state names and shapes against `cfg`, every local parameter's slice against the
    parameter) before the first copy. Load before building the optimizer: fp32 main copies that an
    optimizer already made are not updated.
    """
    check_tensor_shapes({n: t.shape for n, t in full_state.items()}, megatron_tensor_shapes(cfg),
                        "megatron full state")
    shards = _local_shards(model_chunks, cfg, layout)
    with torch.no_grad():
        for shard in shards:
            shard.param.copy_(_take_slice(full_state[shard.canonical], shard))


def gather_full_state(model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig,
                      layout: ParallelLayout) -> Optional[Dict[str, torch.Tensor]]:
    """The canonical full state (CPU tensors in the parameters' dtype) on global rank 0, None on
    the other ranks. Collective: every rank of the world must call it.

    TP/ETP slices are all-gathered within their group; then each tensor is sent to rank 0 by the
    lowest rank holding it (layers of other pipeline stages, experts of other EP ranks).
    """
    import torch.distributed as dist

    # Agree on validity first, so that a model that does not fit raises on every rank instead of
    # leaving the others waiting in a collective.
    problem: Optional[Exception] = None
    try:
        shards = _local_shards(model_chunks, cfg, layout)
    except (CheckpointError, ValueError) as exc:
        shards, problem = [], exc
    reports: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if problem is None else str(problem))
    if problem is not None:
        raise problem
    failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if failed:
        raise CheckpointError(f"gather_full_state failed on rank {failed[0][0]}: {failed[0][1]}")

    local: Dict[str, torch.Tensor] = {}
    for shard in shards:
        if shard.tied_copy:  # the first stage's embedding is the canonical copy
            continue
        tensor = shard.param.detach()
        if shard.dim is not None:
            pieces = [torch.empty_like(tensor) for _ in range(shard.size)]
            dist.all_gather(pieces, tensor.contiguous(), group=shard.group)
            tensor = _join_slices(pieces, shard)
        local[shard.canonical] = tensor

    holdings: List[Optional[Dict[str, Tuple[Tuple[int, ...], str]]]] = [None] * dist.get_world_size()
    dist.all_gather_object(holdings, {n: (tuple(t.shape), str(t.dtype).split(".")[-1])
                                      for n, t in local.items()})
    owner: Dict[str, int] = {}
    for rank, held in enumerate(holdings):
        for name in held:
            owner.setdefault(name, rank)
    expected = megatron_tensor_shapes(cfg)
    missing = [name for name in expected if name not in owner]
    if missing:  # every rank sees the same holdings, so every rank raises (no rank is left waiting)
        raise CheckpointError(f"no rank holds these tensors of the config: {_names_list(missing)}")

    me, dst = dist.get_rank(), 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    result: Optional[Dict[str, torch.Tensor]] = {} if me == dst else None
    for name in expected:
        src = owner[name]
        if src == me and me == dst:
            result[name] = local[name].to("cpu", copy=True)
        elif src == me:
            dist.send(local[name].contiguous(), dst)
        elif me == dst:
            shape, dtype = holdings[src][name]
            buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            dist.recv(buffer, src)
            result[name] = buffer.cpu()
    return result


# ------------------------------------------------------------------------------------------------
# HF directories
# ------------------------------------------------------------------------------------------------


def _safetensors_files(path: Path) -> Tuple[List[Path], Optional[Dict[str, str]]]:
    index = path / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from exc
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise CheckpointError(f"{index} names shard files that do not exist: {absent}")
        return [path / f for f in files], weight_map
    if (path / SAFETENSORS_FILE).is_file():
        return [path / SAFETENSORS_FILE], None
    present = sorted(p.name for p in path.iterdir())
    raise CheckpointError(f"{path}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} (found {present}); "
                          "only safetensors checkpoints are supported")


class _Checkpoint:
    """A HF checkpoint directory whose config and tensor headers have been checked against each
    other; tensors are read on demand (`read`), so a rank can load only what it holds."""

    def __init__(self, path, **overrides) -> None:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory")
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{path}: no {CONFIG_FILE}")
        try:
            hf_config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from exc
        self.path = path
        self.cfg = model_config_from_hf(hf_config, **overrides)

        files, weight_map = _safetensors_files(path)
        located: Dict[str, Tuple[Path, Tuple[int, ...]]] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    if name in located:
                        raise CheckpointError(f"tensor {name} is stored twice: in "
                                              f"{located[name][0].name} and {file.name}")
                    located[name] = (file, tuple(handle.get_slice(name).get_shape()))
        if weight_map is not None:
            wrong = [f"{n} (index: {f}, found in: {located[n][0].name if n in located else 'no file'})"
                     for n, f in weight_map.items() if n not in located or located[n][0].name != f]
            if wrong:
                raise CheckpointError(f"{path / SAFETENSORS_INDEX} does not match the shard files: "
                                      f"{_names_list(wrong)}")
        shapes = {n: shape for n, (_, shape) in located.items()}
        check_tensor_shapes({n: shapes[n] for n in _drop_ignored(shapes, self.cfg)},
                            hf_tensor_shapes(self.cfg), f"checkpoint {path}")
        self.files = {n: file for n, (file, _) in located.items()}

    def read(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """The named tensors, each file opened once."""
        from safetensors import safe_open

        by_file: Dict[Path, List[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, wanted in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                out.update((name, handle.get_tensor(name)) for name in wanted)
        return out


def check_hf_checkpoint(path, cfg: ModelConfig) -> None:
    """Raise `CheckpointError` naming the field or tensor where the HF checkpoint at `path` does not
    hold `cfg`'s model. Reads config.json and the safetensors headers only, no tensor data."""
    check_same_architecture(_Checkpoint(path).cfg, cfg)


def load_hf_checkpoint(path, **overrides) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """(ModelConfig, HF state dict) of a HF checkpoint directory: config.json plus either one
    model.safetensors or shards listed in model.safetensors.index.json. Names and shapes are
    checked against config.json from the safetensors headers before any tensor data is read.
    `overrides` set ModelConfig fields (see `model_config_from_hf`)."""
    checkpoint = _Checkpoint(path, **overrides)
    names = list(hf_tensor_shapes(checkpoint.cfg))
    state = checkpoint.read(names)
    return checkpoint.cfg, {name: state[name] for name in names}


def _shard_groups(tensors: Mapping[str, torch.Tensor], max_shard_bytes: Optional[int]) -> List[List[str]]:
    groups: List[List[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def save_hf_checkpoint(path, cfg: ModelConfig, hf_state: Mapping[str, torch.Tensor], *,
                       overwrite: bool = False, max_shard_bytes: Optional[int] = None) -> Path:
    """Write config.json and the weights (one model.safetensors; shards plus an index when the
    total exceeds `max_shard_bytes`) as a HF checkpoint directory `path`.

    The state is validated against `cfg` first; everything is written into a temporary directory
    next to `path` that is renamed into place at the end, so a failure leaves no partial output
    (and, with `overwrite`, the previous checkpoint intact)."""
    import safetensors.torch

    path = Path(path)
    state = _drop_ignored(hf_state, cfg)
    check_tensor_shapes({n: t.shape for n, t in state.items()}, hf_tensor_shapes(cfg), "HF state")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    dtypes = {t.dtype for t in state.values()}
    names = {v: k for k, v in DTYPES.items()}
    dtype = names.get(next(iter(dtypes))) if len(dtypes) == 1 else None

    tensors: Dict[str, torch.Tensor] = {}
    storages = set()
    for name in hf_tensor_shapes(cfg):
        tensor = state[name].detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # safetensors refuses shared memory
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config_from_model(cfg, dtype=dtype), indent=2) + "\n")
        groups = _shard_groups(tensors, max_shard_bytes)
        if len(groups) == 1:
            safetensors.torch.save_file(tensors, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, group in enumerate(groups, start=1):
                file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
                safetensors.torch.save_file({n: tensors[n] for n in group}, str(tmp / file),
                                            metadata={"format": "pt"})
                weight_map.update({n: file for n in group})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and restored on failure."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_hf_into_model(path, model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig,
                       layout: ParallelLayout) -> ModelConfig:
    """Load a HF checkpoint directory into this rank's model chunks. No communication: each rank
    reads only the tensors its parameters are sliced from (its layers, its experts). The
    checkpoint's config must match `cfg` on every architecture field, and its tensor headers
    `cfg`'s names and shapes, before any parameter is written. Returns the checkpoint's config."""
    checkpoint = _Checkpoint(path)
    check_same_architecture(checkpoint.cfg, cfg)
    shards = _local_shards(model_chunks, cfg, layout)
    rules = {rule.megatron: rule for rule in _rules(cfg)}
    slices = []  # read and slice everything first: an I/O error leaves the model untouched
    for shard in shards:
        rule = rules[shard.canonical]
        full = _merge_rule(rule, checkpoint.read(rule.hf), cfg)
        slices.append(_take_slice(full, shard).clone())
    with torch.no_grad():
        for shard, local in zip(shards, slices):
            shard.param.copy_(local)
    return checkpoint.cfg


def export_model_to_hf(path, model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig,
                       layout: ParallelLayout, *, overwrite: bool = False,
                       max_shard_bytes: Optional[int] = None) -> None:
    """Gather the model to rank 0 and write it as a HF checkpoint directory there. Collective:
    every rank must call it; every rank returns once the directory is in place, and every rank
    raises if rank 0 could not write it."""
    import torch.distributed as dist

    full = gather_full_state(model_chunks, cfg, layout)
    failure: List[Optional[str]] = [None]
    error: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            save_hf_checkpoint(path, cfg, megatron_to_hf(full, cfg), overwrite=overwrite,
                               max_shard_bytes=max_shard_bytes)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = exc
            failure[0] = f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise CheckpointError(f"export to {path} failed on rank 0: {failure[0]}")


__all__ = [
    "ARCHITECTURES", "CheckpointError", "check_same_architecture", "check_tensor_shapes",
    "export_model_to_hf", "gather_full_state", "hf_config_from_model", "hf_tensor_shapes",
    "hf_to_megatron", "load_full_state", "load_hf_checkpoint", "load_hf_into_model",
    "megatron_tensor_shapes", "megatron_to_hf", "model_config_from_hf", "save_hf_checkpoint",
]
