"""softmax_ce.integrations.transformers under torch's sharding, on gloo ranks with tiny random
models (float64): FSDP2 (the head sharded apart, layers and root, root only, tied embeddings,
reshard_after_forward both ways, a bf16 MixedPrecisionPolicy), tensor parallel on the head
(ColwiseParallel, with and without SequenceParallel on the final norm), FSDP2 x TP on a 2-D
mesh, and DDP. The oracle: the unsharded model's float64 logits through torch's cross_entropy,
every parameter's gradient of the mean of the ranks' losses (data parallel) or of the one loss
(tensor parallel: every rank the same batch)."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import REQUIRE_EXTENSION
from dist_harness import assert_same_on_every_rank, run_cases

try:
    import transformers  # noqa: F401
except ImportError:
    if REQUIRE_EXTENSION:  # installed by the set-up: its absence must fail the run
        raise
    pytest.skip("transformers is not installed (the [hf] extra)", allow_module_level=True)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

V = 64


def _model(tied=False, dtype=torch.float64):
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=32, tie_word_embeddings=tied)
    return T.LlamaForCausalLM(config).to(dtype).train()


def _batch(seed, shape=(2, 9)):
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(0, V, shape, generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _truth_loss(model, ids, labels):
    """torch's cross_entropy on the model's whole float64 logits, labels shifted."""
    logits = model(input_ids=ids).logits
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.reshape(-1, V).double(), shift.reshape(-1))


def _oracle(plain, batches):
    """(each batch's loss, the gradients of their mean) on an unsharded copy."""
    model = copy.deepcopy(plain)
    losses = [_truth_loss(model, *b) for b in batches]
    torch.stack(losses).mean().backward()
    return [x.item() for x in losses], {n: p.grad for n, p in model.named_parameters()}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _compare(model, loss, want_loss, want_grads, rtol=1e-9, atol=1e-11):
    torch.testing.assert_close(float(_full(loss)), want_loss, rtol=rtol, atol=atol)
    got = {n.replace("_fsdp_wrapped_module.", "").replace("module.", "", 1)
           if n.startswith("module.") else n: p.grad for n, p in model.named_parameters()}
    assert set(got) == set(want_grads), (set(got) ^ set(want_grads))
    for name, g in want_grads.items():
        assert got[name] is not None, name
        torch.testing.assert_close(_full(got[name]), g, rtol=rtol, atol=atol, msg=name)


def case_fsdp2_layouts(rank, world, group):
    from torch.distributed.fsdp import fully_shard

    from softmax_ce.integrations import transformers as sce_hf

    out = []
    layouts = [("head apart", False), ("layers and root", False), ("root only", False),
               ("tied embeddings", True)]
    for layout, tied in layouts:
        for reshard in (True, False):
            plain = _model(tied)
            batches = [_batch(r) for r in range(world)]
            want_losses, want_grads = _oracle(plain, batches)
            model = sce_hf.apply(copy.deepcopy(plain))
            if layout in ("head apart", "layers and root", "tied embeddings"):
                for layer in model.model.layers:
                    fully_shard(layer, reshard_after_forward=reshard)
            if layout == "head apart":
                fully_shard(model.lm_head, reshard_after_forward=reshard)
            fully_shard(model, reshard_after_forward=reshard)
            ids, labels = batches[rank]  # each rank its own batch; FSDP averages gradients
            result = model(input_ids=ids, labels=labels)
            assert result.logits is None
            result.loss.backward()
            _compare(model, result.loss, want_losses[rank], want_grads)
            out.append(f"{layout}, reshard={reshard}: ok")
    return out


def case_fsdp2_mixed_precision(rank, world, group):
    """bf16 parameters, float32 gradient reduction: the fused loss against the model's own loss
    under the same sharding and policy (bf16 rounding apart), and both near the float64
    oracle."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from softmax_ce.integrations import transformers as sce_hf

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    plain = _model(dtype=torch.float32)
    batches = [_batch(r) for r in range(world)]
    runs = {}
    for fused in (False, True):
        model = copy.deepcopy(plain)
        if fused:
            sce_hf.apply(model)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model.lm_head, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        result = model(input_ids=batches[rank][0], labels=batches[rank][1])
        result.loss.backward()
        runs[fused] = (float(result.loss), {n: _full(p.grad) for n, p in model.named_parameters()})
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=2e-2, atol=0)
    for name, g in runs[False][1].items():
        diff = (runs[True][1][name] - g).norm() / g.norm().clamp_min(1e-12)
        assert diff < 5e-2, (name, float(diff))
    return [runs[True][0]]


def _tp_plan(sequence_parallel):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   SequenceParallel)

    if not sequence_parallel:
        return [{"lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}]
    # the decoder's output is replicated in this model: split it on the sequence before the norm
    return [{"model.norm": PrepareModuleInput(input_layouts=(Replicate(),),
                                              desired_input_layouts=(Shard(1),))},
            {"model.norm": SequenceParallel(),
             "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                        use_local_output=False)}]


def case_tensor_parallel_head(rank, world, group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from softmax_ce.integrations import transformers as sce_hf

    mesh = init_device_mesh("cpu", (world,))
    out = []
    for sequence_parallel in (False, True):
        for tied in (False, True):
            plain = _model(tied)
            batch = _batch(7)  # every rank the same batch
            want_losses, want_grads = _oracle(plain, [batch])
            model = sce_hf.apply(copy.deepcopy(plain))
            if tied:  # a tied head is the embedding's weight: no TP plan on it here
                plan = [p for p in _tp_plan(sequence_parallel)]
                plan = [{k: v for k, v in p.items() if k != "lm_head"} for p in plan]
            else:
                plan = _tp_plan(sequence_parallel)
            for p in plan:
                if p:
                    parallelize_module(model, mesh, p)
            result = model(input_ids=batch[0], labels=batch[1])
            result.loss.backward()
            _compare(model, result.loss, want_losses[0], want_grads)
            out.append(f"sp={sequence_parallel}, tied={tied}: {float(_full(result.loss)):.12f}")
    return out


def case_ddp(rank, world, group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from softmax_ce.integrations import transformers as sce_hf

    plain = _model()
    batches = [_batch(r) for r in range(world)]
    want_losses, want_grads = _oracle(plain, batches)
    model = DDP(sce_hf.apply(copy.deepcopy(plain)), process_group=group)
    result = model(input_ids=batches[rank][0], labels=batches[rank][1])
    result.loss.backward()
    _compare(model, result.loss, want_losses[rank], want_grads)
    return "ddp: ok"


def case_fsdp2_times_tp(rank, world, group):
    """A (dp 2, tp 2) mesh: the head (and the final norm, sequence-parallel) over tp, FSDP2 over
    dp on the layers and the root; each dp rank its own batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from softmax_ce.integrations import transformers as sce_hf

    if world != 4:
        return None
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh.get_local_rank("dp")
    out = []
    for sequence_parallel in (False, True):
        plain = _model()
        batches = [_batch(r) for r in range(2)]
        want_losses, want_grads = _oracle(plain, batches)
        model = sce_hf.apply(copy.deepcopy(plain))
        for p in _tp_plan(sequence_parallel):
            parallelize_module(model, mesh["tp"], p)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        result = model(input_ids=batches[dp][0], labels=batches[dp][1])
        result.loss.backward()
        _compare(model, result.loss, want_losses[dp], want_grads)
        out.append(f"sp={sequence_parallel}: ok")
    return out


CASES_2 = [case_fsdp2_layouts, case_fsdp2_mixed_precision, case_tensor_parallel_head, case_ddp]


def test_transformers_under_fsdp2_tp_and_ddp(tmp_path):
    results = run_cases(2, tmp_path, CASES_2, timeout=400)
    assert_same_on_every_rank(results, except_for=("case_fsdp2_layouts",
                                                   "case_fsdp2_mixed_precision", "case_ddp"))


def test_transformers_under_fsdp2_times_tp(tmp_path):
    run_cases(4, tmp_path, [case_fsdp2_times_tp], timeout=400)
