"""Vocab-parallel cross-entropy over torch.distributed (gloo, CPU): world sizes 2, 3 and 4, each
in one spawn (a file rendezvous in tmp_path, a 60 s process-group timeout so that a bug fails
instead of hanging). Every case holds the result to torch on the gathered logits in float64 (or
to a float64 formula for z-loss and soft-capping); the loss must be bit-identical on every
rank; collectives are counted; errors must be raised on every rank."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import softmax_ce
from dist_harness import (GATHER, assert_same_on_every_rank, count_collectives, expect_error,
                          run_cases, torch_leaf_grad_placements)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

OPTION_SETS = [
    {},
    {"weight": True},
    {"ignore": True},
    {"label_smoothing": 0.1},
    {"label_smoothing": 0.2, "weight": True, "ignore": True},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0, "ignore": True},
]


# ---------------------------------------------------------------------------------------------
# the oracle: torch on the whole logits, float64
# ---------------------------------------------------------------------------------------------


def truth(x, target, weight, reduction, label_smoothing, z_loss, softcap):
    """torch's cross_entropy of the whole logits, plus z-loss and soft-capping written out."""
    xc = softcap * torch.tanh(x / softcap) if softcap else x
    rows = F.cross_entropy(xc, target, weight=weight, reduction="none",
                           label_smoothing=label_smoothing)
    prob = target.is_floating_point()
    if z_loss:
        lse = torch.logsumexp(xc, dim=1 if x.dim() >= 2 else 0)
        valid = torch.ones_like(rows, dtype=torch.bool) if prob else target != -100
        rows = rows + torch.where(valid, z_loss * lse * lse, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if prob:
        return rows.sum() / rows.numel()
    valid = target != -100
    safe = torch.where(valid, target, torch.zeros_like(target))
    w_y = weight[safe] if weight is not None else torch.ones_like(rows)
    return rows.sum() / torch.where(valid, w_y, torch.zeros_like(w_y)).sum()


def local_slice(x, rank, c_local, dim=1):
    return x.narrow(dim, rank * c_local, c_local)


def check_case(rank, world, group, shape, dtype, options, reduction, prob, seed, gap=0.0,
               owned_by=None, tol=None):
    """One case: the loss and this rank's gradient slice against the truth; returns the loss's
    bits (compared across ranks by the test)."""
    g = torch.Generator().manual_seed(seed)
    class_dim = 1 if len(shape) >= 2 else 0
    C = shape[class_dim]
    c_local = C // world
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    if gap:  # rank r's classes sit r * gap higher
        offsets = torch.arange(C, dtype=torch.float64) // c_local * gap
        x = x + offsets.view([-1] + [1] * (len(shape) - class_dim - 1))
    x = x.to(dtype).double()  # the oracle sees the values the ranks hold
    tshape = [s for i, s in enumerate(shape) if i != class_dim]
    if prob:
        target = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64),
                               class_dim).to(dtype).double()
    else:
        high = c_local if owned_by is not None else C
        target = torch.randint(0, high, tshape, generator=g)
        if owned_by is not None:
            target = target + owned_by * c_local
        if options.get("ignore") and target.dim() > 0:
            target.view(-1)[::3] = -100
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype).double() \
        if options.get("weight") else None
    eps, z, cap = (options.get("label_smoothing", 0.0), options.get("z_loss", 0.0),
                   options.get("softcap"))
    xf = x.clone().requires_grad_()
    expected = truth(xf, target, weight, reduction, eps, z, cap or 0.0)
    expected.sum().backward()

    xl = local_slice(x, rank, c_local, class_dim).to(dtype).clone().requires_grad_()
    tl = local_slice(target, rank, c_local, class_dim).to(dtype) if prob else target
    wl = weight.to(dtype) if weight is not None else None
    loss = softmax_ce.cross_entropy(xl, tl, wl, reduction=reduction, label_smoothing=eps,
                                    z_loss=z, softcap=cap, process_group=group)
    loss.sum().backward()
    rtol, atol = tol or ((1e-10, 1e-12) if dtype == torch.float64 else (2e-2, 2e-3))
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=rtol, atol=atol,
                               equal_nan=True)
    torch.testing.assert_close(xl.grad.double(),
                               local_slice(xf.grad, rank, c_local, class_dim),
                               rtol=rtol, atol=atol, equal_nan=True)
    return loss.detach().double().reshape(-1).numpy().tobytes().hex()


