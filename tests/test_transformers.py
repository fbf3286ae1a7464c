"""softmax_ce.integrations.transformers on tiny random Hugging Face causal LMs (nothing
downloaded): the patched model's loss and every parameter's gradient against the unpatched
model's and against a float64 evaluation of the full logits; labels shift, ignore_index=-100,
num_items_in_batch, shift_labels, logits when asked, no whole logits, lower peak memory."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REQUIRE_EXTENSION

try:
    import transformers as T
except ImportError:
    if REQUIRE_EXTENSION:  # installed by the set-up: its absence must fail the run
        raise
    pytest.skip("transformers is not installed (the [hf] extra)", allow_module_level=True)

from softmax_ce.integrations import transformers as sce_hf  # noqa: E402

V = 101
KINDS = sorted(sce_hf.SUPPORTED_MODEL_TYPES)
MOE = {kind for kind, spec in sce_hf.SUPPORTED_MODEL_TYPES.items() if spec.router_aux_loss}
_EXPERTS = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)
_EXTRA = {  # what a kind needs beyond the common tiny config, or what makes its head show
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gemma2": dict(head_dim=8, final_logit_softcapping=2.0),
    "gemma3_text": dict(head_dim=8, final_logit_softcapping=2.0),
    "cohere": dict(logit_scale=0.5), "cohere2": dict(logit_scale=0.5),
    "granite": dict(logits_scaling=2.0),
    "granitemoe": dict(logits_scaling=2.0, num_local_experts=4, **_EXPERTS),
    "mixtral": dict(num_local_experts=4, **_EXPERTS),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16, **_EXPERTS),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=16, **_EXPERTS),
}


def tiny(kind, vocab=V, dtype=torch.float64):
    """A 2-layer model of the kind with random weights, no dropout (mixtures of experts in
    float32: their grouped GEMMs take no float64)."""
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = T.AutoConfig.for_model(kind, **{**common, **_EXTRA.get(kind, {})})
    for name, value in vars(config).items():
        if ("drop" in name or name.endswith("pdrop")) and isinstance(value, float):
            setattr(config, name, 0.0)
    model = T.AutoModelForCausalLM.from_config(config)
    return model.to(torch.float32 if kind in MOE else dtype).train()


def batch(seed=0, shape=(3, 17)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, shape, generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    labels[2, -3:] = -100  # padding
    return ids, labels


def pair(kind, dtype=torch.float64, vocab=V, **apply_kwargs):
    torch.manual_seed(0)
    plain = tiny(kind, vocab, dtype)
    fused = sce_hf.apply(copy.deepcopy(plain), **apply_kwargs)
    return plain, fused


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def float64_truth(model, ids, labels, num_items=None):
    """The loss of the model's full float64 logits (soft-capped by the model where it caps),
    labels shifted, through torch."""
    logits = model(input_ids=ids, return_logits=True).logits
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    reduction = "mean" if num_items is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, V), shift.reshape(-1), reduction=reduction)
    return loss if num_items is None else loss / num_items


@pytest.mark.parametrize("kind", KINDS)
def test_loss_and_gradients_equal_the_unpatched_model(kind):
    plain, fused = pair(kind)
    ids, labels = batch()
    out_plain = plain(input_ids=ids, labels=labels)
    out_fused = fused(input_ids=ids, labels=labels)
    assert out_fused.logits is None  # training with labels: no logits
    assert type(out_fused) is type(out_plain)
    # transformers computes the loss on float32 logits: equal to float32 rounding
    torch.testing.assert_close(out_fused.loss.float(), out_plain.loss.float(), rtol=1e-6, atol=0)
    if kind in MOE:  # the router's load-balancing loss, as the model adds it
        assert out_fused.aux_loss is not None
        torch.testing.assert_close(out_fused.aux_loss, out_plain.aux_loss)
    out_plain.loss.backward()
    out_fused.loss.backward()
    g_plain, g_fused = grads(plain), grads(fused)
    assert g_plain.keys() == g_fused.keys() and len(g_fused) > 0
    tol = dict(rtol=1e-4, atol=1e-6) if kind in MOE else dict(rtol=1e-5, atol=1e-7)
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], **tol, msg=name)
    if kind in MOE:  # float32 models: the unpatched model is the oracle
        return

    # against the float64 truth (the whole logits through torch): to float64 rounding
    truth_model = copy.deepcopy(plain)
    truth_model.zero_grad()
    sce_hf.apply(truth_model)
    truth = float64_truth(truth_model, ids, labels)
    torch.testing.assert_close(out_fused.loss, truth, rtol=1e-12, atol=0)
    truth.backward()
    for name, g in grads(truth_model).items():
        torch.testing.assert_close(g_fused[name], g, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", ["cohere", "granite"])
def test_a_logit_scale_scales_the_heads_bias_too(kind):
    """(f h) @ W.T + f b: the factor reaches the bias of a head that has one (the models' own
    heads have none; a fine-tune may add it)."""
    torch.manual_seed(0)
    plain = tiny(kind)
    old = plain.lm_head
    plain.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True,
                                    dtype=old.weight.dtype)
    with torch.no_grad():
        plain.lm_head.weight.copy_(old.weight)
        plain.lm_head.bias.normal_()
    fused = sce_hf.apply(copy.deepcopy(plain))
    ids, labels = batch()
    out_plain = plain(input_ids=ids, labels=labels)
    out_fused = fused(input_ids=ids, labels=labels)
    torch.testing.assert_close(out_fused.loss.float(), out_plain.loss.float(), rtol=1e-6, atol=0)
    out_plain.loss.backward()
    out_fused.loss.backward()
    g_plain, g_fused = grads(plain), grads(fused)
    assert "lm_head.bias" in g_fused
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_num_items_in_batch_and_shift_labels(kind):
    plain, fused = pair(kind)
    ids, labels = batch(1)
    n = torch.tensor(40)  # gradient accumulation: the tokens of all micro-batches
    out_plain = plain(input_ids=ids, labels=labels, num_items_in_batch=n)
    out_fused = fused(input_ids=ids, labels=labels, num_items_in_batch=n)
    torch.testing.assert_close(out_fused.loss, float64_truth(fused, ids, labels, 40),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(out_fused.loss.float(), out_plain.loss, rtol=1e-6, atol=0)
    # an int as well, and labels already shifted by the caller
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    out = fused(input_ids=ids, labels=labels, shift_labels=shift, num_items_in_batch=40)
    torch.testing.assert_close(out.loss, out_fused.loss, rtol=0, atol=0)
    other = shift.roll(1, dims=1)  # shift_labels wins over labels
    torch.testing.assert_close(
        fused(input_ids=ids, labels=labels, shift_labels=other).loss,
        plain(input_ids=ids, labels=labels, shift_labels=other).loss.double(),
        rtol=1e-6, atol=0)


def test_every_label_ignored_gives_nan_like_transformers():
    plain, fused = pair("llama")
    ids, _ = batch()
    labels = torch.full_like(ids, -100)
    assert torch.isnan(plain(input_ids=ids, labels=labels).loss)
    assert torch.isnan(fused(input_ids=ids, labels=labels).loss)


def test_logits_when_asked():
    plain, fused = pair("qwen2")
    ids, labels = batch()
    asked = fused(input_ids=ids, labels=labels, return_logits=True)
    reference = plain(input_ids=ids, labels=labels)
    torch.testing.assert_close(asked.logits, reference.logits, rtol=0, atol=0)
    torch.testing.assert_close(asked.loss, reference.loss, rtol=0, atol=0)
    # eval mode returns logits by default; no labels (generation) is the model's own forward
    fused.eval()
    plain.eval()
    assert fused(input_ids=ids, labels=labels).logits is not None
    torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits,
                               rtol=0, atol=0)
    # the setting given to apply
    sce_hf.apply(fused, return_logits=False)
    assert fused(input_ids=ids, labels=labels).logits is None
    # tuples when asked: loss first, the logits' slot kept (None), every later output at the
    # index the model's own tuple gives it
    out = fused(input_ids=ids, labels=labels, return_dict=False, use_cache=True)
    own = plain(input_ids=ids, labels=labels, return_dict=False, use_cache=True)
    assert isinstance(out, tuple) and len(out) == len(own) and out[1] is None
    assert torch.equal(out[0], fused(input_ids=ids, labels=labels).loss)
    assert type(out[2]) is type(own[2])  # the cache where the model puts it
    out = fused(input_ids=ids, labels=labels, return_dict=False, use_cache=True,
                output_hidden_states=True)
    own = plain(input_ids=ids, labels=labels, return_dict=False, use_cache=True,
                output_hidden_states=True)
    assert len(out) == len(own) and out[1] is None
    for a, b in zip(out[3], own[3]):  # the hidden states at the same index
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match="return_logits"):
        fused(input_ids=ids, labels=labels, return_logits="yes")


def test_mixture_of_experts_tuple_and_router_switch():
    """A mixture of experts: with return_dict=False the tuple is the model's own, the logits'
    slot None (loss, aux_loss, None, ...); output_router_logits=False drops the aux loss as the
    model does."""
    plain, fused = pair("mixtral")
    ids, labels = batch()
    own = plain(input_ids=ids, labels=labels, return_dict=False)
    out = fused(input_ids=ids, labels=labels, return_dict=False)
    assert len(out) == len(own) and out[2] is None
    torch.testing.assert_close(out[0], own[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(out[1], own[1])
    own = plain(input_ids=ids, labels=labels, output_router_logits=False)
    out = fused(input_ids=ids, labels=labels, output_router_logits=False)
    assert out.aux_loss is None and own.aux_loss is None
    torch.testing.assert_close(out.loss, own.loss, rtol=1e-6, atol=0)


def test_positional_arguments_and_attention_mask():
    plain, fused = pair("llama")
    ids, labels = batch()
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    a = fused(ids, mask, labels=labels).loss
    b = plain(ids, mask, labels=labels).loss
    torch.testing.assert_close(a.float(), b, rtol=1e-6, atol=0)


class _LargestTensor(TorchDispatchMode):
    """The largest number of elements any op produced in memory while active (meta tensors,
    which the argument checks use, take none)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.largest = max(self.largest, t.numel())
        return out


