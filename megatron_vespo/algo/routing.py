"""MoE routing-stability metrics as additive statistics (pure: tensors in, `RoutingSums` out).

Inputs are this rank's response tokens' routing decisions, one row per (token, MoE layer):
  ids         [N, L, k] int64 top-k expert ids; a row holding any -1 means "no route recorded"
              (as does an id >= num_experts where that is known) and is excluded.
  probs       [N, L, k] the selected (gated) probabilities, optional.
  probs_full  [N, L, E] the router's full probability rows, optional.
  mask        [N] bool, the tokens to count (response tokens).

Everything ratio-like or nonlinear in counts (fractions, means, KL means, load CV, max violation)
is stored as plain SUMS, one tensor per statistic: per layer [L] (rows, mismatches, KL sums, ...),
per layer and expert [L, E] (assignment counts), or a scalar; they are summed over the ranks that
hold different tokens (`RoutingSums.reduce`: one collective for all of them) and turned into floats
by `finalize_routing`, so the result over many ranks is exactly the result over the concatenated
batch. The names and shapes depend on (L, E, which inputs were given) only, never on data.

User-facing names (`finalize_routing`):
  {prefix}_topk_mismatch_frac[/layer_i]  fraction of (token, layer) rows whose top-k SET differs
  {prefix}_any_layer_mismatch_frac       fraction of tokens with at least one differing layer
  {prefix}_overlap_mean[/layer_i]        mean |A ∩ B| / k
  moe/router_kl[/layer_i]                mean KL(old || new) of the full router rows
  moe/router_kl_max                      max over rows
  moe/selected_mass_change[/layer_i]     mean of (new mass on new top-k) - (old mass on old top-k)
  moe/selected_mass_abs_change[/layer_i] mean absolute value of the same
  moe/expert_load_cv[/layer_i]           std / mean of per-expert assignment counts (mean over layers)
  moe/expert_load_max_violation[/layer_i] max_e load_e / mean_e load - 1 (mean over layers)
  moe/routing_confidence[/layer_i]       mean selected probability mass per (token, layer)
  moe/router_entropy[/layer_i]           mean entropy (nats) of the full router rows
Overall fractions and means are weighted by rows (pooled over layers); the load statistics, which
are per-layer distributions, are averaged over the layers that received any assignment.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from .metrics import _max

__all__ = [
    "RoutingSums",
    "route_agreement",
    "router_drift",
    "expert_load",
    "finalize_routing",
    "load_matrix",
]

_AGREE_RE = re.compile(r"^agree\[(.+)\]/tokens$")
Reducer = Callable[[Tensor], Tensor]


def _through_flat(d: dict[str, Tensor], fn: Reducer) -> dict[str, Tensor]:
    """`fn` applied once to all of `d` laid end to end as float64 (names sorted, so every rank
    lays them out alike), split back into the same names and shapes."""
    if not d:
        return {}
    keys = sorted(d)
    flat = fn(torch.cat([d[k].detach().double().reshape(-1) for k in keys]))
    out, at = {}, 0
    for k in keys:
        out[k] = flat[at:at + d[k].numel()].view(d[k].shape)
        at += d[k].numel()
    return out


@dataclass
class RoutingSums:
    """Routing statistics of some tokens: `sums` name -> tensor ([L], [L, E] or []) that add over
    tokens and ranks; `maxima` name -> scalar tensor that takes the max."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    maxima: dict[str, Tensor] = field(default_factory=dict)

    def merge(self, other: "RoutingSums") -> "RoutingSums":
        sums, maxima = dict(self.sums), dict(self.maxima)
        for k, v in other.sums.items():
            sums[k] = sums[k] + v if k in sums else v
        for k, v in other.maxima.items():
            maxima[k] = torch.maximum(maxima[k], v) if k in maxima else v
        return RoutingSums(sums, maxima)

    def reduce(self, sum_all: Reducer, max_all: Reducer) -> "RoutingSums":
        """Over ranks: every sum in one flat float64 collective, every maximum in another."""
        return RoutingSums(_through_flat(self.sums, sum_all), _through_flat(self.maxima, max_all))

    def cpu(self) -> "RoutingSums":
        """On the host, in one device-to-host copy per kind (finalising reads every value)."""
        return RoutingSums(_through_flat(self.sums, Tensor.cpu),
                           _through_flat(self.maxima, Tensor.cpu))


