"""The EE searches for unequal classes, grouped (pml_ext/functional/embedding_expansion_groups.py)
and by rows (embedding_expansion_rows.py): brute-force references on unbalanced, long-tailed,
singleton-class and random-label batches; equality with the blocked search to float64 precision;
gradients; degenerate batches; memory chunks; the cost model's choice."""
import importlib.util

import pytest
import torch
from pytorch_metric_learning import distances, losses

import pml_ext.functional as F
import pml_ext.functional.compiled as K
import pml_ext.functional.embedding_expansion as E
import pml_ext.functional.embedding_expansion_groups as G
import pml_ext.functional.embedding_expansion_rows as R
from pml_ext.losses import EmbeddingExpansionLoss
from pml_ext.miners import EmbeddingExpansionMiner

from . import ee_reference as ref

GRAM_DISTANCES = {
    "l2": lambda: distances.LpDistance(),
    "l2raw": lambda: distances.LpDistance(normalize_embeddings=False),
    "l2sq": lambda: distances.LpDistance(power=2),
    "cos": lambda: distances.CosineSimilarity(),
    "dot": lambda: distances.DotProductSimilarity(normalize_embeddings=False),
}

BATCHES = {
    "unbalanced": (0, 0, 1, 1, 1, 1, 1, 2, 2, 0, 3, 3),
    "long_tailed": (0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 5),
    "singletons": (0, 1, 2, 3, 4, 4),
    "random": tuple(torch.randint(0, 5, (13,), generator=torch.Generator().manual_seed(3)).tolist()),
}


def batch(classes, seed=0, dim=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(classes), dim, generator=g, dtype=torch.float64), torch.tensor(classes)


NUMBA = importlib.util.find_spec("numba") is not None


@pytest.fixture
def search(monkeypatch):
    """Force one search ("blocked", "groups", "rows" with tensor operations, or "rows-compiled", the
    row search's numba kernel) for the test's calls. Groups cost nothing extra by default here, so
    that every distinct class size gets its own group (small test batches would otherwise share one
    group and leave the mirrored pairs untested)."""
    def force(path, group_cost=0):
        if path == "rows-compiled" and not NUMBA:
            pytest.skip("numba does not import here")
        monkeypatch.setattr(K, "_COMPILED", "auto" if path == "rows-compiled" else "off")
        monkeypatch.setattr(E, "_SEARCH", "rows" if path == "rows-compiled" else path)
        monkeypatch.setattr(G, "_GROUP_COST", group_cost)
        E._LAYOUT_CACHE.clear()  # layouts cache their groups
    yield force
    E._LAYOUT_CACHE.clear()


def hardest(x, y, dist, n, pairs, normalize, originals_best=True):
    layout = F.batch_layout(y, n, pairs, x.dtype)
    return layout, F.hardest_negative_pairs_in_layout(x, layout, dist, normalize, originals_best=originals_best)


UNEQUAL = ["groups", "rows", "rows-compiled"]  # the searches made for classes of unequal size


@pytest.mark.parametrize("path", UNEQUAL)
@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("kind", list(GRAM_DISTANCES))
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("n", [0, 2])
def test_search_for_unequal_classes_matches_brute_force(search, path, name, kind, pairs, n):
    search(path)
    x, y = batch(BATCHES[name], seed=1)
    normalize = kind != "l2raw"
    dist = GRAM_DISTANCES[kind]()
    hb = EmbeddingExpansionMiner(n_points=n, normalize=normalize, pairs=pairs, distance=dist).harden(x, y)
    got = F.hardened_pair_matrix(dist(x), hb.classes, hb.classes, hb.hardest)
    want = torch.tensor(ref.hardened_matrix(x, y, n, normalize, pairs, kind), dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-9), (got - want).abs().max()


def _random_batch(trial):
    g = torch.Generator().manual_seed(100 + trial)
    b = int(torch.randint(2, 40, (1,), generator=g))
    c = int(torch.randint(1, 12, (1,), generator=g))
    if trial % 3 == 0:  # long-tailed
        p = 1 / torch.arange(1, c + 1, dtype=torch.float64)
        y = torch.multinomial(p, b, replacement=True, generator=g)
    else:
        y = torch.randint(0, c, (b,), generator=g)
    return torch.randn(b, 6, generator=g, dtype=torch.float64), y


