"""Embedding Expansion against brute-force references written from the paper's formulas."""
import pytest
import torch
from pytorch_metric_learning import distances, losses, miners, reducers

import pml_ext.functional as F
from pml_ext.losses import EmbeddingExpansionLoss, HPHNTripletLoss
from pml_ext.miners import EmbeddingExpansionMiner

from . import ee_reference as ref

LOSS_NAMES = ref.WRAPPED_LOSSES

DISTANCES = {
    "l2": lambda: distances.LpDistance(),
    "l2raw": lambda: distances.LpDistance(normalize_embeddings=False),
    "l2sq": lambda: distances.LpDistance(power=2),
    "l1": lambda: distances.LpDistance(p=1),
    "cos": lambda: distances.CosineSimilarity(),
    "dot": lambda: distances.DotProductSimilarity(normalize_embeddings=False),
}


def batch(seed=0, classes=(0, 0, 1, 1, 1, 2, 2, 0, 3, 3), dim=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(classes), dim, generator=g, dtype=torch.float64)
    return x, torch.tensor(classes)


@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_division_points_match_formula(pairs, n, normalize):
    x, y = batch()
    pts, labs = F.division_points(x, y, n, normalize, pairs)
    want, want_labs, _ = ref.synthetic_points(x, y, n, normalize, pairs)
    assert pts.shape == (len(want), x.shape[1])
    assert torch.allclose(pts, torch.stack(want), atol=1e-12)
    assert labs.tolist() == want_labs


def test_adjacent_pairs_follow_batch_order_and_skip_odd_leftover():
    y = torch.tensor([5, 3, 5, 3, 5, 3, 3, 9])
    i, j = F.division_point_pairs(y, "adjacent")
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 2), (1, 3), (5, 6)]
    i, j = F.division_point_pairs(y, "all")
    assert len(i) == 3 + 6


def test_division_points_of_unit_vectors_are_unit_and_between():
    x = torch.nn.functional.normalize(torch.randn(4, 3, dtype=torch.float64), dim=1)
    pts, _ = F.division_points(x, torch.tensor([0, 0, 1, 1]), 4, True, "adjacent")
    assert torch.allclose(pts.norm(dim=1), torch.ones(8, dtype=torch.float64))
    raw, _ = F.division_points(x, torch.tensor([0, 0, 1, 1]), 4, False, "adjacent")
    assert (raw.norm(dim=1) < 1).all()


