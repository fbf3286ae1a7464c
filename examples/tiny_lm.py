"""A small causal language model whose head runs through softmax_ce's fused linear cross-entropy,
against the same model with the usual head (logits, then cross_entropy).

The text is the opening chapter of Jane Austen's "Pride and Prejudice" (1813, public domain),
in examples/data, split into words and punctuation. The vocabulary is padded to --vocab-size
entries (default 16384), as a language model's head has many classes that a short text never
uses: the head's logits are then most of a step's memory. Both runs start from the same weights
and see the same batches; the output is each run's loss curve, tokens per second and the extra
peak memory of one training step (beyond what is allocated before it).

    python examples/tiny_lm.py            # 150 steps, well under a minute on 2 cores
    python examples/tiny_lm.py --short    # 20 steps (the test suite's mode)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import softmax_ce
from softmax_ce.bench.harness import extra_peak_bytes

TEXT = os.path.join(os.path.dirname(__file__), "data", "pride_and_prejudice_ch1.txt")


def load_tokens(vocab_size: int):
    with open(TEXT, encoding="utf-8") as f:
        words = re.findall(r"[A-Za-z]+|[^\sA-Za-z]", f.read())
    vocab = {w: i for i, w in enumerate(sorted(set(words)))}
    if len(vocab) > vocab_size:
        raise SystemExit(f"--vocab-size must be at least {len(vocab)}")
    return torch.tensor([vocab[w] for w in words]), len(vocab)


class TinyLM(torch.nn.Module):
    """Token embedding (tied with the head), learned positions, two pre-norm Transformer
    blocks with a causal mask."""

    def __init__(self, vocab: int, dim: int = 64, context: int = 32, layers: int = 2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        torch.nn.init.normal_(self.embed.weight, std=dim ** -0.5)
        self.pos = torch.nn.Parameter(torch.zeros(context, dim))
        layer = torch.nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True,
                                                 norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context))

    def hidden(self, tokens):
        T = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:T]
        return self.norm(self.blocks(h, mask=self.mask[:T, :T], is_causal=True))

    def loss(self, tokens, targets, fused: bool):
        h = self.hidden(tokens).reshape(-1, self.embed.embedding_dim)
        if fused:  # the logits never whole
            return softmax_ce.linear_cross_entropy(h, self.embed.weight, targets.reshape(-1))
        return F.cross_entropy(h @ self.embed.weight.t(), targets.reshape(-1))


def batches(tokens, steps, batch, context, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(tokens) - context - 1, (batch,), generator=gen)
        idx = start[:, None] + torch.arange(context + 1)
        chunk = tokens[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def train(fused: bool, steps: int, vocab_size: int, batch: int = 16, context: int = 32):
    tokens, used = load_tokens(vocab_size)
    torch.manual_seed(0)
    model = TinyLM(vocab_size, context=context)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    t0 = time.perf_counter()
    for x, y in batches(tokens, steps, batch, context, seed=1):
        loss = model.loss(x, y, fused)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    return {"losses": losses, "tokens_per_s": steps * batch * context / seconds,
            "extra_peak_bytes": step_peak(fused, vocab_size), "words_in_vocab": used}


def step_peak(fused: bool, vocab_size: int):
    """Extra peak memory of one training step, in a child process whose glibc returns every
    block above 128 KB to the system (as the benchmark measures), so that the peak resident set
    counts the step's allocations and not a heap warmed by earlier steps."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    # the child imports the softmax_ce this process runs, installed or not
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(softmax_ce.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, __file__, "--peak", "fused" if fused else "unfused",
                          "--vocab-size", str(vocab_size)], env=env, capture_output=True,
                         text=True, check=True).stdout
    value = out.strip().splitlines()[-1]
    return None if value == "None" else int(value)


def _peak_here(fused: bool, vocab_size: int, batch: int = 16, context: int = 32):
    tokens, _ = load_tokens(vocab_size)
    torch.manual_seed(0)
    model = TinyLM(vocab_size, context=context)
    x, y = next(batches(tokens, 1, batch, context, seed=2))

    def step():
        model.loss(x, y, fused).backward()

    step()  # the gradients exist before the measured step, as in a training loop
    softmax_ce.empty_cache()
    return extra_peak_bytes(step, "cpu")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="20 steps (the tests' mode)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--peak", choices=["fused", "unfused"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak:  # the child process of step_peak
        print(_peak_here(args.peak == "fused", args.vocab_size))
        return {}
    steps = args.steps or (20 if args.short else 150)
    results = {}
    for name, fused in (("fused linear cross-entropy", True), ("linear, then cross_entropy", False)):
        results[name] = train(fused, steps, args.vocab_size)
    logits_mb = 16 * 32 * args.vocab_size * 4 / 2**20
    first = next(iter(results.values()))
    print(f"tiny LM, {steps} steps of 16 x 32 tokens, vocabulary {args.vocab_size} "
          f"({first['words_in_vocab']} used; the whole logits would be {logits_mb:.0f} MiB)")
    for name, r in results.items():
        curve = ", ".join(f"{r['losses'][i]:.2f}" for i in
                          sorted({0, len(r['losses']) // 4, len(r['losses']) // 2,
                                  3 * len(r['losses']) // 4, len(r['losses']) - 1}))
        peak = r["extra_peak_bytes"]
        peak_txt = "n/a" if peak is None else f"{peak / 2**20:.0f} MiB"
        print(f"  {name:28s} loss {curve}; {r['tokens_per_s']:,.0f} tokens/s; "
              f"extra peak memory of a step {peak_txt}")
    return results


if __name__ == "__main__":
    main()
