"""One contract, every public loss/miner: forward, backward, dtypes, distances, degenerate batches.
The trainers' contract is tests/test_contract_trainers.py."""
import pytest
import torch
from pytorch_metric_learning import distances, losses, reducers

from pml_ext.losses import EmbeddingExpansionLoss, HPHNTripletLoss
from pml_ext.miners import EmbeddingExpansionMiner

from . import ee_reference as ref

WRAPPED = ref.WRAPPED_LOSSES


def make(name, **kw):
    if name == "HPHNTripletLoss":
        return HPHNTripletLoss(margin=0.1, **kw)
    if name == "EmbeddingExpansionMiner":
        return EmbeddingExpansionMiner(**kw)
    dist = kw.pop("distance", None)
    base_kw = {} if dist is None else {"distance": dist}
    return EmbeddingExpansionLoss(getattr(losses, name)(**base_kw), **kw)


ALL = WRAPPED + ["HPHNTripletLoss", "EmbeddingExpansionMiner"]
LOSSES = WRAPPED + ["HPHNTripletLoss"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DISTS = {
    "lp2": lambda: distances.LpDistance(),
    "lp2_raw": lambda: distances.LpDistance(normalize_embeddings=False),
    "lp2_sq": lambda: distances.LpDistance(power=2),
    "lp1": lambda: distances.LpDistance(p=1),
    "cosine": lambda: distances.CosineSimilarity(),
    "dot": lambda: distances.DotProductSimilarity(),
}


def call(obj, x, y):
    if isinstance(obj, EmbeddingExpansionMiner):
        # the reference-set mode, consumed by a PML loss, and harden()
        ref_emb, ref_labels = obj.expand(x, y)
        tuples = obj(x, y, ref_emb, ref_labels)
        assert all(bool((t < len(r)).all()) for t, r in zip(tuples, (x, ref_emb, x, ref_emb)))
        pml = losses.ContrastiveLoss(distance=obj.distance)(x, y, tuples, ref_emb, ref_labels)
        return obj.harden(x, y).hardest.nan_to_num(posinf=0, neginf=0).sum() + pml
    return obj(x, y)


def run_batch(name, x, y, **kw):
    obj = make(name, **kw)
    x = x.clone().requires_grad_(True)
    out = call(obj, x, y)
    assert out.ndim == 0
    assert torch.isfinite(out), f"{name} gave {out}"
    out.float().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return out, x.grad


def data(n_classes=4, per_class=4, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_classes * per_class, dim, generator=g).to(dtype)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return x, y


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_is_finite_and_close_to_float64(name, dtype):
    x, y = data(dtype=dtype)
    out, _ = run_batch(name, x, y)
    ref, _ = run_batch(name, x.double(), y)
    if name == "NTXentLoss" and dtype == torch.float16:
        # PML's own NTXentLoss is 13% off float64 in float16 on this batch (log of an underflowing
        # ratio); finiteness is what we can promise there.
        return
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1}[dtype]
    assert out.double().item() == pytest.approx(ref.item(), rel=tol, abs=tol)


@pytest.mark.parametrize("name", ["TripletMarginLoss", "ContrastiveLoss", "LiftedStructureLoss",
                                  "GeneralizedLiftedStructureLoss", "NPairsLoss", "MultiSimilarityLoss",
                                  "NTXentLoss", "SupConLoss", "HPHNTripletLoss", "EmbeddingExpansionMiner"])
@pytest.mark.parametrize("dist", list(DISTS))
def test_every_distance(name, dist):
    x, y = data()
    run_batch(name, x, y, distance=DISTS[dist]())


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize(
    "labels",
    [
        pytest.param([0, 1, 2, 3], id="all-unique"),
        pytest.param([7, 7, 7, 7], id="one-class"),
        pytest.param([3], id="one-sample"),
        pytest.param([], id="empty"),
    ],
)
def test_degenerate_batches_are_well_defined_and_connected_to_graph(name, labels):
    """No synthetic points or no negatives: EE equals the plain loss (zero where it needs
    tuples that do not exist, e.g. triplets; pair losses with only negatives or only positives
    keep their value). HPHN has no valid anchor: zero. An empty batch: zero, as PML's losses.
    Equal to float32 rounding: EE and PML compute the same distances by different arithmetic (an
    unseeded rel=1e-6 failed ~3% of draws for Contrastive's few contributing pairs)."""
    y = torch.tensor(labels, dtype=torch.long)
    x = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    obj = make(name)
    out = obj(x, y)
    assert torch.isfinite(out)
    if name == "HPHNTripletLoss":
        assert out.item() == 0
    else:
        assert out.item() == pytest.approx(obj.loss(x, y).item(), rel=1e-5, abs=1e-6)
    assert out.requires_grad
    out.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
def test_odd_counts_duplicates_and_identical_embeddings(name, pairs):
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    x = torch.randn(len(y), 6)
    x[1] = x[0]  # duplicate embeddings: zero distances must not give NaN gradients
    kw = {"pairs": pairs}
    run_batch(name, x, y, **kw)
    if name != "NPairsLoss":
        run_batch(name, torch.ones(len(y), 6), y, **kw)


