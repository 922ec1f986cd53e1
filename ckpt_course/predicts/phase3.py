"""Lesson 3's Predicts (notebooks/3_choosing_a_policy.ipynb): forms, tolerances, and the wrong
answers learners give, each with its reason.

The ``answer`` functions recompute the lesson's derived values from its sizes (the same `sized`
choice on a GPU) in closed form or with the package's fake-tensor estimates; ``given`` the numbers
the Check cells pass to the rules. 3.1's time overhead is judged against the clock: its derivation
is the FLOP model the clock refutes, and ``given`` holds a measurement typical of a 2-core CPU
(the tests need one; a lesson passes its own).
"""

from __future__ import annotations

import functools

from . import Predict, Wrong

GPU = 80 * 10**9  # 3.2's "80 GB" GPU
BQ, HEADS, T_1024 = 1, 4, 1024  # 3.3's naive-against-SDPA sizes
# 3.4's answers are op names as in selective:save=OPS (policies.OP_NAMES; a test keeps them equal)
OP_NAMES = ("mm", "sdpa", "softmax", "gelu", "silu", "relu", "layernorm", "dropout", "attn-core")


@functools.cache
def _sizes() -> dict:
    """3.1's tiny GPT and batch, as the lesson sizes them."""
    from ..models import GPTConfig, sized

    cfg = sized(cpu=GPTConfig(), gpu=GPTConfig(n_layer=8, d_model=512, n_head=8, seq_len=512))
    return {"B": sized(cpu=8, gpu=16), "T": cfg.seq_len, "C": cfg.d_model, "L": cfg.n_layer,
            "H": cfg.n_head, "V": cfg.vocab_size}


def _full_recompute(s: dict) -> int:
    b, t, c, n = s["B"], s["T"], s["C"], s["L"]
    return n * (2 * b * t * c * 3 * c + 4 * b * t * t * c + 2 * b * t * c * (c + 4 * c))


def _fc2(g: dict) -> int:
    """The MLP's second matmul, all layers: what the early stop skips without dropout."""
    return g["L"] * 2 * g["B"] * g["T"] * 4 * g["C"] * g["C"]


@functools.cache
def _flop_share() -> float:
    """3.1's FLOP model of full's overhead: its recompute FLOPs over a plain step's, as counted."""
    from ..models import GPTConfig, TinyGPT, sized
    from ..recompute import measure_recompute

    cfg = sized(cpu=GPTConfig(), gpu=GPTConfig(n_layer=8, d_model=512, n_head=8, seq_len=512))
    model = TinyGPT(cfg)
    r = measure_recompute(model, model.example_batch(_sizes()["B"]), "full")
    return round(r.flops / r.step_flops, 3)


def _forward(derived: int, g: dict) -> int:
    """A whole forward's matmul FLOPs: the re-run's, the MLP's second matmul and the head."""
    return derived + _fc2(g) + 2 * g["B"] * g["T"] * g["C"] * g["V"]


@functools.cache
def _llama_70b() -> dict:
    from ..estimate import model_memory
    from ..models import llama_config

    est = model_memory(llama_config("70b"), batch_size=1, seq_len=4096)
    return {"n_params": est.n_params, "activations": est.activations["full"]}


