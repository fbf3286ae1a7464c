"""Hugging Face ``transformers``: a causal LM computes its training loss with the fused linear
cross-entropy, so the ``(batch, seq, vocab)`` logits never exist whole.

    from softmax_ce.integrations import transformers as sce_hf

    model = AutoModelForCausalLM.from_pretrained(...)
    sce_hf.apply(model)            # returns the model; sce_hf.remove(model) undoes it
    out = model(input_ids, labels=labels)        # out.loss as before, out.logits is None
    out.loss.backward()

What changes, only for a call with ``labels`` that does not want the logits: the model runs its
decoder (``model.base_model``), then ``softmax_ce.linear_cross_entropy`` on the last hidden
states and the head's weight (and bias) instead of ``lm_head`` + the model's loss function. The
loss is the model's own, computed the way ``transformers``' ``ForCausalLMLoss`` does it: labels
shifted left by one (or ``shift_labels`` when given), ``ignore_index=-100``, a float32 loss
(float64 for a float64 model),
``mean`` over the kept positions, or ``sum / num_items_in_batch`` when the caller (Hugging
Face's ``Trainer`` under gradient accumulation) passes ``num_items_in_batch``; a final logit
soft-cap (Gemma 2 and 3) is applied inside the fused loss, a logit scale (Cohere) or divisor
(Granite) scales the hidden states and the head's bias, and a mixture of experts adds its
router's load-balancing loss when it outputs router logits, as its own forward does. Under
autocast the hidden states and the head's weight are cast to the autocast dtype, as autocast's
``F.linear`` would.

The logits are returned when asked for: ``model(..., labels=labels, return_logits=True)``, the
``return_logits`` given to ``apply``, or, by default, whenever the model is in eval mode
(``model.eval()``: evaluation loops read logits). Such a call, every call without labels
(generation) and a call with ``logits_to_keep`` other than 0 run the model's own forward,
untouched. A loss function of the caller's (``Trainer(compute_loss_func=...)``) reads the logits
and so needs ``return_logits=True``.

Architectures: those whose ``config.model_type`` is in ``SUPPORTED_MODEL_TYPES``, each checked
by the test suite against the unpatched model (loss and every parameter's gradient); any other
raises ``NotImplementedError`` rather than risk a head that post-processes logits in a way the
fused loss would not reproduce. Tested with transformers 5.24 (``HeadSpec`` says what each type's
head does).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._args import is_dtensor
from .._linear_core import linear_cross_entropy_acc

__all__ = ["apply", "remove", "is_applied", "check_head", "HeadSpec", "SUPPORTED_MODEL_TYPES"]

@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What a causal LM does between ``lm_head`` and its loss, beyond ``logits = lm_head(h)``:
    the config fields of a final tanh soft-cap, of a factor multiplying the logits, of a divisor
    of them, and whether the loss adds a mixture-of-experts router's load-balancing loss
    (``router_aux_loss_coef * load_balancing_loss_func(router_logits, num_experts,
    num_experts_per_tok, attention_mask)`` when router logits are output)."""

    softcap: Optional[str] = None
    scale: Optional[str] = None
    divisor: Optional[str] = None
    router_aux_loss: bool = False


_PLAIN, _MOE = HeadSpec(), HeadSpec(router_aux_loss=True)
_SOFTCAP = HeadSpec(softcap="final_logit_softcapping")

# config.model_type -> its head: each checked by tests/test_transformers.py against the model's
# own forward (loss and every parameter's gradient) on a tiny random config
SUPPORTED_MODEL_TYPES = {
    "apertus": _PLAIN, "arcee": _PLAIN, "cohere": HeadSpec(scale="logit_scale"),
    "cohere2": HeadSpec(scale="logit_scale"), "exaone4": _PLAIN, "gemma": _PLAIN,
    "gemma2": _SOFTCAP, "gemma3_text": _SOFTCAP, "glm4": _PLAIN, "gpt2": _PLAIN,
    "gpt_neox": _PLAIN, "granite": HeadSpec(divisor="logits_scaling"),
    "granitemoe": HeadSpec(divisor="logits_scaling", router_aux_loss=True), "llama": _PLAIN,
    "mistral": _PLAIN, "mixtral": _MOE, "olmo": _PLAIN, "olmo2": _PLAIN, "olmo3": _PLAIN,
    "phi": _PLAIN, "phi3": _PLAIN, "qwen2": _PLAIN, "qwen2_moe": _MOE, "qwen3": _PLAIN,
    "qwen3_moe": _MOE, "seed_oss": _PLAIN, "smollm3": _PLAIN, "stablelm": _PLAIN,
    "starcoder2": _PLAIN,
}

_ATTR = "_softmax_ce_fused_loss"  # the settings, on a patched model


@dataclasses.dataclass
class _Settings:
    original_forward: object
    return_logits: Optional[bool]
    chunk_size: Optional[int]


