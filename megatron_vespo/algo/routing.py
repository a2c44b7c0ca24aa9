"""MoE routing-stability metrics as additive statistics (pure: tensors in, `MetricSums` out).

Inputs are this rank's response tokens' routing decisions, one row per (token, MoE layer):
  ids         [N, L, k] int64 top-k expert ids; a row holding any -1 means "no route recorded"
              (as does an id >= num_experts where that is known) and is excluded.
  probs       [N, L, k] the selected (gated) probabilities, optional.
  probs_full  [N, L, E] the router's full probability rows, optional.
  mask        [N] bool, the tokens to count (response tokens).

Everything ratio-like or nonlinear in counts (fractions, means, KL means, load CV, max violation)
is stored as plain SUMS in scope `tok` (each CP rank holds different tokens) and turned into floats
by `finalize_routing` after `MetricSums.reduce`, so the result over many ranks is exactly the result
over the concatenated batch. The key set depends on (L, E, which inputs were given) only, never on
data, as `MetricSums.reduce` requires.

Sum keys live under prefixes no other metric uses (`moe_agree[...]`, `moe_drift/`, `moe_load/`,
`moe_conf/`, `moe_ent/`); `MetricSums.finalize` reads only the keys it knows, so it ignores them.
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
from typing import Optional

import torch
from torch import Tensor

from .metrics import MetricSums, _max

__all__ = [
    "route_agreement",
    "router_drift",
    "expert_load",
    "finalize_routing",
    "load_matrix",
    "load_counts",
]

_AGREE_RE = re.compile(r"^moe_agree\[(.+)\]/tokens$")


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
    return f"moe_agree[{prefix}]/{what}"


# --------------------------------------------------------------------------------------------------
# 1. agreement between two sources of routes
# --------------------------------------------------------------------------------------------------


def route_agreement(a_ids: Tensor, b_ids: Tensor, mask: Tensor, prefix: str = "moe/route") -> MetricSums:
    """Top-k agreement between two routing sources (e.g. engine vs old-policy forward: prefix
    "moe/route"; old-policy vs current forward: prefix "moe/drift").

    Args:
        a_ids, b_ids: [N, L, k] int64 top-k ids (-1: not recorded). The comparison is of SETS
            (order-insensitive); ids within a row are assumed distinct (as top-k ids are).
        mask: [N] bool tokens to count.
    A (token, layer) row counts when the token is in `mask` and both sources recorded it; a token
    counts for the any-layer fraction when it has at least one such row.

    Returns `MetricSums` (scope `tok`) with, per layer i, rows / mismatching rows / summed overlap
    fraction, and the counted / any-mismatch tokens.
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

    v = valid.double()
    rows_l = v.sum(0)
    mism_l = mismatch.double().sum(0)
    over_l = overlap.sum(0)
    token_counted = valid.any(-1)
    out: dict[str, Tensor] = {
        _agree_key(prefix, "tokens"): token_counted.double().sum(),
        _agree_key(prefix, "any_mismatch_tokens"): mismatch.any(-1).double().sum(),
    }
    for i in range(num_layers):
        out[_agree_key(prefix, f"rows/layer_{i}")] = rows_l[i]
        out[_agree_key(prefix, f"mismatch/layer_{i}")] = mism_l[i]
        out[_agree_key(prefix, f"overlap/layer_{i}")] = over_l[i]
    return MetricSums(tok=out)


# --------------------------------------------------------------------------------------------------
# 2. router drift between two forwards
# --------------------------------------------------------------------------------------------------


def _selected_mass(probs_full: Tensor, ids: Tensor) -> Tensor:
    """[N, L] sum of probs_full over the row's top-k ids (ids must be valid where used)."""
    return probs_full.gather(-1, ids.clamp(0, probs_full.shape[-1] - 1)).sum(-1)