def _check_ids(ids: Tensor, name: str) -> None:
    if ids.dim() != 3:
        raise ValueError(f"{name} must be [N, L, k], got shape {tuple(ids.shape)}")


def _recorded(ids: Tensor, num_experts: Optional[int] = None) -> Tensor:
    """[N, L] bool: every one of the k ids of the row is a real expert id."""
    ok = ids >= 0
    if num_experts is not None:
        ok = ok & (ids < num_experts)
    return ok.all(-1)


def _token_mask(mask: Tensor, n: int) -> Tensor:
    mask = mask.reshape(-1).bool()
    if mask.numel() != n:
        raise ValueError(f"mask has {mask.numel()} entries, ids have {n} tokens")
    return mask


def _agree_key(prefix: str, what: str) -> str:
    return f"agree[{prefix}]/{what}"


# --------------------------------------------------------------------------------------------------
# 1. agreement between two sources of routes
# --------------------------------------------------------------------------------------------------


def route_agreement(a_ids: Tensor, b_ids: Tensor, mask: Tensor, prefix: str = "moe/route") -> RoutingSums:
    """Top-k agreement between two routing sources (e.g. engine vs old-policy forward: prefix
    "moe/route"; old-policy vs current forward: prefix "moe/drift").

    Args:
        a_ids, b_ids: [N, L, k] int64 top-k ids (-1: not recorded). The comparison is of SETS
            (order-insensitive); ids within a row are assumed distinct (as top-k ids are).
        mask: [N] bool tokens to count.
    A (token, layer) row counts when the token is in `mask` and both sources recorded it; a token
    counts for the any-layer fraction when it has at least one such row.

    Returns `RoutingSums` with [L] rows / mismatching rows / summed overlap fraction, and the
    counted / any-mismatch tokens.
    """
    _check_ids(a_ids, "a_ids")
    _check_ids(b_ids, "b_ids")
    if a_ids.shape != b_ids.shape:
        raise ValueError(f"a_ids {tuple(a_ids.shape)} and b_ids {tuple(b_ids.shape)} differ in shape")
    if "]" in prefix:
        raise ValueError(f"prefix must not contain ']': {prefix!r}")
    n, num_layers, k = a_ids.shape
    tok = _token_mask(mask, n)
    valid = tok[:, None] & _recorded(a_ids) & _recorded(b_ids)  # [N, L]
    a = a_ids.detach()
    b = b_ids.detach()
    same_set = (a.sort(-1).values == b.sort(-1).values).all(-1)  # [N, L]
    mismatch = valid & ~same_set
    # |A ∩ B|: for each id of A, whether B holds it (ids in a row are distinct).
    inter = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1).double()  # [N, L]
    overlap = torch.where(valid, inter / max(k, 1), 0.0)

    return RoutingSums({
        _agree_key(prefix, "tokens"): valid.any(-1).double().sum(),
        _agree_key(prefix, "any_mismatch_tokens"): mismatch.any(-1).double().sum(),
        _agree_key(prefix, "rows"): valid.double().sum(0),
        _agree_key(prefix, "mismatch"): mismatch.double().sum(0),
        _agree_key(prefix, "overlap"): overlap.sum(0),
    })


# --------------------------------------------------------------------------------------------------
# 2. router drift between two forwards
# --------------------------------------------------------------------------------------------------


def _selected_mass(probs_full: Tensor, ids: Tensor) -> Tensor:
    """[N, L] sum of probs_full over the row's top-k ids (ids must be valid where used)."""
    return probs_full.gather(-1, ids.clamp(0, probs_full.shape[-1] - 1)).sum(-1)


