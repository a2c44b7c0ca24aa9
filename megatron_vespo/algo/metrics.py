"""Step metrics as additive tensor statistics, reduced once per optimizer step.

A loss never calls `.item()`: it returns `MetricSums`, plain sums (and maxima) of per-sequence or
per-token quantities. Micro-batches are merged with `merge`, the parallel layer reduces each scope
once per step (`reduce`), and only `finalize` turns sums into floats.

Scopes decide how ranks combine, so each sequence is counted once:
  seq  per-sequence statistics; identical on every CP rank (built from CP-summed `SequenceStats`),
       so they are summed over data-parallel ranks only.
  tok  per-token statistics; each CP rank holds different tokens, summed over DP x CP.
  max  maxima over DP x CP. A key ending in `_min` holds the maximum of the negated value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from .importance import SequenceStats

Reducer = Callable[[Tensor], Tensor]


def _max(x: Tensor) -> Tensor:
    """Max of a possibly empty tensor (-inf when empty)."""
    return torch.cat([x.detach().double().reshape(-1), x.new_full((1,), -math.inf, dtype=torch.float64)]).max()


@dataclass
class MetricSums:
    seq: dict[str, Tensor] = field(default_factory=dict)
    tok: dict[str, Tensor] = field(default_factory=dict)
    max: dict[str, Tensor] = field(default_factory=dict)

    def merge(self, other: "MetricSums") -> "MetricSums":
        """Combine two sets of statistics (micro-batches, or two metric builders)."""

        def add(a: dict, b: dict, op) -> dict:
            out = dict(a)
            for k, v in b.items():
                out[k] = op(out[k], v) if k in out else v
            return out

        return MetricSums(
            seq=add(self.seq, other.seq, torch.add),
            tok=add(self.tok, other.tok, torch.add),
            max=add(self.max, other.max, torch.maximum),
        )

    def reduce(self, *, sum_seq: Reducer, sum_tok: Reducer, max_all: Reducer) -> "MetricSums":
        """Reduce each scope with one collective on a stacked tensor (keys sorted so that every rank
        stacks in the same order; the key set depends on configuration only, never on data)."""

        def apply(d: dict[str, Tensor], fn: Reducer) -> dict[str, Tensor]:
            if not d:
                return {}
            keys = sorted(d)
            reduced = fn(torch.stack([d[k].double().reshape(()) for k in keys]))
            return dict(zip(keys, reduced.unbind()))

        return MetricSums(apply(self.seq, sum_seq), apply(self.tok, sum_tok), apply(self.max, max_all))

    def finalize(self) -> dict[str, float]:
        """User-facing metrics (names documented in the README's metric reference)."""
        s = {k: v.item() for k, v in {**self.seq, **self.tok}.items()}
        m = {k: (-v.item() if k.endswith("_min") else v.item()) for k, v in self.max.items()}
        out: dict[str, float] = {}

        def ratio(num: float, den: float) -> float:
            return num / den if den > 0 else math.nan

        if "loss" in s:
            out["loss"] = s["loss"]
        if "n_tok" in s:
            out["tokens"] = s["n_tok"]
        for name in ("clip_low", "clip_high"):
            if name in s:
                out[f"loss/{name}_frac"] = ratio(s[name], s["n_tok"])
        for name in ("bapo_c_low", "bapo_c_high"):  # the adaptive clip bounds (largest chosen)
            if name in m:
                out[f"loss/{name}"] = m[name]
        if "n_seq" in s:
            n = s["n_seq"]
            out["is/num_seqs"] = n
            out["is/nonfinite_seqs_zeroed"] = s["n_seq_dropped"]
            out["is/seq_len_mean"] = ratio(s["len_sum"], n)
            mean = ratio(s["log_w_sum"], n)
            out["is/log_w_mean"] = mean
            out["is/log_w_std"] = math.sqrt(max(ratio(s["log_w_sq_sum"], n) - mean * mean, 0.0))
            out["is/log_w_max"] = m["log_w_max"]
            out["is/log_w_min"] = m["log_w_min"]
            out["is/w_mean"] = ratio(s["w_sum"], n)
        if "phi_sum_pos" in s:
            phi_sum = s["phi_sum_pos"] + s["phi_sum_neg"]
            phi_sq_sum = s["phi_sq_sum_pos"] + s["phi_sq_sum_neg"]
            out["phi/mean"] = ratio(phi_sum, s["n_seq"])
            out["phi/sq_mean"] = ratio(phi_sq_sum, s["n_seq"])
            # Normalised effective sample size (sum phi)^2 / (n sum phi^2), in (0, 1].
            out["phi/ess"] = ratio(phi_sum * phi_sum, s["n_seq"] * phi_sq_sum)
            for sign in ("pos", "neg"):
                n = s[f"n_seq_{sign}"]
                z = ratio(s[f"phi_sum_{sign}"], n)
                out[f"phi/z_{sign}"] = z
                out[f"phi/sq_mean_{sign}"] = ratio(s[f"phi_sq_sum_{sign}"], n)
                # E_Q[W] = E_mu[phi W] / E_mu[phi]: the quantity the bound's constraint C limits.
                out[f"phi/q_w_{sign}"] = ratio(s[f"phi_w_sum_{sign}"], s[f"phi_sum_{sign}"])
                # Z * K * C with C estimated by E_Q[W]; equals K * E_mu[phi W].
                out[f"phi/bound_{sign}"] = ratio(s[f"phi_kw_sum_{sign}"], n)
                # E[phi^2] / (Z K C): <= 1 whenever the bound holds (it holds pointwise: phi <= K W).
                out[f"phi/bound_ratio_{sign}"] = ratio(
                    s[f"phi_sq_sum_{sign}"], s[f"phi_kw_sum_{sign}"]
                )
        if "mm_tokens" in s:
            out["mismatch/k3_kl"] = ratio(s["mm_k3_sum"], s["mm_tokens"])
            out["mismatch/extreme_frac"] = ratio(s["mm_extreme"], s["mm_tokens"])
            out["mismatch/max_abs_delta"] = m["mm_abs_delta_max"]
        return out


def sequence_metrics(
    seq: SequenceStats,
    advantages: Tensor,
    phi: Optional[Tensor] = None,
    bound_constants: tuple[float, float] = (math.inf, math.inf),
) -> MetricSums:
    """Importance-weight statistics, once per sequence (valid sequences only).

    Args:
        seq: [S] per-sequence stats (CP-summed). advantages: [S].
        phi: [S] the sequence weights the loss applied, if it has any.
        bound_constants: K for (A >= 0, A < 0) (see `kernel.variance_bound_constant`).
    """
    valid = seq.valid
    v = valid.double()
    log_w = torch.where(valid, seq.log_w.double(), 0.0)
    has_tokens = seq.num_tokens > 0
    out = MetricSums(
        seq={
            "n_seq": v.sum(),
            "n_seq_dropped": (has_tokens & ~valid).double().sum(),
            "len_sum": (seq.num_tokens * v).sum(),
            "log_w_sum": log_w.sum(),
            "log_w_sq_sum": (log_w * log_w).sum(),
            "w_sum": (log_w.exp() * v).sum(),
        },
        max={
            "log_w_max": _max(torch.where(valid, seq.log_w.double(), -math.inf)),
            "log_w_min": _max(torch.where(valid, -seq.log_w.double(), -math.inf)),
        },
    )
    if phi is not None:
        w = log_w.exp()
        phi = torch.where(valid, phi.double(), 0.0)
        for sign, in_sign, k in (
            ("pos", advantages >= 0, bound_constants[0]),
            ("neg", advantages < 0, bound_constants[1]),
        ):
            sel = (valid & in_sign).double()
            out.seq[f"n_seq_{sign}"] = sel.sum()
            out.seq[f"phi_sum_{sign}"] = (phi * sel).sum()
            out.seq[f"phi_sq_sum_{sign}"] = (phi * phi * sel).sum()
            out.seq[f"phi_w_sum_{sign}"] = (phi * w * sel).sum()
            out.seq[f"phi_kw_sum_{sign}"] = (k * phi * w * sel).sum()
    return out


def mismatch_metrics(
    old_logp: Tensor, engine_logp: Tensor, mask: Tensor, extreme_threshold: float = 1.0
) -> MetricSums:
    """Train/inference mismatch between the trainer's old log-probs and the engine's, per token.

    k3 = rho - 1 - log rho with log rho = log pi_old - log mu_engine (samples come from the engine, so
    this estimates KL(mu_engine || pi_old) and is >= 0 per token). Non-finite tokens are excluded.
    All inputs [T].
    """
    delta = (old_logp.detach().double() - engine_logp.detach().double())
    m = mask.bool() & torch.isfinite(delta)
    d = torch.where(m, delta, 0.0)
    k3 = torch.expm1(d) - d
    return MetricSums(
        tok={
            "mm_tokens": m.double().sum(),
            "mm_k3_sum": torch.where(m, k3, 0.0).sum(),
            "mm_extreme": (m & (d.abs() > extreme_threshold)).double().sum(),
        },
        max={"mm_abs_delta_max": _max(torch.where(m, d.abs(), 0.0))},
    )
