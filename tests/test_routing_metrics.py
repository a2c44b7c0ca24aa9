"""MoE routing-stability metrics: hand-made cases with known answers, exactness of the sharded
reduction (merge of shards == whole batch), and the load heat-map PNG."""

import math

import pytest
import torch

from megatron_vespo.algo.routing import (expert_load, finalize_routing, load_matrix, route_agreement,
                                         router_drift)


def ids_t(rows):
    return torch.tensor(rows, dtype=torch.int64)


def fin(ms, num_layers, num_experts=4):
    """Finalised metrics; the sums are [num_layers] and [num_layers, num_experts] tensors."""
    for name, value in ms.sums.items():
        assert value.shape in ((), (num_layers,), (num_layers, num_experts)), name
    return finalize_routing(ms)


# --------------------------------------------------------------------------------------------------
# route agreement
# --------------------------------------------------------------------------------------------------


def test_identical_routes():
    a = ids_t([[[0, 1], [2, 3]], [[1, 3], [0, 2]], [[3, 2], [1, 0]]])  # [N=3, L=2, k=2]
    out = fin(route_agreement(a, a.clone(), torch.ones(3, dtype=torch.bool), prefix="moe/route"), 2)
    assert out["moe/route_topk_mismatch_frac"] == 0.0
    assert out["moe/route_any_layer_mismatch_frac"] == 0.0
    assert out["moe/route_overlap_mean"] == 1.0
    for i in range(2):
        assert out[f"moe/route_topk_mismatch_frac/layer_{i}"] == 0.0
        assert out[f"moe/route_overlap_mean/layer_{i}"] == 1.0


def test_disjoint_routes():
    a = ids_t([[[0, 1], [2, 3]], [[0, 1], [0, 1]]])
    b = ids_t([[[2, 3], [0, 1]], [[2, 3], [3, 2]]])
    out = fin(route_agreement(a, b, torch.ones(2, dtype=torch.bool), prefix="moe/drift"), 2)
    assert out["moe/drift_topk_mismatch_frac"] == 1.0
    assert out["moe/drift_any_layer_mismatch_frac"] == 1.0
    assert out["moe/drift_overlap_mean"] == 0.0


def test_order_insensitive():
    a = ids_t([[[0, 1, 2]], [[3, 1, 0]]])
    b = ids_t([[[2, 0, 1]], [[0, 3, 1]]])
    out = fin(route_agreement(a, b, torch.ones(2, dtype=torch.bool)), 1)
    assert out["moe/route_topk_mismatch_frac"] == 0.0
    assert out["moe/route_overlap_mean"] == 1.0


