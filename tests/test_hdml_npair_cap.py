"""HDML's max_synthetic_tuples in N-pair mode: over the cap, R = max(1, cap // (T-1)) random anchors
keep their whole candidate rows. J_syn / J_soft / statistics against loops in float64, gradcheck,
the cap's bound, bit-identity below it, degenerate batches, the trainer."""
import math

import pytest
import torch
from pytorch_metric_learning import distances, losses, samplers

from pml_ext.functional import hardness_aware_tuples as HT
from pml_ext.losses import HDMLLoss
from pml_ext.trainers import HardnessAwareDeepMetricLearning

DT = torch.float64
IN, FEAT, EMB, HID = 5, 7, 4, 9
C, PER = 6, 2  # T = 6 anchors: 30 synthetic negatives uncapped


def make_setup(seed=0, dtype=DT, classes=C, per=PER, **kw):
    """Backbone features, an embedder, labels with ``classes`` x ``per`` samples, and HDMLLoss with a
    generator without BatchNorm (so the loops below may call it row by row)."""
    torch.manual_seed(seed)
    feats = torch.randn(classes * per, FEAT, dtype=dtype)
    head = torch.nn.Linear(FEAT, EMB).to(dtype)
    kw.setdefault("loss", losses.NPairsLoss())
    if kw.get("use_generator", True):
        kw.setdefault("generator", torch.nn.Sequential(
            torch.nn.Linear(EMB, HID), torch.nn.Tanh(), torch.nn.Linear(HID, FEAT)))
    hdml = HDMLLoss(embedding_size=EMB, feature_size=FEAT, num_classes=classes, alpha=1.0, **kw).to(dtype)
    hdml.javg_tracker.value.fill_(0.3)  # exp(-1/0.3): the pullable negatives move
    y = torch.arange(classes).repeat(per)  # anchor / positive of class c: samples c and classes + c
    return feats, head, hdml, y


def spy_rows(monkeypatch):
    """Records what HT.cap_npair_rows returned (the real function runs)."""
    seen = []
    real = HT.cap_npair_rows

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(HT, "cap_npair_rows", spy)
    return seen


# ------------------------------------------------------------------ brute force
def ref_pull(a, p, n, alpha, javg):
    """(pulled negative, coefficient, pullable): the HDML augmentor for one negative, floats."""
    dp = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, p)))
    dn = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, n)))
    if dp < dn:
        c = (dp + (dn - dp) * math.exp(-alpha / javg)) / dn
        return [ai + (ni - ai) * c for ai, ni in zip(a, n)], c, True
    return list(n), 1.0, False


def ref_ce(logits, target):
    m = max(logits)
    return m + math.log(sum(math.exp(v - m) for v in logits)) - logits[target]


def ref_sim(kind, u, v):
    if kind == "dot":  # PML's DotProductSimilarity normalises the embeddings by default
        nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(b * b for b in v))
        return sum(a * b for a, b in zip(u, v)) / (nu * nv)
    return -math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v)))  # Lp distance, not inverted: -d


def reference(feats, head, hdml, y, rows, kind, javg):
    """J_syn, J_soft, mean pull coefficient and fraction pullable over the kept rows, one anchor
    and one candidate at a time (J_avg = ``javg``)."""
    with torch.no_grad():
        emb = head(feats)
        anchors = [int((y == c).nonzero()[0]) for c in range(int(y.max()) + 1)]
        positives = [int((y == c).nonzero()[1]) for c in range(int(y.max()) + 1)]
        T = len(anchors)
        G, cls = hdml.generator, hdml.classifier

        def regen(z):  # the generator, then the same embedder, one row
            return head(G(torch.tensor([z], dtype=DT)))[0].tolist()

        def logits(z):
            return cls(G(torch.tensor([z], dtype=DT)))[0].tolist()

        ces, coefs, pullable, soft, soft_anchor = [], [], [], [], []
        for i in (int(r) for r in rows):
            a, p_own = emb[anchors[i]].tolist(), emb[positives[i]].tolist()
            cands, cand_in = [], []
            for j in range(T):
                pj = emb[positives[j]].tolist()
                if j == i:
                    z = pj
                else:
                    z, c, ok = ref_pull(a, p_own, pj, hdml.alpha, javg)
                    coefs.append(c)
                    pullable.append(ok)
                cand_in.append(z)
                if not hdml.use_generator:
                    cands.append(z)
                elif hdml.synthesize == "negatives" and j == i:
                    cands.append(pj)  # the real positive
                else:
                    cands.append(regen(z))
            anchor = regen(a) if hdml.use_generator and hdml.synthesize == "all" else a
            ces.append(ref_ce([ref_sim(kind, anchor, c) for c in cands], i))
            if hdml.use_generator:
                soft += [ref_ce(logits(z), int(y[positives[j]])) for j, z in enumerate(cand_in)]
                soft_anchor.append(ref_ce(logits(a), int(y[anchors[i]])))
        out = {"J_syn": sum(ces) / len(ces), "mean_pull_coefficient": sum(coefs) / len(coefs),
               "fraction_pullable": sum(pullable) / len(pullable)}
        if hdml.use_generator:
            f = hdml.softmax_factor * hdml.lambda_
            out["J_soft"] = f * sum(soft) / len(soft)
            if hdml.synthesize == "all":
                out["J_soft"] += f * sum(soft_anchor) / len(soft_anchor)
        return out