def _gpus(n_params: float, bytes_per_param: float, activations: float) -> int | None:
    """The fewest GPUs with state / N + activations <= GPU (None: never)."""
    room = GPU - activations
    return None if room <= 0 else -(-int(n_params * bytes_per_param) // int(room))


def _naive_extra(t: int) -> int:
    return 4 * BQ * HEADS * t * t + t * t - 4 * BQ * HEADS * t


def _sdpa_bytes(s: dict) -> int:
    return 4 * (s["B"] * s["T"] * s["C"] + s["B"] * s["H"] * s["T"])


EARLY_STOP = ("non-reentrant checkpoint stops once the last tensor backward needs is rebuilt: "
              "without dropout nothing saves the MLP's second matmul's output, so it is not "
              "re-run (with dropout it is: see the cell after the check)")

PREDICTS: dict[str, Predict] = {
    "3.1/full-recompute": Predict(
        what="full recomputes", form="number", unit="FLOPs", example="2 * 8 * 128 * 128 * 128",
        answer=lambda: _full_recompute(_sizes()), given=_sizes,
        wrong=(
            Wrong(lambda d, g: d + _fc2(g), f"you re-ran the MLP's second matmul: {EARLY_STOP}"),
            Wrong(lambda d, g: _forward(d, g),
                  "that is a whole forward: the head and the loss are outside the blocks, and "
                  f"{EARLY_STOP}"),
            Wrong(lambda d, g: d - g["L"] * 4 * g["B"] * g["T"] ** 2 * g["C"],
                  "add attention's two matmuls: Q K^T and P V, 2·B·T·T·C each per layer"),
            Wrong(lambda d, g: d / g["L"], "that is one block: full re-runs all L blocks"),
            Wrong(lambda d, g: 2 * _forward(d, g),
                  "backward's FLOPs: checkpoint re-runs forward, never backward"),
        ),
        over="more than full re-runs: which matmul did you count that the re-run skips?",
        under="less than full re-runs: count each block's qkv, attention's two matmuls, the "
              "output projection and the MLP's first matmul",
    ),
    "3.1/full-overhead": Predict(
        what="full's time overhead", form="number", example="0.5", judge="measured",
        tolerance=0.15,  # a median of interleaved rounds on a shared machine: see its spread
        answer=lambda: _flop_share(), given=lambda: {"measured": 0.35},
        wrong=(
            Wrong(1.0, '"checkpointing doubles training time" is off by the whole backward: full '
                       "re-runs part of forward, never backward"),
            Wrong(lambda d, g: d,
                  "that is the FLOP model: FLOPs price only matmuls, while norms, GELU, adds and "
                  "copies take time too (fixed costs count on small matrices)"),
            Wrong(2.0, "backward is never re-run: full re-runs part of one forward"),
            Wrong(0.0, "full does more work than none: it cannot be free"),
        ),
        over="more than the clock says: full re-runs part of forward, priced at each op's time",
        under="less than the clock says: the re-run ops without FLOPs (norms, GELU, copies) "
              "take time too",
    ),
    "3.1/bigger-batch": Predict(
        what="fits the larger batch", form="choice", choices=("none", "full", "same", "neither"),
        answer=lambda: "full",
        wrong=(
            Wrong("none", "none keeps every activation: per sample it needs more memory than "
                          "full, so fewer samples fit the budget"),
            Wrong("same", "full keeps only each block's input, a fraction of none's activations "
                          "per sample: more samples fit the same budget"),
            Wrong("neither", "both fit batch 1 under 24 MiB; the question is which fits more"),
        ),
    ),
    "3.2/bytes-per-param": Predict(
        what="bytes per parameter", form="number", unit="B", example="2 + 4",
        answer=lambda: 2 + 2 + 8,
        wrong=(
            Wrong(16, "16 counts fp32 weights and gradients (or an fp32 master copy): here the "
                      "weight and the gradient are bf16, 2 bytes each, and there is no master "
                      "copy"),
            Wrong(8, "8 is AdamW's two fp32 moments alone: add the bf16 weight and gradient (2 "
                     "bytes each)"),
            Wrong(10, "add the bf16 gradient: 2 bytes per parameter too"),
            Wrong(4, "AdamW keeps two fp32 moments (4 bytes each), plus the bf16 weight and "
                     "gradient"),
            Wrong(20, "that adds a 4-byte fp32 master copy and fp32 gradients: this recipe keeps "
                      "neither"),
        ),
    ),
    "3.2/gpus-full": Predict(
        what="80 GB GPUs under full", form="count", example="8",
        answer=lambda: _gpus(_llama_70b()["n_params"], 12, _llama_70b()["activations"]),
        given=_llama_70b,
        wrong=(
            Wrong(lambda d, g: _gpus(g["n_params"], 12, 0),
                  "add the activations to every GPU: they are not sharded (each GPU holds its own "
                  "batch's), so the state must fit in 80 GB minus them"),
            Wrong(lambda d, g: _gpus(g["n_params"], 16, g["activations"]),
                  "that counts 16 bytes per parameter: this recipe keeps 12 (bf16 weight and "
                  "gradient, two fp32 moments)"),
            Wrong(lambda d, g: _gpus(g["n_params"], 2, g["activations"]),
                  "the weights alone: the gradients and AdamW's moments are sharded too and "
                  "need room, 12 bytes per parameter in all"),
            Wrong(1, "one GPU: the bf16 weights alone (140 GB) overflow it"),
        ),
        over="more than needed: per GPU, (12 bytes x parameters) / N + the activations fits",
        under="too few: per GPU, (12 bytes x parameters) / N + the activations must fit 80 GB",
    ),
    "3.3/naive-extra": Predict(
        what="naive - SDPA at T = 1024", form="number", unit="B", example="4 * 1024 * 1024",
        answer=lambda: _naive_extra(T_1024),
        wrong=(
            Wrong(lambda d, g: d + 3 * T_1024**2,
                  "the mask is a bool: 1 byte per entry, not 4"),
            Wrong(lambda d, g: d - T_1024**2, "add the causal mask: a T x T bool, 1 byte each"),
            Wrong(lambda d, g: d + 4 * BQ * HEADS * T_1024,
                  "SDPA keeps a logsumexp per row and head that naive does not: subtract it "
                  "(4·B·H·T bytes)"),
            Wrong(lambda d, g: BQ * HEADS * T_1024**2,
                  "that counts the softmax's elements: each is a 4-byte float32; and add the mask"),
            Wrong(lambda d, g: d + 4 * BQ * HEADS * T_1024**2,
                  "naive attention keeps the softmax's output, not the scores too: softmax's "
                  "backward needs only its output"),
        ),
    ),
    "3.3/sdpa-bytes": Predict(
        what="re-running SDPA frees", form="number", unit="B", example="4 * B * T * C",
        answer=lambda: _sdpa_bytes(_sizes()), given=_sizes,
        wrong=(
            Wrong(lambda d, g: 4 * g["B"] * g["T"] * g["C"],
                  "add the logsumexp: one float per query row and head"),
            Wrong(lambda d, g: 4 * g["B"] * g["H"] * g["T"] ** 2,
                  "SDPA keeps no T x T matrix: it saves its output and a logsumexp, and "
                  "recomputes the scores"),
            Wrong(lambda d, g: 4 * 3 * g["B"] * g["T"] * g["C"] + d,
                  "Q, K and V are kept either way (save=mm keeps the qkv matmul's output): "
                  "re-running SDPA frees only SDPA's own outputs"),
            Wrong(lambda d, g: g["L"] * d, "that is all layers: the question is per layer"),
        ),
    ),
    "3.4/save-ops": Predict(
        what="save", form="set", example='{"mm"}', choices=OP_NAMES,
        answer=lambda: {"mm", "sdpa"},
        wrong=(
            Wrong({"mm"}, "SDPA costs FLOPs too, O(T^2) to re-run: a 0-FLOP cap saves it"),
            Wrong({"sdpa"}, "the matmuls cost FLOPs to re-run: a 0-FLOP cap saves them too"),
            Wrong({"gelu"}, "GELU costs 0 FLOPs: a 0-FLOP cap *recomputes* it and saves the ops "
                            "whose re-run costs FLOPs"),
            Wrong({"gelu", "layernorm"}, "those are FLOP-free: a 0-FLOP cap recomputes them and "
                                          "saves the ops with FLOPs"),
            Wrong(set(), "saving nothing recomputes everything, matmuls included: that costs "
                         "FLOPs"),
        ),
        other="a 0-FLOP cap saves exactly the ops whose re-run costs FLOPs (matmuls and "
              "attention) and recomputes the rest",
    ),
}