# ---------------------------------------------------------------------------------------------
# the cases (each runs on every rank; a returned value is compared across ranks)
# ---------------------------------------------------------------------------------------------


def case_parity_float64(rank, world, group):
    bits = []
    seed = 0
    for shape in [(7, 4 * world), (3, 2 * world, 4), (3 * world,)]:
        for prob in (False, True):
            for options in OPTION_SETS:
                if prob and options.get("ignore"):
                    continue
                for reduction in ("mean", "sum", "none"):
                    seed += 1
                    bits.append(check_case(rank, world, group, shape, torch.float64, options,
                                           reduction, prob, seed))
    return bits


def case_half_and_float32(rank, world, group):
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for prob in (False, True):
            options = {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3}
            out.append(check_case(rank, world, group, (16, 8 * world), dtype, options, "mean",
                                  prob, 101))
    return out


def case_ranks_without_targets_and_gaps(rank, world, group):
    out = []
    for owner in (0, world - 1):  # every target on one rank: the others own none
        out.append(check_case(rank, world, group, (9, 5 * world), torch.float64,
                              {"label_smoothing": 0.1}, "mean", False, 7, owned_by=owner))
    for dtype, tol in ((torch.float64, None), (torch.float32, (1e-5, 1e-6))):
        for gap in (1000.0, -1000.0):  # one rank's logits dominate the others' entirely
            out.append(check_case(rank, world, group, (6, 4 * world), dtype,
                                  {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-4},
                                  "sum", False, 8, gap=gap, tol=tol))
    return out


def case_every_position_ignored(rank, world, group):
    """A batch of prompt tokens only: torch's mean is NaN (0 / 0) and its gradients are 0, and so
    are ours, on the logits and through the fused head (never inf * 0 in a gradient)."""
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    target = torch.full((5,), -100)
    for eps in (0.0, 0.1):
        mean = softmax_ce.cross_entropy(x, target, label_smoothing=eps, process_group=group)
        assert torch.isnan(mean), mean
        mean.backward()
        assert torch.count_nonzero(x.grad) == 0, x.grad  # torch's gradient: all zeros
        x.grad = None
    total = softmax_ce.cross_entropy(x, target, reduction="sum", process_group=group)
    total.backward()
    assert total.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for eps in (0.0, 0.1):
        mean = softmax_ce.linear_cross_entropy(h, w, target, label_smoothing=eps,
                                               process_group=group)
        assert torch.isnan(mean), mean
        mean.backward()
        assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0
        h.grad = w.grad = None
    return [mean.item() != mean.item(), total.item()]