@pytest.mark.parametrize("name", ALL)
def test_large_n(name):
    x, y = data(n_classes=3, per_class=3)
    run_batch(name, x, y, n_points=32)


@pytest.mark.parametrize("name", LOSSES)
def test_bad_input_is_a_clear_error(name):
    obj = make(name)
    x, y = data()
    with pytest.raises(ValueError, match="1-D"):
        obj(x, y[:, None])
    with pytest.raises(ValueError, match="integers"):
        obj(x, y.float())
    with pytest.raises(ValueError, match="rows|entries"):
        obj(x, y[:-1])
    with pytest.raises(ValueError, match="2-D"):
        obj(x[0], y[:1])
    for values in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        for dtype in (torch.float64, torch.float32):
            bad = x.clone().to(dtype)
            bad[0, : len(values)] = torch.tensor(values, dtype=dtype)
            with pytest.raises(ValueError, match="NaN"):
                obj(bad, y)
    with pytest.raises(ValueError, match="ref_emb"):
        obj(x, y, None, x, y) if name != "HPHNTripletLoss" else obj(x, y, ref_emb=x, ref_labels=y)


@pytest.mark.parametrize("kw", [{"n_points": -1}, {"n_points": 1.5}, {"pairs": "random"}])
@pytest.mark.parametrize("name", ALL)
def test_bad_arguments(name, kw):
    with pytest.raises(ValueError):
        make(name, **kw)


def test_wrapper_rejects_non_losses():
    with pytest.raises(ValueError, match="PML loss"):
        EmbeddingExpansionLoss(torch.nn.MSELoss())
    with pytest.raises(ValueError, match="EmbeddingExpansionMiner"):
        EmbeddingExpansionLoss(losses.TripletMarginLoss(), miner=torch.nn.Identity())


@pytest.mark.parametrize("reducer", [reducers.MeanReducer(), reducers.SumReducer(), reducers.AvgNonZeroReducer(),
                                     reducers.ThresholdReducer(low=0.01)])
def test_every_reducer(reducer):
    x, y = data()
    loss = EmbeddingExpansionLoss(losses.TripletMarginLoss(reducer=reducer))
    x = x.requires_grad_(True)
    out = loss(x, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    hp = HPHNTripletLoss(reducer=reducer)(x, y)
    assert torch.isfinite(hp)


def test_recordable_attributes_for_record_keeper():
    """Statistics are recorded once, on the wrapper (the object a user hands PML); a given
    miner's collect_stats carries over."""
    x, y = data()
    miner = EmbeddingExpansionMiner(collect_stats=True)
    loss = EmbeddingExpansionLoss(losses.MultiSimilarityLoss(), miner=miner)
    loss(x, y)
    for attr in ["num_synthetic", "num_class_pairs", "synthetic_selection_ratio"]:
        assert attr in loss._record_these_stats
    assert loss.num_synthetic == 4 * 6 * 2
    assert loss.num_class_pairs == 12
    assert 0 <= loss.synthetic_selection_ratio <= 1
    assert miner not in list(loss.modules())  # not walked by record-keeper a second time
    assert miner.num_synthetic == 0
    # used as a miner, it records on itself
    miner(x, y, *miner.expand(x, y))
    assert miner.num_synthetic == 48 and miner.num_pos_pairs == 4 * 4 * 3 and miner.num_neg_pairs == 16 * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name):
    x, y = data()
    cpu, _ = run_batch(name, x, y)
    gpu, _ = run_batch(name, x.cuda(), y.cuda())
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-4)


def test_record_keeper_logs_ee_statistics(tmp_path):
    record_keeper = pytest.importorskip("record_keeper")
    from pytorch_metric_learning.utils import common_functions as c_f

    rk = record_keeper.RecordKeeper(
        record_writer=record_keeper.RecordWriter(str(tmp_path)),
        attributes_to_search_for=c_f.list_of_recordable_attributes_list_names(),
    )
    loss = EmbeddingExpansionLoss(losses.MultiSimilarityLoss(), collect_stats=True)
    x, y = data()
    for it in range(2):
        loss(x, y)
        rk.update_records({"loss": loss}, it, recursive_types=[torch.nn.Module])
    group = rk.get_record("loss_EmbeddingExpansionLoss")
    assert sorted(group["synthetic_selection_ratio"]) == [0, 1]
    assert group["num_synthetic"][1] == 48 and group["num_class_pairs"][1] == 12
    rk.save_records()
    assert (tmp_path / "loss_EmbeddingExpansionLoss.csv").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_finiteness_check_accepts_the_largest_finite_values(dtype):
    """The input check's sum overflows on the largest finite values; the elementwise check then
    lets them pass, and still catches one inf among them."""
    from pml_ext.losses.embedding_expansion_loss import _check_batch

    x = torch.full((64, 256), torch.finfo(dtype).max, dtype=dtype)
    _check_batch(x, torch.arange(64) // 4)  # no error
    x[3, 7] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        _check_batch(x, torch.arange(64) // 4)

