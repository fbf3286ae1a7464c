"""Bad input: torch's exception type, a message naming the argument, inputs left unchanged."""

import pytest
import torch
import torch.nn.functional as F

import softmax_ce
from helpers import assert_unchanged, checksum


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _t(n, C=5):
    return torch.randint(0, C, (n,))


CE_CASES = [
    # (name, kwargs builder, expected exception, message regex, torch raises the same type?)
    ("batch_mismatch", lambda: (_x(4, 5), _t(3), {}), ValueError, "batch_size", True),
    ("target_above", lambda: (_x(4, 5), torch.tensor([0, 1, 2, 7]), {}), IndexError, "Target 7 is out of bounds.*'target'", True),
    ("target_equal_C", lambda: (_x(4, 5), torch.tensor([0, 5, 2, 1]), {}), IndexError, "Target 5 is out of bounds", True),
    ("target_negative", lambda: (_x(4, 5), torch.tensor([0, -1, 2, 1]), {}), IndexError, "Target -1 is out of bounds", True),
    ("target_oob_kdim", lambda: (_x(2, 5, 3), torch.full((2, 3), 9), {}), IndexError, "Target 9", True),
    ("target_float_wrong_shape", lambda: (_x(4, 5), torch.rand(4), {}), RuntimeError, "'target'", True),
    ("target_int16", lambda: (_x(4, 5), _t(4).short(), {}), RuntimeError, "'target'", True),
    ("target_2d_for_2d", lambda: (_x(4, 5), torch.zeros(4, 1, dtype=torch.long), {}), RuntimeError, "target", True),
    ("kdim_target_shape", lambda: (_x(2, 5, 3), torch.zeros(2, 4, dtype=torch.long), {}), RuntimeError, "Expected target size", True),
    ("prob_int_target", lambda: (_x(4, 5), torch.ones(4, 5, dtype=torch.long), {}), RuntimeError, "'target'", True),
    ("prob_ignore_index", lambda: (_x(4, 5), torch.rand(4, 5), {"ignore_index": 1}), RuntimeError, "ignore_index", True),
    ("weight_len", lambda: (_x(4, 5), _t(4), {"weight": torch.ones(3)}), RuntimeError, "weight", True),
    ("weight_2d", lambda: (_x(4, 5), _t(4), {"weight": torch.ones(5, 1)}), RuntimeError, "weight", True),
    ("weight_dtype", lambda: (_x(4, 5), _t(4), {"weight": torch.ones(5, dtype=torch.float64)}), RuntimeError, "'weight'", True),
    ("weight_int", lambda: (_x(4, 5), _t(4), {"weight": torch.ones(5, dtype=torch.long)}), RuntimeError, "'weight'", True),
    ("weight_device", lambda: (_x(4, 5), _t(4), {"weight": torch.ones(5, device="meta")}), RuntimeError, "'weight'", True),
    ("weight_requires_grad", lambda: (_x(4, 5), _t(4), {"weight": torch.ones(5, requires_grad=True)}), RuntimeError, "'weight'", True),
    ("reduction", lambda: (_x(4, 5), _t(4), {"reduction": "avg"}), ValueError, "avg is not a valid value for reduction", True),
    ("ls_above_one", lambda: (_x(4, 5), _t(4), {"label_smoothing": 1.5}), RuntimeError, "label_smoothing", True),
    ("ls_negative", lambda: (_x(4, 5), _t(4), {"label_smoothing": -0.1}), RuntimeError, "label_smoothing", False),
    ("ls_nan", lambda: (_x(4, 5), _t(4), {"label_smoothing": float("nan")}), RuntimeError, "label_smoothing", False),
    ("zero_dim_input", lambda: (torch.tensor(1.0), torch.tensor(0), {}), RuntimeError, "'input'", True),
    ("integer_logits", lambda: (torch.ones(4, 5, dtype=torch.long), _t(4), {}), NotImplementedError, "'input'", True),
    ("complex_logits", lambda: (_x(4, 5, dtype=torch.complex64), _t(4), {}), NotImplementedError, "'input'", True),
    ("zero_classes", lambda: (_x(4, 0), _t(4, 1) * 0, {}), IndexError, "'target'", True),
]

EXTENSION_CASES = [
    ("z_loss_negative", {"z_loss": -1.0}, ValueError, "z_loss"),
    ("z_loss_nan", {"z_loss": float("nan")}, ValueError, "z_loss"),
    ("z_loss_inf", {"z_loss": float("inf")}, ValueError, "z_loss"),
    ("softcap_zero", {"softcap": 0.0}, ValueError, "softcap"),
    ("softcap_negative", {"softcap": -2.0}, ValueError, "softcap"),
    ("softcap_nan", {"softcap": float("nan")}, ValueError, "softcap"),
]


