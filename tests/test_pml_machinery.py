"""EE through PML's real entry points: every loss class PML exports, its miner conventions,
trainers, HookContainer + record-keeper, the wrapper's attributes as on PML's own classes."""
import copy
import inspect
import re

import pytest
import torch
from pytorch_metric_learning import distances, losses, miners, reducers, trainers
from pytorch_metric_learning.utils import common_functions as c_f

from pml_ext.losses import EmbeddingExpansionLoss, HPHNTripletLoss
from pml_ext.losses.embedding_expansion_loss import UNSUPPORTED_LOSSES
from pml_ext.miners import EmbeddingExpansionMiner

from . import ee_reference as ref

DIM = 8
# PML's abstract bases: no loss of their own.
ABSTRACT = {"BaseMetricLossFunction", "GenericPairLoss", "BaseLossWrapper"}
# Constructor arguments of the classes that need some (every other class: its defaults).
ARGS = {
    **{name: dict(num_classes=4, embedding_size=DIM) for name in (
        "ArcFaceLoss", "CosFaceLoss", "LargeMarginSoftmaxLoss", "NormalizedSoftmaxLoss", "ProxyAnchorLoss",
        "ProxyNCALoss", "SoftTripleLoss", "SphereFaceLoss", "SubCenterArcFaceLoss")},
    "P2SGradLoss": dict(descriptors_dim=DIM, num_classes=4),
    "ManifoldLoss": dict(l=DIM, K=4),
    "RankedListLoss": dict(margin=0.4, Tn=1.0),
    "MultipleLosses": dict(losses=[losses.ContrastiveLoss()]),
    "CrossBatchMemory": dict(loss=losses.ContrastiveLoss(), embedding_size=DIM),
    "SelfSupervisedLoss": dict(loss=losses.ContrastiveLoss()),
}
PML_LOSSES = sorted(name for name, cls in vars(losses).items()
                    if inspect.isclass(cls) and issubclass(cls, torch.nn.Module))


def build(name):
    return getattr(losses, name)(**copy.deepcopy(ARGS.get(name, {})))


def batch(seed=0, classes=(0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(classes), DIM, generator=g, dtype=torch.float64), torch.tensor(classes)


def _rows_of(emb, x):
    rows = []
    for e in emb:
        hits = [i for i in range(len(x)) if torch.equal(x[i], e)]
        if not hits:
            raise AssertionError("the reference distance was given a row that is not in the batch")
        rows.append(hits[0])
    return rows


def reference_distance(distance, x, H):
    """The loss's own distance class and settings, returning the brute-force hardened matrix H
    (EE's definition: negatives -> hardest value over the two classes' expanded sets)."""

    class Reference(type(distance)):
        def forward(self, query_emb, ref_emb=None):
            rows = _rows_of(query_emb, x)
            cols = rows if ref_emb is None else _rows_of(ref_emb, x)
            return H[rows][:, cols]

    d = copy.copy(distance)
    d.__class__ = Reference
    return d


def test_every_exported_loss_is_classified():
    """A PML release that adds a loss class fails here until it is tested below."""
    for name in PML_LOSSES:
        assert name in ABSTRACT or name in UNSUPPORTED_LOSSES or build(name) is not None
    assert set(UNSUPPORTED_LOSSES) <= set(PML_LOSSES)  # the list names real PML classes


@pytest.mark.parametrize("name", PML_LOSSES)
def test_every_pml_loss(name):
    """Supported -> equals the wrapped loss evaluated on the brute-force hardened matrix (loops,
    float64); unsupported -> an error at construction that names the loss and the reason."""
    if name in ABSTRACT:
        with pytest.raises((NotImplementedError, TypeError)):
            getattr(losses, name)()(*batch())
        return
    base = build(name)
    if name in UNSUPPORTED_LOSSES:
        with pytest.raises(ValueError, match=f"cannot wrap {name}: " + re.escape(UNSUPPORTED_LOSSES[name])):
            EmbeddingExpansionLoss(base)
        return
    x, y = batch()
    x = x.clone().requires_grad_(True)
    got = EmbeddingExpansionLoss(base, n_points=2)(x, y)
    H = torch.tensor(ref.hardened_matrix(x.detach(), y, 2, True, "all", ref.kind_of(base.distance)),
                     dtype=torch.float64)
    reference_loss = build(name)
    reference_loss.distance = reference_distance(reference_loss.distance, x.detach(), H)
    want = reference_loss(x.detach(), y)
    assert got.item() == pytest.approx(want.item(), rel=1e-7, abs=1e-10)
    assert got.item() != pytest.approx(build(name)(x.detach(), y).item(), rel=1e-6)  # EE changed it
    got.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", [n for n in UNSUPPORTED_LOSSES if UNSUPPORTED_LOSSES[n] in (
    UNSUPPORTED_LOSSES["AngularLoss"], UNSUPPORTED_LOSSES["ArcFaceLoss"])])