def test_partial_overlap_and_any_layer():
    # token 0: layer 0 same, layer 1 shares one of two -> mismatch; token 1: both layers same.
    a = ids_t([[[0, 1], [2, 3]], [[1, 2], [0, 3]]])
    b = ids_t([[[1, 0], [2, 0]], [[2, 1], [3, 0]]])
    out = fin(route_agreement(a, b, torch.ones(2, dtype=torch.bool)), 2)
    assert out["moe/route_topk_mismatch_frac"] == pytest.approx(1 / 4)
    assert out["moe/route_any_layer_mismatch_frac"] == pytest.approx(1 / 2)
    assert out["moe/route_overlap_mean"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert out["moe/route_topk_mismatch_frac/layer_0"] == 0.0
    assert out["moe/route_topk_mismatch_frac/layer_1"] == pytest.approx(1 / 2)
    assert out["moe/route_overlap_mean/layer_1"] == pytest.approx(0.75)


def test_unrecorded_and_masked_excluded():
    # token 0 counted and matching; token 1 masked (disjoint); token 2 has layer 1 unrecorded in b
    # (disjoint there) and layer 0 matching; token 3 unrecorded everywhere in a.
    a = ids_t([[[0, 1], [2, 3]], [[0, 1], [0, 1]], [[0, 1], [0, 1]], [[-1, -1], [-1, -1]]])
    b = ids_t([[[0, 1], [2, 3]], [[2, 3], [2, 3]], [[1, 0], [-1, -1]], [[2, 3], [2, 3]]])
    mask = torch.tensor([True, False, True, True])
    out = fin(route_agreement(a, b, mask), 2)
    assert out["moe/route_topk_mismatch_frac"] == 0.0
    assert out["moe/route_any_layer_mismatch_frac"] == 0.0
    assert out["moe/route_overlap_mean"] == 1.0
    ms = route_agreement(a, b, mask)
    assert float(ms.sums["agree[moe/route]/tokens"]) == 2.0  # tokens 0 and 2
    assert float(ms.sums["agree[moe/route]/rows"][1]) == 1.0  # token 0 only


def test_empty_gives_nan():
    a = ids_t([[[0, 1]]])
    out = fin(route_agreement(a, a, torch.zeros(1, dtype=torch.bool)), 1)
    assert math.isnan(out["moe/route_topk_mismatch_frac"])
    assert math.isnan(out["moe/route_any_layer_mismatch_frac"])


def test_two_prefixes_coexist():
    a = ids_t([[[0, 1]], [[2, 3]]])
    b = ids_t([[[0, 2]], [[2, 3]]])
    m = torch.ones(2, dtype=torch.bool)
    ms = route_agreement(a, a, m, prefix="moe/route").merge(route_agreement(a, b, m, prefix="moe/drift"))
    out = fin(ms, 1)
    assert out["moe/route_topk_mismatch_frac"] == 0.0
    assert out["moe/drift_topk_mismatch_frac"] == 0.5


# --------------------------------------------------------------------------------------------------
# router drift
# --------------------------------------------------------------------------------------------------


def rand_probs(g, n, num_layers, e, scale=1.0):
    return torch.softmax(scale * torch.randn(n, num_layers, e, generator=g, dtype=torch.float64), -1)


def topk(p, k):
    return p.topk(k, -1).indices


def test_kl_zero_for_identical_rows():
    g = torch.Generator().manual_seed(0)
    p = rand_probs(g, 5, 3, 6)
    ids = topk(p, 2)
    out = fin(router_drift(p, p.clone(), ids, ids, torch.ones(5, dtype=torch.bool)), 3, 6)
    assert out["moe/router_kl"] == 0.0
    assert out["moe/router_kl_max"] == 0.0
    assert out["moe/selected_mass_change"] == 0.0
    for i in range(3):
        assert out[f"moe/router_kl/layer_{i}"] == 0.0


def test_kl_and_mass_match_direct_formula():
    g = torch.Generator().manual_seed(1)
    n, num_layers, e, k = 7, 2, 5, 2
    p, q = rand_probs(g, n, num_layers, e), rand_probs(g, n, num_layers, e, scale=2.0)
    p[0, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)  # zeros in p: 0 log 0 = 0
    pi, qi = topk(p, k), topk(q, k)
    mask = torch.tensor([True, True, False, True, True, True, True])
    pi[4, 1] = -1  # unrecorded row
    out = fin(router_drift(p, q, pi, qi, mask), num_layers, e)

    kls, changes, per_layer = [], [], {0: [], 1: []}
    for t in range(n):
        for l in range(num_layers):
            if not mask[t] or (pi[t, l] < 0).any():
                continue
            kl = sum(
                float(p[t, l, j]) * math.log(float(p[t, l, j]) / float(q[t, l, j]))
                for j in range(e) if p[t, l, j] > 0
            )
            ch = float(q[t, l, qi[t, l]].sum()) - float(p[t, l, pi[t, l]].sum())
            kls.append(kl)
            changes.append(ch)
            per_layer[l].append(kl)
    assert out["moe/router_kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-12)
    assert out["moe/router_kl_max"] == pytest.approx(max(kls), rel=1e-12)
    assert out["moe/selected_mass_change"] == pytest.approx(sum(changes) / len(changes), rel=1e-12)
    assert out["moe/selected_mass_abs_change"] == pytest.approx(
        sum(abs(c) for c in changes) / len(changes), rel=1e-12)
    for l in range(num_layers):
        assert out[f"moe/router_kl/layer_{l}"] == pytest.approx(
            sum(per_layer[l]) / len(per_layer[l]), rel=1e-12)
    # torch's own KL agrees on a counted row
    ref = torch.nn.functional.kl_div(q[1, 0].log(), p[1, 0], reduction="sum")
    direct = router_drift(p[1:2, :1], q[1:2, :1], pi[1:2, :1], qi[1:2, :1], mask[1:2])
    assert float(direct.sums["drift/kl_sum"][0]) == pytest.approx(float(ref), rel=1e-12)


# --------------------------------------------------------------------------------------------------
# expert load
# --------------------------------------------------------------------------------------------------


def test_uniform_load_cv_zero():
    # 4 experts, k = 2, each expert chosen exactly twice per layer
    ids = ids_t([[[0, 1]], [[2, 3]], [[1, 2]], [[3, 0]]])
    out = fin(expert_load(ids, torch.ones(4, dtype=torch.bool), 4), 1, 4)
    assert out["moe/expert_load_cv"] == 0.0
    assert out["moe/expert_load_max_violation"] == 0.0
    assert torch.equal(load_matrix(expert_load(ids, torch.ones(4, dtype=torch.bool), 4)),
                       torch.full((1, 4), 0.25, dtype=torch.float64))


def test_known_load_values():
    # layer 0 counts [3, 1, 0, 0] (k = 1); layer 1 counts [1, 1, 1, 1]
    ids = ids_t([[[0], [0]], [[0], [1]], [[0], [2]], [[1], [3]], [[2], [-1]]])
    mask = torch.tensor([True, True, True, True, False])
    ms = expert_load(ids, mask, 4)
    out = fin(ms, 2, 4)
    mean0 = 1.0
    std0 = math.sqrt(((3 - 1) ** 2 + 0 + 1 + 1) / 4)
    assert out["moe/expert_load_cv/layer_0"] == pytest.approx(std0 / mean0)
    assert out["moe/expert_load_max_violation/layer_0"] == pytest.approx(2.0)
    assert out["moe/expert_load_cv/layer_1"] == 0.0
    assert out["moe/expert_load_max_violation/layer_1"] == 0.0
    assert out["moe/expert_load_cv"] == pytest.approx(std0 / 2)
    assert out["moe/expert_load_max_violation"] == pytest.approx(1.0)
    lm = load_matrix(ms)
    assert torch.allclose(lm, torch.tensor([[0.75, 0.25, 0, 0], [0.25] * 4], dtype=torch.float64))
    assert ms.sums["load"].shape == (2, 4) and float(ms.sums["load"][0, 0]) == 3.0


def test_load_key_set_independent_of_data_and_empty_layer_nan():
    ids = ids_t([[[-1, -1]], [[-1, -1]]])
    ms = expert_load(ids, torch.ones(2, dtype=torch.bool), 3)
    assert list(ms.sums) == ["load"] and ms.sums["load"].shape == (1, 3)
    out = fin(ms, 1, 3)
    assert math.isnan(out["moe/expert_load_cv"])
    assert torch.isnan(load_matrix(ms)).all()


def test_confidence_and_entropy():
    g = torch.Generator().manual_seed(2)
    n, num_layers, e, k = 6, 2, 5, 2
    p = rand_probs(g, n, num_layers, e)
    ids = topk(p, k)
    sel = p.gather(-1, ids)
    mask = torch.tensor([True, True, True, False, True, True])
    out_full = fin(expert_load(ids, mask, e, probs_full=p), num_layers, e)
    out_sel = fin(expert_load(ids, mask, e, probs=sel), num_layers, e)
    m = mask[:, None].expand(n, num_layers)
    conf = sel.sum(-1)[m].mean().item()
    ent = (-(p * p.log()).sum(-1))[m].mean().item()
    assert out_full["moe/routing_confidence"] == pytest.approx(conf, rel=1e-12)
    assert out_sel["moe/routing_confidence"] == pytest.approx(conf, rel=1e-12)
    assert out_full["moe/router_entropy"] == pytest.approx(ent, rel=1e-12)
    assert "moe/router_entropy" not in out_sel
    uniform = torch.full((2, 1, 4), 0.25, dtype=torch.float64)
    out_u = fin(expert_load(ids_t([[[0]], [[1]]]), torch.ones(2, dtype=torch.bool), 4, probs_full=uniform), 1, 4)
    assert out_u["moe/router_entropy"] == pytest.approx(math.log(4))
    assert out_u["moe/routing_confidence"] == pytest.approx(0.25)


def test_routing_sums_reduce_in_one_collective_per_kind():
    """Every [L] and [L, E] sum crosses ranks in one flat all-reduce, every maximum in another."""
    g = torch.Generator().manual_seed(3)
    p, q = rand_probs(g, 4, 2, 4), rand_probs(g, 4, 2, 4)
    pi, qi = topk(p, 2), topk(q, 2)
    m = torch.ones(4, dtype=torch.bool)
    ms = route_agreement(pi, qi, m).merge(router_drift(p, q, pi, qi, m)).merge(
        expert_load(pi, m, 4, probs_full=p))
    calls = []

    def twice(x):  # two ranks holding the same sums
        calls.append(x.shape)
        return x * 2

    reduced = ms.reduce(twice, lambda x: calls.append(x.shape) or x)
    assert len(calls) == 2 and calls[0] == (sum(v.numel() for v in ms.sums.values()),)
    assert torch.equal(reduced.sums["load"], 2 * ms.sums["load"].double())
    routing = fin(reduced, 2, 4)
    assert routing == pytest.approx(fin(ms, 2, 4), nan_ok=True)  # ratios of doubled sums
    assert routing and all(k.startswith("moe/") for k in routing)


# --------------------------------------------------------------------------------------------------
# exactness of the sharded reduction
# --------------------------------------------------------------------------------------------------


def all_sums(p, q, pi, qi, mask, e):
    return (
        route_agreement(pi, qi, mask, prefix="moe/route")
        .merge(route_agreement(qi, pi.flip(-1), mask, prefix="moe/drift"))
        .merge(router_drift(p, q, pi, qi, mask))
        .merge(expert_load(pi, mask, e, probs_full=p))
        .merge(expert_load(qi, mask, e, probs=q.gather(-1, qi.clamp_min(0))))
    )


@pytest.mark.parametrize("bounds", [(0, 13, 40), (0, 1, 20, 40), (0, 40, 40)])
def test_sharded_reduction_exact(bounds):
    g = torch.Generator().manual_seed(4)
    n, num_layers, e, k = 40, 3, 6, 2
    p, q = rand_probs(g, n, num_layers, e), rand_probs(g, n, num_layers, e, scale=1.5)
    pi, qi = topk(p, k), topk(q, k)
    pi[torch.rand(n, num_layers, generator=g) < 0.1] = -1
    mask = torch.rand(n, generator=g) < 0.8

    whole = fin(all_sums(p, q, pi, qi, mask, e), num_layers, e)
    merged = None
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        shard = all_sums(p[lo:hi], q[lo:hi], pi[lo:hi], qi[lo:hi], mask[lo:hi], e)
        merged = shard if merged is None else merged.merge(shard)
    # the same path a step takes: reduce (identity: one rank holds all shards' sums) then finalize
    ident = lambda x: x  # noqa: E731
    sharded = fin(merged.reduce(ident, ident), num_layers, e)

    assert whole.keys() == sharded.keys()
    assert len(whole) > 30
    for key, v in whole.items():
        assert math.isfinite(v), key
        assert sharded[key] == pytest.approx(v, rel=1e-12, abs=1e-12), key
    assert torch.equal(load_matrix(merged),
                       load_matrix(all_sums(p, q, pi, qi, mask, e)))


# --------------------------------------------------------------------------------------------------
# heat-map
# --------------------------------------------------------------------------------------------------


def test_heatmap_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from megatron_vespo.tracking import heatmap
    from megatron_vespo.tracking.heatmap import write_load_heatmap

    figures = []
    save_png = heatmap.save_png
    monkeypatch.setattr(heatmap, "save_png", lambda fig, path: figures.append(fig) or save_png(fig, path))

    ids = ids_t([[[0, 1], [2, 3]], [[0, 2], [-1, -1]], [[1, 0], [3, 2]]])
    load = load_matrix(expert_load(ids, torch.ones(3, dtype=torch.bool), 4))
    load = torch.cat([load, torch.full((1, 4), math.nan, dtype=torch.float64)])  # an empty layer
    path = write_load_heatmap(load, tmp_path / "sub" / "load.png")
    assert path == tmp_path / "sub" / "load.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["load.png"]  # no temp file left behind
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    # layer and expert ticks fall on whole layers and experts (3 layers drew 0.5 steps before)
    ax = figures[0].axes[0]
    for ticks in (ax.get_yticks(), ax.get_xticks()):
        assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks
    # overwriting works (atomic replace)
    write_load_heatmap(load[:2], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