@pytest.mark.parametrize("case", CE_CASES, ids=[c[0] for c in CE_CASES])
def test_cross_entropy_bad_input(cpu_impl, case):
    name, build, exc, pattern, torch_same = case
    x, t, kw = build()
    before = checksum(x, t, kw.get("weight"))
    with pytest.raises(exc, match=pattern):
        softmax_ce.cross_entropy(x, t, **kw)
    assert_unchanged(before, x, t, kw.get("weight"))
    if torch_same:
        with pytest.raises(exc):
            F.cross_entropy(x, t, **kw)


@pytest.mark.parametrize("case", EXTENSION_CASES, ids=[c[0] for c in EXTENSION_CASES])
def test_extension_arguments(cpu_impl, case):
    name, kw, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        softmax_ce.cross_entropy(_x(4, 5), _t(4), **kw)
    with pytest.raises(exc, match=pattern):
        softmax_ce.nn.CrossEntropyLoss(**kw)


def test_inplace_backward_op_validates_before_writing(cpu_impl):
    """The in-place backward op with a bad target raises and leaves the logits untouched (no
    partially written gradient)."""
    from softmax_ce import ops

    x = _x(6, 5, 1)
    t = _t(6).view(6, 1)
    _, lse = ops.ce_fwd(x, t, None, -100, 0.0, 0.0, 0.0)
    t[3, 0] = 11
    before = checksum(x)
    with pytest.raises(IndexError, match="Target 11"):
        ops.ce_bwd_(torch.ones(6, 1), x, t, None, lse, -100, 0.0, 0.0, 0.0)
    assert_unchanged(before, x)


def test_target_modified_after_forward_is_caught_by_autograd(cpu_impl):
    x = _x(6, 5).requires_grad_()
    t = _t(6)
    loss = softmax_ce.cross_entropy(x, t, inplace_backward=True)
    t[3] = 11
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


BCE_CASES = [
    ("shape", lambda: (_x(4, 5), torch.rand(4, 4), {}), ValueError, "Target size", True),
    ("target_int", lambda: (_x(4, 5), torch.ones(4, 5, dtype=torch.long), {}), RuntimeError, "'target'", True),
    ("weight_shape", lambda: (_x(4, 5), torch.rand(4, 5), {"weight": torch.ones(3)}), RuntimeError, "'weight'", True),
    ("pos_weight_shape", lambda: (_x(4, 5), torch.rand(4, 5), {"pos_weight": torch.ones(3)}), RuntimeError, "'pos_weight'", True),
    ("weight_bigger", lambda: (_x(4, 5), torch.rand(4, 5), {"weight": torch.ones(2, 4, 5)}), RuntimeError, "'weight'", True),
    ("weight_grad", lambda: (_x(4, 5), torch.rand(4, 5), {"weight": torch.ones(5, requires_grad=True)}), RuntimeError, "'weight'", True),
    ("pos_weight_grad", lambda: (_x(4, 5), torch.rand(4, 5), {"pos_weight": torch.ones(5, requires_grad=True)}), RuntimeError, "'pos_weight'", True),
    ("reduction", lambda: (_x(4, 5), torch.rand(4, 5), {"reduction": "x"}), ValueError, "reduction", True),
    ("integer_logits", lambda: (torch.ones(4, 5, dtype=torch.long), torch.rand(4, 5), {}), NotImplementedError, "'input'", True),
    ("complex_logits", lambda: (_x(3, dtype=torch.complex64), torch.rand(3), {}), NotImplementedError, "'input'", True),
]


@pytest.mark.parametrize("case", BCE_CASES, ids=[c[0] for c in BCE_CASES])
def test_bce_bad_input(cpu_impl, case):
    name, build, exc, pattern, torch_same = case
    x, y, kw = build()
    before = checksum(x, y, kw.get("weight"), kw.get("pos_weight"))
    with pytest.raises(exc, match=pattern):
        softmax_ce.binary_cross_entropy_with_logits(x, y, **kw)
    assert_unchanged(before, x, y, kw.get("weight"), kw.get("pos_weight"))
    if torch_same:
        with pytest.raises(exc):
            r = F.binary_cross_entropy_with_logits(x, y, **kw)
            r.sum().backward()


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_bad_input(cpu_impl, fn):
    ours, theirs = getattr(softmax_ce, fn), getattr(F, fn)
    for args, exc, pattern in [
        ((_x(4, 5), 2), IndexError, "Dimension out of range"),
        ((_x(4, 5), -3), IndexError, "Dimension out of range"),
        ((torch.ones(3, dtype=torch.long), 0), NotImplementedError, "'input'"),
        ((_x(3, dtype=torch.complex64), 0), NotImplementedError, "'input'"),
    ]:
        with pytest.raises(exc, match=pattern):
            ours(*args)
        with pytest.raises(exc):
            theirs(*args)


def test_zero_classes_all_ignored_is_nan_like_torch(cpu_impl):
    """C = 0 is only valid when every position is ignored: NaN for mean, as torch."""
    x = torch.randn(3, 0, requires_grad=True)
    t = torch.full((3,), -100)
    ours = softmax_ce.cross_entropy(x, t)
    assert ours.isnan() and F.cross_entropy(x, t).isnan()
    ours.backward()
    assert x.grad.shape == (3, 0)
    assert softmax_ce.cross_entropy(x, t, reduction="sum").item() == 0.0


