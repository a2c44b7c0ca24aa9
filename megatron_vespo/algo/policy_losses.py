"""Policy losses behind one interface, chosen by name from a registry.

Every loss takes the same `PolicyLossInput`: this rank's tokens (log pi with grad, behaviour log-probs,
the mask, which sequence each token belongs to), per-sequence scalars already reduced over context
parallelism (`SequenceStats`), and global denominators for the whole optimizer step. A loss only ever
reads its local tokens plus those scalars, so the same function is exact sharded or unsharded: the sum
of its values over all DP x CP ranks and micro-batches is the global loss.

    vespo   -sg[phi(W)] A sum_t log pi_t / N_tokens       (Eq. 20 kernel, no ratio, no clip)
    seq_is  -sg[W] A sum_t log pi_t / N_tokens            (naive sequence IS: unbiased, unbounded)
    grpo    -min(rho_t A, clip(rho_t, 1-el, 1+eh) A) / N_tokens        (token PPO clip)
    cispo   -sg[clip(rho_t, lo, 1+eh)] A log pi_t / N_tokens            (clipped, detached token IS)
    gspo    -min(s_i A, clip(s_i) A) / (T_i N_seqs), s_i = exp(log W_i / T_i)  (length-normalised)
    sapo    -sigmoid(tau (rho_t - 1)) 4/tau A / (T_i N_seqs)            (soft gate instead of a clip)
    topr    -sg[w_i] A sum_t log pi_t / N_tokens, w_i = 1 (A >= 0), min(W_i, 1) (A < 0)
                                                   (Tapered Off-Policy REINFORCE, Le Roux et al. 2025)
    bapo    -min(rho_t A, clip(rho_t, c_lo, c_hi) A) / N_tokens, bounds raised until the positive
            tokens' share of the live gradient reaches a target (Xi et al. 2025, BAPO)

Sequences with a non-finite log-ratio contribute nothing and are counted in the metrics.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .importance import LocalSequenceSums, SequenceStats, token_log_ratio
from .kernel import KernelConstants, variance_bound_constant, vespo_phi
from .metrics import MetricSums, sequence_metrics


@dataclass(frozen=True)
class Denominators:
    """Global counts for one optimizer step (all micro-batches, DP x CP), computed before the step.

    tokens: response tokens (the token-mean normaliser); sequences: sequences with response tokens
    (the sequence-mean normaliser). Sequences later dropped for non-finite log-ratios stay counted.
    input_tokens: every real token, prompts included (the MoE router load-balancing loss's
    normaliser; 0 where nobody needs it).
    """

    tokens: float
    sequences: float
    input_tokens: float = 0.0

    def __post_init__(self) -> None:
        if not self.tokens > 0 or not self.sequences > 0:
            raise ValueError(
                f"the optimizer step has no response tokens (tokens={self.tokens}, "
                f"sequences={self.sequences}): check the loss mask of the batch"
            )


@dataclass(frozen=True)
class PolicyLossInput:
    """Local tokens of one micro-batch plus sequence scalars; shapes T (local tokens), S (sequences).

    logp: [T] log pi with grad. behaviour_logp: [T] the ratio's denominator (old policy, or the
    engine's with the mismatch fold; see `importance.behaviour_logprobs`). mask: [T] response tokens.
    seq_index: [T] int64 sequence of each token. advantages: [S]. seq: CP-reduced `SequenceStats`.
    local: this rank's per-sequence log pi sums and token counts (`importance.local_sequence_sums`),
    from which the sequence-level losses are computed without another pass over the tokens.
    """

    logp: Tensor
    behaviour_logp: Tensor
    mask: Tensor
    seq_index: Tensor
    advantages: Tensor
    seq: SequenceStats
    local: LocalSequenceSums
    denom: Denominators

    def __post_init__(self) -> None:
        t = self.logp.shape
        if self.logp.dim() != 1:
            raise ValueError(f"logp must be 1-D [T], got shape {tuple(t)}")
        for name in ("behaviour_logp", "mask", "seq_index"):
            if getattr(self, name).shape != t:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, logp {tuple(t)}")
        for name, value in (("advantages", self.advantages), ("local.logp_sum", self.local.logp_sum)):
            if value.shape != (self.seq.num_seqs,):
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}, expected ({self.seq.num_seqs},)"
                )
        if self.seq_index.dtype != torch.int64:
            raise ValueError(f"seq_index must be int64, got {self.seq_index.dtype}")

    @cached_property
    def contributing(self) -> Tensor:
        """[T] bool: response tokens of valid sequences."""
        return self.mask.bool() & self.seq.valid[self.seq_index]

    @property
    def token_advantages(self) -> Tensor:
        return self.advantages.float()[self.seq_index]

    def masked_logp(self) -> Tensor:
        """log pi with non-contributing tokens replaced by 0, so a NaN there cannot reach a gradient."""
        return torch.where(self.contributing, self.logp.float(), 0.0)

    def inverse_seq_len(self) -> Tensor:
        """[T] 1 / T_i of each token's whole sequence (T_i summed over CP ranks)."""
        return (1.0 / self.seq.num_tokens.clamp(min=1)).float()[self.seq_index]