@pytest.mark.parametrize("use_generator,synthesize", [(True, "all"), (True, "negatives"), (False, "all")])
@pytest.mark.parametrize("kind", ["dot", "lp"])
def test_capped_npair_matches_loops(monkeypatch, use_generator, synthesize, kind):
    loss = losses.NPairsLoss() if kind == "dot" else losses.NPairsLoss(
        distance=distances.LpDistance(normalize_embeddings=False))
    feats, head, hdml, y = make_setup(loss=loss, use_generator=use_generator, synthesize=synthesize,
                                      max_synthetic_tuples=12)
    seen = spy_rows(monkeypatch)
    javg = hdml.J_avg_value
    terms = hdml.compute_terms(feats, y, head)
    rows = seen[0]
    assert rows is not None and len(rows) == 2  # 12 // 5
    ref = reference(feats, head, hdml, y, rows, kind, javg)
    assert terms["J_syn"].item() == pytest.approx(ref["J_syn"], rel=1e-10, abs=1e-12)
    assert hdml.J_syn == pytest.approx(ref["J_syn"], rel=1e-10)
    assert hdml.mean_pull_coefficient == pytest.approx(ref["mean_pull_coefficient"], rel=1e-10)
    assert hdml.fraction_pullable == pytest.approx(ref["fraction_pullable"], rel=1e-6)  # a float32 mean
    assert hdml.fraction_pullable > 0 and hdml.mean_pull_coefficient < 1  # the pull is exercised
    assert hdml.num_synthetic_tuples == 10
    if use_generator:
        assert terms["J_soft"].item() == pytest.approx(ref["J_soft"], rel=1e-10)
    # the loops on every row give the uncapped value: the kept rows are not all of them
    full = reference(feats, head, hdml, y, range(C), kind, javg)["J_syn"]
    assert full != pytest.approx(ref["J_syn"], rel=1e-6)


@pytest.mark.parametrize("use_generator,synthesize", [(True, "all"), (True, "negatives"), (False, "all")])
def test_capped_npair_gradcheck(use_generator, synthesize):
    feats, head, hdml, y = make_setup(use_generator=use_generator, synthesize=synthesize, max_synthetic_tuples=12)
    hdml.eval()  # J_avg stays put between gradcheck's calls

    def fn(f):
        torch.manual_seed(7)  # the same kept rows in every call
        terms = hdml.compute_terms(f, y, head)
        out = (terms["J_syn"],) + ((terms["J_gen"],) if use_generator else ())
        assert hdml.num_synthetic_tuples == 10
        return out

    assert torch.autograd.gradcheck(fn, (feats.clone().requires_grad_(True),))


# ------------------------------------------------------------------ the bound
@pytest.mark.parametrize("T,cap,R", [(6, 12, 2), (6, 29, 5), (6, 5, 1), (6, 3, 1), (2, 1, 1), (40, 512, 13)])
def test_cap_npair_rows_bound(T, cap, R):
    torch.manual_seed(3)
    rows = HT.cap_npair_rows(T, cap)
    assert rows is not None and len(rows) == R
    assert len(set(rows.tolist())) == R and all(0 <= r < T for r in rows.tolist())
    assert R * (T - 1) <= cap or (R == 1 and cap < T - 1)
    assert (R + 1) * (T - 1) > cap  # as many rows as fit
    torch.manual_seed(3)  # one randperm over the anchors, as the triplet cap's
    assert torch.equal(rows, torch.randperm(T)[:R])


def test_cap_npair_rows_below_the_cap_draws_nothing():
    state = torch.get_rng_state()
    for T, cap in [(6, 30), (6, 512), (0, 1), (1, 1), (40, None)]:
        assert HT.cap_npair_rows(T, cap) is None
    assert torch.equal(state, torch.get_rng_state())
    chosen = set()
    for s in range(40):  # every anchor gets its turn
        torch.manual_seed(s)
        chosen.update(HT.cap_npair_rows(6, 5).tolist())
    assert chosen == set(range(6))


