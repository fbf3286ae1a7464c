"""The fused linear head sharded on the vocabulary (tensor parallel): a DTensor weight (and bias)
sharded on dimension 0 with the input plain, replicated or sharded on positions (sequence
parallel), on a 1-D mesh and on one dimension of a 2-D mesh, and the plain-tensor API with
``sequence_parallel=True``; each against torch on the whole head in float64, the gradients with
the inputs' placements; the collectives of a first and a steady call."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import softmax_ce
from dist_harness import (GATHER, assert_same_on_every_rank, count_collectives, run_cases,
                          torch_leaf_grad_placements)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

CLOSE = dict(rtol=1e-10, atol=1e-12)


def _problem(seed, N, H, C, prob=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(C, H, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    if prob:
        t = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), 1)
    else:
        t = torch.randint(0, C, (N,), generator=g)
        t[::5] = -100
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    return h, W, b, t, w


def _truth(h, W, b, t, w, reduction, **kw):
    hf, Wf, bf = (a.clone().requires_grad_() for a in (h, W, b))
    loss = F.cross_entropy(F.linear(hf, Wf, bf), t, w, reduction=reduction, **kw)
    loss.sum().backward()
    return loss.detach(), hf.grad, Wf.grad, bf.grad


def case_dtensor_weight(rank, world, group):
    """1-D mesh: the weight and bias Shard(0) (uneven: C = 4 world - 1), the input plain,
    replicated, or Shard(0) on positions (N = 3 world + 1: uneven rows too)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = []
    N, H, C = 3 * world + 1, 5, 4 * world - 1
    for layout in ("plain", "replicate", "sequence"):
        for reduction in ("mean", "sum", "none"):
            h, W, b, t, w = _problem(len(out), N, H, C)
            kw = {"label_smoothing": 0.1}
            loss_t, gh, gW, gb = _truth(h, W, b, t, w, reduction, **kw)
            Wd = distribute_tensor(W.clone(), mesh, [Shard(0)]).requires_grad_()
            bd = distribute_tensor(b.clone(), mesh, [Shard(0)]).requires_grad_()
            if layout == "plain":
                hd = h.clone().requires_grad_()
            else:
                placement = Replicate() if layout == "replicate" else Shard(0)
                hd = distribute_tensor(h.clone(), mesh, [placement]).requires_grad_()
            loss = softmax_ce.linear_cross_entropy(hd, Wd, t, linear_bias=bd, weight=w,
                                                   reduction=reduction, chunk_size=3, **kw)
            assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), loss
            loss.sum().backward()
            torch.testing.assert_close(loss.to_local(), loss_t, **CLOSE)
            assert Wd.grad.placements == (Shard(0),) and bd.grad.placements == (Shard(0),)
            torch.testing.assert_close(Wd.grad.full_tensor(), gW, **CLOSE)
            torch.testing.assert_close(bd.grad.full_tensor(), gb, **CLOSE)
            if layout == "plain":
                torch.testing.assert_close(hd.grad, gh, **CLOSE)
            else:
                assert hd.grad.placements == hd.placements, hd.grad.placements
                torch.testing.assert_close(hd.grad.full_tensor(), gh, **CLOSE)
            out.append(loss.to_local().sum().item())
    return out