@pytest.mark.parametrize("kind", list(DISTANCES))
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("n", [0, 2])
def test_hardened_matrix_matches_brute_force(kind, pairs, n):
    x, y = batch(seed=1)
    normalize = kind != "l2raw"
    dist = DISTANCES[kind]()
    miner = EmbeddingExpansionMiner(n_points=n, normalize=normalize, pairs=pairs, distance=dist)
    hb = miner.harden(x, y)
    base = dist(x)
    got = F.hardened_pair_matrix(base, hb.classes, hb.classes, hb.hardest)
    want = torch.tensor(ref.hardened_matrix(x, y, n, normalize, pairs, kind), dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-9), (got - want).abs().max()


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("n", [0, 2])
def test_wrapped_loss_matches_brute_force(name, n):
    x, y = batch(seed=2, classes=(0, 0, 1, 1, 1, 2, 2, 2, 0, 3, 3))
    loss = EmbeddingExpansionLoss(getattr(losses, name)(), n_points=n)
    got = loss(x, y)
    dist = loss.loss.distance
    kind = {
        "LpDistance": "l2",
        "CosineSimilarity": "cos",
        "DotProductSimilarity": "dot" if not dist.normalize_embeddings else "cos",
    }[type(dist).__name__]
    H = ref.hardened_matrix(x, y, n, True, "all", kind)
    want = ref.loss_from_matrix(name, H, y)
    assert got.item() == pytest.approx(want, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_reference_losses_agree_with_pml_on_plain_matrix(name):
    """The reference formulas are PML's losses: check them on the plain (unhardened) matrix."""
    x, y = batch(seed=3, classes=(0, 0, 1, 1, 1, 2, 2, 2, 0, 3, 3))
    pml_loss = getattr(losses, name)()
    H = pml_loss.distance(x).tolist()
    assert pml_loss(x, y).item() == pytest.approx(ref.loss_from_matrix(name, H, y), rel=1e-7, abs=1e-9)


def test_hardened_values_are_never_easier_than_plain():
    x, y = batch(seed=4)
    for kind in ["l2", "cos"]:
        dist = DISTANCES[kind]()
        hb = EmbeddingExpansionMiner(n_points=4, distance=dist).harden(x, y)
        plain = dist(x)
        hard = F.hardened_pair_matrix(plain, hb.classes, hb.classes, hb.hardest)
        neg = y[:, None] != y[None, :]
        if dist.is_inverted:
            assert (hard[neg] >= plain[neg] - 1e-12).all()
        else:
            assert (hard[neg] <= plain[neg] + 1e-12).all()
        same = ~neg
        assert torch.equal(hard[same], plain[same])


@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("n", [0, 1, 3])
def test_hphn_matches_brute_force(pairs, n):
    x, y = batch(seed=5, classes=(0, 0, 1, 1, 1, 2, 2, 0, 2, 0))
    got = HPHNTripletLoss(margin=0.1, n_points=n, pairs=pairs)(x, y)
    assert got.item() == pytest.approx(ref.hphn_triplet(x, y, n, True, pairs, 0.1), rel=1e-9)


def _hphn_loops(x, y, n, pairs, dist, margin):
    """HPHN from its definition, loops over anchors and points on the explicit expanded set (any
    PML distance; differentiable, for value and gradient references)."""
    ex = F.expand(y, n, pairs, x.dtype)
    pts = F.expanded_embeddings(dist.maybe_normalize(x), ex, True)
    b, m = len(y), len(ex.labels)
    better = max if dist.is_inverted else min  # the harder negative
    worse = min if dist.is_inverted else max  # the harder positive
    d = lambda i, j: dist.compute_mat(pts[i:i + 1], pts[j:j + 1])[0, 0] ** dist.power  # noqa: E731
    losses_ = []
    for i in range(b):
        pos = [d(i, j) for j in range(b) if j != i and y[j] == y[i]]
        group = [i] + [u for u in range(b, m) if i in (int(ex.first[u]), int(ex.second[u]))]
        neg = [d(u, v) for u in group for v in range(m) if ex.labels[v] != y[i]]
        if pos and neg:
            ap, an = worse(pos), better(neg)
            losses_.append(torch.relu(dist.margin(ap, an) + margin))
    return torch.stack(losses_).mean()


@pytest.mark.parametrize("dist", [distances.LpDistance(p=1), distances.LpDistance(power=2),
                                  distances.CosineSimilarity(), distances.DotProductSimilarity()])
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
def test_hphn_value_and_gradient_match_loops_for_any_distance(dist, pairs):
    """The search runs without autograd and only the selected distances are recomputed: the value
    and the gradient equal the definition's (Gram-derived and explicit-matrix distances alike)."""
    x, y = batch(seed=13, classes=(0, 0, 1, 1, 1, 2, 2, 0), dim=5)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = HPHNTripletLoss(margin=0.3, n_points=2, pairs=pairs, distance=dist)(a, y)
    want = _hphn_loops(b, y, 2, pairs, dist, 0.3)
    assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    got.backward()
    want.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("dist", [None, distances.CosineSimilarity(), distances.LpDistance(power=2)])
def test_hphn_with_zero_points_is_batch_hard_triplet(dist):
    x, y = batch(seed=6)
    kw = {} if dist is None else {"distance": dist}
    ours = HPHNTripletLoss(margin=0.2, n_points=0, **kw)(x, y)
    pml = losses.TripletMarginLoss(margin=0.2, reducer=reducers.MeanReducer(), **kw)
    want = pml(x, y, miners.BatchHardMiner(**kw)(x, y))
    assert ours.item() == pytest.approx(want.item(), rel=1e-9)


def test_ee_with_zero_points_is_class_pair_hard_negative_mining():
    """n=0: each negative value is the hardest original pair between the two classes."""
    x, y = batch(seed=7)
    dist = distances.LpDistance()
    hb = EmbeddingExpansionMiner(n_points=0, distance=dist).harden(x, y)
    assert hb.expanded.is_synthetic.sum() == 0
    plain = dist(x)
    for a in range(len(hb.unique_labels)):
        for b in range(len(hb.unique_labels)):
            block = plain[hb.classes == a][:, hb.classes == b]
            assert hb.hardest[a, b] == pytest.approx(block.min().item())


def test_harden_returns_hardest_pairs_in_expanded_set_and_selection_ratio():
    x, y = batch(seed=8)
    miner = EmbeddingExpansionMiner(n_points=2, collect_stats=True)
    hb = miner.harden(x, y)
    c = len(hb.unique_labels)
    off = ~torch.eye(c, dtype=torch.bool)
    a2, n = hb.hardest_rows[off], hb.hardest_cols[off]
    assert len(a2) == c * (c - 1)
    ex_labels = hb.expanded.labels
    mat = F.expanded_distance_matrix(x, hb.expanded, miner.distance, True)
    assert (ex_labels[a2] != ex_labels[n]).all()
    # the hardest pair's value is the smallest distance between the two classes' expanded sets
    assert torch.allclose(mat[a2, n], hb.hardest[off])
    involves = (a2 >= len(y)) | (n >= len(y))
    assert miner.num_synthetic == int(hb.expanded.is_synthetic.sum())
    # the recorded ratio counts strictly harder synthetic pairs; it can't exceed the involvement rate
    assert 0.0 <= miner.synthetic_selection_ratio <= involves.float().mean().item() + 1e-9


@pytest.mark.parametrize("kind", ["l2", "cos", "l1"])
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
def test_miner_with_the_expanded_reference_set_matches_brute_force(kind, pairs):
    """Reference-set mode: positives = original same-class pairs; for every anchor and other
    class, the hardest point of that class's expanded set (loops, float64)."""
    x, y = batch(seed=19, classes=(0, 0, 1, 1, 1, 2, 2, 0, 3, 3))
    miner = EmbeddingExpansionMiner(n_points=2, pairs=pairs, distance=DISTANCES[kind](), collect_stats=True)
    ref_emb, ref_labels = miner.expand(x, y)
    a1, p, a2, n = miner(x, y, ref_emb, ref_labels)
    xs = [v for v in (torch.stack(ref.normalize_rows(x)) if kind == "cos" or kind == "l2" else
                      torch.stack([v / v.abs().sum() for v in x]))]
    pts, labs, _ = ref.synthetic_points(torch.stack(xs), y, 2, True, pairs)
    all_pts, all_labs = xs + pts, y.tolist() + labs
    assert torch.allclose(ref_emb, torch.stack(all_pts), atol=1e-12) and ref_labels.tolist() == all_labs
    if kind == "l1":  # a PML distance normalises the reference set its own way (L1 here)
        all_pts = [v / v.abs().sum() for v in all_pts]
    assert sorted(zip(a1.tolist(), p.tolist())) == [(i, j) for i in range(len(y)) for j in range(len(y))
                                                    if i != j and y[i] == y[j]]
    inv = ref.INVERTED[kind]
    want = []
    for i in range(len(y)):
        for b in sorted(set(y.tolist()), key=y.tolist().index):
            if b == y[i]:
                continue
            vals = [(ref.pair_value(xs[i], q, kind), j) for j, (q, lq) in enumerate(zip(all_pts, all_labs)) if lq == b]
            best = max(v for v, _ in vals) if inv else min(v for v, _ in vals)
            want.append((i, best))
    got = sorted(zip(a2.tolist(), [ref.pair_value(xs[i], all_pts[j], kind) for i, j in zip(a2.tolist(), n.tolist())]))
    assert [g[0] for g in got] == sorted(w[0] for w in want)
    for (i, v), (wi, wv) in zip(got, sorted(want)):
        assert i == wi and v == pytest.approx(wv, abs=1e-9)
    assert (ref_labels[n] != y[a2]).all()
    synthetic = n >= len(y)
    assert miner.synthetic_selection_ratio == pytest.approx(synthetic.float().mean().item())


def test_miner_without_a_reference_set_says_how_to_use_it():
    x, y = batch(seed=20)
    miner = EmbeddingExpansionMiner()
    with pytest.raises(ValueError, match=r"miner.expand\(embeddings, labels\).*EmbeddingExpansionLoss\(loss\)"):
        miner(x, y)
    with pytest.raises(ValueError, match="expanded set"):  # a reference set that is not the expansion
        miner(x, y, x[:4], y[:4])
    ref_emb, _ = miner.expand(x, y)
    with pytest.raises(ValueError, match="expanded set"):  # no reference labels
        miner(x, y, ref_emb)


def test_gradients_reach_originals_through_selected_pair():
    x, y = batch(seed=9)
    x = x.clone().requires_grad_(True)
    loss = EmbeddingExpansionLoss(losses.ContrastiveLoss(pos_margin=0, neg_margin=10), n_points=2)
    # only negatives contribute (pos margin 0 on a single class pair would be zero anyway)
    loss(x, y).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["TripletMarginLoss", "MultiSimilarityLoss", "NPairsLoss", "LiftedStructureLoss"])
