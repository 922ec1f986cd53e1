"""Lesson 1's Predicts (notebooks/1_why_activations_eat_memory.ipynb): forms, tolerances, and the
wrong answers learners give, each with its reason.

The ``answer`` functions rebuild the lesson's objects at the lesson's sizes (the same `sized`
choice on a GPU) to recompute the derived values without running the notebook; a lesson run
with CKPT_COURSE_STRICT_TABLES=1 checks that they agree with its derivations.
"""

from __future__ import annotations

import functools
import math

from . import Predict, Wrong

B = 4  # the lesson's batch in 1.2 and 1.3
L, ACT_N = 16, 4  # 1.4's chain depth, and the N of its peak question


@functools.cache
def _tiny():
    """1.1-1.3's model and its sizes, as the lesson builds them."""
    import torch

    from ..models import GPTConfig, TinyGPT, sized
    from ..tape import record_tape

    cfg = GPTConfig(n_layer=4, d_model=128, n_head=4, seq_len=sized(128, 256), vocab_size=256)
    model = TinyGPT(cfg)
    x = torch.randn(B, cfg.seq_len, cfg.d_model)
    dropout = TinyGPT(GPTConfig(**{**cfg.__dict__, "dropout": 0.1}))
    batch = dropout.example_batch(B, generator=torch.Generator().manual_seed(0))
    dropout_tape = record_tape(dropout.loss, batch, model=dropout)
    block_tape = record_tape(model.blocks[0], x)
    model_batch = model.example_batch(B, generator=torch.Generator().manual_seed(0))
    return {"n_params": sum(p.numel() for p in model.parameters()),
            "n_tensors": len(list(model.parameters())),
            "block": block_tape.activation_bytes, "block_tape": block_tape,
            "tape": record_tape(model.loss, model_batch, model=model),
            "dropout_block": dropout_tape.by_module()["blocks.1"],
            "x": x.nbytes, "n_layer": cfg.n_layer}


def _qkv_bytes(block_tape) -> int:
    """The storage SDPA saves three views of (q, k, v)."""
    return next(e.nbytes for e in block_tape.entries if e.times_saved == 3)


def _llama_7b() -> dict:
    from ..models import llama_config

    return vars(llama_config("7b"))


def _llama_7b_params() -> int:
    from ..models import llama_config

    c = llama_config("7b")
    per_layer = 4 * c.d_model**2 + 3 * c.d_model * c.d_ff + 2 * c.d_model
    return c.n_layer * per_layer + 2 * c.vocab_size * c.d_model + c.d_model


def _gpt_best_n() -> int:
    import torch

    from ..models import GPTConfig, TinyGPT
    from ..tape import record_tape

    cfg = GPTConfig(n_layer=8, d_model=64, n_head=4, seq_len=128, vocab_size=64)
    x = torch.randn(8, cfg.seq_len, cfg.d_model)
    r = (record_tape(TinyGPT(cfg).blocks[0], x).activation_bytes - x.nbytes) / x.nbytes
    return min(range(1, cfg.n_layer + 1), key=lambda n: math.ceil(cfg.n_layer / n) + r * n)