def case_dtensor_weight_2d_mesh(rank, world, group):
    """The weight sharded along the second dimension of a (2, world / 2) mesh, replicated along
    the first; the input replicated or sharded on positions along the same dimension."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if world != 4:
        return None
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    out = []
    for sequence in (False, True):
        h, W, b, t, w = _problem(40 + sequence, 6, 4, 7)
        loss_t, gh, gW, _ = _truth(h, W, b, t, None, "mean")
        Wd = distribute_tensor(W.clone(), mesh, [Replicate(), Shard(0)]).requires_grad_()
        placements = [Replicate(), Shard(0) if sequence else Replicate()]
        hd = distribute_tensor(h.clone(), mesh, placements).requires_grad_()
        bd = distribute_tensor(b.clone(), mesh, [Replicate(), Shard(0)])
        loss = softmax_ce.linear_cross_entropy(hd, Wd, t, linear_bias=bd)
        loss.backward()
        torch.testing.assert_close(loss.to_local(), loss_t, **CLOSE)
        torch.testing.assert_close(Wd.grad.full_tensor(), gW, **CLOSE)
        torch.testing.assert_close(hd.grad.full_tensor(), gh, **CLOSE)
        out.append(loss.to_local().item())
    return out


def case_dtensor_sequence_sharded_hidden(rank, world, group):
    """Hidden states (B, S, H) sharded on the sequence (what SequenceParallel returns), S uneven
    over the ranks: the loss per position comes back in (B, S) order; the hidden states'
    gradient keeps their placement."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = []
    for reduction in ("none", "mean"):
        B, S, H, C = 3, 2 * world + 1, 4, 2 * world + 1
        g = torch.Generator().manual_seed(60)
        h = torch.randn(B, S, H, generator=g, dtype=torch.float64)
        W = torch.randn(C, H, generator=g, dtype=torch.float64)
        t = torch.randint(0, C, (B, S), generator=g)
        t[0, :2] = -100
        hf, Wf = h.clone().requires_grad_(), W.clone().requires_grad_()
        want = F.cross_entropy((hf @ Wf.t()).reshape(-1, C), t.reshape(-1), reduction=reduction,
                               label_smoothing=0.1)
        if reduction == "none":
            want = want.reshape(B, S)
        want.sum().backward()
        hd = distribute_tensor(h.clone(), mesh, [Shard(1)]).requires_grad_()
        Wd = distribute_tensor(W.clone(), mesh, [Shard(0)]).requires_grad_()
        loss = softmax_ce.linear_cross_entropy(hd, Wd, t, reduction=reduction,
                                               label_smoothing=0.1, chunk_size=4)
        loss.sum().backward()
        torch.testing.assert_close(loss.to_local(), want.detach(), **CLOSE)
        assert hd.grad.placements == torch_leaf_grad_placements(mesh, h.shape, [Shard(1)])
        torch.testing.assert_close(hd.grad.full_tensor(), hf.grad, **CLOSE)
        torch.testing.assert_close(Wd.grad.full_tensor(), Wf.grad, **CLOSE)
        out.append(loss.to_local().sum().item())
    return out


def case_sequence_parallel_plain(rank, world, group):
    """``process_group=..., sequence_parallel=True``: this rank's rows of the input (torch.chunk's
    split), every position's target; the input's gradient comes back as this rank's rows."""
    out = []
    for N, prob in ((4 * world, False), (4 * world - 1, False), (2 * world, True)):
        C = 3 * world
        h, W, b, t, w = _problem(N, N, 5, C, prob=prob)
        weight = None if prob else w
        loss_t, gh, gW, gb = _truth(h, W, b, t, weight, "none", label_smoothing=0.2)
        rows = list(h.chunk(world))
        hl = (rows[rank] if rank < len(rows) else h[:0]).clone().requires_grad_()
        Wl = W[rank * 3:(rank + 1) * 3].clone().requires_grad_()
        bl = b[rank * 3:(rank + 1) * 3].clone().requires_grad_()
        tl = t[:, rank * 3:(rank + 1) * 3] if prob else t
        loss = softmax_ce.linear_cross_entropy(hl, Wl, tl, linear_bias=bl, weight=weight,
                                               reduction="none", label_smoothing=0.2,
                                               chunk_size=5, process_group=group,
                                               sequence_parallel=True)
        loss.sum().backward()
        torch.testing.assert_close(loss, loss_t, **CLOSE)
        mine = gh.chunk(world)
        torch.testing.assert_close(hl.grad, mine[rank] if rank < len(mine) else gh[:0], **CLOSE)
        torch.testing.assert_close(Wl.grad, gW[rank * 3:(rank + 1) * 3], **CLOSE)
        torch.testing.assert_close(bl.grad, gb[rank * 3:(rank + 1) * 3], **CLOSE)
        out.append(loss.sum().item())
    return out


