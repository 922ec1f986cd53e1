"""The ``ckpt-course`` command: the package's measurements from a terminal."""

from __future__ import annotations

import argparse
import sys

from .units import positive_int

MODELS = ("hand-trace", "gpt", "llama-tiny")


def build_model(
    name: str, n_layer: int | None = None, d_model: int | None = None, dropout: float = 0.0
):
    from .models import LLAMA_PRESETS, GPTConfig, HandTraceNet, Llama, TinyGPT

    if name == "hand-trace":
        return HandTraceNet(depth=n_layer or 4)
    if name == "gpt":
        cfg = GPTConfig(dropout=dropout)
        return TinyGPT(
            GPTConfig(
                n_layer=n_layer or cfg.n_layer, d_model=d_model or cfg.d_model, dropout=dropout
            )
        )
    if name == "llama-tiny":
        cfg = LLAMA_PRESETS["llama-tiny"]
        return Llama(cfg.with_layers(n_layer) if n_layer else cfg)
    raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")


def _model_arguments(parser):
    parser.add_argument(
        "--model", choices=MODELS, default="gpt", help="which course model (default: gpt)"
    )
    parser.add_argument("--layers", type=positive_int, help="number of blocks")
    parser.add_argument("--batch", type=positive_int, help="batch size")
    parser.add_argument("--seq", type=positive_int, help="sequence length (GPT models)")


def cmd_tape(args) -> int:
    from .tape import record_tape

    model = build_model(args.model, args.layers)
    batch = model.example_batch(args.batch or (512 if args.model == "hand-trace" else 8), args.seq)
    tape = record_tape(model, batch[0])  # the forward pass only, as the lessons count it
    print(tape)
    return 0


def cmd_train(args) -> int:
    from .train import train
    from .units import fmt_bytes, fmt_flops

    model = build_model(args.model, args.layers, dropout=args.dropout)
    records = train(
        model,
        args.policy,
        steps=args.steps,
        batch_size=args.batch or 8,
        seq_len=args.seq,
        device=args.device,
    )
    print(f"{'step':>4}  {'loss':>8}  {'time':>8}  {'peak':>11}  {'saved':>11}  recompute")
    for r in records:
        print(
            f"{r.step:>4}  {r.loss:>8.4f}  {r.time_s * 1e3:>6.1f}ms  "
            f"{fmt_bytes(r.peak_bytes):>11}  "
            f"{fmt_bytes(r.saved_bytes):>11}  {fmt_flops(r.recompute_flops)}"
        )
    return 0


def cmd_reset(args) -> int:
    from .authoring import AuthoringError, reset_exercises

    try:
        backups = reset_exercises(args.names, args.src, args.exercises)
    except AuthoringError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for backup in backups:
        print(f"your edited notebook was moved to {backup}")
    print("exercises reset to their pristine state")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt-course", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tape = sub.add_parser("tape", help="print the activation tape of one forward pass")
    _model_arguments(tape)
    tape.set_defaults(run=cmd_tape)

    train = sub.add_parser("train", help="train a course model under a policy and print each step")
    _model_arguments(train)
    train.add_argument(
        "--policy",
        default="none",
        help="none, full, every-K, sqrt, selective:save=OPS, "
        "selective:recompute=OPS, offload (default: none)",
    )
    train.add_argument("--steps", type=positive_int, default=3)
    train.add_argument("--dropout", type=float, default=0.0)
    train.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    train.set_defaults(run=cmd_train)

    from .authoring import add_build_arguments, run_build
    from .compare import add_compare_arguments, run_compare
    from .doctor import add_doctor_arguments, run_doctor
    from .grading import add_grade_arguments, run_grade
    from .plan import add_plan_arguments, run_plan

    compare = sub.add_parser(
        "compare", help="train under several policies side by side: table and PNG plot"
    )
    add_compare_arguments(compare)
    compare.set_defaults(run=run_compare)

    plan = sub.add_parser(
        "plan", help="cheapest checkpoint placement that fits a budget (fake tensors, up to 70B)"
    )
    add_plan_arguments(plan)
    plan.set_defaults(run=run_plan)

    doctor = sub.add_parser(
        "doctor", help="run until out of memory, diagnose, prescribe a fix and verify it"
    )
    add_doctor_arguments(doctor)
    doctor.set_defaults(run=run_doctor)

    grade = sub.add_parser("grade", help="grade learners' exercise notebooks (never modifies them)")
    add_grade_arguments(grade)
    grade.set_defaults(run=run_grade)

    build = sub.add_parser(
        "build-exercises", help="make exercises/ and solutions/ from exercises/src"
    )
    add_build_arguments(build)
    build.set_defaults(run=run_build)

    reset = sub.add_parser(
        "reset-exercises", help="fresh exercise notebooks; edited ones are moved to backups/"
    )
    reset.add_argument(
        "names", nargs="*", metavar="NAME", help="e.g. 1_why_activations (all if none)"
    )
    reset.add_argument("--src", default="exercises/src")
    reset.add_argument("--exercises", default="exercises")
    reset.set_defaults(run=cmd_reset)
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:  # bad input the parser could not see, e.g. a malformed policy
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