PREDICTS: dict[str, Predict] = {
    "1.1/adamw-state": Predict(
        what="AdamW state", form="number", unit="B", example="8 * 1000 + 4 * 3",
        answer=lambda: 8 * _tiny()["n_params"] + 4 * _tiny()["n_tensors"], given=_tiny,
        wrong=(
            Wrong(lambda d, g: 8 * g["n_params"],
                  "two moments, right, but AdamW also keeps a `step` counter per parameter "
                  "tensor: 4 bytes x the number of tensors"),
            Wrong(lambda d, g: 8 * g["n_params"] + 8 * g["n_tensors"],
                  "two moments and a counter per tensor, right, but you counted the counters as "
                  "8-byte: each `step` is a float32 tensor, 4 bytes"),
            Wrong(lambda d, g: 4 * g["n_params"] + 4 * g["n_tensors"],
                  "AdamW keeps two moments per parameter (exp_avg and exp_avg_sq), not one"),
            Wrong(lambda d, g: 4 * g["n_params"],
                  "AdamW keeps two moments per parameter (exp_avg and exp_avg_sq), and a counter "
                  "per tensor"),
            Wrong(lambda d, g: 12 * g["n_params"] + 4 * g["n_tensors"],
                  "that includes the parameters themselves: the state is the moments and counters"),
            Wrong(lambda d, g: 16 * g["n_params"] + 4 * g["n_tensors"],
                  "that is parameters + gradients + state: the question is the state alone"),
            Wrong(lambda d, g: 16 * g["n_params"],
                  "that is parameters + gradients + two moments: the question is the state "
                  "alone, the moments and a counter per tensor"),
            Wrong(lambda d, g: 2 * g["n_params"] + g["n_tensors"],
                  "you counted elements: each float32 moment entry is 4 bytes"),
        ),
        under="less than two float32 moments per parameter: AdamW keeps exp_avg and exp_avg_sq",
        over="more than AdamW keeps: two float32 moments per parameter and a counter per tensor"),
    "1.1/batch-ratio": Predict(
        what="batch x2", form="number", tolerance=1e-3, example="1.5",
        answer=lambda: 2.0,
        wrong=(
            Wrong(1, "activations are per sample: they grow with the batch (the weights do not)"),
            Wrong(4, "doubling the batch doubles the tokens; nothing saved is quadratic in the "
                     "batch (attention's T x T is per sample, and SDPA keeps none)"),
            Wrong(0.5, "upside down: the ratio is batch 8's activations over batch 4's"),
            Wrong(8, "8 is the batch itself; the ratio is batch 8's activations over batch 4's"),
        ),
        under="that is how the whole step grows: weights, gradients and AdamW state stay put; "
              "the activations alone follow the batch",
        over="more than the tokens grow: every saved tensor has one batch dimension"),
    "1.1/7b-params": Predict(
        what="7B parameters", form="number", example="c7.vocab_size * c7.d_model",
        tolerance=0.01,  # to 2 digits, as the count is quoted: "6.7 B"
        answer=_llama_7b_params, given=_llama_7b,
        wrong=(
            Wrong(lambda d, g: d - 2 * g["vocab_size"] * g["d_model"],
                  "add the embedding and the head: vocab x d each"),
            Wrong(lambda d, g: d - g["vocab_size"] * g["d_model"],
                  "the head is its own vocab x d matrix (Llama does not tie it to the embedding)"),
            Wrong(lambda d, g: d - g["n_layer"] * g["d_model"] * g["d_ff"],
                  "SwiGLU has three d x d_ff matrices (gate, up, down), not two"),
            Wrong(lambda d, g: d + g["n_layer"] * g["d_model"] * (12 * g["d_model"]
                                                                  - 3 * g["d_ff"]),
                  "the MLP width is c7.d_ff, not the textbook 4 x d_model"),
            Wrong(7e9, "7B is the model's rounded name, not its count: add up the matrices"),
        ),
        under="fewer than the matrices listed: per layer 4 d^2 + 3 d d_ff, then embedding, head",
        over="more than the matrices listed: count per layer 4 d^2 + 3 d d_ff + 2 d"),
    "1.2/blocks-bytes": Predict(
        what="4 blocks", form="number", unit="B", example="4 * 1024",
        tolerance=0.0025,  # read off the tape's printed MiB (3 digits), times 4
        answer=lambda: _tiny()["n_layer"] * _tiny()["block"], given=_tiny,
        wrong=(
            Wrong(lambda d, g: d / g["n_layer"], "that is one block; the model has four"),
            Wrong(lambda d, g: g["tape"].activation_bytes,
                  "that is the whole tape: the embeddings and the head save tensors too"),
            Wrong(lambda d, g: d + 2 * g["n_layer"] * _qkv_bytes(g["block_tape"]),
                  "q, k and v are three views of one storage ('x saved' 3): count it once"),
            Wrong(lambda d, g: d + g["n_layer"] * g["block_tape"].param_bytes,
                  "weights (param = yes) exist anyway: they are not activations"),
            Wrong(lambda d, g: g["n_layer"] * g["x"],
                  "a block saves far more than its input: every Linear's input, GELU's, q k v..."),
        ),
        under="less than the 4 blocks save: each block's tape is the one printed above",
        over="more than the 4 blocks save: each block's tape is the one printed above"),
    "1.3/saving-bytes": Predict(
        what="forward keeps less by", form="number", unit="B", example="5 * 1024",
        answer=lambda: _tiny()["dropout_block"] - _tiny()["x"],
        given=lambda: {**_tiny(), "block_1_2": _tiny()["block"]},
        wrong=(
            Wrong(lambda d, g: d + g["x"], "the checkpoint keeps block 1's input x"),
            Wrong(lambda d, g: g["block_1_2"] - g["x"],
                  "that is 1.2's block: with dropout the block also saves its masks (and SDPA "
                  "on CPU its T x T probabilities); read the tape printed in this cell"),
            Wrong(lambda d, g: g["block_1_2"],
                  "that is 1.2's block, without dropout: read the tape printed in this cell, "
                  "and the checkpoint keeps x"),
            Wrong(lambda d, g: g["x"], "that is what the checkpoint keeps, not what it drops"),
            Wrong(lambda d, g: g["n_layer"] * (d + g["x"]), "only block 1 is checkpointed"),
        ),
        under="less than block 1's tape without its input x",
        over="more than block 1's tape: only block 1 is checkpointed"),
    "1.3/rerun": Predict(
        what="backward re-runs", form="choice", choices=("a", "b", "c", "d"),
        answer=lambda: "a",
        wrong=(
            Wrong("b", "backward runs once anyway: checkpointing adds a forward of block 1"),
            Wrong("c", "only the checkpointed block runs again: the others kept their tapes"),
            Wrong("d", "backward needs block 1's tape, and forward did not keep it: it is "
                       "rebuilt by running block 1's forward again"),
        )),
    "1.4/best-n": Predict(
        what="best N", form="count", example="3",
        answer=lambda: min(range(1, L + 1), key=lambda n: math.ceil(L / n) + n),
        given=lambda: {"L": L},
        wrong=(
            Wrong(1, "every-1 saves nothing here: each layer's input is a saved output anyway"),
            Wrong(lambda d, g: g["L"], "one segment rebuilds all the layers at once in backward"),
            Wrong(2, "N = 2 keeps 8 inputs and rebuilds 2 layers: the bottom is where the two "
                     "terms meet, ceil(L/N) = N"),
            Wrong(8, "N = 8 keeps 2 inputs but rebuilds 8 layers: the bottom is where the two "
                     "terms meet, ceil(L/N) = N"),
            Wrong(lambda d, g: d - 1,
                  "a smaller N checkpoints more often than needed: one layer less to rebuild, "
                  "but more segment inputs kept, ceil(L/N) + N is higher there"),
            Wrong(lambda d, g: d + 1,
                  "a larger N keeps fewer segment inputs but rebuilds more layers at once: "
                  "ceil(L/N) + N is higher there"),
        ),
        other="the peak ceil(L/N) + N is smallest where the two terms meet"),
    "1.4/peak-at-4": Predict(
        what="peak at N = 4", form="number", unit="act", tolerance=0.04, example="6.5",
        answer=lambda: float(math.ceil(L / ACT_N) + ACT_N), given=lambda: {"L": L},
        wrong=(
            Wrong(lambda d, g: math.ceil(g["L"] / ACT_N),
                  "add the 4 rebuilt layers to the 4 stored segment inputs"),
            Wrong(lambda d, g: float(g["L"]),
                  "that is no checkpointing: every-4 keeps 4 inputs, not 16 activations"),
            Wrong(lambda d, g: math.ceil(g["L"] / ACT_N) + 1,
                  "backward rebuilds a whole segment at once: 4 layers, not 1"),
            Wrong(lambda d, g: math.ceil(g["L"] / ACT_N) - 1 + ACT_N,
                  "the first segment's input is the batch (baseline), right, but add the "
                  "gradient flowing back: one act"),
            Wrong(lambda d, g: math.ceil(g["L"] / ACT_N) + ACT_N + 1,
                  "the first segment's input is the batch, already in the baseline"),
        ),
        under="less than the 4 stored inputs plus the 4 layers rebuilt at once",
        over="more than the 4 stored inputs plus the 4 layers rebuilt at once"),
    "1.4/gpt-best-n": Predict(
        what="GPT best N", form="count", example="3",
        answer=_gpt_best_n, given=lambda: {"L": 8},
        wrong=(
            Wrong(lambda d, g: round(math.sqrt(g["L"])),
                  "that is sqrt(L): a block's tape is r inputs, which moves the bottom to "
                  "sqrt(L / r)"),
            Wrong(lambda d, g: g["L"],
                  "one segment rebuilds all the blocks at once, each r inputs' worth"),
            Wrong(lambda d, g: d + 1,
                  "one more block per segment costs r inputs and saves fewer than r: the peak "
                  "ceil(L/N) + r N is lower at the smaller N"),
        ),
        other="work out ceil(L/N) + r N for each N: the smallest wins"),
}