def test_gradcheck_wrapped(name):
    x, y = batch(seed=10, classes=(0, 0, 1, 1, 2, 2), dim=3)
    x = x.clone().requires_grad_(True)
    loss = EmbeddingExpansionLoss(getattr(losses, name)(), n_points=2)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("pairs", ["all", "adjacent"])
def test_gradcheck_hphn(pairs):
    x, y = batch(seed=11, classes=(0, 0, 1, 1, 2, 2, 2), dim=3)
    x = x.clone().requires_grad_(True)
    loss = HPHNTripletLoss(margin=0.5, n_points=2, pairs=pairs)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x,), eps=1e-6, atol=1e-5)


def test_gradcheck_expanded_distance_matrix():
    x, y = batch(seed=12, classes=(0, 0, 1, 1), dim=3)
    x = x.clone().requires_grad_(True)
    ex = F.expand(y, 2, "all", x.dtype)
    for dist in [distances.LpDistance(), distances.CosineSimilarity(), distances.LpDistance(p=1)]:
        assert torch.autograd.gradcheck(
            lambda t: F.expanded_distance_matrix(t, ex, dist, True), (x,), eps=1e-6, atol=1e-5
        )


def test_gram_shortcut_equals_explicit_points():
    x, y = batch(seed=13, dim=16)
    ex = F.expand(y, 3, "all", x.dtype)
    for dist in [distances.LpDistance(), distances.LpDistance(normalize_embeddings=False, power=2),
                 distances.CosineSimilarity(), distances.DotProductSimilarity(normalize_embeddings=False)]:
        for normalize in [True, False]:
            fast = F.expanded_distance_matrix(x, ex, dist, normalize)
            pts = F.expanded_embeddings(dist.maybe_normalize(x), ex, normalize)
            slow = dist.compute_mat(pts, pts) ** dist.power
            off = ~torch.eye(len(pts), dtype=torch.bool)
            # cdist's own diagonal carries a rounding residue (it uses a matmul above 25 rows)
            assert torch.allclose(fast[off], slow[off], atol=1e-9)
            if not dist.is_inverted:
                assert (torch.diagonal(fast) == 0).all()


def test_user_miner_tuples_are_respected():
    x, y = batch(seed=14)
    base = losses.TripletMarginLoss(margin=0.1)
    tuples = miners.TripletMarginMiner(margin=0.1, type_of_triplets="all")(x, y)
    ee = EmbeddingExpansionLoss(base, n_points=2)
    got = ee(x, y, tuples)
    a, p, n = tuples
    H = torch.tensor(ref.hardened_matrix(x, y, 2, True, "all", "l2"), dtype=torch.float64)
    v = torch.relu(H[a, p] - H[a, n] + 0.1)
    assert got.item() == pytest.approx(v[v > 0].mean().item(), rel=1e-9)


