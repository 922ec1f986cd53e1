"""Lesson 2's Predicts (notebooks/2_hand_trace_a_checkpointed_net.ipynb): forms, tolerances, and
the wrong answers learners give, each with its reason.

The hand-trace net's counts are whole numbers of A (one 512 x 512 float32 activation, 1 MiB),
exact on every device, so each ``answer`` is the derivation's own arithmetic; a lesson run with
CKPT_COURSE_STRICT_TABLES=1 checks that they agree with the notebook's derivations.
"""

from __future__ import annotations

from . import Predict, Wrong

A = 512 * 512 * 4
LOSS = 4  # the loss scalar, float32
VARIANTS = ("as is", "8 layers", "grads freed", "8 layers, grads freed", "batch 1024")
LOWERS = frozenset({"grads freed", "8 layers, grads freed", "batch 1024"})

PREDICTS: dict[str, Predict] = {
    "2.1/tape-activations": Predict(
        what="tape activations", form="number", unit="A", example="2.5",
        answer=lambda: 5.0,
        wrong=(
            Wrong(4, "x is saved too: layer 1's addmm needs it for the weight gradient gW1"),
            Wrong(8, "h1, h2, h3 are each saved by two nodes, but one storage counts once"),
            Wrong(9, "the z_k are not saved: relu keeps its output, and no node needs z"),
            Wrong(3, "h4 is saved too: its ReLU keeps it, though no addmm follows"),
        ),
        under="fewer than the tape lists: which input or ReLU output did you leave out?",
        over="more than the tape lists: a storage counts once, and nobody saves z"),
    "2.1/tape-params": Predict(
        what="tape weights", form="number", unit="A", example="2",
        answer=lambda: 3.0,
        wrong=(
            Wrong(4, "W1 is not kept: x needs no gradient, so g @ W1 is never computed"),
            Wrong(0, "addmm keeps its weight (as the view weight.t()) for the input gradient "
                     "g @ W"),
            Wrong(8, "gradients are not on the tape: forward saves, backward makes gradients"),
            Wrong(1, "every addmm whose input needs a gradient keeps its weight: layers 2-4"),
        ),
        under="fewer than the addmms that need g @ W: layers 2, 3 and 4",
        over="more than the addmms that need g @ W: not layer 1, whose input x needs none"),
    "2.1/saved-none": Predict(
        what="saved after forward", form="number", unit="B", example="3 * 1048576",
        answer=lambda: 4 * A + LOSS,
        wrong=(
            Wrong(lambda d, g: d - LOSS,
                  "forward also returns the 4-byte loss scalar, alive until backward"),
            Wrong(lambda d, g: d + LOSS, "the loss scalar is float32: 4 bytes, not 8"),
            Wrong(lambda d, g: d + A, "x is baseline: it existed before forward"),
            Wrong(lambda d, g: d + A - LOSS,
                  "x is baseline (it existed before forward), and the 4-byte loss is alive"),
            Wrong(lambda d, g: d / A, "that is in A: this answer is asked in bytes"),
            Wrong(lambda d, g: d + 3 * A,
                  "h1, h2, h3 are saved twice but stored once: the meter counts storages"),
        ),
        under="less than forward leaves alive: h1..h4 and the loss",
        over="more than forward leaves alive: the z_k are freed, x is baseline"),
    "2.1/forward-high": Predict(
        what="forward high", form="number", unit="A", example="3",
        answer=lambda: 5.0,
        wrong=(
            Wrong(4, "z4 is alive while relu makes h4"),
            Wrong(6, "x is baseline: it was alive before forward"),
            Wrong(8, "each z_k is freed once relu has made h_k: only z4 is alive at the end"),
            Wrong(9, "x is baseline, and each z_k is freed once relu has made h_k"),
        ),
        under="fewer than alive one op before the end: h1, h2, h3, and z4 with h4",
        over="more than alive one op before the end: each z_k but z4 is freed, x is baseline"),
    "2.2/kept-full": Predict(
        what="full keeps", form="count", example="3",
        answer=lambda: 4,
        wrong=(
            Wrong(5, "the output h4 is no region's input"),
            Wrong(3, "x counts: it is region 1's input (the meter calls it baseline)"),
            Wrong(0, "each region keeps its input: the re-run must start from something"),
            Wrong(8, "a region keeps only its input: not its output, not its weights"),
        ),
        other="full makes each layer a region, and a region keeps only its input"),
    "2.2/kept-every2": Predict(
        what="every-2 keeps", form="count", example="3",
        answer=lambda: 2,
        wrong=(
            Wrong(1, "x counts: it is region 1's input"),
            Wrong(4, "every-2 makes 2 regions (layers 1-2 and 3-4), and each keeps one input"),
            Wrong(3, "h4 is no region's input: the regions start at x and h2"),
            Wrong(5, "that is no checkpointing: the regions keep only their inputs"),
        ),
        other="every-2 makes 2 regions, and a region keeps only its input"),
    "2.2/rerun-order": Predict(
        what="re-run addmm in layers", form="tuple", length=4, example="[1, 2, 3, 4]",
        answer=lambda: (4, 4, 2, 2),
        wrong=(
            Wrong((4, 3, 2, 1),
                  "a region re-runs whole: both its addmms in the backward of its last layer"),
            Wrong((2, 2, 4, 4), "backward starts from layer 4: region 2 re-runs first"),
            Wrong((1, 2, 3, 4), "that is forward's order: re-runs happen in backward, when a "
                                "region's tape is first needed"),
            Wrong((3, 3, 1, 1), "a region's tape is first needed by its LAST layer's backward: "
                                "layer 4 for layers 3-4"),
            Wrong((4, 4, 4, 4), "region 1 (layers 1-2) is rebuilt later, in layer 2's backward"),
        ),
        other="a region re-runs when backward first needs its tape: its last layer's backward"),
    "2.3/addmm-full": Predict(
        what="full re-runs addmm", form="count", example="3",
        answer=lambda: 4,
        wrong=(
            Wrong(8, "a re-run is forward only: one addmm per layer, not forward + backward"),
            Wrong(11, "a re-run is one forward, not a whole step"),
            Wrong(0, "torch skips a region's trailing op only when it saves nothing needed; "
                     "here the last op, ReLU, saves its output, so the addmm before it runs"),
            Wrong(3, "layer 4 re-runs too: its ReLU's saved output is needed by its backward"),
        ),
        other="full re-runs each layer's forward once: one addmm per layer"),
    "2.3/addmm-every2": Predict(
        what="every-2 re-runs addmm", form="count", example="3",
        answer=lambda: 4,
        wrong=(
            Wrong(2, "recompute follows the ops re-run, not the number of regions"),
            Wrong(8, "a re-run is forward only, once per region: 2 regions x 2 addmm"),
            Wrong(0, "the regions' last op, ReLU, saves its output: the whole region re-runs"),
            Wrong(6, "each region re-runs once, not once per layer in it"),
        ),
        other="every-2 re-runs each region's forward once: 2 regions x 2 addmm"),
    "2.3/full-share": Predict(
        what="full's share", form="number", tolerance=0.015, example="0.25",
        answer=lambda: 4 / 11,
        wrong=(
            Wrong(1 / 3, "1/3 assumes backward = 2 x forward; here layer 1 skips its input "
                         "gradient, so a step is 11 addmm, not 12"),
            Wrong(1.0, "it adds one forward, not a whole step"),
            Wrong(0.5, "backward costs two matmuls per layer, not one: a step is 4 + 7 addmm"),
            Wrong(4 / 15, "that is the re-run's share of the checkpointed step; asked: of a "
                          "plain step (4 of 11)"),
        ),
        under="less than one forward (4 addmm) over a plain step (4 forward + 7 backward)",
        over="more than one forward (4 addmm) over a plain step (4 forward + 7 backward)"),
    "2.3/early-full": Predict(
        what="full, ReLU first", form="count", unit="addmm", example="3",
        answer=lambda: 0,
        wrong=(
            Wrong(4, "each region's only addmm is its last op, and it saves nothing backward "
                     "needs: torch stops before it"),
            Wrong(2, "that is every-2; under full each region is one ReLU -> Linear, and its "
                     "addmm is last"),
            Wrong(8, "a re-run is forward only, and here it stops before the addmm"),
            Wrong(1, "every region ends in its addmm: none of them re-runs"),
        ),
        over="each region's only addmm is its last op: torch never re-runs it"),
    "2.3/early-every2": Predict(
        what="every-2, ReLU first", form="count", unit="addmm", example="3",
        answer=lambda: 2,
        wrong=(
            Wrong(4, "the trailing addmm of each region is skipped"),
            Wrong(0, "only each region's trailing addmm is skipped: the inner one feeds a ReLU "
                     "whose output is saved"),
            Wrong(1, "both regions re-run their inner addmm: 2"),
            Wrong(8, "a re-run is forward only, and it stops before each region's last addmm"),
        ),
        other="every-2 re-runs each region's inner addmm, not its trailing one"),
    "2.4/peak-at": Predict(
        what="peak at", form="tuple", length=3, example='("forward", 4, "aten.relu")',
        answer=lambda: ("backward", 2, "aten.sum"),
        wrong=(
            Wrong(("forward", 4, "aten.relu"),
                  "the end of forward is not the top: backward adds gradients before it frees "
                  "activations"),
            Wrong(("backward", 4, "aten.threshold_backward"),
                  "the start of backward is not the top: each layer's weight gradient arrives "
                  "before its activation leaves"),
            Wrong(("backward", 4, "aten.sum"),
                  "layer 4 reaches 6A first, but each later layer adds a 2 KiB bias gradient "
                  "on top: the tie breaks later"),
            Wrong(("backward", 4, "aten.mm"),
                  "layer 4 reaches 6A first, but each later layer adds a 2 KiB bias gradient "
                  "on top: the tie breaks later"),
            Wrong(("backward", 1, "aten.sum"),
                  "layer 1 makes no input gradient (x needs none): its matmuls stop at 5A"),
            Wrong(("backward", 1, "aten.threshold_backward"),
                  "that moment only ties the top: the peak is the FIRST moment at it"),
            Wrong(("backward", 2, "aten.mm"),
                  "the right layer; the last straw is the bias gradient's aten.sum, just after "
                  "the matmuls"),
        ),
        other="find the last layer whose backward reaches 6A, and the op that adds a bias "
              "gradient there"),
    "2.5/walk-every2": Predict(
        what="every-2 walk", form="dict", keys=(4, 3, 2, 1), example="{4: 1, 3: 1, 2: 1, 1: 1}",
        answer=lambda: {4: 5, 3: 5, 2: 6, 1: 6},
        wrong=(
            Wrong({4: 6, 3: 6, 2: 6, 1: 6},
                  "under every-2, layers 4 and 3 run before h1 is rebuilt: 5A there"),
            Wrong({4: 6, 3: 6, 2: 5, 1: 5},
                  "reversed: region 2 (layers 3-4) is rebuilt first, without h1"),
            Wrong({4: 5, 3: 5, 2: 5, 1: 5},
                  "layers 2 and 1 run after region 1 is rebuilt: h1 is back, 6A as under none"),
            Wrong({4: 3, 3: 3, 2: 3, 1: 3},
                  "the walk counts everything alive: activations, gradients in and out, and "
                  "the weight gradients made so far"),
        ),
        other="add, per layer: activations still needed + gradient in + gradients out + "
              "weight gradients made so far"),
    "2.5/saved-full": Predict(
        what="full keeps after forward", form="number", unit="A", example="2",
        answer=lambda: 3.0,
        wrong=(
            Wrong(4, "x is baseline and h4 is no block's input: only h1, h2, h3 are kept"),
            Wrong(0, "each block keeps its input: h1, h2, h3 (x is baseline)"),
            Wrong(1, "that is every-2 (h2); full checkpoints each layer alone, each keeps its "
                     "input"),
            Wrong(2, "full makes each of the 4 layers a region: the inputs of layers 2-4 are "
                     "kept, x is baseline"),
        ),
        other="full keeps each block's input: h1, h2, h3 (x is baseline)"),
    "2.5/every2-lowers": Predict(
        what="every-2 lowers the peak for", form="set", choices=VARIANTS,
        example='{"8 layers"}',
        answer=lambda: set(LOWERS),
        wrong=(
            Wrong(LOWERS | {"8 layers"},
                  "deeper alone does not help: one gradient arrives per activation freed"),
            Wrong(frozenset({"8 layers"}), "deeper alone does not help; freeing gradients does"),
            Wrong(frozenset(), "free the weight gradients, or make activations outweigh them "
                               "(a bigger batch), and the peak moves to where every-2 cuts"),
            Wrong(LOWERS - {"batch 1024"},
                  "a batch of 1024 too: activations grow with the batch, weight gradients do "
                  "not, so activations make the peak"),
            Wrong(frozenset(VARIANTS), "as is, 2.4 measured the same peak for every policy"),
        ),
        other="every-2 lowers the peak only where activations, not gradients, make it"),
}
