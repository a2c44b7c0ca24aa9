"""A tiny GRU language-model policy, its sampler and its per-token log-probs.

Sequences are a fixed-length prompt followed by up to `max_new` response tokens; after the first
<eos> the sampler writes <pad> and the response mask is False. Layout used throughout:

    tokens  [B, L]      prompt (P tokens) then response (L - P tokens)
    logp    [B, L - 1]  log pi(tokens[:, t+1] | tokens[:, :t+1]), one per predicted position
    mask    [B, L - 1]  True where the predicted token is a response token up to and including <eos>
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class PolicyConfig:
    embed_dim: int = 64
    hidden_dim: int = 128
    layers: int = 1


class GruPolicy(nn.Module):
    def __init__(self, vocab_size: int, cfg: PolicyConfig):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim)
        self.gru = nn.GRU(cfg.embed_dim, cfg.hidden_dim, num_layers=cfg.layers, batch_first=True)
        self.head = nn.Linear(cfg.hidden_dim, vocab_size)

    def forward(self, tokens: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens [B, L] -> (logits [B, L, V], GRU state [layers, B, H])."""
        out, state = self.gru(self.embed(tokens), state)
        return self.head(out), state

    def token_logprobs(self, tokens: Tensor) -> Tensor:
        """[B, L - 1] log-prob of every next token (with grad; the trainer's log pi)."""
        logits, _ = self(tokens[:, :-1])
        return torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


@dataclass(frozen=True)
class Rollout:
    """tokens [B, L]; behaviour_logp [B, L - 1] (log mu at sampling time, 0 off the mask);
    mask [B, L - 1] bool. See the module docstring for the layout."""

    tokens: Tensor
    behaviour_logp: Tensor
    mask: Tensor

    def responses(self, prompt_len: int) -> Tensor:
        return self.tokens[:, prompt_len:]

    def select(self, rows: slice) -> "Rollout":
        return Rollout(self.tokens[rows], self.behaviour_logp[rows], self.mask[rows])


@torch.no_grad()
def sample(policy: GruPolicy, prompts: Tensor, max_new: int, eos_id: int, pad_id: int,
           generator: torch.Generator | None, greedy: bool = False) -> Rollout:
    """Decode up to `max_new` tokens for each prompt [B, P], recording the sampling log-probs.

    The GRU state is carried step by step (no recomputation of the prefix). With `greedy` the
    argmax is taken (the evaluation policy); otherwise tokens are drawn at temperature 1 from
    `generator`, so the recorded log-probs are exactly the behaviour policy mu.
    """
    b, p = prompts.shape
    logits, state = policy(prompts)
    last = logits[:, -1]
    done = torch.zeros(b, dtype=torch.bool)
    new_tokens, new_logp, new_mask = [], [], []
    for _ in range(max_new):
        logp_all = torch.log_softmax(last.float(), -1)
        if greedy:
            tok = logp_all.argmax(-1)
        else:
            tok = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
        live = ~done
        new_tokens.append(torch.where(live, tok, pad_id))
        new_logp.append(torch.where(live, logp_all.gather(-1, tok[:, None]).squeeze(-1), 0.0))
        new_mask.append(live)
        done = done | (tok == eos_id)
        if bool(done.all()):
            break
        step_logits, state = policy(new_tokens[-1][:, None], state)
        last = step_logits[:, -1]
    pad = max_new - len(new_tokens)  # every row ended early: fill to the fixed length
    new_tokens += [torch.full((b,), pad_id)] * pad
    new_logp += [torch.zeros(b)] * pad
    new_mask += [torch.zeros(b, dtype=torch.bool)] * pad
    prompt_part = torch.zeros(b, p - 1)
    return Rollout(
        tokens=torch.cat([prompts, torch.stack(new_tokens, 1)], 1),
        behaviour_logp=torch.cat([prompt_part, torch.stack(new_logp, 1)], 1),
        mask=torch.cat([prompt_part.bool(), torch.stack(new_mask, 1)], 1),
    )
