"""The examples in their short mode: they train, reach their accuracy, and our loss stays within
float32 rounding of a float64 evaluation at every step, as torch's does."""

import importlib.util
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_classifier_short():
    result = _load("digits_classifier").main(["--short"])
    assert result["accuracy_softmax_ce"] >= 0.95
    assert abs(result["accuracy_softmax_ce"] - result["accuracy_torch"]) <= 0.01
    # within a few float32 roundings of float64 at every step (torch's own: about 2-3)
    for key in ("ours_loss", "ours_grad", "ref_loss", "ref_grad"):
        assert result[key] <= 8.0, (key, result[key])


def test_digits_classifier_without_scikit_learn_says_how_to_install_it(hide_package):
    hide_package("sklearn")
    with pytest.raises(SystemExit, match="pip install scikit-learn"):
        _load("digits_classifier").main(["--short"])


def test_tiny_lm_short():
    results = _load("tiny_lm").main(["--short"])
    fused = results["fused linear cross-entropy"]
    plain = results["linear, then cross_entropy"]
    assert len(fused["losses"]) == 20
    assert fused["losses"][-1] < 0.7 * fused["losses"][0]  # it learns
    # the same model, weights and batches: the same curve up to float32 rounding
    for a, b in zip(fused["losses"], plain["losses"]):
        assert abs(a - b) <= 1e-3 * abs(b), (a, b)
    if fused["extra_peak_bytes"] is not None and plain["extra_peak_bytes"] is not None:
        assert fused["extra_peak_bytes"] < plain["extra_peak_bytes"]
