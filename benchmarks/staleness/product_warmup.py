"""The product study's starting point: a tiny Qwen3-MoE (transformers, fp32) taught the synthetic
task (`megatron_vespo.tasks.synthetic`) for a few supervised steps, saved as an HF checkpoint.

Every cell of the study loads it (`train.init_hf_checkpoint`) and the fleet starts from it, so all
cells share one warm-up and only the loss, N, R3 and the seed differ. The warm-up is short on
purpose: the policy should already answer in the task's format (about K characters, then <eos>)
but pick the prompt's class only part of the time, leaving room for RL to improve.

Targets are K characters drawn uniformly from the prompt's class, then <eos>; the loss is the
cross-entropy of the answer tokens only. Prompts come from the task's training stream under a seed
no cell uses (`WARMUP_TASK_SEED`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_vespo.learner.hf_config import hf_config_from_model
from megatron_vespo.learner.model import ModelConfig
from megatron_vespo.tasks.synthetic import CLASSES, synthetic_prompt_text
from megatron_vespo.tasks.tiny_tokenizer import build_tiny_tokenizer

WARMUP_TASK_SEED = 10_007
IGNORE = -100  # transformers' label for positions without a loss


def warmup_batch(tokenizer, rng: np.random.Generator, first_index: int, size: int,
                 answer_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both [size, prompt + answer_length + 1]: prompt, K in-class
    characters, <eos>; labels are IGNORE on the prompt."""
    rows, labels = [], []
    for index in range(first_index, first_index + size):
        text, target = synthetic_prompt_text(WARMUP_TASK_SEED, index, "train")
        prompt = tokenizer(text).input_ids
        answer = "".join(rng.choice(sorted(CLASSES[target]), answer_length))
        response = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(prompt + response)
        labels.append([IGNORE] * len(prompt) + response)
    return torch.tensor(rows), torch.tensor(labels)


def warm_up_checkpoint(model: ModelConfig, out: Path, steps: int, lr: float, batch_size: int = 32,
                       answer_length: int = 8, seed: int = 0) -> list[float]:
    """Train a freshly initialised `model` (std 0.02 matrices, unit norms: the learner's own
    initialisation scheme) for `steps` AdamW steps and save it to `out` (safetensors, fp32).
    Returns the loss per step."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**hf_config_from_model(model, dtype="float32"))
    policy = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:  # the routers too: transformers starts some of them at zero, which ties experts
                param.normal_(0.0, 0.02)
    tokenizer = build_tiny_tokenizer()
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    policy.train()
    losses = []
    for step in range(steps):
        input_ids, labels = warmup_batch(tokenizer, rng, step * batch_size, batch_size, answer_length)
        loss = policy(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    policy.eval()
    policy.save_pretrained(out)
    return losses