def test_logits_never_whole():
    vocab = 2000  # the logits much larger than the model's activations
    plain, fused = pair("llama", dtype=torch.float32, vocab=vocab, chunk_size=8)
    ids, labels = batch(shape=(4, 32))
    logits_numel = ids.numel() * vocab
    with _LargestTensor() as seen:
        fused(input_ids=ids, labels=labels).loss.backward()
    # the largest: the head's weight (and its gradient), vocab x 32, a quarter of the logits
    assert seen.largest <= vocab * 32 < logits_numel, (seen.largest, logits_numel)
    with _LargestTensor() as seen:  # the measurement sees the unpatched model's logits
        plain(input_ids=ids, labels=labels).loss.backward()
    assert seen.largest >= logits_numel


def test_autocast_bfloat16_matches_the_unpatched_model():
    plain, fused = pair("llama", dtype=torch.float32)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = fused(input_ids=ids, labels=labels).loss
        b = plain(input_ids=ids, labels=labels).loss
    assert a.dtype == torch.float32 == b.dtype
    torch.testing.assert_close(a, b, rtol=2e-2, atol=0)
    a.backward()
    b.backward()
    g_fused, g_plain = grads(fused), grads(plain)
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert g_fused[name].dtype == torch.float32
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=5e-2, atol=2e-3, msg=name)