@dataclass(frozen=True)
class PolicyLossOutput:
    loss: Tensor  # scalar: this rank's share of the global loss
    metrics: MetricSums
    # [S_valid] the detached per-sequence coefficient of sequence-level losses (phi for vespo, W for
    # seq_is) of this rank's valid sequences, for histograms; None for token-level losses.
    seq_coef: Optional[Tensor] = None


@dataclass(frozen=True)
class PolicyLoss:
    name: str
    params_type: type
    fn: Callable[[PolicyLossInput, Any], PolicyLossOutput]

    def __call__(self, inp: PolicyLossInput, params: Optional[Any] = None) -> PolicyLossOutput:
        return self.fn(inp, self.params_type() if params is None else params)


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register(name: str, params_type: type):
    def wrap(fn):
        POLICY_LOSSES[name] = PolicyLoss(name, params_type, fn)
        return fn

    return wrap


def get_policy_loss(name: str) -> PolicyLoss:
    if name not in POLICY_LOSSES:
        raise ValueError(f"algorithm.loss={name!r} is unknown; choose one of {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def _token_stats(inp: PolicyLossInput, loss: Tensor, **counts: Tensor) -> MetricSums:
    # Contributing tokens, counted per sequence: this rank's response tokens of valid sequences.
    n_tok = torch.where(inp.seq.valid, inp.local.num_tokens, 0.0).sum(dtype=torch.float64)
    tok = {"loss": loss.detach().double(), "n_tok": n_tok}
    tok.update({k: v.sum(dtype=torch.float64) for k, v in counts.items()})
    return MetricSums(tok=tok)


def _weighted_reinforce(inp: PolicyLossInput, seq_weight: Tensor) -> Tensor:
    """-sum_i sg[w_i] A_i sum_t log pi_t / N_tokens over this rank's tokens, from the per-sequence
    log pi sums: the gradient reaches each token through their one-pass backward. Invalid
    sequences (a NaN log pi among them) contribute 0 and a zero gradient."""
    valid = inp.seq.valid
    coef = torch.where(valid, seq_weight.detach().float() * inp.advantages.float(), 0.0)
    return -(coef * torch.where(valid, inp.local.logp_sum, 0.0)).sum() / inp.denom.tokens


@register("vespo", KernelConstants)
def vespo_loss(inp: PolicyLossInput, p: KernelConstants) -> PolicyLossOutput:
    phi = torch.where(inp.seq.valid, vespo_phi(inp.seq.log_w, inp.advantages, **asdict(p)), 0.0)
    loss = _weighted_reinforce(inp, phi)
    k = (variance_bound_constant(*p.for_sign(True)), variance_bound_constant(*p.for_sign(False)))
    metrics = sequence_metrics(inp.seq, inp.advantages, phi, k).merge(_token_stats(inp, loss))
    return PolicyLossOutput(loss, metrics, phi[inp.seq.valid].detach())


@dataclass(frozen=True)
class SeqIsParams:
    pass


@register("seq_is", SeqIsParams)
def seq_is_loss(inp: PolicyLossInput, p: SeqIsParams) -> PolicyLossOutput:
    w = torch.where(inp.seq.valid, inp.seq.log_w.exp(), 0.0)
    loss = _weighted_reinforce(inp, w)
    # phi(W) = W: sup phi(w)/w = 1.
    metrics = sequence_metrics(inp.seq, inp.advantages, w, (1.0, 1.0)).merge(_token_stats(inp, loss))
    return PolicyLossOutput(loss, metrics, w[inp.seq.valid].detach())


@dataclass(frozen=True)
class ClipParams:
    eps_low: float = 0.2
    eps_high: float = 0.28

    def __post_init__(self) -> None:
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"clip needs 0 <= eps_low < 1 and eps_high >= 0, got "
                             f"eps_low={self.eps_low}, eps_high={self.eps_high}")