def test_refusal_reasons_hold_for_plain_pml(name):
    """The listed reasons, checked on PML's own classes: 'own geometry' losses never call their
    distance; proxy / classification losses call it only against rows that are not the batch's."""
    base = build(name).double()
    x, y = batch()
    calls = []
    base.distance.register_forward_pre_hook(lambda module, args: calls.append((args + (None,))[:2]))
    base(x) if name == "ManifoldLoss" else base(x, y)  # ManifoldLoss takes no labels
    if UNSUPPORTED_LOSSES[name] == UNSUPPORTED_LOSSES["AngularLoss"]:
        assert calls == []
    else:
        def is_batch(t):
            return t is None or t is x or (t.shape == x.shape and torch.equal(t, x))
        assert not any(is_batch(q) and is_batch(r) for q, r in calls)


def test_a_loss_that_never_calls_its_distance_is_an_error_at_the_first_forward():
    class OwnNorm(losses.BaseMetricLossFunction):  # a user loss not on the maintained list
        def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
            return {"loss": {"losses": embeddings.norm(dim=1), "indices": c_f.torch_arange_from_size(embeddings),
                             "reduction_type": "element"}}

    ee = EmbeddingExpansionLoss(OwnNorm())
    with pytest.raises(ValueError, match="OwnNorm never called its distance"):
        ee(*batch())


# ----------------------------------------------------------------------- PML's attribute conventions
def test_distance_reducer_and_defaults_are_the_wrapped_losss():
    x, y = batch(seed=1)
    ms = EmbeddingExpansionLoss(losses.MultiSimilarityLoss())
    assert type(ms.get_default_distance()) is distances.CosineSimilarity
    tri = EmbeddingExpansionLoss(losses.TripletMarginLoss())
    assert type(tri.get_default_reducer()) is reducers.AvgNonZeroReducer
    assert tri.distance is tri.loss.distance and tri.reducer is tri.loss.reducer
    # assignment, as PML honours it on its own losses
    tri.distance = distances.CosineSimilarity()
    tri.reducer = reducers.SumReducer()
    assert type(tri.loss.distance) is distances.CosineSimilarity and type(tri.loss.reducer) is reducers.SumReducer
    want = EmbeddingExpansionLoss(losses.TripletMarginLoss(distance=distances.CosineSimilarity(),
                                                           reducer=reducers.SumReducer()))(x, y)
    assert tri(x, y).item() == pytest.approx(want.item(), rel=1e-12)
    assert tri(x, y).item() != pytest.approx(EmbeddingExpansionLoss(losses.TripletMarginLoss())(x, y).item())
    # one copy of each module: the wrapper registers only the wrapped loss
    assert [n for n, _ in tri.named_children()] == ["loss"]


def test_conflicting_arguments_are_errors():
    with pytest.raises(ValueError, match="n_points=7 conflicts with the miner's n_points=3"):
        EmbeddingExpansionLoss(losses.TripletMarginLoss(), n_points=7, miner=EmbeddingExpansionMiner(n_points=3))
    with pytest.raises(ValueError, match="pairs='adjacent' conflicts"):
        EmbeddingExpansionLoss(losses.TripletMarginLoss(), pairs="adjacent", miner=EmbeddingExpansionMiner())
    ee = EmbeddingExpansionLoss(losses.TripletMarginLoss(), n_points=3, miner=EmbeddingExpansionMiner(n_points=3))
    assert ee.n_points == 3
    ee.miner = EmbeddingExpansionMiner(n_points=5)
    assert ee.n_points == 5
    with pytest.raises(ValueError, match="EmbeddingExpansionMiner"):
        ee.miner = miners.BatchHardMiner()
    with pytest.raises(ValueError, match="give distance to the wrapped loss"):
        EmbeddingExpansionLoss(losses.TripletMarginLoss(), distance=distances.CosineSimilarity())


# ----------------------------------------------------------------------- the miner as a PML miner
def test_reference_set_snippet_with_pml_losses_and_miners():
    """The README's snippet: the expanded set as PML's reference set, for our miner and PML's."""
    x, y = batch(seed=2)
    x = x.clone().requires_grad_(True)
    miner = EmbeddingExpansionMiner(n_points=2)
    ref_emb, ref_labels = miner.expand(x, y)
    loss = losses.TripletMarginLoss(margin=0.1)(x, y, miner(x, y, ref_emb, ref_labels), ref_emb, ref_labels)
    hard = miners.BatchHardMiner()(x, y, ref_emb, ref_labels)  # any PML miner over the reference set
    loss = loss + losses.TripletMarginLoss(margin=0.1)(x, y, hard, ref_emb, ref_labels)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the synthetic points are used: the mined negatives include some
    a1, p, a2, n = miner(x, y, ref_emb, ref_labels)
    assert bool((n >= len(y)).any()) and bool((p < len(y)).all())