@pytest.mark.parametrize("trial", range(6))
@pytest.mark.parametrize("kind", list(GRAM_DISTANCES))
@pytest.mark.parametrize("path, group_cost", [("groups", 0), ("groups", G._GROUP_COST), ("rows", 0),
                                              ("rows-compiled", 0)])
def test_search_for_unequal_classes_equals_blocked_search(search, trial, kind, path, group_cost):
    """Hardest values, search values, originals-only values, selected pairs and gradients off the
    diagonal (a class against itself, which no loss reads) agree to float64 precision."""
    x, y = _random_batch(trial)
    search("groups", group_cost)
    assert len(F.class_groups(F.batch_layout(y, 2, "all", x.dtype)).groups) > (1 if group_cost == 0 else 0) \
        or len(set(y.tolist())) < 3
    for pairs in ("all", "adjacent"):
        for n in (0, 1, 2):
            for normalize in (True, False):
                out = {}
                for forced in ("blocked", path):
                    search(forced, group_cost)
                    xx = x.clone().requires_grad_(True)
                    layout, hp = hardest(xx, y, GRAM_DISTANCES[kind](), n, pairs, normalize)
                    off = ~layout.class_eye
                    weights = torch.arange(int(off.sum()), dtype=x.dtype)
                    if off.any():
                        (hp.hardest[off] * weights).sum().backward()
                    out[forced] = (hp.hardest[off].detach(), hp.best[off], hp.best_originals[off], xx.grad,
                                   hp.rows[off], hp.cols[off], hp.search_inverted)
                a, b = out["blocked"], out[path]
                for u, v in zip(a[:3], b[:3]):
                    assert torch.allclose(u, v, rtol=0, atol=1e-12)
                assert (a[3] is None) == (b[3] is None)
                if a[3] is not None:
                    assert torch.allclose(a[3], b[3], rtol=0, atol=1e-12)
                assert torch.equal(a[4], b[4]) and torch.equal(a[5], b[5]) and a[6] == b[6]


@pytest.mark.parametrize("path", UNEQUAL)
@pytest.mark.parametrize("kind", list(GRAM_DISTANCES))
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_search_for_unequal_classes(search, path, kind, normalize):
    search(path)
    x, y = batch(BATCHES["long_tailed"], seed=2, dim=4)
    layout = F.batch_layout(y, 2, "all", x.dtype)
    off = ~layout.class_eye

    def f(e):
        return F.hardest_negative_pairs_in_layout(e, layout, GRAM_DISTANCES[kind](), normalize).hardest[off]

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True),))


@pytest.mark.parametrize("classes", [(0,), (3, 3, 3), (0, 1, 2, 3), (0, 1, 1, 1, 1, 1), (5, 5, 2)])
@pytest.mark.parametrize("name", ["TripletMarginLoss", "ContrastiveLoss", "NPairsLoss", "MultiSimilarityLoss"])
def test_degenerate_batches_give_the_blocked_result(search, classes, name):
    """One sample, one class, all singletons, one large class with a singleton: the wrapped loss
    is finite, connected to the graph, and equal to the blocked search's."""
    x, y = batch(classes, seed=3)
    values, grads = [], []
    for path in ("blocked", *UNEQUAL):
        search(path)
        xx = x.clone().requires_grad_(True)
        loss = EmbeddingExpansionLoss(getattr(losses, name)(), n_points=2)(xx, y)
        assert torch.isfinite(loss) and loss.requires_grad
        loss.backward()
        values.append(loss.detach())
        grads.append(xx.grad)
    for value, grad in zip(values[1:], grads[1:]):
        assert torch.allclose(values[0], value, atol=1e-12)
        assert torch.allclose(grads[0], grad, atol=1e-12)


def test_a_class_alone_in_its_group_pairs_its_first_point_with_itself(search):
    search("groups")
    x, y = batch(BATCHES["long_tailed"], seed=4)
    layout, hp = hardest(x, y, distances.LpDistance(), 2, "all", True)
    groups = F.class_groups(layout)
    alone = groups.alone.nonzero().flatten()
    assert alone.numel() > 0
    first = layout.first_index[alone]  # the class's first original
    assert torch.equal(hp.rows[alone, alone], first) and torch.equal(hp.cols[alone, alone], first)
    assert torch.isfinite(hp.best).all() and torch.isfinite(hp.hardest).all()


@pytest.mark.parametrize("path, module, constant", [("groups", G, "_SEARCH_CHUNK_ENTRIES"),
                                                    ("rows", R, "_ROW_CHUNK_ENTRIES")])
