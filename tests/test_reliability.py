"""Property-based tests over random label layouts and dtypes, and mixed precision."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from pytorch_metric_learning import losses

from pml_ext.losses import EmbeddingExpansionLoss, HPHNTripletLoss

from . import ee_reference as ref

labels_strategy = st.lists(st.integers(0, 3), min_size=1, max_size=9)


@settings(max_examples=40, deadline=None)
@given(labels=labels_strategy, n=st.integers(0, 3), pairs=st.sampled_from(["all", "adjacent"]),
       seed=st.integers(0, 10_000), name=st.sampled_from(["TripletMarginLoss", "MultiSimilarityLoss",
                                                          "ContrastiveLoss", "NTXentLoss"]))
def test_wrapped_losses_match_reference_on_any_label_layout(labels, n, pairs, seed, name):
    y = torch.tensor(labels)
    x = torch.randn(len(labels), 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    loss = EmbeddingExpansionLoss(getattr(losses, name)(), n_points=n, pairs=pairs)
    got = loss(x.requires_grad_(True), y)
    assert torch.isfinite(got)
    got.backward()
    assert torch.isfinite(x.grad).all()
    kind = "l2" if name in ("TripletMarginLoss", "ContrastiveLoss") else "cos"
    H = ref.hardened_matrix(x.detach(), y, n, True, pairs, kind)
    assert got.item() == pytest.approx(ref.loss_from_matrix(name, H, y), rel=1e-7, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(labels=labels_strategy, n=st.integers(0, 3), pairs=st.sampled_from(["all", "adjacent"]),
       seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_hphn_matches_reference_on_any_label_layout(labels, n, pairs, seed, dtype):
    y = torch.tensor(labels)
    x = torch.randn(len(labels), 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = HPHNTripletLoss(margin=0.1, n_points=n, pairs=pairs)(x.to(dtype), y)
    assert torch.isfinite(got)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert got.item() == pytest.approx(ref.hphn_triplet(x, y, n, True, pairs, 0.1), rel=tol, abs=tol)


@pytest.mark.parametrize("make", [
    lambda: EmbeddingExpansionLoss(losses.MultiSimilarityLoss()),
    lambda: EmbeddingExpansionLoss(losses.TripletMarginLoss()),
    lambda: EmbeddingExpansionLoss(losses.NPairsLoss()),
    lambda: HPHNTripletLoss(margin=0.1),
])
def test_autocast_bfloat16_training_step_matches_float32(make):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(32, 16)
    y = torch.arange(8).repeat_interleave(4)
    loss_fn = make()
    ref_loss = loss_fn(net(x), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net(x)
        assert emb.dtype == torch.bfloat16
        out = loss_fn(emb, y)
    assert torch.isfinite(out)
    out.float().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert out.float().item() == pytest.approx(ref_loss.item(), rel=0.1, abs=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_autocast_float16_on_cuda():
    net = torch.nn.Linear(16, 8).cuda()
    x = torch.randn(32, 16, device="cuda")
    y = torch.arange(8, device="cuda").repeat_interleave(4)
    loss_fn = EmbeddingExpansionLoss(losses.MultiSimilarityLoss())
    ref_loss = loss_fn(net(x), y)
    with torch.autocast("cuda", dtype=torch.float16):
        out = loss_fn(net(x), y)
    assert torch.isfinite(out) and out.float().item() == pytest.approx(ref_loss.item(), rel=0.05)


def test_labels_on_another_device_is_a_clear_error():
    if not torch.cuda.is_available():
        # emulate with the meta device, which is also "another device"
        x = torch.randn(4, 3)
        y = torch.tensor([0, 0, 1, 1], device="meta")
    else:
        x = torch.randn(4, 3, device="cuda")
        y = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="labels are on"):
        EmbeddingExpansionLoss(losses.TripletMarginLoss())(x, y)
    with pytest.raises(ValueError, match="labels are on"):
        HPHNTripletLoss()(x, y)


def test_hdml_autocast_bfloat16_training_step_is_finite_and_close():
    from pml_ext.losses import HDMLLoss

    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU())
    head = torch.nn.Linear(32, 8)
    hdml = HDMLLoss(losses.TripletMarginLoss(margin=0.2), embedding_size=8, feature_size=32, num_classes=8,
                    alpha=0.05)
    x = torch.randn(32, 16)
    y = torch.arange(8).repeat_interleave(4)
    ref_loss = hdml(trunk(x), y, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hdml(trunk(x), y, head)
    assert torch.isfinite(out)
    out.float().backward()
    params = list(trunk.parameters()) + list(head.parameters()) + list(hdml.parameters())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
    assert out.float().item() == pytest.approx(ref_loss.item(), rel=0.1, abs=0.02)