def apply(model: nn.Module, *, return_logits: Optional[bool] = None,
          chunk_size: Optional[int] = None) -> nn.Module:
    """Makes ``model`` (a ``...ForCausalLM`` / ``GPT2LMHeadModel`` of a supported type) compute
    its training loss with the fused linear cross-entropy; returns the model.

    ``return_logits``: None (the default) returns logits in eval mode only; True always (the
    model's own forward runs); False never. ``chunk_size``: rows per chunk of the fused loss
    (default: ``softmax_ce.linear.default_chunk_size``). Applying again updates the settings.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"softmax_ce.integrations.transformers.apply: model type {model_type!r} is not "
            f"supported (supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})")
    check_head(model.get_output_embeddings())  # and again at every call (an adapter added later)
    if return_logits is not None and not isinstance(return_logits, bool):
        raise TypeError("apply(): return_logits must be None or a bool, got "
                        f"{type(return_logits).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"apply(): chunk_size must be a positive int, got {chunk_size!r}")
    settings = getattr(model, _ATTR, None)
    if settings is not None:  # applied before: new settings, the same wrapper
        settings.return_logits = return_logits
        settings.chunk_size = chunk_size
        return model
    original = model.forward
    settings = _Settings(original, return_logits, chunk_size)
    signature = inspect.signature(original)

    @functools.wraps(original)  # Trainer reads the signature (dataset columns, loss kwargs)
    def forward(*args, **kwargs):
        return _forward(model, settings, signature, args, kwargs)

    model.forward = forward
    setattr(model, _ATTR, settings)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undoes ``apply``: the model's own forward again. Returns the model."""
    settings = getattr(model, _ATTR, None)
    if settings is not None:
        del model.forward  # the instance attribute; the class's forward shows through
        delattr(model, _ATTR)
        head = model.get_output_embeddings()
        if head is not None and _METHOD in head.__dict__ \
                and not head.__dict__.get(_FSDP_REGISTERED, False):
            del head.__dict__[_METHOD]
    return model


