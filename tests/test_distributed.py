"""EE under torch.distributed (gloo, 2 processes) with PML's DistributedLossWrapper."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import losses
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

from pml_ext.losses import EmbeddingExpansionLoss, HPHNTripletLoss

WORLD = 2


def make_loss(name):
    if name == "hphn":
        return HPHNTripletLoss(margin=0.1, pairs="all")
    return EmbeddingExpansionLoss(getattr(losses, name)(), n_points=2)


def full_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * 8, 6, generator=g, dtype=torch.float64)
    y = torch.arange(4).repeat(WORLD * 2)  # every class on every rank
    return x, y


def _worker(rank, port, name, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    x, y = full_batch()
    local = x[rank * 8:(rank + 1) * 8].clone().requires_grad_(True)
    loss = DistributedLossWrapper(make_loss(name))(local, y[rank * 8:(rank + 1) * 8])
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": local.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ContrastiveLoss", "hphn"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path, name):
    mp.spawn(_worker, args=(_free_port(), name, str(tmp_path)), nprocs=WORLD, join=True)
    x, y = full_batch()
    x = x.clone().requires_grad_(True)
    single = make_loss(name)(x, y)
    single.backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # PML's wrapper multiplies by world size so that DDP's gradient averaging gives the sum
        assert got["loss"].item() == pytest.approx(WORLD * single.item(), rel=1e-9)
        assert torch.allclose(got["grad"] / WORLD, x.grad[rank * 8:(rank + 1) * 8], atol=1e-12)


def test_efficient_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="ref_emb"):
        make_loss("MultiSimilarityLoss")(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), None,
                                         torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))


def make_hdml_parts():
    from pml_ext.losses import HDMLLoss

    torch.manual_seed(0)
    head = torch.nn.Linear(6, 4).double()
    hdml = HDMLLoss(losses.TripletMarginLoss(margin=0.2), embedding_size=4, feature_size=6, num_classes=4,
                    alpha=0.05, generator_hidden_size=8).double()
    return head, hdml


def _hdml_worker(rank, port, out_dir):
    from pml_ext.utils import DistributedHDMLWrapper

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    x, y = full_batch()
    head, hdml = make_hdml_parts()
    local = x[rank * 8:(rank + 1) * 8].clone().requires_grad_(True)
    loss = DistributedHDMLWrapper(hdml)(local, y[rank * 8:(rank + 1) * 8], head)
    loss.backward()
    params = {n: p.grad for n, p in list(head.named_parameters()) + list(hdml.named_parameters())
              if p.grad is not None}
    torch.save({"loss": loss.detach(), "grad": local.grad, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_hdml_two_processes_equal_one_process_after_ddp_averaging(tmp_path):
    mp.spawn(_hdml_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    x, y = full_batch()
    x = x.clone().requires_grad_(True)
    head, hdml = make_hdml_parts()
    single = hdml(x, y, head)
    single.backward()
    want = {n: p.grad for n, p in list(head.named_parameters()) + list(hdml.named_parameters()) if p.grad is not None}
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert want and set(got[0]["params"]) == set(want)
    for rank, g in enumerate(got):
        assert g["loss"].item() == pytest.approx(single.item(), rel=1e-9)
        # the backbone's gradient, averaged over ranks by DDP, is the one-process gradient
        assert torch.allclose(g["grad"] / WORLD, x.grad[rank * 8:(rank + 1) * 8], atol=1e-10)
    for name, grad in want.items():  # DDP's average of the ranks' parameter gradients
        avg = sum(g["params"][name] for g in got) / WORLD
        assert torch.allclose(avg, grad, atol=1e-10), name
