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