TARGET_SHAPES = [
    # (input shape, target shape)
    ((5,), ()), ((5,), (1,)), ((5,), (2,)), ((5,), (1, 1)),
    ((4, 5), (4,)), ((4, 5), (3,)), ((4, 5), ()), ((4, 5), (4, 1)), ((4, 5), (4, 2)),
    ((4, 5, 3), (4, 3)), ((4, 5, 3), (4, 2)), ((4, 5, 3), (3, 3)), ((4, 5, 3), (4,)),
    ((4, 5, 3), (4, 3, 1)), ((4, 5, 3, 2), (4, 3, 2)), ((4, 5, 3, 2), (4, 3, 3)),
    ((4, 5, 3, 2), (4, 3)), ((0, 5), (0,)), ((0, 5), (1,)),
]


@pytest.mark.parametrize("shapes", TARGET_SHAPES, ids=str)
def test_regression_target_shape_errors_match_torch_side_by_side(cpu_impl, shapes):
    """Bug: some target-shape mismatches raised another exception type than torch (a 0-D target
    for a batched input: RuntimeError where torch raises ValueError). Every pair is run through
    both; the outcome (accepted, or the exception type) must be the same."""
    in_shape, t_shape = shapes
    x = torch.randn(in_shape)
    t = torch.zeros(t_shape, dtype=torch.long)

    def outcome(fn):
        try:
            return ("ok", fn(x, t, reduction="none"))
        except Exception as e:  # noqa: BLE001 - the type is what is compared
            return (type(e), str(e))

    ours, theirs = outcome(softmax_ce.cross_entropy), outcome(F.cross_entropy)
    if len(in_shape) == 1 and len(t_shape) == 1 and theirs[0] is RuntimeError \
            and "size mismatch" in theirs[1]:
        # torch 2.8 refuses any 1-D target for a 1-D input; softmax_ce keeps torch
        # 2.13's rule on every torch (docs/semantics.md): a target of one element is a batch of
        # one, any other size a ValueError
        theirs = (("ok", F.cross_entropy(x[None], t, reduction="none")[0]) if t_shape == (1,)
                  else (ValueError, "target"))
    assert ours[0] == theirs[0], (ours, theirs)
    if ours[0] == "ok":
        torch.testing.assert_close(ours[1], theirs[1])
    else:
        assert "target" in ours[1], ours[1]


def test_regression_ignore_index_numpy_integer(cpu_impl):
    """Bug: ignore_index as a NumPy integer was rejected; torch takes anything operator.index
    takes."""
    np = pytest.importorskip("numpy")
    x = torch.randn(6, 5)
    t = torch.tensor([0, 1, 2, 3, 4, 2])
    for ii in (np.int64(2), np.int32(2), np.uint8(2)):
        torch.testing.assert_close(softmax_ce.cross_entropy(x, t, ignore_index=ii),
                                   F.cross_entropy(x, t, ignore_index=ii))
        torch.testing.assert_close(softmax_ce.nn.CrossEntropyLoss(ignore_index=ii)(x, t),
                                   torch.nn.CrossEntropyLoss(ignore_index=ii)(x, t))
    with pytest.raises(TypeError, match="ignore_index"):
        softmax_ce.cross_entropy(x, t, ignore_index=2.0)
    with pytest.raises(TypeError):
        F.cross_entropy(x, t, ignore_index=2.0)


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "BCEWithLogitsLoss"])
def test_regression_module_bad_reduction_raises_at_the_call_like_torch(cpu_impl, name):
    """Bug: CrossEntropyLoss(reduction='avg') raised in __init__; torch raises at the call."""
    ours = getattr(softmax_ce.nn, name)(reduction="avg")
    theirs = getattr(torch.nn, name)(reduction="avg")
    x = torch.randn(4, 5)
    t = _t(4) if name == "CrossEntropyLoss" else torch.rand(4, 5)
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        ours(x, t)
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        theirs(x, t)
    ours = softmax_ce.nn.CrossEntropyLoss(label_smoothing=1.5)  # torch, too, checks at the call
    torch.nn.CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        ours(x, _t(4))


def test_regression_weighted_mean_out_of_range_target(cpu_impl):
    """Bug: the weighted mean's denominator indexed `weight` with the raw target before any
    range check (on CUDA a device-side assert; on the CPU torch's indexing error instead of
    ours). The kernel's error names the target."""
    x = torch.randn(4, 5)
    t = torch.tensor([0, 1, 9, 2])
    w = torch.rand(5)
    with pytest.raises(IndexError, match="Target 9 is out of bounds.*'target'"):
        softmax_ce.cross_entropy(x, t, w)
    with pytest.raises(IndexError):
        F.cross_entropy(x, t, w)