@pytest.mark.parametrize("kind", ["l2", "l2raw", "cos"])
def test_search_in_memory_chunks_is_the_same(search, monkeypatch, path, module, constant, kind):
    search(path)
    x, y = batch(BATCHES["long_tailed"], seed=5)
    results = []
    for entries in (1 << 22, 1):  # one chunk; one class (grouped) or one row (rows) per chunk
        monkeypatch.setattr(module, constant, entries)
        _, hp = hardest(x, y, GRAM_DISTANCES[kind](), 2, "all", True)
        results.append((hp.rows, hp.cols, hp.hardest.detach(), hp.best))
    for u, v in zip(*results):
        assert torch.equal(u, v)


@pytest.mark.parametrize("path", ["rows", "rows-compiled"])
def test_row_search_pairs_each_class_first_original_with_itself_on_the_diagonal(search, path):
    search(path)
    x, y = batch(BATCHES["long_tailed"], seed=4)
    layout, hp = hardest(x, y, distances.LpDistance(), 2, "all", True)
    assert torch.equal(hp.rows.diagonal(), layout.first_index) and torch.equal(hp.cols.diagonal(), layout.first_index)
    assert torch.isfinite(hp.best).all() and torch.isfinite(hp.hardest).all()


@pytest.mark.parametrize("path", UNEQUAL)
@pytest.mark.parametrize("name", ["TripletMarginLoss", "ContrastiveLoss", "NPairsLoss", "MultiSimilarityLoss",
                                  "LiftedStructureLoss"])
def test_wrapped_loss_on_a_long_tailed_batch_matches_brute_force(search, path, name):
    search(path)
    x, y = batch(BATCHES["long_tailed"], seed=6)
    loss = EmbeddingExpansionLoss(getattr(losses, name)(), n_points=2)
    kind = "l2" if isinstance(loss.loss.distance, distances.LpDistance) else "cos"  # N-pair: normalised dot
    want = ref.loss_from_matrix(name, ref.hardened_matrix(x, y, 2, True, "all", kind), y)
    assert loss(x, y).item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def _layout(y, n=2, pairs="all"):
    return F.batch_layout(torch.as_tensor(y), n, pairs)


def test_cost_model_blocked_for_balanced_batches_grouped_for_unequal_or_many_points():
    balanced = torch.arange(32).repeat_interleave(4)
    assert not G.use_groups(_layout(balanced))
    assert not G.use_groups(_layout(balanced[torch.randperm(128, generator=torch.Generator().manual_seed(0))]))
    g = torch.Generator().manual_seed(0)
    zipf = torch.multinomial(1 / torch.arange(1, 61, dtype=torch.float64), 128, replacement=True, generator=g)
    assert G.use_groups(_layout(zipf))
    assert G.use_groups(_layout(torch.randint(0, 40, (128,), generator=g)))
    # equal classes with many points each: the blocked search would run in many memory chunks
    assert not G.use_groups(_layout(torch.arange(16).repeat_interleave(8)))  # 8 chunks
    assert G.use_groups(_layout(torch.arange(16).repeat_interleave(8), n=4))  # 16 chunks
    assert G.use_groups(_layout(balanced, n=8))  # 32 chunks
    assert not G.use_groups(_layout(torch.arange(64).repeat_interleave(2), n=8))


def test_search_path_blocked_for_equal_classes_rows_for_small_unequal_sets_groups_for_large(monkeypatch):
    """The cost model with tensor operations only (no numba kernel)."""
    monkeypatch.setattr(K, "_COMPILED", "off")
    g = torch.Generator().manual_seed(0)
    balanced = torch.arange(32).repeat_interleave(4)
    zipf = torch.multinomial(1 / torch.arange(1, 61, dtype=torch.float64), 128, replacement=True, generator=g)
    random40 = torch.randint(0, 40, (128,), generator=g)
    assert E.search_path(_layout(balanced)) == "blocked"
    assert E.search_path(_layout(balanced[torch.randperm(128, generator=g)])) == "blocked"
    assert E.search_path(_layout(torch.arange(16).repeat_interleave(8), n=4)) == "groups"  # equal, many chunks
    for y in (random40, torch.randint(0, 100, (128,), generator=g), zipf):
        assert E.search_path(_layout(y)) == "rows"
        assert E.search_path(_layout(y, pairs="adjacent")) == "rows"
    assert E.search_path(_layout(random40, n=8)) == "groups"  # R·M > _ROWS_MAX_ENTRIES
    assert E.search_path(_layout([0, 0, 0])) == "blocked"  # one class: nothing to search
    layout = _layout([0, 0, 0, 1, 2, 2])  # expanded sizes 3 + 2·3, 1, 2 + 2·1: M = 14
    assert R.row_entries(layout) == (14 - 9) * 14


