"""A compiled model inside DistributedDataParallel (gloo, 2 processes on 127.0.0.1): method
``none`` gives the gradients of single-process training on the concatenated batch; with
``aq_scq`` each rank quantizes with its own stream (rank 0 keeps the single-process one);
a few steps keep the replicas in sync. One spawn for all checks (process start-up is slow)."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import fqt_compiler as fqt
from fqt_test_models import MLP

pytestmark = pytest.mark.slow   # two processes training: end to end
WORLD = 2


def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(8, 20, generator=g), torch.randint(0, 5, (8,), generator=g)


def model():
    torch.manual_seed(0)
    return MLP()    # no BatchNorm: per-rank batch statistics would differ from the full batch


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        x, y = batch()
        half = slice(rank * 4, rank * 4 + 4)
        results = {}
        for method in ("none", "aq_scq"):
            m = model()
            # DDP wraps the compiled module; Dynamo traces the inner model only, so DDP's
            # graph splitting (optimize_ddp) does not apply and the hooks see every gradient.
            ddp = nn.parallel.DistributedDataParallel(fqt.compile(m, fqt.Config(method=method)))
            with ddp.no_sync():   # step 0: the local gradient of the same (full) batch
                nn.functional.cross_entropy(ddp(x), y).backward()
            results[method, "local"] = grads(m)
            m.zero_grad()
            nn.functional.cross_entropy(ddp(x[half]), y[half]).backward()
            results[method, "allreduced"] = grads(m)
            m.zero_grad()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for step in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x[half]), y[half]).backward()
            opt.step()
        results["params"] = {n: p.detach().clone() for n, p in m.named_parameters()}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def single(method):
    m = model()
    x, y = batch()
    nn.functional.cross_entropy(fqt.compile(m, fqt.Config(method=method))(x), y).backward()
    return grads(m)


def test_method_none_matches_single_process_on_the_concatenated_batch(ranks):
    expect = single("none")
    for r in ranks:
        for name, g in r["none", "allreduced"].items():
            torch.testing.assert_close(g, expect[name], rtol=1e-5, atol=1e-6, msg=name)


def test_aq_scq_ranks_draw_their_own_streams(ranks):
    expect = single("aq_scq")
    local0, local1 = ranks[0]["aq_scq", "local"], ranks[1]["aq_scq", "local"]
    binarized = ["net.2.weight", "net.5.weight"]
    for name in binarized:
        assert torch.equal(local0[name], expect[name]), name      # rank 0 = single process
        assert not torch.equal(local1[name], local0[name]), name  # rank 1: another stream
    # float layers see no quantizer: same data, same gradient on both ranks
    torch.testing.assert_close(local1["net.7.weight"], local0["net.7.weight"])
    # method none has no stream: both ranks agree
    for name in binarized:
        torch.testing.assert_close(ranks[1]["none", "local"][name], ranks[0]["none", "local"][name])


def test_replicas_stay_in_sync(ranks):
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), name