def test_readme_snippets_run():
    """The README's 'Public classes' code blocks, in order (the last one is the reference-set
    snippet), on a small batch."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Public classes"):text.index("## Tests")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2 and "miner.expand" in blocks[-1]
    scope = {}
    for code in blocks:
        exec(code.replace("torch.randn(128, 512", "torch.randn(32, 16").replace(
            "torch.arange(32).repeat_interleave(4)", "torch.arange(8).repeat_interleave(4)"), scope)
    assert torch.isfinite(scope["loss"]) and scope["hard"][0].numel() > 0


def test_hphn_and_batch_hard_over_the_reference_set():
    """n_points=0: HPHN is BatchHard + Triplet. With synthetic points they differ (measured): HPHN
    takes its positives from originals only and its anchors' group includes the synthetic points
    of the anchor's pair; BatchHard over the reference set does neither."""
    x, y = batch(seed=3)
    for n in (0, 2):
        miner = EmbeddingExpansionMiner(n_points=n, pairs="adjacent")
        ref_emb, ref_labels = miner.expand(x, y)
        bh = losses.TripletMarginLoss(margin=0.1, reducer=reducers.MeanReducer())(
            x, y, miners.BatchHardMiner()(x, y, ref_emb, ref_labels), ref_emb, ref_labels)
        hphn = HPHNTripletLoss(margin=0.1, n_points=n)(x, y)
        if n == 0:
            assert hphn.item() == pytest.approx(bh.item(), rel=1e-9)
        else:
            assert hphn.item() != pytest.approx(bh.item(), rel=1e-3)


# ----------------------------------------------------------------------- trainers and hooks
class _Data(torch.utils.data.Dataset):
    def __init__(self, n_classes=4, per_class=6):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n_classes).repeat_interleave(per_class)
        self.x = torch.randn(len(self.labels), 10, generator=g) + 2 * torch.randn(n_classes, 10, generator=g)[self.labels]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.x[i], self.labels[i]


def _trainer(loss, miner=None, hooks=None):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(10, 6)
    data = _Data()
    from pytorch_metric_learning import samplers

    return trainers.MetricLossOnly(
        models={"trunk": trunk}, optimizers={"trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.01)},
        batch_size=12, loss_funcs={"metric_loss": loss}, dataset=data,
        mining_funcs={} if miner is None else {"tuple_miner": miner},
        sampler=samplers.MPerClassSampler(data.labels, m=3, length_before_new_iter=24),
        dataloader_num_workers=0, end_of_iteration_hook=hooks,
    ), trunk


def test_trainer_with_the_wrapper_and_a_pml_miner_trains():
    loss = EmbeddingExpansionLoss(losses.TripletMarginLoss(margin=0.2))
    trainer, trunk = _trainer(loss, miners.MultiSimilarityMiner(epsilon=0.5))
    before = trunk.weight.detach().clone()
    trainer.train(num_epochs=1)
    assert not torch.equal(before, trunk.weight) and torch.isfinite(trunk.weight).all()


def test_trainer_with_the_miner_as_tuple_miner_says_how_to_use_it():
    trainer, _ = _trainer(losses.TripletMarginLoss(), EmbeddingExpansionMiner())
    with pytest.raises(ValueError, match=r"tuple_miner.*EmbeddingExpansionLoss\(loss\)"):
        trainer.train(num_epochs=1)


def test_hook_container_records_ee_statistics_once_on_the_wrapper(tmp_path):
    record_keeper = pytest.importorskip("record_keeper")
    from pytorch_metric_learning.utils import logging_presets

    rk = record_keeper.RecordKeeper(record_writer=record_keeper.RecordWriter(str(tmp_path)),
                                    attributes_to_search_for=c_f.list_of_recordable_attributes_list_names())
    hooks = logging_presets.HookContainer(rk, record_group_name_prefix="t")
    loss = EmbeddingExpansionLoss(losses.MultiSimilarityLoss(), miner=EmbeddingExpansionMiner(collect_stats=True))
    trainer, _ = _trainer(loss, hooks=hooks.end_of_iteration_hook)
    trainer.train(num_epochs=1)
    groups = {g: series for g, series in rk.record_writer.records.items()
              if any(s == "synthetic_selection_ratio" for s in series)}
    assert list(groups) == ["metric_loss_EmbeddingExpansionLoss"], groups
    series = groups["metric_loss_EmbeddingExpansionLoss"]
    last = max(series["num_synthetic"])  # {iteration: value}
    assert series["num_synthetic"][last] == 4 * 3 * 2 and series["num_class_pairs"][last] == 12
    assert 0 <= series["synthetic_selection_ratio"][last] <= 1