@pytest.mark.skipif(not NUMBA, reason="numba does not import here")
def test_search_path_compiled_rows_while_its_block_fits_then_groups(monkeypatch):
    """With the compiled row search: rows for balanced and unequal batches of any size, groups once
    the kernel's block (one class's originals x M) exceeds _COMPILED_MAX_BLOCK; half precision (no
    kernel) keeps the tensor-operation model."""
    monkeypatch.setattr(K, "_COMPILED", "auto")
    g = torch.Generator().manual_seed(0)
    balanced = torch.arange(32).repeat_interleave(4)
    random40 = torch.randint(0, 40, (128,), generator=g)
    assert E.search_path(_layout(balanced)) == "rows"
    assert E.search_path(_layout(random40, n=8)) == "rows"  # 2.7M entries
    big = torch.arange(16).repeat_interleave(8)
    assert E.search_path(_layout(big, n=8)) == "rows"  # 12.9M entries
    assert R.compiled_block_entries(_layout(big, n=8)) == 8 * 3712
    # the block: the originals of the largest class but the (first) largest, times M
    layout = _layout([0, 0, 0, 1, 2, 2])  # originals 3, 1, 2; M = 9 + 1 + 4
    assert R.compiled_block_entries(layout) == 2 * 14
    E._LAYOUT_CACHE.clear()
    monkeypatch.setattr(R, "_COMPILED_MAX_BLOCK", 8 * 3712 - 1)
    assert E.search_path(_layout(big, n=8)) == "groups"
    assert E.search_path(_layout(balanced)) == "rows"
    assert E.search_path(_layout([0, 0, 0])) == "blocked"  # one class: nothing to search
    assert E.search_path(F.batch_layout(balanced, 2, "all", torch.bfloat16)) == "blocked"
    E._LAYOUT_CACHE.clear()


@pytest.mark.parametrize("seed", range(3))
def test_grouped_search_cost_follows_the_expanded_set(monkeypatch, seed):
    """Stage-1 entries: with a group per class size, pairs of points in different groups once and
    pairs inside a group of several classes in both orders, at most (M² + Σ_g M_g²) / 2 ≤ M²
    (M_g: the group's points); with the default group cost at most M² plus that cost per group
    saved. On a long-tailed batch a small fraction of the blocked search's padded box (C·K_max)²."""
    g = torch.Generator().manual_seed(seed)
    zipf = torch.multinomial(1 / torch.arange(1, 61, dtype=torch.float64), 128, replacement=True, generator=g)
    for y in (zipf, torch.randint(0, 40, (128,), generator=g), torch.randint(0, 100, (128,), generator=g)):
        for group_cost in (0, G._GROUP_COST):
            monkeypatch.setattr(G, "_GROUP_COST", group_cost)
            E._LAYOUT_CACHE.clear()
            layout = _layout(y)
            sizes = layout.class_sizes
            m, distinct = int(sizes.sum()), sizes.unique().numel()
            groups = F.class_groups(layout)
            entries = groups.entries()
            if group_cost == 0:
                assert len(groups.groups) == distinct
                per_group = [int(sizes[g.classes].sum()) for g in groups.groups]
                assert entries <= (m * m + sum(p * p for p in per_group)) / 2 <= m * m
            else:
                assert entries <= m * m + (distinct - len(groups.groups)) * group_cost
            if y is zipf:
                assert entries < (layout.num_classes * int(sizes.max())) ** 2 / 100
    E._LAYOUT_CACHE.clear()


def test_groups_partition_the_classes_and_slots_hold_each_class_points():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 5, 5])
    layout = _layout(y)
    groups = F.class_groups(layout)
    seen = torch.cat([g.classes for g in groups.groups]).sort().values
    assert torch.equal(seen, torch.arange(layout.num_classes))
    ex = layout.expanded
    point_class = layout.classes[ex.first]
    for g in groups.groups:
        members = groups.order[g.slots]  # expanded-set indices
        for c, row in zip(g.classes.tolist(), members):
            assert set(row.tolist()) == set((point_class == c).nonzero().flatten().tolist())