def _clipped_surrogate(ratio: Tensor, adv: Tensor, p: ClipParams) -> tuple[Tensor, Tensor, Tensor]:
    """min(ratio A, clip(ratio) A) and where the clip is active on the low / high side."""
    clipped = ratio.clamp(1.0 - p.eps_low, 1.0 + p.eps_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    low = (adv < 0) & (ratio < 1.0 - p.eps_low)
    high = (adv > 0) & (ratio > 1.0 + p.eps_high)
    return surrogate, low, high


@register("grpo", ClipParams)
def grpo_loss(inp: PolicyLossInput, p: ClipParams) -> PolicyLossOutput:
    r, _ = token_log_ratio(inp.masked_logp(), inp.behaviour_logp)
    surrogate, low, high = _clipped_surrogate(r.exp(), inp.token_advantages, p)
    keep = inp.contributing
    loss = -torch.where(keep, surrogate, 0.0).sum() / inp.denom.tokens
    metrics = sequence_metrics(inp.seq, inp.advantages).merge(
        _token_stats(inp, loss, clip_low=low & keep, clip_high=high & keep)
    )
    return PolicyLossOutput(loss, metrics)


@dataclass(frozen=True)
class GspoParams(ClipParams):
    eps_low: float = 3e-4
    eps_high: float = 4e-4


@register("gspo", GspoParams)
def gspo_loss(inp: PolicyLossInput, p: GspoParams) -> PolicyLossOutput:
    seq_ratio = (inp.seq.log_w / inp.seq.num_tokens.clamp(min=1).float()).exp()
    logp = inp.masked_logp()
    # Value s_i on every token, gradient s_i * grad log pi_t (GSPO's token-level form).
    token_ratio = seq_ratio[inp.seq_index] * (logp - logp.detach()).exp()
    surrogate, low, high = _clipped_surrogate(token_ratio, inp.token_advantages, p)
    keep = inp.contributing
    per_token = torch.where(keep, surrogate * inp.inverse_seq_len(), 0.0)
    loss = -per_token.sum() / inp.denom.sequences
    metrics = sequence_metrics(inp.seq, inp.advantages).merge(
        _token_stats(inp, loss, clip_low=low & keep, clip_high=high & keep)
    )
    return PolicyLossOutput(loss, metrics)


@dataclass(frozen=True)
class SapoParams:
    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self) -> None:
        if not (self.tau_pos > 0 and self.tau_neg > 0):
            raise ValueError(f"sapo temperatures must be > 0, got tau_pos={self.tau_pos}, "
                             f"tau_neg={self.tau_neg}")


@register("sapo", SapoParams)
def sapo_loss(inp: PolicyLossInput, p: SapoParams) -> PolicyLossOutput:
    r, _ = token_log_ratio(inp.masked_logp(), inp.behaviour_logp)
    adv = inp.token_advantages
    tau = torch.where(adv > 0, p.tau_pos, p.tau_neg)
    gate = torch.sigmoid(tau * (r.exp() - 1.0)) * (4.0 / tau)
    keep = inp.contributing
    per_token = torch.where(keep, gate * adv * inp.inverse_seq_len(), 0.0)
    loss = -per_token.sum() / inp.denom.sequences
    metrics = sequence_metrics(inp.seq, inp.advantages).merge(_token_stats(inp, loss))
    return PolicyLossOutput(loss, metrics)


@dataclass(frozen=True)
class CispoParams:
    eps_low: Optional[float] = None  # None: no lower clip (MiniMax-M1's setting)
    eps_high: float = 0.28

    def __post_init__(self) -> None:
        if (self.eps_low is not None and not 0 <= self.eps_low < 1) or self.eps_high < 0:
            raise ValueError(f"cispo needs 0 <= eps_low < 1 (or null) and eps_high >= 0, got "
                             f"eps_low={self.eps_low}, eps_high={self.eps_high}")


@register("cispo", CispoParams)
def cispo_loss(inp: PolicyLossInput, p: CispoParams) -> PolicyLossOutput:
    r, _ = token_log_ratio(inp.logp.detach(), inp.behaviour_logp)
    rho = r.exp()
    low_bound = None if p.eps_low is None else 1.0 - p.eps_low
    weight = rho.clamp(low_bound, 1.0 + p.eps_high)
    keep = inp.contributing
    loss = -(weight * inp.token_advantages * inp.masked_logp()).sum() / inp.denom.tokens
    low = torch.zeros_like(keep) if low_bound is None else (rho < low_bound)
    metrics = sequence_metrics(inp.seq, inp.advantages).merge(
        _token_stats(inp, loss, clip_low=low & keep, clip_high=(rho > 1.0 + p.eps_high) & keep)
    )
    return PolicyLossOutput(loss, metrics)