def test_loss_keeps_its_distance_and_reducer_after_call():
    base = losses.TripletMarginLoss()
    dist, red = base.distance, base.reducer
    ee = EmbeddingExpansionLoss(base)
    x, y = batch()
    ee(x, y)
    assert base.distance is dist and base.reducer is red and type(base.distance) is distances.LpDistance
    # the plain loss still gives plain values afterwards
    assert base(x, y).item() == pytest.approx(losses.TripletMarginLoss()(x, y).item())


@pytest.mark.parametrize("balanced", [True, False])
def test_search_on_inner_products_selects_the_smallest_distance(balanced):
    """The unit-sphere shortcut (search on inner products) picks the same pairs as distances."""
    classes = (0, 0, 1, 1, 2, 2, 3, 3) if balanced else (0, 0, 0, 1, 1, 2, 2, 2, 2, 3)
    x, y = batch(seed=15, classes=classes, dim=7)
    uniq, cls = F.class_indices(y)
    ex = F.expand(y, 3, "all", x.dtype)
    ex_cls = torch.cat([cls, cls[ex.first[len(y):]]])
    dist = distances.LpDistance()
    hp = F.hardest_negative_pairs(x, ex, cls, len(uniq), dist, True)
    assert hp.search_inverted  # the shortcut was taken
    full = F.expanded_distance_matrix(x, ex, dist, True)
    for a in range(len(uniq)):
        for b in range(len(uniq)):
            block = full[ex_cls == a][:, ex_cls == b]
            assert hp.hardest[a, b].item() == pytest.approx(block.min().item(), abs=1e-9)


@pytest.mark.parametrize("make", [
    lambda: losses.TripletMarginLoss(margin=0.2),
    lambda: losses.TripletMarginLoss(margin=0.2, smooth_loss=True),
    lambda: losses.TripletMarginLoss(margin=0.2, distance=distances.CosineSimilarity()),
    lambda: losses.TripletMarginLoss(margin=0.2, reducer=reducers.MeanReducer()),
    lambda: losses.LiftedStructureLoss(neg_margin=0.8, pos_margin=0.1),
    lambda: losses.LiftedStructureLoss(distance=distances.CosineSimilarity()),
    lambda: losses.LiftedStructureLoss(reducer=reducers.SumReducer()),
    lambda: losses.NPairsLoss(),
    lambda: losses.NPairsLoss(distance=distances.LpDistance()),
    lambda: losses.NPairsLoss(reducer=reducers.AvgNonZeroReducer()),
    lambda: losses.ContrastiveLoss(),
    lambda: losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.7, distance=distances.CosineSimilarity()),
    lambda: losses.ContrastiveLoss(reducer=reducers.MeanReducer()),
    lambda: losses.ContrastiveLoss(reducer=reducers.MultipleReducers(
        {"pos_loss": reducers.ThresholdReducer(low=0.1)}, default_reducer=reducers.SumReducer())),
])
@pytest.mark.parametrize("classes", [(0, 0, 1, 1, 1, 2, 2, 0, 3, 3, 3, 3), (0, 0, 1, 2), (0, 0, 0, 0), (0, 1)])
def test_dense_paths_equal_pml_on_the_hardened_matrix(make, classes, monkeypatch):
    """The dense Triplet / Lifted / N-pair / Contrastive paths give exactly what PML computes
    through its index lists (N-pair: through the sub-batches it hands its distance)."""
    import pml_ext.losses.embedding_expansion_dense as eel

    taken = []
    for name in ("_dense_triplet", "_dense_lifted", "_dense_npairs", "_dense_contrastive"):
        monkeypatch.setattr(eel, name, lambda *a, f=getattr(eel, name): taken.append(1) or f(*a))
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    x, y = batch(seed=16, classes=classes)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    base = make()
    dense = EmbeddingExpansionLoss(base)(x1, y)
    all_tuples = (lmu.get_all_triplets_indices(y) if isinstance(base, losses.TripletMarginLoss)
                  else lmu.get_all_pairs_indices(y))
    if isinstance(base, losses.NPairsLoss):  # shuffled labels: PML orders its anchors by label
        y = y * 5 % 11  # 0, 1, 2, 3 -> 0, 5, 10, 4
        all_tuples = lmu.get_all_pairs_indices(y)
    assert len(taken) == 1  # the dense path ran, once
    generic = EmbeddingExpansionLoss(make())(x2, y, all_tuples)  # indices given: PML's own path
    assert len(taken) == 1
    assert dense.item() == pytest.approx(generic.item(), rel=1e-10, abs=1e-12)
    dense.backward()
    generic.backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-10)


