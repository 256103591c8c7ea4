"""HDML (Zheng et al., CVPR 2019): augmentor against brute force, gradient routing, reductions,
running averages, checkpointing, degenerate batches, argument validation."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import distances, losses, miners, reducers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_ext.functional.hardness_aware import (
    adaptive_metric_weight,
    hardness_aware_negatives,
    hardness_aware_npair_negatives,
    hardness_decay,
    hdml_metric_objective,
)
from pml_ext.losses.hdml_loss import HDMLLoss, RunningLossAverage

DT = torch.float64


# ------------------------------------------------------------------ brute-force reference
def ref_negative(a, p, n, alpha, javg):
    """The official augmentor, one triplet, plain Python floats."""
    dp = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, p)))
    dn = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, n)))
    if dp < dn:
        c = (dp + (dn - dp) * math.exp(-alpha / javg)) / dn
        return [ai + (ni - ai) * c for ai, ni in zip(a, n)]
    return list(n)


def ref_npair(anc, pos, alpha, javg):
    N = len(anc)
    return [[list(pos[j]) if i == j else ref_negative(anc[i], pos[i], pos[j], alpha, javg) for j in range(N)] for i in range(N)]


def mixed_triplets(seed=0, T=40, d=5):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(T, d, generator=g, dtype=DT)
    p = a + 0.5 * torch.randn(T, d, generator=g, dtype=DT)
    n = a + 1.5 * torch.randn(T, d, generator=g, dtype=DT)
    # force some d+ >= d- (swap roles), one exact tie, one d- = 0
    n[:8], p[:8] = p[:8].clone(), n[:8].clone()
    n[8] = a[8] + (p[8] - a[8]).flip(0)  # same norm as p[8]-a[8] -> d+ == d-
    n[9] = a[9]  # d- = 0
    return a, p, n


def dists(a, b):
    return (a - b).norm(dim=-1)


# ------------------------------------------------------------------ augmentor
@pytest.mark.parametrize("alpha,javg", [(90.0, 1e6), (1.0, 1.0), (2.0, 0.5), (90.0, 30.0), (0.0, 1.0)])
def test_augmentor_matches_bruteforce_both_branches(alpha, javg):
    a, p, n = mixed_triplets()
    out, coef, mask = hardness_aware_negatives(a, p, n, alpha, javg, return_coefficients=True)
    dp, dn = dists(a, p), dists(a, n)
    assert (dp < dn).any() and (dp >= dn).any() and (dp == dn).any() and (dn == 0).any()
    for t in range(len(a)):
        exp = ref_negative(a[t].tolist(), p[t].tolist(), n[t].tolist(), alpha, javg)
        assert torch.allclose(out[t], torch.tensor(exp, dtype=DT), atol=1e-12, rtol=0), t
        if dp[t] >= dn[t]:  # untouched branch: exactly the negative
            assert torch.equal(out[t], n[t]) and not mask[t] and coef[t] == 1
    assert torch.equal(mask, dp < dn)


def test_augmentor_javg_huge_no_pull_and_small_pulls_to_dpos():
    a, p, n = mixed_triplets(1)
    dp, dn = dists(a, p), dists(a, n)
    m = dp < dn
    far = hardness_aware_negatives(a, p, n, 90.0, 1e300)
    assert torch.allclose(far, n, atol=1e-12)
    near = hardness_aware_negatives(a, p, n, 90.0, 1e-3)  # exp(-9e4) == 0
    d_new = dists(a, near)
    assert torch.allclose(d_new[m], dp[m], atol=1e-12)  # pulled exactly to d+
    assert torch.equal(near[~m], n[~m])
    # direction preserved: the pulled point is on the segment anchor -> negative
    u = (n - a)[m] / dn[m, None]
    v = (near - a)[m] / d_new[m, None].clamp_min(1e-300)
    assert torch.allclose(u, v, atol=1e-10)
    # intermediate J_avg: distance strictly between d+ and d-
    mid = dists(a, hardness_aware_negatives(a, p, n, 1.0, 1.0))
    assert ((mid[m] >= dp[m] - 1e-12) & (mid[m] <= dn[m] + 1e-12)).all()
    clear = m & (dn - dp > 1e-3)
    assert ((mid[clear] > dp[clear]) & (mid[clear] < dn[clear])).all()
    assert torch.allclose(mid[m], dp[m] + (dn[m] - dp[m]) * math.exp(-1.0), atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 10_000),
    st.floats(0.0, 100.0),
    st.floats(1e-3, 1e3),
)
def test_augmentor_never_closer_than_dpos_never_farther_than_dneg(seed, alpha, javg):
    g = torch.Generator().manual_seed(seed)
    a, p, n = (torch.randn(16, 4, generator=g, dtype=DT) for _ in range(3))
    out = hardness_aware_negatives(a, p, n, alpha, javg)
    dp, dn, d = dists(a, p), dists(a, n), dists(a, out)
    assert torch.isfinite(out).all()
    assert (d >= torch.minimum(dp, dn) - 1e-9).all() and (d <= dn + 1e-9).all()


def test_npair_matches_bruteforce():
    g = torch.Generator().manual_seed(3)
    N, d = 7, 4
    anc = torch.randn(N, d, generator=g, dtype=DT)
    pos = anc + 0.8 * torch.randn(N, d, generator=g, dtype=DT)
    pos[2] = anc[2]  # d+ = 0 for anchor 2
    for alpha, javg in [(1.0, 1.0), (90.0, 1e6), (3.0, 0.1)]:
        out, coef, mask = hardness_aware_npair_negatives(anc, pos, alpha, javg, return_coefficients=True)
        assert out.shape == (N, N, d)
        exp = torch.tensor(ref_npair(anc.tolist(), pos.tolist(), alpha, javg), dtype=DT)
        assert torch.allclose(out, exp, atol=1e-12, rtol=0)
        idx = torch.arange(N)
        assert torch.equal(out[idx, idx], pos)  # own positive kept
        assert not mask.diagonal().any() and (coef.diagonal() == 1).all()
        # row i == the triplet form with (anc_i, pos_i, pos_j)
        for i in range(N):
            row = hardness_aware_negatives(anc[i].expand(N, d), pos[i].expand(N, d), pos, alpha, javg)
            row[i] = pos[i]
            assert torch.allclose(out[i], row, atol=1e-14)


def test_gradcheck_triplet_and_npair():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 3, generator=g, dtype=DT)
    p = a + 0.3 * torch.randn(6, 3, generator=g, dtype=DT)
    n = a + 2.0 * torch.randn(6, 3, generator=g, dtype=DT)
    n[:2], p[:2] = p[:2].clone(), n[:2].clone()  # both branches, away from the d+ = d- kink
    a, p, n = (t.requires_grad_() for t in (a, p, n))
    assert torch.autograd.gradcheck(lambda a, p, n: hardness_aware_negatives(a, p, n, 1.5, 0.7), (a, p, n))
    anc = torch.randn(5, 3, generator=g, dtype=DT, requires_grad=True)
    pos = (anc.detach() + 0.3 * torch.randn(5, 3, generator=g, dtype=DT)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: hardness_aware_npair_negatives(x, y, 1.5, 0.7), (anc, pos))
    # J_avg as a tensor is differentiable too
    j = torch.tensor(0.9, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda j: hardness_aware_negatives(a, p, n, 1.5, j), (j,))


def test_no_nan_when_dneg_or_dpos_zero():
    a = torch.zeros(3, 4, dtype=DT, requires_grad=True)
    p = torch.zeros(3, 4, dtype=DT, requires_grad=True)
    n = torch.zeros(3, 4, dtype=DT, requires_grad=True)
    out = hardness_aware_negatives(a, p, n, 1.0, 1e-6)
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (a, p, n))
    a2 = torch.randn(4, 3, dtype=DT, requires_grad=True)
    out2 = hardness_aware_npair_negatives(a2, a2 * 1.0, 1.0, 1e-6)  # d+ = 0 everywhere
    out2.sum().backward()
    assert torch.isfinite(out2).all() and torch.isfinite(a2.grad).all()


def test_helpers_and_validation():
    assert float(adaptive_metric_weight(1e4, 0.0)) == 1.0
    assert math.isclose(float(adaptive_metric_weight(2.0, 3.0)), math.exp(-1.5))
    assert float(hardness_decay(90.0, float("inf"))) == 1.0
    jm, js = torch.tensor(2.0), torch.tensor(5.0)
    w = math.exp(-1.0)
    assert math.isclose(float(hdml_metric_objective(jm, js, 1.0, 1.0)), w * 2 + (1 - w) * 5, rel_tol=1e-6)
    a = torch.randn(3, 2)
    with pytest.raises(ValueError):
        hardness_aware_negatives(a, a, a, -1.0, 1.0)
    with pytest.raises(ValueError):
        hardness_aware_negatives(a, a, a, 1.0, 0.0)
    with pytest.raises(ValueError):
        hardness_aware_negatives(a, a, torch.randn(4, 2), 1.0, 1.0)
    with pytest.raises(ValueError):
        hardness_aware_npair_negatives(a, torch.randn(3), 1.0, 1.0)
    with pytest.raises(ValueError):
        adaptive_metric_weight(-1.0, 1.0)


# ------------------------------------------------------------------ HDMLLoss fixtures
B, IN, FEAT, EMB, C = 16, 10, 12, 6, 4


def make_setup(seed=0, dtype=DT, **kw):
    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(torch.nn.Linear(IN, FEAT), torch.nn.ReLU(), torch.nn.Linear(FEAT, FEAT)).to(dtype)
    head = torch.nn.Linear(FEAT, EMB).to(dtype)
    kw.setdefault("loss", losses.TripletMarginLoss(margin=0.2))
    kw.setdefault("max_synthetic_tuples", None)  # every triplet (the default cap subsamples at random)
    hdml = HDMLLoss(embedding_size=EMB, feature_size=FEAT, num_classes=C, **kw).to(dtype)
    x = torch.randn(B, IN, dtype=dtype)
    y = torch.arange(B) % C
    return backbone, head, hdml, x, y


def set_averages(hdml, javg, jgen):
    hdml.javg_tracker.value.fill_(javg)
    hdml.jgen_tracker.value.fill_(jgen)


def grads(out, params):
    gs = torch.autograd.grad(out, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def all_close(xs, ys, tol=1e-10):
    return all(torch.allclose(x, y, atol=tol, rtol=tol) for x, y in zip(xs, ys))


def all_zero(xs):
    return all((x == 0).all() for x in xs)


@pytest.mark.parametrize("loss_name,synthesize", [("triplet", "all"), ("triplet", "negatives"), ("npair", "all"), ("npair", "negatives")])
def test_gradient_isolation(loss_name, synthesize):
    wrapped = losses.TripletMarginLoss(margin=0.2) if loss_name == "triplet" else losses.NPairsLoss()
    backbone, head, hdml, x, y = make_setup(loss=wrapped, alpha=1.0, beta=1.0, synthesize=synthesize)
    set_averages(hdml, javg=0.3, jgen=1.0)  # negatives are pulled; w = exp(-1): both J_m and J_syn matter
    groups = {
        "metric": list(backbone.parameters()) + list(head.parameters()),
        "gen": list(hdml.generator.parameters()),
        "cls": list(hdml.classifier.parameters()),
    }
    state = copy.deepcopy(hdml.state_dict())

    # reference: the un-routed graph, each group differentiated only by its own term (official)
    terms = hdml.compute_terms(backbone(x), y, head)
    assert hdml.fraction_pullable > 0
    ref = {
        "metric": grads(terms["J_metric"], groups["metric"]),
        "gen": grads(terms["J_gen"], groups["gen"]),
        "cls": grads(terms["J_cls"], groups["cls"]),
    }
    # sanity: in the un-routed graph the terms DO leak into the other groups
    assert not all_zero(grads(terms["J_metric"], groups["gen"]))
    assert not all_zero(grads(terms["J_gen"], groups["metric"]))
    assert not all_zero(grads(terms["J_gen"], groups["cls"]))
    assert not all_zero(grads(terms["J_cls"], groups["metric"]))

    # routed terms: each term reaches only its own group
    hdml.load_state_dict(state)
    routed = hdml._compute(backbone(x), y, head, None, routed=True)
    for term, own in (("J_metric", "metric"), ("J_gen", "gen"), ("J_cls", "cls")):
        for g in groups:
            got = grads(routed[term], groups[g])
            if g == own:
                assert all_close(got, ref[g]), (term, g)
            else:
                assert all_zero(got), (term, g)

    # the module's output: one backward gives every group exactly its own term's gradient
    hdml.load_state_dict(state)
    out = hdml(backbone(x), y, head)
    assert torch.allclose(out, terms["J_metric"], atol=1e-12)  # value == J_metric
    for g, params in groups.items():
        assert all_close(grads(out, params), ref[g]), g
    # and J_syn really does reach the backbone and head (through the frozen generator)
    hdml.load_state_dict(state)
    routed = hdml._compute(backbone(x), y, head, None, routed=True)
    assert not all_zero(grads(routed["J_syn"], groups["metric"]))


def test_one_optimizer_with_param_groups_step():
    backbone, head, hdml, x, y = make_setup(dtype=torch.float32, alpha=1.0)
    opt = torch.optim.Adam(hdml.param_groups(list(backbone.parameters()) + list(head.parameters())))
    assert [g["lr"] for g in opt.param_groups] == [7e-5, 1e-2, 1e-3]
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    for _ in range(3):
        opt.zero_grad()
        loss = hdml(backbone(x), y, head)
        loss.backward()
        opt.step()
    after = [p.detach() for g in opt.param_groups for p in g["params"]]
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    assert torch.isfinite(loss)


def plain_reference(backbone, head, x, y, wrapped):
    emb = head(backbone(x))
    return wrapped(emb, y)


@pytest.mark.parametrize("wrapped_fn", [lambda: losses.TripletMarginLoss(margin=0.2), lambda: losses.NPairsLoss()])
def test_beta_zero_reduces_to_plain_metric_loss(wrapped_fn):
    # exp(-beta/J_gen) = 1 at beta = 0: J_metric = J_m exactly (beta -> inf gives J_syn instead)
    backbone, head, hdml, x, y = make_setup(loss=wrapped_fn(), alpha=1.0, beta=0.0)
    set_averages(hdml, javg=0.3, jgen=5.0)
    metric = list(backbone.parameters()) + list(head.parameters())
    out = hdml(backbone(x), y, head)
    plain = plain_reference(backbone, head, x, y, wrapped_fn())
    assert torch.allclose(out, plain, atol=1e-12)
    assert all_close(grads(out, metric), grads(plain, metric))
    assert hdml.metric_weight == 1.0 and hdml.syn_weight == 0.0


def test_beta_large_gives_synthetic_loss_only():
    backbone, head, hdml, x, y = make_setup(alpha=1.0, beta=1e9)
    set_averages(hdml, javg=0.3, jgen=1.0)
    out = hdml(backbone(x), y, head)
    assert hdml.metric_weight == 0.0
    assert math.isclose(out.item(), hdml.J_syn, rel_tol=1e-9)


@pytest.mark.parametrize("wrapped_fn", [lambda: losses.TripletMarginLoss(margin=0.2), lambda: losses.NPairsLoss(),
                                        lambda: losses.NPairsLoss(distance=distances.LpDistance())])
def test_negatives_only_without_pull_reduces_to_plain(wrapped_fn):
    # generator disabled + alpha = 0 (no pull): synthetic tuples == real tuples, J_syn == J_m
    backbone, head, hdml, x, y = make_setup(loss=wrapped_fn(), use_generator=False, alpha=0.0)
    metric = list(backbone.parameters()) + list(head.parameters())
    out = hdml(backbone(x), y, head)
    plain = plain_reference(backbone, head, x, y, wrapped_fn())
    assert torch.allclose(out, plain, atol=1e-12)
    assert math.isclose(hdml.J_syn, hdml.J_m, rel_tol=1e-12)
    assert all_close(grads(out, metric), grads(plain, metric))
    assert hdml.mean_pull_coefficient == pytest.approx(1.0, abs=1e-12) and hdml.generator is None


def test_negatives_only_mode_pulls_and_raises_loss():
    # unnormalised Euclidean + mean reducer: every triplet's loss can only grow when d- shrinks
    wrapped = losses.TripletMarginLoss(margin=0.5, distance=distances.LpDistance(normalize_embeddings=False),
                                       reducer=reducers.MeanReducer())
    backbone, head, hdml, x, y = make_setup(loss=wrapped, use_generator=False, alpha=1.0, synthetic_weight=1.0)
    set_averages(hdml, javg=1e-3, jgen=1.0)  # full pull to d+
    out = hdml(backbone(x), y, head)
    assert hdml.fraction_pullable > 0 and hdml.mean_pull_coefficient < 1.0
    assert out.item() == hdml.J_syn > hdml.J_m  # harder negatives, larger triplet loss
    # full pull: each pullable triplet sits at d- = d+, i.e. loss = margin exactly
    emb = head(backbone(x))
    a, p, n = lmu.get_all_triplets_indices(y)
    z = hardness_aware_negatives(emb[a], emb[p], emb[n], 1.0, 1e-3)
    dp, dn = dists(emb[a], emb[p]), dists(emb[a], z)
    m = dists(emb[a], emb[p]) < dists(emb[a], emb[n])
    assert torch.allclose(dn[m], dp[m], atol=1e-10)
    assert hdml.J_syn == pytest.approx(torch.relu(dp - dn + 0.5).mean().item(), rel=1e-10)
    out.backward()


def test_miner_tuples_are_used():
    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="all")
    backbone, head, hdml, x, y = make_setup(miner=miner)
    feats = backbone(x)
    expected = len(miner(head(feats), y)[0])
    hdml(feats, y, head).backward()
    assert hdml.num_synthetic_tuples == expected > 0


def test_any_pml_loss_runs():
    for wrapped in (losses.ContrastiveLoss(), losses.MultiSimilarityLoss(), losses.CircleLoss()):
        backbone, head, hdml, x, y = make_setup(loss=wrapped, alpha=1.0)
        set_averages(hdml, javg=0.5, jgen=1.0)
        out = hdml(backbone(x), y, head)
        out.backward()
        assert torch.isfinite(out)


# ------------------------------------------------------------------ running averages / state
def test_block_average_semantics():
    r = RunningLossAverage("block", block_size=64, initial=1e6)
    vals = [float(i) for i in range(1, 200)]
    for i, v in enumerate(vals[:63]):
        r.update(v)
        assert r.read() == 1e6
    assert not r.update(float("nan"))  # skipped, not counted
    assert r.read() == 1e6
    r.update(vals[63])
    assert r.read() == pytest.approx(sum(vals[:64]) / 64)
    for v in vals[64:127]:
        r.update(v)
        assert r.read() == pytest.approx(sum(vals[:64]) / 64)
    r.update(vals[127])
    assert r.read() == pytest.approx(sum(vals[64:128]) / 64)
    e = RunningLossAverage("ema", momentum=0.9, initial=1e6)
    assert e.read() == 1e6
    e.update(5.0)
    assert e.read() == pytest.approx(5.0)
    e.update(1.0)
    assert e.read() == pytest.approx((0.9 * 0.1 * 5 + 0.1 * 1) / (1 - 0.81))


def test_hdml_updates_averages_every_64_training_steps_only():
    backbone, head, hdml, x, y = make_setup(dtype=torch.float32)
    feats = backbone(x).detach()
    seen_jm = []
    for step in range(64):
        with torch.no_grad():  # the averages do not need a graph; keeps the test fast
            hdml(feats, y, head)
        seen_jm.append(hdml.metric_weight * hdml.J_m)  # official: J_avg is fed the weighted J_m
        if step < 63:
            assert hdml.J_avg_value == 1e6 and hdml.J_gen_avg_value == 1e6
    assert hdml.J_avg_value == pytest.approx(sum(seen_jm) / 64, rel=1e-6)
    assert hdml.J_gen_avg_value < 1e6
    hdml.eval()
    cnt = int(hdml.javg_tracker.count)
    hdml(feats, y, head)
    assert int(hdml.javg_tracker.count) == cnt  # eval mode: no update


def test_state_dict_round_trip():
    backbone, head, hdml, x, y = make_setup(alpha=1.0, average="block", block_size=4)
    feats = backbone(x).detach()
    for _ in range(6):  # one full block + a partial one
        hdml(feats, y, head)
    sd = hdml.state_dict()
    for k in ("javg_tracker.value", "javg_tracker.block", "javg_tracker.count",
              "jgen_tracker.value", "generator.2.running_mean", "classifier.weight"):
        assert k in sd
    assert int(sd["javg_tracker.count"]) == 2 and float(sd["javg_tracker.value"]) != 1e6
    _, _, fresh, _, _ = make_setup(seed=123, alpha=1.0, average="block", block_size=4)
    fresh.load_state_dict(copy.deepcopy(sd))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    out_a, out_b = hdml(feats, y, head), fresh(feats, y, head)
    assert torch.equal(out_a, out_b)
    for _ in range(3):
        hdml(feats, y, head), fresh(feats, y, head)
    assert hdml.J_avg_value == fresh.J_avg_value and hdml.J_gen_avg_value == fresh.J_gen_avg_value


# ------------------------------------------------------------------ degenerate batches / validation
@pytest.mark.parametrize("use_generator", [True, False])
@pytest.mark.parametrize("case", ["one_class", "one_sample", "empty_miner", "npair_one_class"])
def test_degenerate_batches_zero_connected_never_nan(case, use_generator):
    kw = {"use_generator": use_generator}
    if case == "npair_one_class":
        kw["loss"] = losses.NPairsLoss()
    if case == "empty_miner":
        kw["miner"] = miners.TripletMarginMiner(margin=-1e9)  # nothing violates: no triplets
    backbone, head, hdml, x, y = make_setup(**kw)
    if case in ("one_class", "npair_one_class"):
        y = torch.zeros(B, dtype=torch.long)
    if case == "one_sample":
        x, y = x[:1], y[:1]
    feats = backbone(x)
    before = {k: v.clone() for k, v in hdml.state_dict().items() if "tracker" in k}
    out = hdml(feats, y, head)
    assert out.item() == 0.0 and out.requires_grad and torch.isfinite(out)
    out.backward()
    for p in list(backbone.parameters()) + list(head.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad == 0).all()
    if use_generator:
        for p in hdml.generator.parameters():
            assert p.grad is not None and (p.grad == 0).all()
        for p in hdml.classifier.parameters():  # the classifier still learns from real features
            assert p.grad is not None and torch.isfinite(p.grad).all()
    for k, v in before.items():  # averages untouched by degenerate batches
        assert torch.equal(v, hdml.state_dict()[k])
    assert hdml.num_synthetic_tuples == 0 and not math.isnan(hdml.J_metric)


def test_argument_validation():
    T = losses.TripletMarginLoss()
    ok = dict(loss=T, embedding_size=4, feature_size=8, num_classes=3)
    bad = [
        dict(alpha=-1.0), dict(beta=-1.0), dict(lambda_=1.5), dict(softmax_factor=-2.0),
        dict(tuple_mode="quad"), dict(synthesize="anchors"), dict(synthetic_weight=2.0),
        dict(average="median"), dict(block_size=0), dict(ema_momentum=1.0), dict(initial_average=0.0),
        dict(javg_source="x"), dict(max_synthetic_tuples=0), dict(triplets_per_anchor=-3),
        dict(embedding_size=None), dict(num_classes=0), dict(use_generator="yes"),
        dict(use_generator=False, generator=torch.nn.Identity()), dict(miner="hard"),
    ]
    for b in bad:
        with pytest.raises(ValueError):
            HDMLLoss(**{**ok, **b})
    with pytest.raises(ValueError):
        HDMLLoss(loss=lambda e, l: e.sum())  # not a Module
    with pytest.raises(ValueError):
        HDMLLoss(loss=torch.nn.MSELoss(), tuple_mode="npair", use_generator=False)  # no .distance
    h = HDMLLoss(**ok)
    head = torch.nn.Linear(8, 4)
    f = torch.randn(5, 8)
    with pytest.raises(ValueError):
        h(f, torch.arange(4), head)  # batch mismatch
    with pytest.raises(ValueError):
        h(f, torch.tensor([0, 1, 2, 3, 4]), head)  # label 4 out of classifier range
    with pytest.raises(ValueError):
        h(f, torch.zeros(5), head)  # float labels
    with pytest.raises(ValueError):
        h(f.unsqueeze(-1), torch.zeros(5, dtype=torch.long), head)  # features not 2-D
    with pytest.raises(ValueError):
        h(f[:0], torch.zeros(0, dtype=torch.long), head)


def test_recordable_attributes():
    backbone, head, hdml, x, y = make_setup(alpha=1.0)
    hdml(backbone(x), y, head)
    names = set(hdml._record_these)
    for n in ("J_m", "J_syn", "J_gen", "J_recon", "J_soft", "J_cls", "J_metric", "J_avg", "J_gen_avg",
              "metric_weight", "syn_weight", "hardness_decay", "pull_strength", "lambda_", "alpha", "beta"):
        assert n in names and isinstance(getattr(hdml, n), (int, float)), n
    assert hdml.J_gen == pytest.approx(hdml.J_recon + hdml.J_soft, rel=1e-6)
    assert hdml.metric_weight == pytest.approx(math.exp(-1e4 / 1e6))


def test_max_synthetic_tuples_and_ema_option():
    backbone, head, hdml, x, y = make_setup(max_synthetic_tuples=7, average="ema", ema_momentum=0.5)
    out = hdml(backbone(x), y, head)
    out.backward()
    assert hdml.num_synthetic_tuples == 7
    assert hdml.J_avg_value == pytest.approx(hdml.metric_weight * hdml.J_m)  # first EMA value, bias-corrected
    assert "javg_tracker.ema" in hdml.state_dict()


@pytest.mark.parametrize("make", [
    lambda: losses.TripletMarginLoss(margin=0.2),
    lambda: losses.TripletMarginLoss(margin=0.2, swap=True),
    lambda: losses.TripletMarginLoss(margin=0.2, smooth_loss=True),
    lambda: losses.TripletMarginLoss(margin=0.1, distance=distances.CosineSimilarity()),
    lambda: losses.TripletMarginLoss(margin=0.1, distance=distances.LpDistance(normalize_embeddings=False, power=2)),
    lambda: losses.TripletMarginLoss(margin=0.1, reducer=reducers.MeanReducer()),
    lambda: losses.TripletMarginLoss(margin=0.1, reducer=reducers.SumReducer()),
    lambda: losses.TripletMarginLoss(margin=0.1, reducer=reducers.MultipleReducers(
        {"loss": reducers.ThresholdReducer(low=0.05)})),
])
def test_rowwise_synthetic_triplet_loss_equals_pml(make):
    """J_syn computed triplet by triplet equals PML's own (B+T)² path, value and gradient,
    including duplicate rows (zero distances)."""
    g = torch.Generator().manual_seed(31)
    B, T = 12, 40
    emb = torch.randn(B + T, EMB, generator=g, dtype=DT)
    emb[B] = emb[0]  # a synthetic negative equal to an anchor: zero distance
    labels = torch.randint(0, 4, (B + T,), generator=g)
    a = torch.randint(0, B, (T,), generator=g)
    p = torch.randint(0, B, (T,), generator=g)
    p[0] = a[0]  # zero anchor-positive distance
    n = B + torch.arange(T)
    a[0] = 0
    hdml = HDMLLoss(make(), embedding_size=EMB, feature_size=FEAT, num_classes=C)
    from pml_ext.losses.hdml_synthetic_tuples import _rowwise_triplet_kind

    assert _rowwise_triplet_kind(hdml.loss) is not None  # the row-wise path is the one tested
    e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    fast = hdml._triplet_syn_loss(e1, labels, (a, p, n))
    slow = make()(e2, labels, (a, p, n))
    assert fast.item() == pytest.approx(slow.item(), rel=1e-9, abs=1e-12)
    fast.backward()
    slow.backward()
    assert torch.isfinite(e1.grad).all()
    assert torch.allclose(e1.grad, e2.grad, atol=1e-8)


def test_generator_runs_once_per_step_and_routes_its_gradients():
    """One generator forward per step (BatchNorm counts one batch), and the routed call gives the
    same gradients as two separate calls: generator parameters from J_gen only, the embedding
    from J_syn only."""
    from pml_ext.losses.hdml_generator import _RoutedCall

    torch.manual_seed(3)
    gen = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 4))
    gen = gen.to(DT)
    z = torch.randn(9, 5, dtype=DT, requires_grad=True)
    before = int(gen[2].num_batches_tracked)
    y_gen, y_met = _RoutedCall.apply(gen, z, *gen.parameters())
    assert int(gen[2].num_batches_tracked) == before + 1
    w1, w2 = torch.randn(9, 4, dtype=DT), torch.randn(9, 4, dtype=DT)
    ((y_gen * w1).sum() + (y_met * w2).sum()).backward()
    got_params = [p.grad.clone() for p in gen.parameters()]
    got_z = z.grad.clone()
    # reference: two calls, one with a detached input, one with detached parameters (same BN batch)
    gen.zero_grad()
    z.grad = None
    gen.train()
    (gen(z.detach()) * w1).sum().backward()
    frozen = {n: p.detach() for n, p in gen.named_parameters()}
    frozen.update({n: b.clone() for n, b in gen.named_buffers()})
    (torch.func.functional_call(gen, frozen, (z,)) * w2).sum().backward()
    for got, p in zip(got_params, gen.parameters()):
        assert torch.allclose(got, p.grad)
    assert torch.allclose(got_z, z.grad)
    assert torch.autograd.gradcheck(lambda t: _RoutedCall.apply(gen, t, *gen.parameters())[1], (z.detach().requires_grad_(),))


def test_reassigned_wrapped_loss_is_checked_and_sets_the_auto_settings():
    """``hdml.loss = ...`` after construction: tuple_mode="auto" and triplets_per_anchor=None
    follow the new loss; an unusable loss is refused and leaves the old one in place; explicit
    settings stay."""
    hdml = HDMLLoss(losses.TripletMarginLoss(triplets_per_anchor=3), embedding_size=4, feature_size=8, num_classes=3)
    assert hdml.tuple_mode == "triplet" and hdml.triplets_per_anchor == 3
    hdml.loss = losses.NPairsLoss()
    assert hdml.tuple_mode == "npair" and hdml.triplets_per_anchor == "all"
    assert hdml.recorded_modules["loss"] is hdml.loss
    npair = hdml.loss
    with pytest.raises(ValueError, match="cannot wrap PNPLoss"):
        hdml.loss = losses.PNPLoss()
    assert hdml.loss is npair and hdml.tuple_mode == "npair"
    x, y = torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    out = hdml(x, y, torch.nn.Linear(8, 4))
    assert torch.isfinite(out) and hdml.num_synthetic_tuples == 3 * 2  # N-pair: T (T - 1) negatives
    fixed = HDMLLoss(losses.TripletMarginLoss(), tuple_mode="triplet", triplets_per_anchor=2, embedding_size=4,
                     feature_size=8, num_classes=3)
    fixed.loss = losses.NPairsLoss()
    assert fixed.tuple_mode == "triplet" and fixed.triplets_per_anchor == 2
