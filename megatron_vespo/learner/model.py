"""Build megatron-core GPTModel chunks for the Qwen2 / Qwen3 / Qwen3-MoE (and Qwen2-MoE) shapes.

`ModelConfig` is the `model:` section of the project config, named after the Hugging Face config
fields users already know. `transformer_config` maps it (plus the parallel layout) onto megatron's
`TransformerConfig`; `build_model_chunks` builds one GPTModel per virtual pipeline stage with the
TransformerEngine spec on GPUs and the local spec on CPU (`spec: auto`), overridable.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..parallel.layout import ParallelLayout

FAMILIES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
SPECS = ("auto", "local", "te")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DISPATCHERS = ("alltoall", "allgather")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture (Hugging Face field names) and how megatron realises it."""

    family: str = "qwen3"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # MoE (families *_moe): routed experts, top-k, expert FFN width, optional shared expert.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    moe_token_dispatcher: str = "alltoall"
    # Realisation: module spec (auto: TransformerEngine when it and a GPU are present) and dtype.
    spec: str = "auto"
    params_dtype: str = "float32"

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.family in FAMILIES, f"family={self.family!r} is unknown; allowed: {list(FAMILIES)}")
        need(self.spec in SPECS, f"spec={self.spec!r} is unknown; allowed: {list(SPECS)}")
        need(self.params_dtype in DTYPES, f"params_dtype={self.params_dtype!r}; allowed: {list(DTYPES)}")
        need(self.moe_token_dispatcher in DISPATCHERS,
             f"moe_token_dispatcher={self.moe_token_dispatcher!r}; allowed: {list(DISPATCHERS)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.is_moe:
            need(self.num_experts >= 2, f"num_experts must be >= 2 for family {self.family}")
            need(1 <= self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok must be in [1, num_experts], got {self.num_experts_per_tok}")
            need(self.moe_intermediate_size >= 1, "moe_intermediate_size must be >= 1")
        else:
            need(self.num_experts == 0, f"num_experts must be 0 for dense family {self.family}")
            need(self.intermediate_size >= 1, "intermediate_size must be >= 1")
        need(self.shared_expert_intermediate_size == 0 or self.family == "qwen2_moe",
             "shared_expert_intermediate_size > 0 needs family qwen2_moe (Qwen3-MoE has none)")

    @property
    def is_moe(self) -> bool:
        return self.family.endswith("_moe")

    @property
    def qk_layernorm(self) -> bool:
        return self.family.startswith("qwen3")

    @property
    def qkv_bias(self) -> bool:
        return self.family.startswith("qwen2")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.params_dtype]


def check_moe_layout(cfg: ModelConfig, layout: ParallelLayout) -> None:
    """Refuse the MoE layouts megatron-core trains wrongly or not at all."""
    if not cfg.is_moe:
        if layout.ep > 1:
            raise ValueError(f"parallel.ep={layout.ep} needs an MoE model.family")
        return
    if cfg.num_experts % layout.ep:
        raise ValueError(f"model.num_experts ({cfg.num_experts}) must be divisible by parallel.ep "
                         f"({layout.ep})")
    if layout.ep == 1 and layout.expert_tp != layout.tp:
        # megatron-core 0.16 marks experts of an EP=1 model as dense parameters, reduced over DP only:
        # with ETP < TP each TP rank holds a partial expert gradient that is never summed.
        raise ValueError(f"parallel.etp={layout.expert_tp} differs from tp={layout.tp} with ep=1: "
                         "megatron-core does not reduce expert gradients across TP then; use "
                         "etp = tp (the default) or ep > 1")
    if layout.tp > 1 and not layout.sequence_parallel:
        raise ValueError("MoE with parallel.tp > 1 needs parallel.sequence_parallel: true "
                         "(megatron-core refuses to train it otherwise)")


def use_transformer_engine(cfg: ModelConfig) -> bool:
    """Resolve `spec`: TE needs both the package and a CUDA device."""
    available = torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None
    if cfg.spec == "te" and not available:
        raise ValueError("model.spec=te needs transformer_engine and a CUDA device; use spec=local on CPU")
    return cfg.spec == "te" or (cfg.spec == "auto" and available)


def transformer_config(cfg: ModelConfig, layout: ParallelLayout, **overrides):
    """megatron `TransformerConfig` for this model and layout (fusions only where TE/GPU run them)."""
    from megatron.core.transformer import TransformerConfig

    check_moe_layout(cfg, layout)
    te = use_transformer_engine(cfg)
    if layout.cp > 1 and not te:
        raise ValueError("parallel.cp > 1 needs TransformerEngine attention (GPU); the local spec has "
                         "no context-parallel attention")
    moe = {}
    if cfg.is_moe:
        moe = dict(
            num_moe_experts=cfg.num_experts,
            moe_router_topk=cfg.num_experts_per_tok,
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            # Top-k on logits then softmax over the k == softmax, top-k, renormalise (norm_topk_prob);
            # without renormalisation megatron must softmax over all experts first.
            moe_router_pre_softmax=not cfg.norm_topk_prob,
            # router_aux_loss_coef is the learner's own per-sequence, step-normalised loss
            # (moe.aux_loss): megatron's per-micro-batch one would make training depend on the
            # micro-batch split and the padding.
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_router_dtype="fp32",
            moe_grouped_gemm=te,
            moe_shared_expert_intermediate_size=cfg.shared_expert_intermediate_size or None,
            moe_shared_expert_gate=cfg.shared_expert_intermediate_size > 0,
        )
    kwargs = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        params_dtype=cfg.dtype,
        pipeline_dtype=cfg.dtype,
        bf16=cfg.dtype == torch.bfloat16,
        fp16=cfg.dtype == torch.float16,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=te,
        bias_activation_fusion=False,
        bias_dropout_fusion=te,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # Read by megatron's checks even for dense models (allgather refuses variable lengths).
        moe_token_dispatcher_type=cfg.moe_token_dispatcher,
        **moe,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(cfg: ModelConfig):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    experts = cfg.num_experts or None
    if use_transformer_engine(cfg):
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=experts is not None, qk_layernorm=cfg.qk_layernorm)
    return specs.get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False,
                                          qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")


def build_model_chunks(cfg: ModelConfig, layout: ParallelLayout, config=None) -> list:
    """One GPTModel per virtual pipeline stage of this rank (one chunk without VPP).

    Needs the layout's process groups (`layout.initialize()`) and, on CPU, the CPU shim applied.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = config or transformer_config(cfg, layout)
    spec = layer_spec(cfg)
    chunks = []
    for vp_stage in range(layout.vpp or 1):
        stage = vp_stage if layout.vpp else None
        chunks.append(GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.rope_theta,
            vp_stage=stage,
        ))
    return chunks