def case_loss_module_sharded(rank, world, group):
    """nn.LinearCrossEntropyLoss, the head and its loss in one module: its weight a DTensor
    sharded on the vocabulary, or the module under fully_shard (FSDP2 hooks its call)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    h, W, _, t, _ = _problem(70, 6, 8, 5 * world)
    loss_t, gh, gW, _ = _truth(h, W, torch.zeros(5 * world, dtype=torch.float64), t, None,
                               "mean")
    out = []
    for layout in ("tensor parallel", "fully_shard"):
        module = softmax_ce.nn.LinearCrossEntropyLoss(8, 5 * world, dtype=torch.float64)
        with torch.no_grad():
            module.linear.weight.copy_(W)
        if layout == "tensor parallel":
            module.linear.weight = torch.nn.Parameter(distribute_tensor(W.clone(), mesh,
                                                                        [Shard(0)]))
        else:
            fully_shard(module)
        hd = h.clone().requires_grad_()
        loss = module(hd, t)
        loss.backward()
        local = loss.to_local() if hasattr(loss, "to_local") else loss
        torch.testing.assert_close(local, loss_t, **CLOSE)
        torch.testing.assert_close(module.linear.weight.grad.full_tensor(), gW, **CLOSE)
        torch.testing.assert_close(hd.grad, gh, **CLOSE)
        out.append(f"{layout}: {local.item():.12f}")
    # the per-token outputs' module under fully_shard: its call gathers the weight
    module = softmax_ce.nn.LinearLogProbs(8, 5 * world, dtype=torch.float64, entropy=True)
    with torch.no_grad():
        module.linear.weight.copy_(W)
    fully_shard(module)
    hd = h.clone().requires_grad_()
    res = module(hd, t)
    (res.log_prob.sum() + res.entropy.sum()).backward()
    hf, Wf = h.clone().requires_grad_(), W.clone().requires_grad_()
    lp = torch.log_softmax(hf @ Wf.t(), -1)
    valid = t != -100
    want_lp = torch.where(valid, lp.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0)
    want_H = -(lp.exp() * lp).sum(-1)
    (want_lp.sum() + want_H.sum()).backward()
    torch.testing.assert_close(res.log_prob, want_lp.detach(), **CLOSE)
    torch.testing.assert_close(module.linear.weight.grad.full_tensor(), Wf.grad, **CLOSE)
    torch.testing.assert_close(hd.grad, hf.grad, **CLOSE)
    return out


def case_linear_log_probs_sharded(rank, world, group):
    """Per-token outputs of a head split over the ranks (process group, and a DTensor weight):
    every output and every gradient against torch on the whole head, in float64; masked
    (-inf-biased) classes on one rank; the collectives of a first and a steady call."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    C = 4 * world
    out = []
    for layout in ("group", "dtensor"):
        g = torch.Generator().manual_seed(80)
        x = torch.randn(7, 5, generator=g, dtype=torch.float64)
        W = torch.randn(C, 5, generator=g, dtype=torch.float64)
        b = torch.randn(C, generator=g, dtype=torch.float64)
        b[1:3] = float("-inf")  # classes nobody may predict, all on rank 0
        t = torch.randint(3, C, (7,), generator=g)
        t[2] = -100
        xf, Wf, bf = (a.clone().requires_grad_() for a in (x, W, b))
        z = F.linear(xf, Wf, bf) / 0.7
        lp = torch.log_softmax(z, -1)
        p = lp.exp()
        want = [torch.where(t != -100, lp.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0),
                torch.logsumexp(z, -1), -(p * torch.where(p > 0, lp, 0.0)).sum(-1),
                torch.topk(lp, 3)[0]]
        ups = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in want]
        sum((w * u).sum() for w, u in zip(want, ups)).backward()
        mine = slice(rank * 4, (rank + 1) * 4)
        xl = x.clone().requires_grad_()
        if layout == "group":
            Wl, bl = W[mine].clone().requires_grad_(), b[mine].clone().requires_grad_()
            res = softmax_ce.linear_log_probs(xl, Wl, t, bl, temperature=0.7, entropy=True,
                                              top_k=3, chunk_size=3, process_group=group)
            got = [res.log_prob, res.lse, res.entropy, res.top_k_log_probs]
        else:
            Wl = distribute_tensor(W.clone(), mesh, [Shard(0)]).requires_grad_()
            bl = distribute_tensor(b.clone(), mesh, [Shard(0)]).requires_grad_()
            res = softmax_ce.linear_log_probs(xl, Wl, t, bl, temperature=0.7, entropy=True,
                                              top_k=3)
            got = [o.to_local() for o in (res.log_prob, res.lse, res.entropy,
                                          res.top_k_log_probs)]
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w.detach(), **CLOSE)
        argmax = res.argmax if layout == "group" else res.argmax.to_local()
        assert torch.equal(argmax, z.detach().argmax(-1))
        sum((a * u).sum() for a, u in zip(
            [res.log_prob, res.lse, res.entropy, res.top_k_log_probs], ups)).backward() \
            if layout == "group" else sum((a.to_local() * u).sum() for a, u in zip(
                [res.log_prob, res.lse, res.entropy, res.top_k_log_probs], ups)).backward()
        torch.testing.assert_close(xl.grad, xf.grad, **CLOSE)
        gW = Wl.grad if layout == "group" else Wl.grad.full_tensor()[mine]
        torch.testing.assert_close(gW, Wf.grad[mine], **CLOSE)
        out.append(float(got[1].sum()))
    counts = {}
    with count_collectives() as calls:
        for k in (0, 2):
            for call in ("first", "steady"):
                xl = torch.randn(5, 3, requires_grad=True)
                Wl = torch.randn(4, 3, requires_grad=True)
                del calls[:]
                res = softmax_ce.linear_log_probs(xl, Wl, torch.zeros(5, dtype=torch.long),
                                                  top_k=k, process_group=group)
                counts[f"top_k={k} {call} forward"] = list(calls)
                del calls[:]
                res.lse.sum().backward()
                counts[f"top_k={k} {call} backward"] = list(calls)
    assert counts == {"top_k=0 first forward": [GATHER, GATHER],
                      "top_k=0 steady forward": [GATHER],
                      "top_k=2 first forward": [GATHER, GATHER, GATHER],
                      "top_k=2 steady forward": [GATHER, GATHER],
                      **{f"top_k={k} {c} backward": ["all_reduce"] for k in (0, 2)
                         for c in ("first", "steady")}}, counts
    return out


def case_sequence_parallel_collectives(rank, world, group):
    counts = {}
    with count_collectives() as calls:
        for call in ("first", "steady"):
            hl = torch.randn(3, 4, requires_grad=True)
            Wl = torch.randn(2, 4, requires_grad=True)
            t = torch.randint(0, 2 * world, (3 * world,))
            del calls[:]
            loss = softmax_ce.linear_cross_entropy(hl, Wl, t, process_group=group,
                                                   sequence_parallel=True)
            counts[f"{call} forward"] = list(calls)
            del calls[:]
            loss.backward()
            counts[f"{call} backward"] = list(calls)
    expected = {"first forward": [GATHER, GATHER, GATHER, "reduce_scatter_tensor"],
                "steady forward": [GATHER, GATHER, "reduce_scatter_tensor"],
                "first backward": [], "steady backward": []}
    assert counts == expected, counts
    return counts


CASES = [case_dtensor_weight, case_dtensor_weight_2d_mesh, case_dtensor_sequence_sharded_hidden,
         case_sequence_parallel_plain, case_loss_module_sharded, case_linear_log_probs_sharded,
         case_sequence_parallel_collectives]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_heads(world, tmp_path):
    assert_same_on_every_rank(run_cases(world, tmp_path, CASES))