@pytest.mark.parametrize("inverted", [False, True])
def test_two_stage_best_equals_one_reduction_with_ties(monkeypatch, inverted):
    """_first_best in two stages (many slots per class) gives the one-reduction answer: the best
    value and the first (q, p) attaining it in row-major order, ties included."""
    import pml_ext.functional.embedding_expansion_blocked as Bk

    g = torch.Generator().manual_seed(7)
    vals = torch.randint(0, 4, (3, 5, 6, 6), generator=g).to(torch.float64)  # many exact ties
    vals[0, 0] = float("inf") if not inverted else float("-inf")  # a fully masked class pair
    reduce = torch.max if inverted else torch.min
    monkeypatch.setattr(Bk, "_TWO_STAGE_SLOTS", 1 << 30)
    one = Bk._first_best(vals, reduce, inverted)
    monkeypatch.setattr(Bk, "_TWO_STAGE_SLOTS", 1)
    two = Bk._first_best(vals, reduce, inverted)
    for u, v in zip(one, two):
        assert torch.equal(u, v)


def test_blocked_search_with_many_slots_per_class_matches_brute_force(search):
    """A balanced batch whose classes have >= 32 expanded points (the two-stage reduction)."""
    search("blocked")
    y = torch.arange(3).repeat_interleave(6)  # 6 + 2·15 = 36 points per class
    x = torch.randn(18, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for kind in ("l2", "cos", "l2raw"):
        dist = GRAM_DISTANCES[kind]()
        normalize = kind != "l2raw"
        hb = EmbeddingExpansionMiner(n_points=2, normalize=normalize, distance=dist).harden(x, y)
        got = F.hardened_pair_matrix(dist(x), hb.classes, hb.classes, hb.hardest)
        want = torch.tensor(ref.hardened_matrix(x, y, 2, normalize, "all", kind), dtype=torch.float64)
        assert torch.allclose(got, want, atol=1e-9), (got - want).abs().max()


@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("n", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_balanced_layout_in_any_order_equals_the_direct_construction(pairs, n, k):
    """A balanced batch in a new order: the layout mapped from the canonical one equals, field by
    field, the layout built from scratch (expanded set in the batch's order, slots, weights)."""
    from pml_ext.functional.embedding_expansion_layouts import balanced_layout

    g = torch.Generator().manual_seed(10 * k + n)
    for trial in range(3):
        c = 5
        y = torch.arange(c).repeat_interleave(k)[torch.randperm(c * k, generator=g)] * 7 + 3
        classes, num = F.first_appearance_classes(y)
        got = balanced_layout(classes, num, n, pairs, torch.float64)
        want = F.BatchLayout(classes, num, F.expand(classes, n, pairs, torch.float64))
        assert got is not None
        for u, v in zip(got.expanded, want.expanded):
            assert (u == v) if isinstance(u, int) else torch.equal(u, v)
        for name in ("classes", "first_index", "_original_slots", "class_sizes", "slots", "weights",
                     "synthetic_slot", "original_slot", "row_base", "col_base", "slot_points", "slot_weights",
                     "originals", "negative", "positive", "pair_index", "class_eye"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert got.valid_slot is None and want.valid_slot is None and got.has_synthetic == want.has_synthetic


def test_unbalanced_batches_are_built_directly():
    from pml_ext.functional.embedding_expansion_layouts import balanced_layout

    classes, num = F.first_appearance_classes(torch.tensor([0, 1, 1, 2, 2, 2]))
    assert balanced_layout(classes, num, 2, "all", torch.float32) is None


def _compiled(monkeypatch, mode):
    """Switch the compiled kernels on ("auto"; skip without numba) or off."""
    if mode == "auto" and not NUMBA:
        pytest.skip("numba does not import here")
    monkeypatch.setattr(K, "_COMPILED", mode)


@pytest.mark.parametrize("pairs", ["all", "adjacent"])
@pytest.mark.parametrize("n", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compiled", ["off", "auto"])
def test_numpy_layout_equals_the_direct_construction(monkeypatch, pairs, n, dtype, compiled):
    """A new unbalanced label pattern on CPU is built from NumPy arrays, by NumPy calls or by the
    compiled loops: field by field the layout built with tensor operations (expanded set in the
    batch's order, slots, weights, masks)."""
    from pml_ext.functional.embedding_expansion_layouts import numpy_layout

    _compiled(monkeypatch, compiled)
    g = torch.Generator().manual_seed(20 + n)
    for trial in range(20):
        b, c = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        classes, num = F.first_appearance_classes(torch.randint(0, c, (b,), generator=g))
        got = numpy_layout(classes, num, n, pairs, dtype)
        want = F.BatchLayout(classes, num, F.expand(classes, n, pairs, dtype))
        for u, v in zip(got.expanded, want.expanded):
            assert (u == v) if isinstance(u, int) else (u.dtype == v.dtype and torch.equal(u, v))
        for name in ("classes", "first_index", "_original_slots", "class_sizes", "slots", "weights", "originals",
                     "negative", "positive", "pair_index", "class_eye"):
            u, v = getattr(got, name), getattr(want, name)
            assert u.dtype == v.dtype and torch.equal(u, v), name


@pytest.mark.parametrize("compiled", ["off", "auto"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_first_appearance_numbering_matches_a_loop(monkeypatch, compiled, dtype):
    """Classes numbered in order of first appearance, and each class's first position (NumPy, one
    stable sort, or compiled loops), for any label values."""
    from pml_ext.functional.embedding_expansion_layouts import _first_appearance_numpy

    _compiled(monkeypatch, compiled)
    g = torch.Generator().manual_seed(21)
    for trial in range(30):
        b = int(torch.randint(1, 60, (1,), generator=g))
        labels = torch.randint(-5, int(torch.randint(1, 30, (1,), generator=g)), (b,), generator=g).to(dtype)
        ids, want = {}, []
        for v in labels.tolist():
            want.append(ids.setdefault(v, len(ids)))
        classes, c = F.first_appearance_classes(labels)
        assert classes.dtype == torch.long and classes.tolist() == want and c == len(ids)
        _, first = _first_appearance_numpy(labels.numpy())
        assert first.tolist() == [want.index(k) for k in range(c)]


@pytest.mark.parametrize("n", [0, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_plan_from_numpy_arrays_equals_the_plan_from_tensors(n, dtype):
    """The row plan of a NumPy-built layout (from the arrays it keeps) equals the plan built from the
    layout's tensors, field by field."""
    from pml_ext.functional.embedding_expansion_layouts import numpy_layout
    from pml_ext.functional.embedding_expansion_rows import _build_plan

    g = torch.Generator().manual_seed(22 + n)
    for trial in range(10):
        classes, num = F.first_appearance_classes(torch.randint(0, 9, (40,), generator=g))
        got = _build_plan(numpy_layout(classes, num, n, "all", dtype))
        want = _build_plan(F.BatchLayout(classes, num, F.expand(classes, n, "all", dtype)))
        for name, u, v in zip(got._fields, got, want):
            assert (u == v) if isinstance(u, int) else (u.dtype == v.dtype and torch.equal(u, v)), name


def test_a_new_pattern_keeps_its_large_structures_only_once_it_recurs(monkeypatch):
    """Random batches bring a new label pattern every step: the per-pattern tuple lists
    (Contrastive's pairs, Triplet's triplets) and the row plan (of the row search with tensor
    operations) are not kept in the layout cache until the pattern comes back, so the cache does
    not fill with lists never read again."""
    monkeypatch.setattr(K, "_COMPILED", "off")
    g = torch.Generator().manual_seed(23)
    x, y = torch.randn(48, 8, generator=g), torch.randint(0, 12, (48,), generator=g)
    E._LAYOUT_CACHE.clear()
    for loss, name in ((losses.ContrastiveLoss(), "all_pairs"), (losses.TripletMarginLoss(), "triplet")):
        ee = EmbeddingExpansionLoss(loss)
        first = ee(x, y)
        layout = F.batch_layout(y)  # the cached layout; this call counts as a use
        assert name not in layout._extras and "rows" not in layout._extras
        second = ee(x, y + 100)  # the same pattern, other class ids
        assert name in layout._extras and "rows" in layout._extras
        assert torch.equal(first, second)
        E._LAYOUT_CACHE.clear()


def test_batch_layout_builds_new_unbalanced_patterns_with_numpy_for_float32_and_float64(monkeypatch):
    import pml_ext.functional.embedding_expansion_layouts as Lay

    built = []
    monkeypatch.setattr(Lay, "numpy_layout", lambda *a: built.append(a[-1]) or Lay.BatchLayout(
        a[0], a[1], F.expand(a[0], a[2], a[3], a[4])))
    y = torch.tensor([4, 4, 7, 1, 1, 1])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        E._LAYOUT_CACHE.clear()
        layout = F.batch_layout(y, 2, "all", dtype)
        assert layout.expanded.w_first.dtype == dtype
    assert built == [torch.float32, torch.float64]  # bfloat16 (no NumPy type): tensor operations
    E._LAYOUT_CACHE.clear()


@pytest.mark.parametrize("inverted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_segment_best_matches_loops_with_ties_and_empty_segments(inverted, dtype):
    """The best over each segment's rows and the first row attaining it (many exact ties, infinite
    ties too; segment 3 is empty: worst value, row clamped to M-1)."""
    from pml_ext.functional.primitives import segment_best

    g = torch.Generator().manual_seed(11)
    m, r, s = 300, 7, 5  # 300 rows: bfloat16 holds only 256 integers exactly, the row numbers must not use it
    values = torch.randint(0, 3, (m, r), generator=g).to(dtype)
    segment = torch.randint(0, s, (m,), generator=g)
    segment[segment == 3] = 4
    worst = float("-inf") if inverted else float("inf")
    # infinite values, tied with each other: the best (column 2) and the worst (column 5, segment 1),
    # whose gap to the best is inf - inf = NaN in the float arithmetic that finds the first row
    values[::17, 2] = -worst
    values[segment == 1, 5] = worst
    best, arg = segment_best(values, segment, s, inverted, worst)
    for k in range(s):
        for col in range(r):
            rows = [i for i in range(m) if segment[i] == k]
            if not rows:
                assert best[k, col] == worst and arg[k, col] == m - 1
                continue
            vals = [float(values[i, col]) for i in rows]
            want = max(vals) if inverted else min(vals)
            assert float(best[k, col]) == want and int(arg[k, col]) == rows[vals.index(want)]


@pytest.mark.parametrize("path", ["blocked", *UNEQUAL])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [2, 8])
def test_half_precision_on_unequal_classes(search, path, dtype, n):
    """Every search takes half-precision embeddings on a batch of unequal classes (the grouped
    search's NumPy builder once failed on bfloat16 weights) and stays close to float64."""
    search(path)
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(40, 16, generator=g, dtype=torch.float64), torch.randint(0, 9, (40,), generator=g)
    want = EmbeddingExpansionLoss(losses.ContrastiveLoss(), n_points=n)(x, y)
    xx = x.to(dtype).requires_grad_(True)
    got = EmbeddingExpansionLoss(losses.ContrastiveLoss(), n_points=n)(xx, y)
    got.backward()
    assert torch.isfinite(xx.grad).all()
    assert got.double().item() == pytest.approx(want.item(), rel=5e-2)


def _search_both_ways(monkeypatch, x, y, dist, n, pairs, normalize):
    """(tensor-operation row search, compiled row search) of one batch, HardestPairs each, on the same
    Gram matrix (its tensor operations both ways: the compiled one reads the norms off x xᵀ, which
    rounds differently)."""
    from pml_ext.functional import primitives

    monkeypatch.setattr(primitives, "compiled_for", lambda device, dtype: False)
    out = []
    for mode in ("off", "auto"):
        monkeypatch.setattr(K, "_COMPILED", mode)
        monkeypatch.setattr(E, "_SEARCH", "rows")
        E._LAYOUT_CACHE.clear()
        layout = F.batch_layout(y, n, pairs, x.dtype)
        out.append(F.hardest_negative_pairs_in_layout(x, layout, dist, normalize, originals_best=True))
    E._LAYOUT_CACHE.clear()
    return out


@pytest.mark.skipif(not NUMBA, reason="numba does not import here")
@pytest.mark.parametrize("kind", list(GRAM_DISTANCES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("track", [0, 1 << 30])
def test_compiled_row_search_equals_the_row_search_with_tensor_operations(monkeypatch, kind, dtype, track):
    """Same pairs, search values, hardest values and originals-only values, on random and long-tailed
    batches (B up to 100, singletons included), every n and pairing mode, the kernel's stage 1 keeping
    its row points or stage 3 rescanning (``track``); float32 values to float32 rounding (an exact tie
    can then go either way: the pairs must have equal values)."""
    monkeypatch.setattr(R, "_TRACK_BELOW", track)
    g = torch.Generator().manual_seed(31)
    for trial in range(8):
        b, c = int(torch.randint(2, 100, (1,), generator=g)), int(torch.randint(2, 30, (1,), generator=g))
        p = 1 / torch.arange(1, c + 1, dtype=torch.float64) if trial % 2 else torch.ones(c, dtype=torch.float64)
        y = torch.multinomial(p, b, replacement=True, generator=g)
        x = torch.randn(b, 12, generator=g, dtype=torch.float64).to(dtype)
        for n, pairs, normalize in ((2, "all", True), (0, "all", True), (3, "adjacent", kind != "l2raw")):
            a, c_ = _search_both_ways(monkeypatch, x, y, GRAM_DISTANCES[kind](), n, pairs, normalize)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            for u, v in ((a.best, c_.best), (a.hardest, c_.hardest), (a.best_originals, c_.best_originals)):
                assert torch.allclose(u, v, rtol=tol, atol=tol), (u - v).abs().max()
            assert a.search_inverted == c_.search_inverted
            if dtype == torch.float64:
                assert torch.equal(a.rows, c_.rows) and torch.equal(a.cols, c_.cols)


@pytest.mark.skipif(not NUMBA, reason="numba does not import here")
@pytest.mark.parametrize("kind", ["l2", "cos", "l2raw"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("track", [0, 1 << 30])
def test_compiled_row_search_breaks_exact_ties_as_the_row_search(monkeypatch, kind, dtype, track):
    """Every sample twice in its class (and n = 0 or 1): every class pair's best value is attained by
    several pairs; both searches keep the same one (the lowest column point, then the lowest row
    point), with stage 1 keeping its row points or stage 3 rescanning. In float32 the tensor
    operations' vectorised and scalar paths round the "same" value differently (by one unit in the
    last place), so only the values are compared there."""
    monkeypatch.setattr(R, "_TRACK_BELOW", track)
    g = torch.Generator().manual_seed(32)
    base_y = torch.multinomial(1 / torch.arange(1, 7, dtype=torch.float64), 15, replacement=True, generator=g)
    base = torch.randn(15, 6, generator=g, dtype=torch.float64).to(dtype)
    x, y = base.repeat_interleave(2, 0), base_y.repeat_interleave(2)
    for n in (0, 1):
        a, c_ = _search_both_ways(monkeypatch, x, y, GRAM_DISTANCES[kind](), n, "adjacent", kind != "l2raw")
        if dtype == torch.float64:
            assert torch.equal(a.rows, c_.rows) and torch.equal(a.cols, c_.cols)
            assert torch.equal(a.best, c_.best)
        else:
            assert torch.allclose(a.best, c_.best, rtol=1e-6, atol=1e-6)
            assert torch.allclose(a.hardest, c_.hardest, rtol=1e-6, atol=1e-6)


def test_compiled_row_search_steps_aside_where_it_cannot_run(monkeypatch):
    """bfloat16 (no NumPy type) and the switch "off" fall back to tensor operations (None)."""
    from pml_ext.functional.embedding_expansion_rows import compiled_row_search

    y = torch.tensor([0, 0, 1, 2, 2, 2])
    dist = distances.CosineSimilarity()
    layout = F.batch_layout(y, 2, "all", torch.bfloat16)
    gram = torch.eye(6, dtype=torch.bfloat16)
    assert compiled_row_search(gram, layout, "inner", dist, True, True) is None
    monkeypatch.setattr(K, "_COMPILED", "off")
    layout = F.batch_layout(y, 2, "all", torch.float32)
    assert compiled_row_search(gram.float(), layout, "inner", dist, True, True) is None
    assert not K.compiled_available()
    E._LAYOUT_CACHE.clear()


def test_a_numba_that_does_not_import_turns_the_kernels_off_with_a_warning(monkeypatch):
    """An installed but broken numba (e.g. built for another NumPy) must not break the loss: one
    warning, then the tensor code, with the same result."""
    import builtins

    g = torch.Generator().manual_seed(33)
    x, y = torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randint(0, 6, (30,), generator=g)
    monkeypatch.setattr(K, "_COMPILED", "off")
    E._LAYOUT_CACHE.clear()
    want = EmbeddingExpansionLoss(losses.ContrastiveLoss())(x, y)
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "numba":
            raise ImportError("numba built against another NumPy")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "numba" else None)
    monkeypatch.setattr(K, "_COMPILED", "auto")
    monkeypatch.setattr(K, "_NUMBA", None)
    E._LAYOUT_CACHE.clear()
    with pytest.warns(RuntimeWarning, match="numba is installed but does not import"):
        assert not K.compiled_available()
    got = EmbeddingExpansionLoss(losses.ContrastiveLoss())(x, y)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    E._LAYOUT_CACHE.clear()
