"""HF `config.json` <-> `ModelConfig` for the Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE families, and
the checks every HF path shares: `CheckpointError` names the field or tensor and the expected
versus found shape.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Dict, Mapping, Optional, Sequence

from .model import DTYPES, ModelConfig

ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
_FAMILY_OF_ARCHITECTURE = {arch: family for family, arch in ARCHITECTURES.items()}
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


def names_list(names: Sequence[str]) -> str:
    """The first names, and how many more."""
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
        problems.append(f"missing tensors ({len(missing)}): {names_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {names_list(unexpected)}")
    if wrong:
        more = f"\n    ... and {len(wrong) - _MAX_LISTED} more" if len(wrong) > _MAX_LISTED else ""
        problems.append(f"shape mismatches ({len(wrong)}):\n    " + "\n    ".join(wrong[:_MAX_LISTED]) + more)
    if problems:
        raise CheckpointError(f"{what} does not match the model config:\n  " + "\n  ".join(problems))

