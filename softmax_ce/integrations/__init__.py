"""Integrations with other libraries; each module imports its library only when imported itself.

- ``softmax_ce.integrations.transformers``: Hugging Face causal LMs train through the fused
  linear cross-entropy (``apply(model)``).
"""