@pytest.mark.parametrize("cap,expected", [(12, 10), (3, 5), (29, 25), (30, 30), (None, 30)])
def test_num_synthetic_tuples_recorded(cap, expected):
    feats, head, hdml, y = make_setup(max_synthetic_tuples=cap, dtype=torch.float32)
    out = hdml(feats, y, head)
    out.backward()
    assert hdml.num_synthetic_tuples == expected and math.isfinite(hdml.J_syn) and hdml.J_syn > 0
    assert all(p.grad is not None for p in hdml.generator.parameters())


# ------------------------------------------------------------------ below the cap: no change at all
@pytest.mark.parametrize("use_generator,synthesize", [(True, "all"), (True, "negatives"), (False, "all")])
@pytest.mark.parametrize("cap", [30, 512])  # 30 = T·(T-1): the boundary
def test_below_the_cap_bit_identical_to_no_cap(use_generator, synthesize, cap):
    results = []
    for c in (None, cap):
        feats, head, hdml, y = make_setup(use_generator=use_generator, synthesize=synthesize, max_synthetic_tuples=c)
        feats.requires_grad_(True)
        torch.manual_seed(11)
        out = hdml(feats, y, head)
        out.backward()
        params = [feats] + list(head.parameters()) + list(hdml.parameters())
        rec = {k: getattr(hdml, k) for k in ("J_syn", "J_soft", "J_m", "mean_pull_coefficient", "fraction_pullable",
                                             "num_synthetic_tuples")}
        results.append((out.detach(), [p.grad.clone() for p in params if p.grad is not None], rec,
                        torch.get_rng_state()))
    (o1, g1, r1, s1), (o2, g2, r2, s2) = results
    assert torch.equal(o1, o2) and r1 == r2 and r1["num_synthetic_tuples"] == 30
    assert len(g1) == len(g2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert torch.equal(s1, s2)  # no random number drawn by the cap


# ------------------------------------------------------------------ degenerate batches
@pytest.mark.parametrize("use_generator", [True, False])
@pytest.mark.parametrize("case", ["one_class", "no_pairs"])
def test_degenerate_batches_under_a_cap(case, use_generator):
    feats, head, hdml, y = make_setup(use_generator=use_generator, max_synthetic_tuples=1)
    if case == "one_class":  # T = 1: one anchor, no negative
        y = torch.zeros_like(y)
    else:  # every label once: no positive pair, T = 0
        feats, y = feats[:C], torch.arange(C)
    feats.requires_grad_(True)
    state = torch.get_rng_state()
    out = hdml(feats, y, head)
    assert torch.equal(state, torch.get_rng_state())
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.isfinite(feats.grad).all() and (feats.grad == 0).all()
    assert hdml.num_synthetic_tuples == 0 and hdml.J_syn == 0.0
    if use_generator:
        assert all(p.grad is not None and (p.grad == 0).all() for p in hdml.generator.parameters())


# ------------------------------------------------------------------ through the trainer
def test_trainer_npair_cap_records_num_synthetic_tuples():
    classes, per = 8, 4
    g = torch.Generator().manual_seed(1)
    y = torch.arange(classes).repeat_interleave(per)
    x = torch.randn(classes, IN, generator=g)[y] + 0.5 * torch.randn(len(y), IN, generator=g)
    dataset = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    models = {"trunk": torch.nn.Sequential(torch.nn.Linear(IN, FEAT), torch.nn.ReLU()),
              "embedder": torch.nn.Linear(FEAT, EMB)}
    seen = []

    def hook(trainer):
        hdml = trainer.loss_funcs["hdml"]
        seen.append((hdml.num_synthetic_tuples, hdml.J_syn, trainer.losses["J_syn"]))

    trainer = HardnessAwareDeepMetricLearning(
        models=models, optimizers=None, batch_size=16, loss_funcs={"metric_loss": losses.NPairsLoss()},
        mining_funcs={}, dataset=dataset, dataloader_num_workers=0, data_device=torch.device("cpu"),
        sampler=samplers.MPerClassSampler(y, m=2, batch_size=16, length_before_new_iter=32),  # 8 classes a batch
        num_classes=classes, alpha=0.05, max_synthetic_tuples=20, end_of_iteration_hook=hook)
    trainer.train(num_epochs=1)
    assert trainer.loss_funcs["hdml"].tuple_mode == "npair"
    assert len(seen) == 2  # two iterations
    for n_syn, j_syn, logged in seen:
        assert n_syn == 14  # T = 8: 56 negatives uncapped; R = 20 // 7 = 2 rows of 7
        assert math.isfinite(j_syn) and j_syn > 0 and float(logged) == pytest.approx(j_syn)