@dataclass(frozen=True)
class ToprParams:
    neg_max: float = 1.0  # the truncation of W for A < 0 (TOPR's [0, 1])

    def __post_init__(self) -> None:
        if not self.neg_max > 0:
            raise ValueError(f"topr needs neg_max > 0, got {self.neg_max}")


@register("topr", ToprParams)
def topr_loss(inp: PolicyLossInput, p: ToprParams) -> PolicyLossOutput:
    """Positive samples: plain REINFORCE (no importance weight: pushing up a good sample is safe
    whoever sampled it); negative samples: the sequence weight W truncated to [0, neg_max]."""
    w = torch.where(inp.advantages >= 0, 1.0, inp.seq.log_w.exp().clamp(max=p.neg_max))
    w = torch.where(inp.seq.valid, w, 0.0)
    loss = _weighted_reinforce(inp, w)
    metrics = sequence_metrics(inp.seq, inp.advantages).merge(_token_stats(inp, loss))
    return PolicyLossOutput(loss, metrics, w[inp.seq.valid].detach())


@dataclass(frozen=True)
class BapoParams:
    """Ratio bounds (explicit, not 1 -+ eps): c_lo from low_start up to low_max, then c_hi from
    high_start up to high_max, in `step`s, until positive / negative live contribution >= target.
    Defaults: the BAPO authors' published recipe."""

    low_start: float = 0.6
    low_max: float = 0.8
    high_start: float = 1.2
    high_max: float = 2.0
    step: float = 0.05
    target: float = 1.0

    def __post_init__(self) -> None:
        if not (0 < self.low_start <= self.low_max < 1 < self.high_start <= self.high_max):
            raise ValueError(f"bapo needs 0 < low_start <= low_max < 1 < high_start <= high_max, got "
                             f"{self.low_start}, {self.low_max}, {self.high_start}, {self.high_max}")
        if not (self.step > 0 and self.target > 0):
            raise ValueError(f"bapo needs step > 0 and target > 0, got {self.step}, {self.target}")


def bapo_bounds(rho: Tensor, adv: Tensor, keep: Tensor, p: BapoParams) -> tuple[float, float]:
    """(c_lo, c_hi) for tokens with ratios `rho` and advantages `adv` ([T]; `keep` the counted
    ones). A token's gradient is live unless the clip is active (A > 0 and rho > c_hi, or A < 0 and
    rho < c_lo); its contribution is rho |A|. Raising c_lo silences more negative tokens, raising
    c_hi lets more positive ones through: both raise the positive share."""
    weight = torch.where(keep, rho * adv.abs(), 0.0).double()
    pos, neg = keep & (adv > 0), keep & (adv < 0)

    def balanced(c_lo: float, c_hi: float) -> bool:
        p_live = weight[pos & (rho <= c_hi)].sum()
        n_live = weight[neg & (rho >= c_lo)].sum()
        return bool(n_live == 0 or p_live >= p.target * n_live)

    def grid(start: float, stop: float) -> list[float]:
        return [min(start + k * p.step, stop)
                for k in range(math.ceil((stop - start) / p.step - 1e-9) + 1)]

    c_lo, c_hi = p.low_start, p.high_start
    for c_lo in grid(p.low_start, p.low_max):
        if balanced(c_lo, c_hi):
            return c_lo, c_hi
    for c_hi in grid(p.high_start, p.high_max):
        if balanced(c_lo, c_hi):
            break
    return c_lo, c_hi


@register("bapo", BapoParams)
def bapo_loss(inp: PolicyLossInput, p: BapoParams) -> PolicyLossOutput:
    """The bounds are chosen on the tokens of this call, so the loss is the step's only where a step
    is one call (the config refuses bapo elsewhere); not split-invariant by definition."""
    r, _ = token_log_ratio(inp.masked_logp(), inp.behaviour_logp)
    rho, adv, keep = r.exp(), inp.token_advantages, inp.contributing
    c_lo, c_hi = bapo_bounds(rho.detach(), adv, keep, p)
    surrogate, low, high = _clipped_surrogate(rho, adv, ClipParams(1.0 - c_lo, c_hi - 1.0))
    loss = -torch.where(keep, surrogate, 0.0).sum() / inp.denom.tokens
    metrics = sequence_metrics(inp.seq, inp.advantages).merge(
        _token_stats(inp, loss, clip_low=low & keep, clip_high=high & keep)).merge(
        MetricSums(max={"bapo_c_low": torch.tensor(c_lo, dtype=torch.float64),
                        "bapo_c_high": torch.tensor(c_hi, dtype=torch.float64)}))
    return PolicyLossOutput(loss, metrics)