def router_drift(
    old_probs_full: Tensor, new_probs_full: Tensor, old_ids: Tensor, new_ids: Tensor, mask: Tensor
) -> RoutingSums:
    """Router drift between an old and a new forward of the same tokens.

    Args:
        old_probs_full, new_probs_full: [N, L, E] router probability rows.
        old_ids, new_ids: [N, L, k] top-k ids chosen by each forward (-1: not recorded).
        mask: [N] bool tokens to count.
    Per counted row (token in mask, both ids recorded, both rows finite):
        KL(old || new) = sum_e p log(p / q) (0 log 0 = 0; q is floored at the float64 tiny so a
        vanished expert gives a large but finite value), and
        mass change = sum_{e in new_ids} q_e - sum_{e in old_ids} p_e.
    Returns `RoutingSums` with [L] row counts and sums and the largest KL.
    """
    _check_ids(old_ids, "old_ids")
    _check_ids(new_ids, "new_ids")
    if old_probs_full.shape != new_probs_full.shape or old_probs_full.dim() != 3:
        raise ValueError(
            f"probability rows must both be [N, L, E]: {tuple(old_probs_full.shape)}, "
            f"{tuple(new_probs_full.shape)}"
        )
    n, num_layers, num_experts = old_probs_full.shape
    if old_ids.shape[:2] != (n, num_layers) or new_ids.shape[:2] != (n, num_layers):
        raise ValueError("ids and probability rows disagree on [N, L]")
    tok = _token_mask(mask, n)
    p = old_probs_full.detach().double()
    q = new_probs_full.detach().double()
    finite = torch.isfinite(p).all(-1) & torch.isfinite(q).all(-1)
    valid = (
        tok[:, None] & _recorded(old_ids, num_experts) & _recorded(new_ids, num_experts) & finite
    )
    p = torch.where(valid[..., None], p, 0.0)
    q = torch.where(valid[..., None], q, 1.0)
    tiny = torch.finfo(torch.float64).tiny
    kl = (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(tiny))).sum(-1)
    kl = torch.where(valid, kl, 0.0)
    change = _selected_mass(q, new_ids.detach()) - _selected_mass(p, old_ids.detach())
    change = torch.where(valid, change, 0.0)

    return RoutingSums(
        {"drift/rows": valid.double().sum(0), "drift/kl_sum": kl.sum(0),
         "drift/mass_change_sum": change.sum(0), "drift/mass_abs_change_sum": change.abs().sum(0)},
        {"drift/kl_max": _max(torch.where(valid, kl, -math.inf))})


# --------------------------------------------------------------------------------------------------
# 3. expert load, routing confidence, router entropy
# --------------------------------------------------------------------------------------------------


def expert_load(
    ids: Tensor,
    mask: Tensor,
    num_experts: int,
    probs_full: Optional[Tensor] = None,
    probs: Optional[Tensor] = None,
) -> RoutingSums:
    """Per-layer per-expert assignment counts, and optionally routing confidence and entropy.

    Args:
        ids: [N, L, k] top-k ids (-1 or >= num_experts: not recorded, the row is excluded).
        mask: [N] bool tokens to count.
        num_experts: E.
        probs_full: [N, L, E] router probability rows, optional (entropy; and confidence when
            `probs` is not given, as the mass of the row on its top-k ids).
        probs: [N, L, k] selected probabilities, optional (confidence = their sum per row).
    Sums: `load` [L, E] assignment counts (each counted row adds one to each of its k experts);
    `conf/rows`, `conf/mass_sum` [L] when probabilities are given; `ent/rows`, `ent/sum` [L] when
    `probs_full` is given. Rows whose probabilities are non-finite are left out of confidence /
    entropy (still counted in the load).
    """
    _check_ids(ids, "ids")
    n, num_layers, k = ids.shape
    if num_experts <= 0:
        raise ValueError(f"num_experts must be positive, got {num_experts}")
    tok = _token_mask(mask, n)
    ids = ids.detach()
    valid = tok[:, None] & _recorded(ids, num_experts)  # [N, L]

    # counts[l, e] via one flat bincount-like scatter (float64: exact up to 2**53).
    layer = torch.arange(num_layers, device=ids.device).view(1, num_layers, 1)
    flat = (layer * num_experts + ids.clamp(0, num_experts - 1)).reshape(-1)
    weight = valid[..., None].expand(n, num_layers, k).reshape(-1).double()
    counts = torch.zeros(num_layers * num_experts, dtype=torch.float64, device=ids.device)
    counts.scatter_add_(0, flat, weight)
    out: dict[str, Tensor] = {"load": counts.view(num_layers, num_experts)}

    if probs_full is not None:
        if probs_full.shape != (n, num_layers, num_experts):
            raise ValueError(
                f"probs_full must be [N, L, E] = {(n, num_layers, num_experts)}, "
                f"got {tuple(probs_full.shape)}"
            )
        pf = probs_full.detach().double()
        ok = valid & torch.isfinite(pf).all(-1)
        pf = torch.where(ok[..., None], pf, 0.0)
        ent = torch.where(ok, -torch.xlogy(pf, pf).sum(-1), 0.0)
        out["ent/rows"], out["ent/sum"] = ok.double().sum(0), ent.sum(0)

    if probs is not None or probs_full is not None:
        if probs is not None:
            if probs.shape != ids.shape:
                raise ValueError(f"probs must be [N, L, k] = {tuple(ids.shape)}, got {tuple(probs.shape)}")
            sp = probs.detach().double()
            ok = valid & torch.isfinite(sp).all(-1)
            mass = torch.where(ok, torch.where(ok[..., None], sp, 0.0).sum(-1), 0.0)
        else:
            pf = probs_full.detach().double()
            ok = valid & torch.isfinite(pf).all(-1)
            mass = torch.where(ok, _selected_mass(torch.where(ok[..., None], pf, 0.0), ids), 0.0)
        out["conf/rows"], out["conf/mass_sum"] = ok.double().sum(0), mass.sum(0)
    return RoutingSums(out)