def test_apply_remove_and_errors():
    plain, fused = pair("llama")
    ids, labels = batch()
    assert sce_hf.is_applied(fused) and not sce_hf.is_applied(plain)
    assert sce_hf.apply(fused) is fused  # again: the same wrapper, new settings
    sce_hf.remove(fused)
    assert not sce_hf.is_applied(fused)
    assert fused(input_ids=ids, labels=labels).logits is not None
    with pytest.raises(ValueError, match="chunk_size"):
        sce_hf.apply(fused, chunk_size=0)
    with pytest.raises(TypeError, match="return_logits"):
        sce_hf.apply(fused, return_logits=1)

    class Other(torch.nn.Module):
        config = T.PretrainedConfig()

    with pytest.raises(NotImplementedError, match="not supported"):
        sce_hf.apply(Other())


def test_a_head_that_is_not_a_plain_linear_is_refused_not_bypassed():
    """An adapter on the head (PEFT's LoRA wraps the Linear and keeps .weight as the base
    weight) would be skipped by a fused loss that reads .weight: refused at apply and at every
    call (an adapter may come after apply), with a clear error."""
    plain, fused = pair("llama")
    ids, labels = batch()

    class Adapter(torch.nn.Module):  # PEFT's shape: the base layer inside, its weight exposed
        def __init__(self, base):
            super().__init__()
            self.base_layer = base
            self.extra = torch.nn.Linear(base.in_features, base.out_features, bias=False,
                                         dtype=base.weight.dtype)

        @property
        def weight(self):
            return self.base_layer.weight

        def forward(self, x):
            return self.base_layer(x) + self.extra(x)

    class Patched(torch.nn.Linear):  # a subclass whose forward does something else
        def forward(self, x):
            return super().forward(x) * 2

    fused.lm_head = Adapter(fused.lm_head)
    with pytest.raises(TypeError, match="plain torch.nn.Linear"):
        fused(input_ids=ids, labels=labels)
    patched = Patched(32, V, bias=False, dtype=torch.float64)
    fused.lm_head = patched
    with pytest.raises(TypeError, match="plain torch.nn.Linear"):
        fused(input_ids=ids, labels=labels)
    with pytest.raises(TypeError, match="plain torch.nn.Linear"):
        sce_hf.apply(copy.deepcopy(fused))


