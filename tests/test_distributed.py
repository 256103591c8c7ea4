"""EE under torch.distributed (gloo, 2 processes) with PML's DistributedLossWrapper."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

from pml_ext.losses import EmbeddingExpansionLoss, HPHNTripletLoss

WORLD = 2


def make_loss(name, pairs="all"):
    if name == "hphn":
        return HPHNTripletLoss(margin=0.1, pairs=pairs)
    if name == "hphn-default":
        return HPHNTripletLoss()  # pairs="adjacent", margin 1e-5
    return EmbeddingExpansionLoss(getattr(losses, name)(), n_points=2, pairs=pairs)


def full_batch(odd=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * 8, 6, generator=g, dtype=torch.float64)
    y = torch.arange(4).repeat(WORLD * 2)  # every class on every rank
    if odd:  # 3 + 3 + 1 + 1 per rank: adjacent pairs of classes 0, 1 cross the ranks
        y = torch.tensor([0, 1, 0, 1, 0, 1, 2, 3] * WORLD)
    return x, y


CASES = {  # name: (loss, pairs, odd class counts, PML miner through DistributedMinerWrapper)
    "ms-all": ("MultiSimilarityLoss", "all", False, False),
    "contrastive-all": ("ContrastiveLoss", "all", False, False),
    "hphn-all": ("hphn", "all", False, False),
    "ms-adjacent": ("MultiSimilarityLoss", "adjacent", True, False),
    "npairs-adjacent": ("NPairsLoss", "adjacent", True, False),  # N-pair's pairs follow row order too
    "hphn-adjacent": ("hphn", "adjacent", True, False),
    "hphn-default": ("hphn-default", "adjacent", True, False),
    "triplet-mined": ("TripletMarginLoss", "adjacent", True, True),
}


def _case_miner():
    return miners.MultiSimilarityMiner(epsilon=0.5)


def _worker(rank, port, out_dir):
    """Every case in one process group (one spawn: starting processes dominates the time)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    for case, (name, pairs, odd, mine) in CASES.items():
        x, y = full_batch(odd)
        local = x[rank * 8:(rank + 1) * 8].clone().requires_grad_(True)
        local_y = y[rank * 8:(rank + 1) * 8]
        # PML's way to mine: on the gathered batch, indices in the wrapper's row order
        tuples = DistributedMinerWrapper(_case_miner())(local, local_y) if mine else None
        loss = DistributedLossWrapper(make_loss(name, pairs))(local, local_y, tuples)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad}, os.path.join(out_dir, f"{case}-rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ee_dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_on_the_concatenated_batch(two_process_results, case):
    """Loss and gradient on every rank = one process on the batch concatenated in rank order
    (PML's wrapper gives each rank its own rows first; adjacent pairing and N-pair's choice of
    pairs depend on row order; mined indices come in the wrapper's order)."""
    name, pairs, odd, mine = CASES[case]
    x, y = full_batch(odd)
    x = x.clone().requires_grad_(True)
    tuples = _case_miner()(x, y) if mine else None
    single = make_loss(name, pairs)(x, y, tuples)
    single.backward()
    for rank in range(WORLD):
        got = torch.load(two_process_results / f"{case}-rank{rank}.pt")
        # PML's wrapper multiplies by world size so that DDP's gradient averaging gives the sum
        assert got["loss"].item() == pytest.approx(WORLD * single.item(), rel=1e-9)
        assert torch.allclose(got["grad"] / WORLD, x.grad[rank * 8:(rank + 1) * 8], atol=1e-12)


@pytest.mark.parametrize("name", ["hphn-default", "NPairsLoss"])
def test_row_order_matters_without_rank_order(name):
    """Why the losses restore rank order: the gathered order of rank 1 (its rows first) gives
    another value than one process on the rank-ordered batch."""
    x, y = full_batch(True)
    rotated = torch.cat([torch.arange(8, 16), torch.arange(8)])
    loss = make_loss(name, "adjacent")
    assert loss(x[rotated], y[rotated]).item() != pytest.approx(loss(x, y).item(), rel=1e-6)


def test_efficient_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="ref_emb"):
        make_loss("MultiSimilarityLoss")(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), None,
                                         torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))


def make_hdml_parts(loss=None, **kwargs):
    from pml_ext.losses import HDMLLoss

    torch.manual_seed(0)
    head = torch.nn.Linear(6, 4).double()
    hdml = HDMLLoss(loss or losses.TripletMarginLoss(margin=0.2), embedding_size=4, feature_size=6, num_classes=4,
                    alpha=0.05, generator_hidden_size=8, **kwargs).double()
    return head, hdml


def _hdml_worker(rank, port, out_dir):
    from pml_ext.utils import DistributedHDMLWrapper

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    x, y = full_batch()
    head, hdml = make_hdml_parts(max_synthetic_tuples=None)  # no random subset: one process must match
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
    head, hdml = make_hdml_parts(max_synthetic_tuples=None)
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


def _hdml_capped_worker(rank, port, out_dir, mode):
    from pml_ext.utils import DistributedHDMLWrapper

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    x, y = full_batch()
    loss = losses.NPairsLoss() if mode == "npair" else losses.TripletMarginLoss(margin=0.2)
    head, hdml = make_hdml_parts(loss, max_synthetic_tuples=3)  # capped: a random subset every step
    torch.manual_seed(100 + rank)  # the ranks' own random streams differ
    before = torch.get_rng_state()
    local = x[rank * 8:(rank + 1) * 8].clone().requires_grad_(True)
    out = DistributedHDMLWrapper(hdml)(local, y[rank * 8:(rank + 1) * 8], head)
    after = torch.get_rng_state()
    out.backward()
    params = {n: p.grad for n, p in hdml.named_parameters() if p.grad is not None}
    torch.save({"loss": out.detach(), "params": params, "tuples": hdml.num_synthetic_tuples,
                "stream": torch.equal(before, after)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["triplet", "npair"])
def test_hdml_capped_subsets_are_the_same_on_every_rank(tmp_path, mode):
    """max_synthetic_tuples draws a random subset; under the wrapper every rank draws the same one
    (a seed broadcast from rank 0), so the value and the generator's gradients agree across ranks
    although the ranks' random streams differ."""
    mp.spawn(_hdml_capped_worker, args=(_free_port(), str(tmp_path), mode), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert 0 < got[0]["tuples"] <= 3
    assert got[0]["loss"].item() == got[1]["loss"].item()
    assert got[0]["params"] and set(got[0]["params"]) == set(got[1]["params"])
    for name, grad in got[0]["params"].items():
        assert torch.equal(grad, got[1]["params"][name]), name
    # the wrapper draws one number for the seed from each rank's stream, nothing else
    assert not got[0]["stream"] and not got[1]["stream"]
