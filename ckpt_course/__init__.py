"""ckpt_course: measure activation checkpointing on your own machine.

Each idea lives in one module; the notebooks import from them:
models (the nets), tape (what backward will read), meter (live bytes, peak, budget),
recompute (FLOPs and ops that backward recomputes), policies (none / full / every-k / sqrt /
selective / offload), train (real training steps under a policy, one record per step),
estimate (big configs on fake tensors).
"""

__version__ = "0.1.0"