def test_peft_lora_on_the_head_is_refused():
    peft = pytest.importorskip("peft", reason="peft is not installed (the set-up installs it)")
    plain, fused = pair("llama")
    ids, labels = batch()
    config = peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(fused, config)
    with pytest.raises(TypeError, match="plain torch.nn.Linear"):
        wrapped(input_ids=ids, labels=labels)
    # with the adapter off the head, the fused loss is PEFT's model's own loss
    plain_peft = peft.get_peft_model(copy.deepcopy(plain),
                                     peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                     lora_dropout=0.0, init_lora_weights=False))
    fused_peft = copy.deepcopy(plain_peft)
    sce_hf.apply(fused_peft.base_model.model)
    want = plain_peft(input_ids=ids, labels=labels).loss
    got = fused_peft(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=0)


def test_trainer_sees_the_models_signature():
    import inspect

    plain, fused = pair("llama")
    assert inspect.signature(fused.forward) == inspect.signature(plain.forward)


_PEAK = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from test_transformers import tiny, batch
from softmax_ce.integrations import transformers as sce_hf
torch.manual_seed(0)
model = tiny("llama", vocab=int(sys.argv[3]), dtype=torch.float32)
if sys.argv[1] == "fused":
    sce_hf.apply(model)
ids = torch.randint(0, model.config.vocab_size, (8, 128))
model(input_ids=ids[:, :8], labels=ids[:, :8]).loss.backward()  # warm-up, small
model.zero_grad(set_to_none=False)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) from here on
    f.write("5")
before = status("VmRSS")
model(input_ids=ids, labels=ids).loss.backward()
print(json.dumps(status("VmHWM") - before))
"""


def _extra_peak(mode, vocab):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    proc = subprocess.run([sys.executable, "-c", _PEAK, mode, os.path.dirname(__file__),
                           str(vocab)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_memory_lower():
    vocab = 32000
    logits_bytes = 8 * 128 * vocab * 4
    fused, plain = _extra_peak("fused", vocab), _extra_peak("plain", vocab)
    # the unpatched model holds the logits and their gradient; the fused loss one chunk
    assert plain >= logits_bytes
    assert fused < plain / 2, (fused, plain, logits_bytes)