# --------------------------------------------------------------------------------------------------
# 4. finalize (after RoutingSums.reduce) and the load matrix
# --------------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def load_matrix(reduced: RoutingSums) -> Tensor:
    """[L, E] float64 token share of each expert per layer (each row sums to 1); a layer with no
    assignments is a row of NaN. Raises KeyError when the sums hold no load counts."""
    if "load" not in reduced.sums:
        raise KeyError("no load counts (expert_load was not merged into these sums)")
    counts = reduced.sums["load"].detach().double().cpu()
    total = counts.sum(-1, keepdim=True)
    return torch.where(total > 0, counts / total.clamp_min(1.0), math.nan)


def finalize_routing(reduced: RoutingSums) -> dict[str, float]:
    """Routing metric floats from reduced sums (the caller merges this with the step's other
    metrics). Only the families whose sums are present are reported."""
    s = {k: v.detach().double().cpu() for k, v in reduced.sums.items()}
    out: dict[str, float] = {}

    def per_layer(name: str, num: Tensor, den: Tensor) -> None:
        """`name` pooled over layers, and `name/layer_i` per layer."""
        out[name] = _ratio(float(num.sum()), float(den.sum()))
        for i, (n, d) in enumerate(zip(num.tolist(), den.tolist())):
            out[f"{name}/layer_{i}"] = _ratio(n, d)

    for key in sorted(s):  # route agreement, one family per prefix
        match = _AGREE_RE.match(key)
        if match is None:
            continue
        prefix = match.group(1)
        rows = s[_agree_key(prefix, "rows")]
        out[f"{prefix}_any_layer_mismatch_frac"] = _ratio(
            float(s[_agree_key(prefix, "any_mismatch_tokens")]), float(s[key]))
        per_layer(f"{prefix}_topk_mismatch_frac", s[_agree_key(prefix, "mismatch")], rows)
        per_layer(f"{prefix}_overlap_mean", s[_agree_key(prefix, "overlap")], rows)

    if "drift/rows" in s:
        for name, key in (("moe/router_kl", "kl_sum"), ("moe/selected_mass_change", "mass_change_sum"),
                          ("moe/selected_mass_abs_change", "mass_abs_change_sum")):
            per_layer(name, s[f"drift/{key}"], s["drift/rows"])
        if "drift/kl_max" in reduced.maxima:
            kl_max = float(reduced.maxima["drift/kl_max"])
            out["moe/router_kl_max"] = kl_max if kl_max > -math.inf else math.nan

    if "load" in s:
        counts = s["load"]
        mean = counts.mean(-1)
        busy = mean > 0  # layers that received any assignment
        cv = torch.where(busy, (counts - mean[:, None]).pow(2).mean(-1).sqrt() / mean, math.nan)
        violation = torch.where(busy, counts.max(-1).values / mean - 1.0, math.nan)
        for i, (c, v) in enumerate(zip(cv.tolist(), violation.tolist())):
            out[f"moe/expert_load_cv/layer_{i}"] = c
            out[f"moe/expert_load_max_violation/layer_{i}"] = v
        out["moe/expert_load_cv"] = _nanmean(cv.tolist())
        out["moe/expert_load_max_violation"] = _nanmean(violation.tolist())

    for name, family, key in (("moe/routing_confidence", "conf", "mass_sum"),
                              ("moe/router_entropy", "ent", "sum")):
        if f"{family}/rows" in s:
            per_layer(name, s[f"{family}/{key}"], s[f"{family}/rows"])
    return out