def test_npair_structure_with_numpy_equals_the_tensor_operations_and_pml():
    """The dense N-pair's anchors and similarity index, built with NumPy on CPU, equal its
    tensor-operation build (the GPU's), and its (anchor, positive) pairs are PML's (the first two
    samples of every class with two)."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    import pml_ext.losses.embedding_expansion_dense as eel

    g = torch.Generator().manual_seed(41)
    patterns = [torch.randint(0, c, (b,), generator=g) for b, c in ((12, 5), (40, 40), (64, 9), (7, 3))]
    for y in patterns + [torch.arange(6), torch.zeros(5, dtype=torch.long), torch.zeros(0, dtype=torch.long)]:
        layout = F.batch_layout(y, 2, "all", torch.float64)
        (a, index), want = eel._npair_index_numpy(layout), eel._npair_index_tensors(layout)
        assert torch.equal(a, want[0]) and torch.equal(index, want[1]) and index.dtype == want[1].dtype
        c, b = layout.num_classes, y.numel()
        p = index.diagonal() - c * c - a * b
        pml = lmu.convert_to_pos_pairs_with_unique_labels(None, y) if b else (a, p)
        assert sorted(zip(a.tolist(), p.tolist())) == sorted(zip(*(t.tolist() for t in pml)))


@pytest.mark.skipif(not F.compiled_available(), reason="numba does not import here")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("negate", [False, True])
def test_compiled_npair_cross_entropy_equals_the_tensor_operations(dtype, negate):
    """The dense N-pair's compiled anchors + gather + cross-entropy: PML's anchors in PML's order
    and per-anchor losses (structure, gather, sign, torch's cross-entropy, ordering by label) and
    their gradients, on random class-pair values and labels; a gradient check in float64; one
    anchor (a 1 x 1 matrix: zero loss, zero gradient); no anchor (empty)."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    import pml_ext.losses.embedding_expansion_dense as eel

    g = torch.Generator().manual_seed(43)
    for y in (torch.randint(0, 9, (30,), generator=g), torch.tensor([0, 1, 1, 2, 3, 3, 3]),
              torch.randint(0, 40, (50,), generator=g)):
        layout = F.batch_layout(y, 2, "all", dtype)
        a, index = eel._npair_structure(layout)
        labels = torch.randperm(1000, generator=g)[:layout.num_classes][layout.classes]  # any class ids
        c, b = layout.num_classes, y.numel()
        hardest = torch.randn(c, c, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
        batch = torch.randn(b, b, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
        slots = layout._original_slots
        got, anchors = eel._NPairCrossEntropy.apply(hardest, batch, slots, labels, negate)
        order = torch.argsort(labels[a])
        assert torch.equal(anchors, a[order])
        assert torch.equal(anchors, lmu.convert_to_pos_pairs_with_unique_labels(None, labels)[0])
        sim = F.take(torch.cat([hardest.reshape(-1), batch.reshape(-1)]), index)
        want = torch.nn.functional.cross_entropy(-sim if negate else sim, torch.arange(a.numel()),
                                                 reduction="none")[order]
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert got.dtype == dtype and torch.allclose(got, want, rtol=tol, atol=tol)
        w = torch.randn(a.numel(), generator=g, dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad((got * w).sum(), (hardest, batch))
        wants = torch.autograd.grad((want * w).sum(), (hardest, batch))
        for u, v in zip(grads, wants):
            assert torch.allclose(u, v, rtol=tol, atol=tol)
        if dtype == torch.float64:
            assert torch.autograd.gradcheck(lambda h, x: eel._NPairCrossEntropy.apply(h, x, slots, labels, negate)[0],
                                            (hardest.detach().requires_grad_(), batch.detach().requires_grad_()))
    for y, n in ((torch.tensor([0, 0, 1, 2]), 1), (torch.tensor([0, 1, 2]), 0)):  # one anchor; none
        layout = F.batch_layout(y, 2, "all", dtype)
        hardest = torch.randn(3, 3, dtype=dtype, requires_grad=True)
        batch = torch.randn(len(y), len(y), dtype=dtype, requires_grad=True)
        got, anchors = eel._NPairCrossEntropy.apply(hardest, batch, layout._original_slots, y, negate)
        assert got.tolist() == [0.0] * n and anchors.tolist() == [0] * n
        if n:
            got.sum().backward()
            assert not hardest.grad.any() and not batch.grad.any()


@pytest.mark.skipif(not F.compiled_available(), reason="numba does not import here")
def test_npair_with_singleton_classes_equal_with_and_without_the_compiled_kernels(monkeypatch):
    """N-pair reads only its anchors' class pairs, so most class pairs get a zero gradient (the
    compiled backward skips them): loss and gradient equal the tensor operations' (float64); also
    with bool labels (two classes)."""
    import pml_ext.functional.compiled as K

    g = torch.Generator().manual_seed(44)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    for y in (torch.randint(0, 60, (40,), generator=g), torch.rand(40, generator=g) < 0.3):  # many singletons; bool
        out = []
        for mode in ("auto", "off"):
            monkeypatch.setattr(K, "_COMPILED", mode)
            F.embedding_expansion._LAYOUT_CACHE.clear()
            xx = x.clone().requires_grad_(True)
            loss = EmbeddingExpansionLoss(losses.NPairsLoss())(xx, y)
            loss.backward()
            out.append((loss.detach(), xx.grad))
        F.embedding_expansion._LAYOUT_CACHE.clear()
        assert torch.allclose(out[0][0], out[1][0], rtol=1e-12, atol=1e-12)
        assert torch.allclose(out[0][1], out[1][1], rtol=1e-10, atol=1e-12)
        assert out[0][1].abs().sum() > 0


def test_npair_cross_entropy_runs_compiled_only_for_pmls_own():
    """A user's cross-entropy (weights, label smoothing, an ignored target) runs as given: the compiled
    one computes PML's only."""
    import pml_ext.losses.embedding_expansion_dense as eel

    loss = losses.NPairsLoss()
    assert eel._plain_cross_entropy(loss)
    for kwargs in ({"label_smoothing": 0.1}, {"ignore_index": 0}, {"weight": torch.ones(3)}):
        loss.cross_entropy = torch.nn.CrossEntropyLoss(reduction="none", **kwargs)
        assert not eel._plain_cross_entropy(loss)
    x, y = batch(seed=16, classes=(0, 0, 1, 1, 2, 2))
    loss.cross_entropy = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=0)
    got = EmbeddingExpansionLoss(loss)(x, y)
    plain = EmbeddingExpansionLoss(losses.NPairsLoss())(x, y)
    assert got.item() != pytest.approx(plain.item())  # anchor 0's loss ignored, as torch's does


@pytest.mark.parametrize("inverted", [False, True])
def test_class_pair_hardest_and_argbest_match_loops(inverted):
    g = torch.Generator().manual_seed(17)
    classes = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    mat = torch.randn(7, 7, generator=g, dtype=torch.float64)
    hardest = F.class_pair_hardest(mat, classes, 3, inverted)
    rows, cols = F.class_pair_argbest(mat, classes, 3, inverted)
    for a in range(3):
        for b in range(3):
            block = [mat[i, j].item() for i in range(7) for j in range(7) if classes[i] == a and classes[j] == b]
            best = max(block) if inverted else min(block)
            assert hardest[a, b].item() == best
            assert classes[rows[a, b]] == a and classes[cols[a, b]] == b and mat[rows[a, b], cols[a, b]] == best


@pytest.mark.parametrize("dist", [distances.LpDistance(), distances.CosineSimilarity(), distances.LpDistance(p=1)])
def test_expanded_pair_values_equal_the_full_matrix_entries(dist):
    x, y = batch(seed=18)
    ex = F.expand(y, 2, "all", x.dtype)
    m = ex.labels.numel()
    rows = torch.randint(0, m, (20,), generator=torch.Generator().manual_seed(0))
    cols = torch.randint(0, m, (20,), generator=torch.Generator().manual_seed(1))
    full = F.expanded_distance_matrix(x, ex, dist, True)
    assert torch.allclose(F.expanded_pair_values(x, ex, rows, cols, dist, True), full[rows, cols], atol=1e-9)


def test_gram_function_gradients_and_double_backward():
    """The one-product Gram backward is exact, twice differentiable, and runs under autocast."""
    from pml_ext.functional.primitives import _Gram

    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_Gram.apply, (x,))
    assert torch.autograd.gradgradcheck(_Gram.apply, (x,))
    y = torch.randn(6, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = _Gram.apply(y)
    g.float().sum().backward()
    assert y.grad.dtype == torch.float32
    # d/dy sum(y yᵀ) = 2 · 1 1ᵀ y (bfloat16 forward, so a loose tolerance)
    assert torch.allclose(y.grad, 2 * torch.ones(6, 6) @ y.detach(), rtol=2e-2, atol=2e-2)


def _compiled_kernels(monkeypatch, mode):
    """The compiled kernels on ("auto"; skip without numba) or off."""
    import importlib.util

    import pml_ext.functional.compiled as K

    if mode == "auto" and importlib.util.find_spec("numba") is None:
        pytest.skip("numba does not import here")
    monkeypatch.setattr(K, "_COMPILED", mode)


@pytest.mark.parametrize("compiled", ["off", "auto"])
def test_normalized_gram_is_normalize_then_gram(monkeypatch, compiled):
    """The fused L2-normalise + Gram function, with tensor operations and with the compiled [B, B]
    steps: exact gradients twice, and the same values (up to rounding: it divides x xᵀ by the
    norms' products) and gradients as PML's normalize followed by the Gram matrix, zero and tiny
    rows included."""
    from pml_ext.functional.primitives import _Gram, _NormalizedGram

    _compiled_kernels(monkeypatch, compiled)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_NormalizedGram.apply, (x,))
    assert torch.autograd.gradgradcheck(_NormalizedGram.apply, (x,))
    w = torch.randn(7, 7, dtype=torch.float64)
    for scale in (1.0, 0.0, 1e-13):  # 1e-13: below normalize's eps, divided by eps
        base = torch.randn(7, 5, dtype=torch.float64)
        base[2] *= scale
        a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
        fused = _NormalizedGram.apply(a)
        ref = _Gram.apply(torch.nn.functional.normalize(b, dim=1))
        assert torch.allclose(fused, ref, rtol=1e-15, atol=1e-15)
        assert torch.equal(fused, fused.t())  # exactly symmetric: the searches read either triangle
        (fused * w).sum().backward()
        (ref * w).sum().backward()
        assert torch.isfinite(a.grad).all()
        assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_normalized_gram_compiled_equals_tensor_operations(monkeypatch, dtype, tol):
    """The compiled [B, B] steps (norms from x xᵀ's diagonal) give the tensor operations' values
    and gradients to rounding, with an asymmetric incoming gradient and a row clamped to eps; the
    result stays exactly symmetric."""
    from pml_ext.functional.primitives import _NormalizedGram

    _compiled_kernels(monkeypatch, "auto")
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 16, generator=g, dtype=dtype)
    base[5] *= 1e-14
    w = torch.randn(40, 40, generator=g, dtype=dtype)
    out = {}
    for mode in ("auto", "off"):
        _compiled_kernels(monkeypatch, mode)
        x = base.clone().requires_grad_(True)
        gram = _NormalizedGram.apply(x)
        (gram * w).sum().backward()
        out[mode] = gram.detach(), x.grad
    assert torch.equal(out["auto"][0], out["auto"][0].t())
    assert torch.allclose(out["auto"][0], out["off"][0], rtol=tol, atol=tol)
    assert torch.allclose(out["auto"][1], out["off"][1], rtol=tol, atol=tol)
    assert out["auto"][1][5].abs().max() > 0  # the clamped row's gradient: 1/eps scale, no projection


@pytest.mark.parametrize("make, fused", [
    (lambda: distances.CosineSimilarity(), True),
    (lambda: distances.LpDistance(), True),
    (lambda: distances.LpDistance(normalize_embeddings=False), False),
    (lambda: distances.DotProductSimilarity(), True),
    (lambda: distances.DotProductSimilarity(normalize_embeddings=False), False),
    (lambda: distances.LpDistance(p=1), False),
])
def test_normalized_gram_dispatch(make, fused, monkeypatch):
    """normalized_gram fuses only PML's own L2 normalisation; otherwise the distance normalises."""
    from pml_ext.functional import primitives as ee

    calls = []
    monkeypatch.setattr(ee._NormalizedGram, "apply", lambda x: calls.append(1) or ee._Gram.apply(
        torch.nn.functional.normalize(x, dim=1)))
    dist = make()
    x = torch.randn(6, 4, dtype=torch.float64)
    g = ee.normalized_gram(x, dist)
    assert bool(calls) == fused
    y = dist.maybe_normalize(x)
    assert torch.allclose(g, y @ y.t(), atol=1e-12)


def test_normalized_gram_custom_normalize_is_respected():
    """A distance subclass with its own normalize keeps it (no fused L2)."""
    from pml_ext.functional.embedding_expansion import normalized_gram

    class Halved(distances.CosineSimilarity):
        def normalize(self, embeddings, dim=1, **kwargs):
            return super().normalize(embeddings, dim=dim, **kwargs) / 2

    x = torch.randn(5, 3, dtype=torch.float64)
    y = Halved().maybe_normalize(x)
    assert torch.allclose(normalized_gram(x, Halved()), y @ y.t(), atol=1e-12)


@pytest.mark.parametrize("make_distance", [
    lambda: distances.LpDistance(),
    lambda: distances.LpDistance(normalize_embeddings=False),
    lambda: distances.LpDistance(power=2),
    lambda: distances.LpDistance(normalize_embeddings=False, power=2),
    lambda: distances.CosineSimilarity(),
    lambda: distances.DotProductSimilarity(),
])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("classes", [(0, 0, 1, 1, 2, 2, 3, 3), (0, 0, 0, 1, 1, 2, 2, 2, 2, 3)])
def test_gradcheck_hardened_matrix_every_distance(make_distance, normalize, classes):
    """The hand-written backward of the selected pairs (and the one-product Gram backward)
    against finite differences, for every Gram-shortcut distance, both normalisations, balanced
    and unbalanced classes."""
    x, y = batch(seed=41, classes=classes, dim=5)
    miner = EmbeddingExpansionMiner(n_points=2, normalize=normalize, distance=make_distance())
    assert torch.autograd.gradcheck(lambda t: miner.harden(t, y).hardened_matrix(), (x.clone().requires_grad_(True),),
                                    eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("compiled", ["off", "auto"])
def test_layout_cache_reuses_a_label_pattern_and_matches_the_uncached_path(monkeypatch, compiled):
    """A pattern with other class ids hits its layout (by the pattern check, or with the compiled
    class numbering by the numbering itself), also after another pattern; the uncached path agrees."""
    _compiled_kernels(monkeypatch, compiled)
    x, y = batch(seed=43, classes=(0, 0, 1, 1, 1, 2, 2, 0, 3, 3))
    miner = EmbeddingExpansionMiner(n_points=2)
    F.embedding_expansion._LAYOUT_CACHE.clear()
    hb1 = miner.harden(x, y)
    ids = torch.tensor([9, 2, 7, 5])
    y2 = ids[y]  # the same pattern with other class ids (and another sorted order)
    hb2 = miner.harden(x, y2)
    assert len(F.embedding_expansion._LAYOUT_CACHE) == 1 and hb2.layout is hb1.layout
    assert torch.equal(hb2.unique_labels, ids[hb1.unique_labels])
    assert torch.equal(hb2.unique_labels[hb2.classes], y2)
    assert torch.equal(hb2.hardened_matrix(), hb1.hardened_matrix())
    uniq, cls = F.class_indices(y2)  # uncached, classes in sorted-label order
    hp = F.hardest_negative_pairs(x, F.expand(y2, 2, "all", x.dtype), cls, len(uniq), distances.LpDistance(), True)
    assert torch.allclose(F.hardened_pair_matrix(hp.originals_mat, cls, cls, hp.hardest), hb2.hardened_matrix(),
                          atol=1e-12)
    miner.harden(x, torch.arange(10) % 3)  # another pattern: its own layout
    assert len(F.embedding_expansion._LAYOUT_CACHE) == 2
    assert miner.harden(x, torch.tensor([4, 1, 0, 3])[y]).layout is hb1.layout  # the first pattern again
    assert len(F.embedding_expansion._LAYOUT_CACHE) == 2


@pytest.mark.parametrize("make_distance", [lambda: distances.LpDistance(), lambda: distances.LpDistance(p=1),
                                           lambda: distances.CosineSimilarity()])
def test_search_in_memory_chunks_gives_the_same_pairs_and_statistics(monkeypatch, make_distance):
    x, y = batch(seed=44, classes=(0, 0, 1, 1, 1, 2, 2, 0, 3, 3, 4, 4, 4, 4))
    results = []
    for entries in (1 << 22, 1):  # one chunk; one row class per chunk
        monkeypatch.setattr(F.embedding_expansion, "_SEARCH_CHUNK_ENTRIES", entries)
        miner = EmbeddingExpansionMiner(n_points=2, distance=make_distance(), collect_stats=True)
        hb = miner.harden(x, y)
        results.append((hb.hardest_rows, hb.hardest_cols, hb.hardest.detach(), miner.synthetic_selection_ratio))
    (r1, c1, h1, s1), (r2, c2, h2, s2) = results
    assert torch.equal(r1, r2) and torch.equal(c1, c2) and torch.equal(h1, h2) and s1 == s2


@pytest.mark.parametrize("classes", [(0, 0, 1, 1, 2, 2, 3, 3), (0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4)])
def test_selection_ratio_matches_brute_force(classes):
    """synthetic_selection_ratio = fraction of class pairs whose hardest pair over the expanded
    sets is strictly harder than the hardest pair over the originals (loops over the full matrix)."""
    x, y = batch(seed=45, classes=classes, dim=3)  # low dimension: synthetic points often win
    dist = distances.LpDistance()
    miner = EmbeddingExpansionMiner(n_points=3, distance=dist, collect_stats=True)
    miner.harden(x, y)
    ex = F.expand(y, 3, "all", x.dtype)
    full = F.expanded_distance_matrix(x, ex, dist, True)
    labels = ex.labels.tolist()
    orig = [not s for s in ex.is_synthetic.tolist()]
    uniq = sorted(set(labels))
    harder = []
    for a in uniq:
        for b in uniq:
            if a == b:
                continue
            pairs = [(i, j) for i in range(len(labels)) for j in range(len(labels)) if labels[i] == a and labels[j] == b]
            best_all = min(full[i, j].item() for i, j in pairs)
            best_orig = min(full[i, j].item() for i, j in pairs if orig[i] and orig[j])
            harder.append(best_all < best_orig - 1e-12)
    assert 0 < sum(harder) < len(harder)  # the check is informative
    assert miner.synthetic_selection_ratio == pytest.approx(sum(harder) / len(harder))


@pytest.mark.parametrize("make", [
    lambda: losses.TripletMarginLoss(margin=0.2),
    lambda: losses.TripletMarginLoss(margin=0.2, smooth_loss=True),
    lambda: losses.TripletMarginLoss(margin=0.2, distance=distances.CosineSimilarity()),
])
@pytest.mark.parametrize("flat, compiled, kind", [(0.0, "auto", "box"), (2.0, "off", "flat"), (2.0, "auto", "lists")])
def test_dense_triplet_by_gathered_triplets_equals_pml(monkeypatch, make, flat, compiled, kind):
    """The dense Triplet path on a long-tailed batch, through the [B, P, B] box, the triplets' flat
    indices, or the triplet lists and gathers of compiled loops (numba), gives what PML computes
    through its index lists (triplets in PML's order, values and gradients)."""
    import pml_ext.functional.compiled as K
    import pml_ext.losses.embedding_expansion_dense as L
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    if compiled == "auto" and not K.compiled_available():
        pytest.skip("numba does not import here")
    monkeypatch.setattr(L, "_FLAT_TRIPLETS", flat)
    monkeypatch.setattr(K, "_COMPILED", compiled)
    F.embedding_expansion._LAYOUT_CACHE.clear()
    x, y = batch(seed=18, classes=(0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 4))
    layout = F.batch_layout(y, 2, "all", x.dtype)
    structure = L._triplet_structure(layout)
    assert structure[0] == kind
    assert all(torch.equal(u, v) for u, v in zip(structure[1], lmu.get_all_triplets_indices(y)))
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dense = EmbeddingExpansionLoss(make())(x1, y)
    generic = EmbeddingExpansionLoss(make())(x2, y, lmu.get_all_triplets_indices(y))
    assert dense.item() == pytest.approx(generic.item(), rel=1e-10, abs=1e-12)
    dense.backward()
    generic.backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-10)
    half = x.to(torch.bfloat16).requires_grad_(True)  # the triplet lists with tensor gathers (no NumPy type)
    got = EmbeddingExpansionLoss(make())(half, y)
    got.backward()
    assert got.double().item() == pytest.approx(dense.item(), rel=5e-2, abs=1e-2)
    assert torch.isfinite(half.grad).all()
    F.embedding_expansion._LAYOUT_CACHE.clear()


def test_dense_path_only_for_reducers_that_read_the_losses_alone():
    """MultipleReducers over plain reducers (Contrastive's default) takes the dense path; any
    reducer that reads more than the per-pair losses (here DivisorReducer) keeps PML's own."""
    from pml_ext.losses.embedding_expansion_dense import _dense_contrastive, dense_loss

    assert dense_loss(losses.ContrastiveLoss(), None) is _dense_contrastive
    custom = reducers.MultipleReducers({"pos_loss": reducers.DivisorReducer()})
    assert dense_loss(losses.ContrastiveLoss(reducer=custom), None) is None
    assert dense_loss(losses.ContrastiveLoss(), (torch.tensor([0]),) * 4) is None