def is_applied(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def _forward(model, settings, signature, args, kwargs):
    want = kwargs.pop("return_logits", None)
    if want is not None and not isinstance(want, bool):
        raise TypeError(f"forward(): return_logits must be a bool, got {type(want).__name__}")
    if want is None:
        want = settings.return_logits
    if want is None:
        want = not model.training
    call = _arguments(signature, args, kwargs)
    labels = call.pop("labels", None)
    keep = call.pop("logits_to_keep", 0)
    if labels is None or want or not (isinstance(keep, int) and keep == 0):
        return settings.original_forward(*args, **kwargs)
    num_items = call.pop("num_items_in_batch", None)
    shift_labels = call.pop("shift_labels", None)
    ignore_index = call.pop("ignore_index", -100)
    return_dict = call.pop("return_dict", None)
    spec = SUPPORTED_MODEL_TYPES[model.config.model_type]
    router = False
    if spec.router_aux_loss:  # the model's own rule: the argument, else its config
        router = call.get("output_router_logits")
        if router is None:
            router = bool(getattr(model.config, "output_router_logits", False))
        call["output_router_logits"] = router
    out = model.base_model(**call)
    hidden = out[0]
    if shift_labels is None:  # tokens < n predict n; the last position predicts nothing
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = _fused_loss(model, spec, hidden, shift_labels, num_items, ignore_index,
                       settings.chunk_size)
    aux_loss = None
    if router:  # the model's load-balancing loss, as its forward adds it
        module = sys.modules[type(model).__module__]
        aux_loss = module.load_balancing_loss_func(out.router_logits, model.num_experts,
                                                   model.num_experts_per_tok,
                                                   call.get("attention_mask"))
        loss = loss + model.router_aux_loss_coef * aux_loss.to(loss.device)
    return _output(model, out, loss, return_dict, aux_loss)


def _arguments(signature, args, kwargs) -> dict:
    """The call's arguments by name, the ``**kwargs`` of the signature flattened in."""
    bound = signature.bind(*args, **kwargs)
    call = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError("forward(): extra positional arguments are not supported by "
                            "softmax_ce's fused loss")
        else:
            call[name] = value
    return call


def _fused_loss(model, spec: HeadSpec, hidden, shift_labels, num_items, ignore_index,
                chunk_size):
    head = model.get_output_embeddings()
    check_head(head)
    softcap = getattr(model.config, spec.softcap, None) if spec.softcap else None
    scale = getattr(model.config, spec.scale, None) if spec.scale else None
    divisor = getattr(model.config, spec.divisor, None) if spec.divisor else None
    factor = (1.0 if scale is None else float(scale)) / (1.0 if divisor is None else float(divisor))
    reduction = "mean" if num_items is None else "sum"
    loss = _head_method(head)(hidden, shift_labels, reduction, ignore_index, softcap, chunk_size,
                              factor)
    # transformers computes the loss on float32 logits; float64 models keep their precision
    loss = loss.to(torch.promote_types(loss.dtype, torch.float32))
    if num_items is not None:
        if torch.is_tensor(num_items):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    return loss


def check_head(head) -> None:
    """The fused loss computes ``hidden @ head.weight.T (+ head.bias)``: that is the head's
    output only for an ``nn.Linear`` whose forward is nn.Linear's (FSDP's subclass of it keeps
    it). A head that does more (a LoRA adapter, a quantised or patched linear) would be bypassed
    by it: refused, never silently wrong."""
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise TypeError(
            "softmax_ce.integrations.transformers: the model's output embeddings must be a plain "
            f"torch.nn.Linear for the fused loss, got {type(head).__module__}."
            f"{type(head).__qualname__} (an adapter such as PEFT's LoRA, or a quantised linear, "
            "computes more than hidden @ weight.T); merge the adapter into the head's weight, "
            "leave the head out of the adapter's target modules, or call "
            "softmax_ce.integrations.transformers.remove(model)")


_METHOD = "_softmax_ce_loss"  # the head's method that computes the fused loss
_FSDP_REGISTERED = "_softmax_ce_fsdp_registered"


def _head_method(head):
    """The fused loss as a method of the head, registered with FSDP when the head is an FSDP
    module (fully_shard on the head): FSDP then gathers the head's parameters before it, frees
    them after and reduces their gradients, as for a call of the head. The head's other forward
    hooks (tensor parallel's) do not run: the method takes the DTensors as they are."""
    if _METHOD not in head.__dict__:
        object.__setattr__(head, _METHOD, types.MethodType(_head_loss, head))
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_cls = getattr(fsdp, "FSDPModule", None)
    if module_cls is not None and isinstance(head, module_cls) \
            and not head.__dict__.get(_FSDP_REGISTERED, False):
        fsdp.register_fsdp_forward_method(head, _METHOD)
        object.__setattr__(head, _FSDP_REGISTERED, True)
    return getattr(head, _METHOD)


def _head_loss(head, hidden, labels, reduction, ignore_index, softcap, chunk_size, factor=1.0):
    """The loss of ``head(hidden) * factor`` against ``labels`` (every position), the logits never
    whole; in the accumulation dtype. Reads the head's parameters, so it runs as the head's call.
    A factor (Cohere's logit scale, one over Granite's divisor) scales the hidden states and the
    bias instead of the logits: (f h) @ W.T + f b = f (h @ W.T + b), an N x H product, not N x C."""
    lin_w, lin_b = head.weight, head.bias
    if factor != 1.0:
        hidden = hidden * factor
        lin_b = lin_b * factor if lin_b is not None else None
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # what autocast's F.linear would compute in
        dtype = torch.get_autocast_dtype(device)
        hidden, lin_w = hidden.to(dtype), lin_w.to(dtype)
        lin_b = lin_b.to(dtype) if lin_b is not None else None
    target = labels.to(hidden.device)
    if target.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"labels: expected {hidden.numel() // hidden.shape[-1]} positions (the "
                         f"hidden states' batch x sequence), got {target.numel()}")
    with torch.autocast(device, enabled=False):  # the chunked path, in those dtypes
        if is_dtensor(lin_w):  # a tensor-parallel head: sharded on the vocabulary
            from .. import distributed

            args = distributed.HeadArgs(reduction, ignore_index, softcap=softcap,
                                        chunk_size=chunk_size)
            return distributed.linear_cross_entropy_dtensor(
                hidden, lin_w, target.reshape(hidden.shape[:-1]), lin_b, None, args,
                "linear_cross_entropy", keep_acc=True).to_local()
        if is_dtensor(hidden):  # sharded hidden states before a head that is not
            hidden = hidden.full_tensor()
        h = hidden.reshape(-1, hidden.shape[-1])
        return linear_cross_entropy_acc(h, lin_w, target.reshape(-1), lin_b,
                                        reduction=reduction, ignore_index=ignore_index,
                                        softcap=softcap, chunk_size=chunk_size)


def _output(model, base_out, loss, return_dict, aux_loss=None):
    """The model's output type (a ``CausalLMOutput...``, ``MoeCausalLMOutputWithPast`` for a
    mixture of experts) with the loss, no logits, and the decoder's other outputs (cache, hidden
    states, attentions, router logits); as a tuple, the logits' slot is kept (None), so every
    later output sits at the index the model's own tuple gives it."""
    from transformers import modeling_outputs as mo

    if isinstance(base_out, tuple):  # a model configured to return tuples
        rest = tuple(base_out[1:])
        return (loss, aux_loss, None) + rest if aux_loss is not None else (loss, None) + rest
    fields = {k: v for k, v in base_out.items() if k != "last_hidden_state"}
    name = type(base_out).__name__
    if name.startswith("Moe"):
        cls = mo.MoeCausalLMOutputWithPast
        fields["aux_loss"] = aux_loss
    elif "CrossAttentions" in name:
        cls = mo.CausalLMOutputWithCrossAttentions
    else:
        cls = mo.CausalLMOutputWithPast
    names = {f.name for f in dataclasses.fields(cls)}
    out = cls(loss=loss, logits=None, **{k: v for k, v in fields.items() if k in names})
    if return_dict is False:  # the model's to_tuple() drops None fields: all but the logits'
        return tuple(getattr(out, f.name) for f in dataclasses.fields(cls)
                     if f.name == "logits" or getattr(out, f.name) is not None)
    return out