def case_collective_count(rank, world, group):
    """The collectives of a first call (new shapes or options: the headers agreed first) and of
    a steady one (one collective per forward, none in backward)."""
    counts = {}
    C = 4 * world
    with count_collectives() as calls:
        for reduction in ("mean", "none"):
            for call in ("first", "steady"):
                x = torch.randn(6, C // world, requires_grad=True)
                t = torch.randint(0, C, (6,))
                del calls[:]
                loss = softmax_ce.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1,
                                                z_loss=1e-3, process_group=group)
                counts[f"ce {reduction} {call} forward"] = list(calls)
                del calls[:]
                loss.sum().backward()
                counts[f"ce {reduction} {call} backward"] = list(calls)
        for reduction in ("mean", "none"):
            for call in ("first", "steady"):
                h = torch.randn(6, 3, requires_grad=True)
                w = torch.randn(C // world, 3, requires_grad=True)
                t = torch.randint(0, C, (6,))
                del calls[:]
                loss = softmax_ce.linear_cross_entropy(h, w, t, reduction=reduction,
                                                       process_group=group)
                counts[f"linear {reduction} {call} forward"] = list(calls)
                del calls[:]
                loss.sum().backward()
                counts[f"linear {reduction} {call} backward"] = list(calls)
    expected = {}
    for reduction in ("mean", "none"):
        expected[f"ce {reduction} first forward"] = [GATHER, GATHER]
        expected[f"ce {reduction} steady forward"] = [GATHER]
        expected[f"ce {reduction} first backward"] = []
        expected[f"ce {reduction} steady backward"] = []
    expected["linear mean first forward"] = [GATHER, GATHER, "all_reduce"]
    expected["linear mean steady forward"] = [GATHER, "all_reduce"]
    expected["linear mean first backward"] = expected["linear mean steady backward"] = []
    expected["linear none first forward"] = [GATHER, GATHER]
    expected["linear none steady forward"] = [GATHER]
    expected["linear none first backward"] = ["all_reduce"]
    expected["linear none steady backward"] = ["all_reduce"]
    assert counts == expected, counts
    return counts


def case_inplace_and_module(rank, world, group):
    C = 4 * world
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, C, generator=g, dtype=torch.float64)
    t = torch.randint(0, C, (6,), generator=g)
    xf = x.clone().requires_grad_()
    F.cross_entropy(xf, t, label_smoothing=0.1).backward()
    leaf = local_slice(x, rank, C // world).clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf: its storage may take the gradient
    loss_fn = softmax_ce.nn.CrossEntropyLoss(label_smoothing=0.1, inplace_backward=True,
                                             process_group=group)
    loss = loss_fn(logits, t)
    loss.backward()
    torch.testing.assert_close(leaf.grad, local_slice(xf.grad, rank, C // world), rtol=1e-10,
                               atol=1e-12)
    # the logits' storage now holds the gradient
    torch.testing.assert_close(logits.detach(), leaf.grad, rtol=0, atol=0)
    return loss.item()


def case_errors_on_every_rank(rank, world, group):
    out = []
    # rank 0 holds one class more than the others
    c_local = 4 + (1 if rank == 0 else 0)
    x = torch.randn(5, c_local, requires_grad=True)
    t = torch.randint(0, 4, (5,))
    out.append(expect_error(RuntimeError, "of the same size", lambda: softmax_ce.cross_entropy(
        x, t, process_group=group)))
    # a target outside the global range (same target on every rank)
    x = torch.randn(5, 4, requires_grad=True)
    bad = torch.tensor([0, 1, 4 * world, 2, 3])
    out.append(expect_error(IndexError, f"Target {4 * world} is out of bounds",
                             lambda: softmax_ce.cross_entropy(x, bad, process_group=group)))
    # only the last rank passes a weight of the wrong size: every rank raises
    w = torch.ones(4 * world + (1 if rank == world - 1 else 0))
    if rank == world - 1:
        out.append(expect_error(RuntimeError, "weight tensor should be defined",
                                 lambda: softmax_ce.cross_entropy(x, t, w, process_group=group)))
    else:
        out.append(expect_error(RuntimeError, f"rank(s) [{world - 1}]",
                                 lambda: softmax_ce.cross_entropy(x, t, w, process_group=group)))
    # options that differ between ranks
    out.append(expect_error(RuntimeError, "disagree on label_smoothing",
                             lambda: softmax_ce.cross_entropy(
                                 x, t, label_smoothing=0.1 * (rank + 1), process_group=group)))
    # transforms that this path does not support: an error, never a number
    out.append(expect_error(NotImplementedError, "torch.func",
                             lambda: torch.func.grad(lambda y: softmax_ce.cross_entropy(
                                 y, t, process_group=group))(x.detach())))
    # a second backward through the gradient formed in the forward
    loss = softmax_ce.cross_entropy(x, t, process_group=group)
    loss.backward(retain_graph=True)
    out.append(expect_error(RuntimeError, "second backward", lambda: loss.backward()))
    # after all of that the group still works
    loss = softmax_ce.cross_entropy(x, t, process_group=group)
    out.append(loss.item())
    return out


def case_dtensor(rank, world, group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    out = []
    mesh = init_device_mesh("cpu", (world,))
    C = 4 * world - 1  # uneven shards: DTensor's split
    g = torch.Generator().manual_seed(5)
    for prob in (False, True):
        for options in ({}, {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3,
                             "softcap": 4.0}):
            x = torch.randn(6, C, generator=g, dtype=torch.float64)
            target = (torch.softmax(torch.randn(6, C, generator=g, dtype=torch.float64), 1)
                      if prob else torch.randint(0, C, (6,), generator=g))
            weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5
                      if options.get("weight") else None)
            eps, z, cap = (options.get("label_smoothing", 0.0), options.get("z_loss", 0.0),
                           options.get("softcap"))
            xf = x.clone().requires_grad_()
            expected = truth(xf, target, weight, "mean", eps, z, cap or 0.0)
            expected.backward()
            xd = distribute_tensor(x.clone(), mesh, [Shard(1)]).requires_grad_()
            td = distribute_tensor(target, mesh, [Replicate()]) if prob else target
            loss = softmax_ce.cross_entropy(xd, td, weight, label_smoothing=eps, z_loss=z,
                                            softcap=cap)
            assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
            loss.backward()
            assert isinstance(xd.grad, DTensor)
            assert xd.grad.placements == torch_leaf_grad_placements(mesh, x.shape, [Shard(1)])
            torch.testing.assert_close(loss.to_local(), expected.detach(), rtol=1e-10,
                                       atol=1e-12)
            torch.testing.assert_close(xd.grad.full_tensor(), xf.grad, rtol=1e-10, atol=1e-12)
            out.append(loss.to_local().item().hex())
    if world == 4:  # the TP dimension of a 2-D mesh
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        x = torch.randn(5, 6, generator=g, dtype=torch.float64)
        t = torch.randint(0, 6, (5,), generator=g)
        xf = x.clone().requires_grad_()
        F.cross_entropy(xf, t).backward()
        xd = distribute_tensor(x.clone(), mesh2, [Replicate(), Shard(1)]).requires_grad_()
        loss = softmax_ce.cross_entropy(xd, t)
        loss.backward()
        torch.testing.assert_close(loss.to_local(), F.cross_entropy(x, t), rtol=1e-10, atol=0)
        torch.testing.assert_close(xd.grad.full_tensor(), xf.grad, rtol=1e-10, atol=1e-12)
        out.append(loss.to_local().item().hex())
    # a placement this path does not take: an error, not a number
    xd = distribute_tensor(torch.randn(4 * world, 5), mesh, [Shard(0)])
    out.append(expect_error(NotImplementedError, "must be sharded on dimension 1",
                             lambda: softmax_ce.cross_entropy(xd, torch.zeros(4 * world,
                                                                              dtype=torch.long))))
    return out


def case_linear(rank, world, group):
    out = []
    g = torch.Generator().manual_seed(9)
    C = 5 * world
    c_local = C // world
    for prob in (False, True):
        for options in ({}, {"weight": True, "label_smoothing": 0.1, "ignore": True},
                        {"z_loss": 1e-3, "softcap": 4.0}):
            if prob and options.get("ignore"):
                continue
            for reduction in ("mean", "sum", "none"):
                x = torch.randn(11, 6, generator=g, dtype=torch.float64)
                W = torch.randn(C, 6, generator=g, dtype=torch.float64)
                b = torch.randn(C, generator=g, dtype=torch.float64)
                if prob:
                    target = torch.softmax(torch.randn(11, C, generator=g, dtype=torch.float64),
                                           1)
                else:
                    target = torch.randint(0, C, (11,), generator=g)
                    if options.get("ignore"):
                        target[::4] = -100
                weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5
                          if options.get("weight") else None)
                eps, z, cap = (options.get("label_smoothing", 0.0), options.get("z_loss", 0.0),
                               options.get("softcap"))
                xf, Wf, bf = (a.clone().requires_grad_() for a in (x, W, b))
                expected = truth(F.linear(xf, Wf, bf), target, weight, reduction, eps, z,
                                 cap or 0.0)
                expected.sum().backward()
                xl = x.clone().requires_grad_()
                Wl = local_slice(W, rank, c_local, 0).clone().requires_grad_()
                bl = local_slice(b, rank, c_local, 0).clone().requires_grad_()
                tl = local_slice(target, rank, c_local) if prob else target
                loss = softmax_ce.linear_cross_entropy(
                    xl, Wl, tl, linear_bias=bl, weight=weight, reduction=reduction,
                    label_smoothing=eps, z_loss=z, softcap=cap, chunk_size=4,
                    process_group=group)
                loss.sum().backward()
                close = dict(rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(loss, expected.detach(), **close)
                torch.testing.assert_close(xl.grad, xf.grad, **close)  # summed over ranks
                torch.testing.assert_close(Wl.grad, local_slice(Wf.grad, rank, c_local, 0),
                                           **close)
                torch.testing.assert_close(bl.grad, local_slice(bf.grad, rank, c_local, 0),
                                           **close)
                out.append(loss.detach().reshape(-1).numpy().tobytes().hex())
    return out


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh())
        self.head = torch.nn.Linear(16, 10, bias=False)

    def forward(self, x, y, which):
        h = self.body(x)
        if which == "linear":
            return softmax_ce.linear_cross_entropy(h, self.head.weight, y, label_smoothing=0.1)
        loss = F.cross_entropy if which == "torch" else softmax_ce.cross_entropy
        return loss(self.head(h), y, label_smoothing=0.1)


def case_ddp(rank, world, group):
    """Plain data parallel (each rank its own batch, the whole head), two ranks: our loss and
    the fused linear cross-entropy under DistributedDataParallel give torch's gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if world != 2:
        return None
    grads = {}
    for which in ("torch", "ours", "linear"):
        torch.manual_seed(0)
        model = DDP(_Net().double(), process_group=group)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        x = torch.randn(12, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (12,), generator=g)
        model(x, y, which).backward()  # DDP averages the gradients over the ranks
        grads[which] = [p.grad.clone() for p in model.parameters()]
    for which in ("ours", "linear"):
        for a, b in zip(grads[which], grads["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    return [float(g.sum()) for g in grads["torch"]]


def case_target_and_weight_gradients(rank, world, group):
    """Probability targets that require grad get torch's gradient (their slice, on this rank):
    over a group, as a DTensor sharded like the logits, through the fused head; class weights
    that require grad raise torch's error (class indices) or ours (probabilities), on every
    rank; a replicated target that requires grad raises a clear error."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    out = []
    g = torch.Generator().manual_seed(21)
    C = 3 * world
    close = dict(rtol=1e-10, atol=1e-12)
    for reduction in ("mean", "sum", "none"):
        for kw in ({}, {"label_smoothing": 0.2, "softcap": 3.0}):
            x = torch.randn(5, C, generator=g, dtype=torch.float64)
            t = torch.softmax(torch.randn(5, C, generator=g, dtype=torch.float64), 1)
            w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
            xf, tf = x.clone().requires_grad_(), t.clone().requires_grad_()
            cap = kw.get("softcap")
            xc = cap * torch.tanh(xf / cap) if cap else xf
            expected = F.cross_entropy(xc, tf, w, reduction=reduction,
                                       label_smoothing=kw.get("label_smoothing", 0.0))
            expected.sum().backward()
            xl = local_slice(x, rank, 3).clone().requires_grad_()
            tl = local_slice(t, rank, 3).clone().requires_grad_()
            loss = softmax_ce.cross_entropy(xl, tl, w, reduction=reduction, process_group=group,
                                            **kw)
            loss.sum().backward()
            torch.testing.assert_close(loss, expected.detach(), **close)
            torch.testing.assert_close(xl.grad, local_slice(xf.grad, rank, 3), **close)
            torch.testing.assert_close(tl.grad, local_slice(tf.grad, rank, 3), **close)
            out.append(float(loss.sum()))
    # DTensor logits and a DTensor target sharded like them
    mesh = init_device_mesh("cpu", (world,))
    x = torch.randn(4, C, generator=g, dtype=torch.float64)
    t = torch.softmax(torch.randn(4, C, generator=g, dtype=torch.float64), 1)
    xf, tf = x.clone().requires_grad_(), t.clone().requires_grad_()
    F.cross_entropy(xf, tf).backward()
    xd = distribute_tensor(x.clone(), mesh, [Shard(1)]).requires_grad_()
    td = distribute_tensor(t.clone(), mesh, [Shard(1)]).requires_grad_()
    softmax_ce.cross_entropy(xd, td).backward()
    torch.testing.assert_close(td.grad.full_tensor(), tf.grad, **close)
    torch.testing.assert_close(xd.grad.full_tensor(), xf.grad, **close)
    out.append(expect_error(NotImplementedError, "sharded like the logits",
                            lambda: softmax_ce.cross_entropy(xd, t.clone().requires_grad_())))
    # the fused head with probabilities sliced like its local logits
    h = torch.randn(4, 5, generator=g, dtype=torch.float64)
    W = torch.randn(C, 5, generator=g, dtype=torch.float64)
    hf, Wf, tf = h.clone().requires_grad_(), W.clone().requires_grad_(), t.clone().requires_grad_()
    F.cross_entropy(hf @ Wf.t(), tf, label_smoothing=0.1).backward()
    hl, Wl = h.clone().requires_grad_(), local_slice(W, rank, 3, 0).clone().requires_grad_()
    tl = local_slice(t, rank, 3).clone().requires_grad_()
    softmax_ce.linear_cross_entropy(hl, Wl, tl, label_smoothing=0.1, process_group=group,
                                    chunk_size=3).backward()
    for got, want in ((hl.grad, hf.grad), (Wl.grad, local_slice(Wf.grad, rank, 3, 0)),
                      (tl.grad, local_slice(tf.grad, rank, 3))):
        torch.testing.assert_close(got, want, **close)
    # class weights that require grad
    xl = local_slice(x, rank, 3).clone().requires_grad_()
    wg = torch.ones(C, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, C, (4,), generator=g)
    out.append(expect_error(RuntimeError, "not differentiable with respect to argument 'weight'",
                            lambda: softmax_ce.cross_entropy(xl, idx, wg, process_group=group)))
    out.append(expect_error(RuntimeError, "does not differentiate with respect to class weights",
                            lambda: softmax_ce.cross_entropy(xl, local_slice(t, rank, 3), wg,
                                                             process_group=group)))
    out.append(expect_error(RuntimeError, "not differentiable with respect to argument 'weight'",
                            lambda: softmax_ce.linear_cross_entropy(
                                hl, Wl, idx, weight=wg, process_group=group)))
    return out


def case_dtensor_every_position_ignored(rank, world, group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    xd = distribute_tensor(torch.randn(5, 3 * world, dtype=torch.float64), mesh,
                           [Shard(1)]).requires_grad_()
    loss = softmax_ce.cross_entropy(xd, torch.full((5,), -100), label_smoothing=0.1)
    assert torch.isnan(loss.to_local())
    loss.backward()
    assert torch.count_nonzero(xd.grad.to_local()) == 0
    return "nan loss, zero gradient"


SUITES = {
    "all": [case_parity_float64, case_half_and_float32, case_ranks_without_targets_and_gaps,
            case_every_position_ignored, case_collective_count, case_inplace_and_module,
            case_errors_on_every_rank, case_dtensor, case_linear, case_ddp,
            case_target_and_weight_gradients, case_dtensor_every_position_ignored],
}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_vocab_parallel(world, tmp_path):
    results = run_cases(world, tmp_path, SUITES["all"])
    assert set(results[0]) == {case.__name__ for case in SUITES["all"]}
    assert_same_on_every_rank(results, except_for=("case_errors_on_every_rank",))
