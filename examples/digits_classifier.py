"""Train a small classifier on scikit-learn's bundled 8x8 digits (no download) with softmax_ce's
``nn.CrossEntropyLoss``, checking it against torch's at every step.

At each step both losses are evaluated on the same model state and batch, and with them a
float64 evaluation of the same logits (the truth): loss and gradient (with respect to the logits,
from which every parameter's gradient follows) of softmax_ce and of torch must both be within
a few float32 roundings of it. Late in training the loss is a small difference of large numbers
(logsumexp - x_y), so the errors are measured against the scale of the logits, as a multiple of
float32's epsilon. Then two runs from the same seed, one with each loss, are compared by their
final test accuracy (over a whole run rounding differences grow, as between torch at 1 and 2
threads, so the curves are not compared).

    python examples/digits_classifier.py            # 60 epochs, well under a minute on 2 cores
    python examples/digits_classifier.py --short    # a few epochs (the test suite's mode)
"""

from __future__ import annotations

import argparse
import time

import torch

import softmax_ce


def load_digits_split(seed: int = 0):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("examples/digits_classifier.py reads scikit-learn's bundled digits data: "
                         "pip install scikit-learn (or softmax_ce's [examples] extra)") from None

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


EPS32 = torch.finfo(torch.float32).eps


def _errors(loss_fn, logits, target):
    """Errors of loss_fn's loss and logits' gradient against float64, in units of float32's
    epsilon times the scale of the logits (loss) or 1 / batch (gradient)."""
    z = logits.detach().requires_grad_()
    loss = loss_fn(z, target)
    (g,) = torch.autograd.grad(loss, z)
    z64 = logits.detach().double().requires_grad_()
    truth = torch.nn.functional.cross_entropy(z64, target)
    (g64,) = torch.autograd.grad(truth, z64)
    scale = max(1.0, z64.detach().abs().max().item())
    e_loss = (loss.double() - truth).abs().item() / (EPS32 * scale)
    # each gradient element is (p_c - [c == y]) / N: float32 rounds p_c to within eps, so the
    # scale of its error is eps / N whatever the element's size (p_y - 1 cancels when p_y ~ 1)
    e_grad = (g.double() - g64).abs().max().item() / (EPS32 / z.shape[0])
    return e_loss, e_grad


def train(loss_fn, epochs: int, check_against=None, seed: int = 0, batch: int = 64):
    """Returns (test accuracy, the worst errors at any step of loss_fn and of check_against
    against float64 (see _errors), steps)."""
    x, y, x_test, y_test = load_digits_split(seed)
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1)
    worst = {"ours_loss": 0.0, "ours_grad": 0.0, "ref_loss": 0.0, "ref_grad": 0.0}
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            logits = model(x[idx])
            loss = loss_fn(logits, y[idx])
            if check_against is not None:  # the same model state, the same batch
                for who, fn in (("ours", loss_fn), ("ref", check_against)):
                    e_loss, e_grad = _errors(fn, logits, y[idx])
                    worst[who + "_loss"] = max(worst[who + "_loss"], e_loss)
                    worst[who + "_grad"] = max(worst[who + "_grad"], e_grad)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return accuracy, worst, steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="a few epochs (the tests' mode)")
    p.add_argument("--epochs", type=int, default=None)
    args = p.parse_args(argv)
    epochs = args.epochs or (8 if args.short else 60)
    ours = softmax_ce.nn.CrossEntropyLoss()
    theirs = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    acc_ours, worst, steps = train(ours, epochs, check_against=theirs)
    acc_theirs, _, _ = train(theirs, epochs)
    result = {"epochs": epochs, "steps": steps, "accuracy_softmax_ce": acc_ours,
              "accuracy_torch": acc_theirs, "seconds": time.perf_counter() - t0, **worst}
    print(f"digits, {epochs} epochs ({steps} steps), {result['seconds']:.1f} s")
    print(f"  test accuracy: softmax_ce {acc_ours:.4f}, torch {acc_theirs:.4f}")
    print("  worst error against float64 at any step, in float32 epsilons (loss: times the "
          "logits' scale; gradient: over the batch size):")
    print(f"    softmax_ce: loss {worst['ours_loss']:.1f}, gradient {worst['ours_grad']:.1f}")
    print(f"    torch:      loss {worst['ref_loss']:.1f}, gradient {worst['ref_grad']:.1f}")
    return result


if __name__ == "__main__":
    main()