def router_drift(
    old_probs_full: Tensor, new_probs_full: Tensor, old_ids: Tensor, new_ids: Tensor, mask: Tensor
) -> MetricSums:
    """Router drift between an old and a new forward of the same tokens.

    Args:
        old_probs_full, new_probs_full: [N, L, E] router probability rows.
        old_ids, new_ids: [N, L, k] top-k ids chosen by each forward (-1: not recorded).
        mask: [N] bool tokens to count.
    Per counted row (token in mask, both ids recorded, both rows finite):
        KL(old || new) = sum_e p log(p / q) (0 log 0 = 0; q is floored at the float64 tiny so a
        vanished expert gives a large but finite value), and
        mass change = sum_{e in new_ids} q_e - sum_{e in old_ids} p_e.
    Returns `MetricSums` with per-layer row counts and sums (scope `tok`) and the largest KL
    (scope `max`).
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

    v = valid.double()
    rows_l, kl_l, ch_l, abs_l = v.sum(0), kl.sum(0), change.sum(0), change.abs().sum(0)
    out: dict[str, Tensor] = {}
    for i in range(num_layers):
        out[f"moe_drift/rows/layer_{i}"] = rows_l[i]
        out[f"moe_drift/kl_sum/layer_{i}"] = kl_l[i]
        out[f"moe_drift/mass_change_sum/layer_{i}"] = ch_l[i]
        out[f"moe_drift/mass_abs_change_sum/layer_{i}"] = abs_l[i]
    return MetricSums(
        tok=out, max={"moe_drift/kl_max": _max(torch.where(valid, kl, -math.inf))}
    )


# --------------------------------------------------------------------------------------------------
# 3. expert load, routing confidence, router entropy
# --------------------------------------------------------------------------------------------------


def expert_load(
    ids: Tensor,
    mask: Tensor,
    num_experts: int,
    probs_full: Optional[Tensor] = None,
    probs: Optional[Tensor] = None,
) -> MetricSums:
    """Per-layer per-expert assignment counts, and optionally routing confidence and entropy.

    Args:
        ids: [N, L, k] top-k ids (-1 or >= num_experts: not recorded, the row is excluded).
        mask: [N] bool tokens to count.
        num_experts: E.
        probs_full: [N, L, E] router probability rows, optional (entropy; and confidence when
            `probs` is not given, as the mass of the row on its top-k ids).
        probs: [N, L, k] selected probabilities, optional (confidence = their sum per row).
    Keys (scope `tok`): `moe_load/layer_{i}/expert_{e}` assignment counts (each counted row adds
    one to each of its k experts); `moe_conf/layer_{i}/rows|mass_sum` when probabilities are given;
    `moe_ent/layer_{i}/rows|sum` when `probs_full` is given. Rows whose probabilities are
    non-finite are left out of confidence / entropy (still counted in the load).
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
    counts = counts.view(num_layers, num_experts)
    out: dict[str, Tensor] = {}
    for i in range(num_layers):
        for e in range(num_experts):
            out[f"moe_load/layer_{i}/expert_{e}"] = counts[i, e]

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
        rows_l, ent_l = ok.double().sum(0), ent.sum(0)
        for i in range(num_layers):
            out[f"moe_ent/layer_{i}/rows"] = rows_l[i]
            out[f"moe_ent/layer_{i}/sum"] = ent_l[i]

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
        rows_l, mass_l = ok.double().sum(0), mass.sum(0)
        for i in range(num_layers):
            out[f"moe_conf/layer_{i}/rows"] = rows_l[i]
            out[f"moe_conf/layer_{i}/mass_sum"] = mass_l[i]
    return MetricSums(tok=out)


# --------------------------------------------------------------------------------------------------
# 4. finalize (after MetricSums.reduce) and the load matrix
# --------------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _to_floats(d: dict[str, Tensor]) -> dict[str, float]:
    """All values in one device-to-host copy (there are L * E load keys)."""
    if not d:
        return {}
    keys = list(d)
    vals = torch.stack([d[k].detach().double().reshape(()) for k in keys]).cpu().tolist()
    return dict(zip(keys, vals))


def load_counts(reduced: MetricSums, num_layers: int, num_experts: int) -> Optional[Tensor]:
    """[L, E] float64 assignment counts from the `moe_load/...` sums, or None if there are none."""
    return _counts_from(_to_floats(reduced.tok), num_layers, num_experts)


def _counts_from(s: dict[str, float], num_layers: int, num_experts: int) -> Optional[Tensor]:
    if "moe_load/layer_0/expert_0" not in s:
        return None
    return torch.tensor(
        [
            [float(s[f"moe_load/layer_{i}/expert_{e}"]) for e in range(num_experts)]
            for i in range(num_layers)
        ],
        dtype=torch.float64,
    ).view(num_layers, num_experts)


def load_matrix(reduced: MetricSums, num_layers: int, num_experts: int) -> Tensor:
    """[L, E] float64 token share of each expert per layer (each row sums to 1); a layer with no
    assignments is a row of NaN. Raises KeyError when the sums hold no load counts."""
    counts = load_counts(reduced, num_layers, num_experts)
    if counts is None:
        raise KeyError("no moe_load/... sums (expert_load was not merged into these metrics)")
    total = counts.sum(-1, keepdim=True)
    return torch.where(total > 0, counts / total.clamp_min(1.0), math.nan)


def finalize_routing(reduced: MetricSums, num_layers: int, num_experts: int) -> dict[str, float]:
    """Routing metric floats from reduced sums (the caller merges this with
    `MetricSums.finalize()`). Only the families whose sums are present are reported."""
    s = _to_floats(reduced.tok)
    out: dict[str, float] = {}
    layers = range(num_layers)

    # route agreement, one family per prefix
    for key in sorted(s):
        match = _AGREE_RE.match(key)
        if match is None:
            continue
        prefix = match.group(1)

        def g(what: str, _p: str = prefix) -> float:
            return s[_agree_key(_p, what)]

        rows = [g(f"rows/layer_{i}") for i in layers]
        mism = [g(f"mismatch/layer_{i}") for i in layers]
        over = [g(f"overlap/layer_{i}") for i in layers]
        out[f"{prefix}_topk_mismatch_frac"] = _ratio(sum(mism), sum(rows))
        out[f"{prefix}_overlap_mean"] = _ratio(sum(over), sum(rows))
        out[f"{prefix}_any_layer_mismatch_frac"] = _ratio(g("any_mismatch_tokens"), g("tokens"))
        for i in layers:
            out[f"{prefix}_topk_mismatch_frac/layer_{i}"] = _ratio(mism[i], rows[i])
            out[f"{prefix}_overlap_mean/layer_{i}"] = _ratio(over[i], rows[i])

    # router drift
    if "moe_drift/rows/layer_0" in s:
        rows = [s[f"moe_drift/rows/layer_{i}"] for i in layers]
        for name, key in (
            ("moe/router_kl", "kl_sum"),
            ("moe/selected_mass_change", "mass_change_sum"),
            ("moe/selected_mass_abs_change", "mass_abs_change_sum"),
        ):
            vals = [s[f"moe_drift/{key}/layer_{i}"] for i in layers]
            out[name] = _ratio(sum(vals), sum(rows))
            for i in layers:
                out[f"{name}/layer_{i}"] = _ratio(vals[i], rows[i])
        if "moe_drift/kl_max" in reduced.max:
            kl_max = float(reduced.max["moe_drift/kl_max"])
            out["moe/router_kl_max"] = kl_max if kl_max > -math.inf else math.nan

    # expert load
    counts = _counts_from(s, num_layers, num_experts)
    if counts is not None:
        cvs, viols = [], []
        for i in layers:
            c = counts[i]
            mean = float(c.mean())
            if mean > 0:
                # population std over experts
                cv = math.sqrt(float(((c - mean) ** 2).mean())) / mean
                viol = float(c.max()) / mean - 1.0
            else:
                cv = viol = math.nan
            cvs.append(cv)
            viols.append(viol)
            out[f"moe/expert_load_cv/layer_{i}"] = cv
            out[f"moe/expert_load_max_violation/layer_{i}"] = viol
        out["moe/expert_load_cv"] = _nanmean(cvs)
        out["moe/expert_load_max_violation"] = _nanmean(viols)

    for name, fam, key in (
        ("moe/routing_confidence", "moe_conf", "mass_sum"),
        ("moe/router_entropy", "moe_ent", "sum"),
    ):
        if f"{fam}/layer_0/rows" not in s:
            continue
        rows = [s[f"{fam}/layer_{i}/rows"] for i in layers]
        vals = [s[f"{fam}/layer_{i}/{key}"] for i in layers]
        out[name] = _ratio(sum(vals), sum(rows))
        for i in layers:
            out[f"{name}/layer_{i}"] = _ratio(vals[i], rows[i])
    return out
