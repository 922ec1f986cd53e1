"""The ``ckpt-course`` command: the package's measurements from a terminal.

Every option is checked before any work starts; bad input exits with code 2 and one line that
names the fix (no traceback). The modules hold the work; this file holds all of the argparse.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

from .costs import config_by_name, config_names
from .meter import parse_budget
from .models import COURSE_MODELS, build_model, longest_sequence
from .policies import OP_NAMES, parse_policy
from .step import MAX_STEPS, check_step_fits, guess_step_bytes, model_step_bytes
from .units import shown

MODEL_CHOICES = tuple(COURSE_MODELS)


# ---------------------------------------------------------------- option types
def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1, or a usage error saying so (a number of
    hundreds of digits is named by its length, never echoed)."""
    digits = re.fullmatch(r"\s*[+-]?\s*(\d+)\s*", text)
    if digits and len(digits[1]) > 30:
        raise argparse.ArgumentTypeError(f"expected a number such as 8, got a "
                                         f"{len(digits[1])}-digit number")
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number such as 8, got "
                                         f"{shown(text)}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1 (such as 8), got "
                                         f"{value}")
    return value


def _at_most(upper: int, why: str):
    """``positive_int`` bounded above, so that no size makes a command hang or exhaust memory
    (the memory guard, ``check_step_fits``, catches what the bounds let through)."""
    def check(text: str) -> int:
        value = positive_int(text)
        if value > upper:
            raise argparse.ArgumentTypeError(f"expected at most {upper:,} ({why}), got "
                                             f"{value:,}"[:200])
        return value
    return check


_layers = _at_most(512, "a course model of more blocks teaches nothing more")
_batch = _at_most(1_000_000, "a batch beyond that is an error, not a size")
_seq = _at_most(1_000_000, "longer than any model's context")
_width = _at_most(65_536, "wider than any real model")
_steps = _at_most(MAX_STEPS, "more steps only take longer")
_devices = _at_most(1_000_000, "more devices than any cluster")
_jobs = _at_most(256, "more processes than any machine's cores")
_op_points = _at_most(64, "a block's Pareto set, thinned, has fewer points that matter")
_micro_batches = _at_most(1_000, "past the second, each adds nothing to the peak")


def _float_where(ok, what: str):
    """An argparse type: a number for which ``ok`` holds, or a usage error saying ``what``."""
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return check


_probability = _float_where(lambda v: 0 <= v < 1, "a probability in [0, 1) such as 0.1")
# A grader's worker takes about a second to start: a shorter limit fails every learner.
_grade_seconds = _float_where(lambda v: 1 <= v < math.inf,
                              "a positive number of seconds, at least 1 second (a worker "
                              "takes about a second to start), such as 60")


def _from_api(parse):
    """An argparse type from one of the package's parsers: its error becomes the usage error."""
    def check(text: str):
        try:
            return parse(text)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return check


_budget_arg = _from_api(parse_budget)
_config_arg = _from_api(config_by_name)
_policy_arg = _from_api(lambda text: str(parse_policy(text)))


def _hf_config_arg(text: str):
    """A transformers config by shipped name or config.json path, checked to be a causal LM."""
    from . import hf

    def load(name):
        config = hf.load_config(name)
        hf.check_causal_lm(config)
        return config
    return _from_api(load)(text)


def _hf_config_option(parser_or_group) -> None:
    from .hf import config_names as hf_names

    parser_or_group.add_argument(
        "--hf-config", type=_hf_config_arg, metavar="NAME_OR_PATH",
        help=f"a Hugging Face causal LM from its config.json ({', '.join(hf_names())}, or a "
             f"path); never downloads")


def split_policies(text: str) -> list[str]:
    """'none,full,selective:save=mm,sdpa,offload' -> ['none', 'full', 'selective:save=mm,sdpa',
    'offload']: an op name after a selective policy, or a block after segments or menu (and an
    op name inside a menu), belongs to it.
    ';' also separates (a segments policy's ';preserve_rng_state=False' stays with it)."""
    if ";" in text:
        out: list[str] = []
        for part in (p.strip() for p in text.split(";")):
            if part.lower().replace(" ", "").startswith("preserve_rng_state=") and out:
                out[-1] += ";" + part
            elif part:
                out.append(part)
        return out
    out = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        last = out[-1].lower() if out else ""
        if (last.startswith("selective:") and token.lower() in OP_NAMES) or (
                last.startswith("segments:") and re.fullmatch(r"\d+([-.]+\d+)?(;.*)?", token)) or (
                last.startswith("menu:") and (token[0].isdigit() or token.lower() in OP_NAMES)):
            out[-1] += "," + token
        else:
            out.append(token)
    return out


def _policy_list(text: str) -> list[str]:
    names = [_policy_arg(p) for p in split_policies(text)]
    if not names:
        raise argparse.ArgumentTypeError("give at least one policy, e.g. none,full")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"each policy once, please: {', '.join(names)}")
    return names


def _device_name(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"device is cpu, cuda or cuda:N, got {text!r}")
    if text.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text} was asked for but this torch sees no CUDA "
                                             f"device: use --device cpu")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has "
                                             f"{torch.cuda.device_count()} CUDA device(s)")
    return text


# Folders of the operating system: an output path inside one is a slip (or, run as root, a
# way to damage the machine), never a learner's file.
SYSTEM_FOLDERS = tuple(Path(p) for p in ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32",
                                         "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr",
                                         "/var/lib", "/var/log", "/var/cache", "/var/spool",
                                         "/var/mail", "/var/backups"))
# Folders whose own top level is the system's, while a folder inside may be a learner's (a clone
# in /opt/me/course, /srv/class): a file or folder written right into one is refused.
SYSTEM_TOPS = tuple(Path(p) for p in ("/", "/var", "/opt", "/srv"))
TEMPORARY = (Path("/tmp"), Path("/var/tmp"))


def _is_system_path(path: Path) -> bool:
    resolved = path.resolve()
    if resolved in TEMPORARY:
        return False
    return (any(resolved == s or s in resolved.parents for s in SYSTEM_FOLDERS)
            or resolved in SYSTEM_TOPS or resolved.parent in SYSTEM_TOPS)


NAME_MAX = 255  # bytes in one file or folder name on Linux, macOS and Windows file systems


def _check_name_lengths(text: str) -> None:
    """Each name in the path short enough for the file system (else the OS raises, later)."""
    for part in Path(text).parts:
        if len(part.encode(errors="surrogateescape")) > NAME_MAX:
            raise argparse.ArgumentTypeError(f"a name in {shown(text)} is "
                                             f"{len(part.encode(errors='surrogateescape'))} "
                                             f"bytes long, more than the file system's "
                                             f"{NAME_MAX}: choose a shorter name")


def _check_writable_folder(folder: Path, text: str) -> None:
    """``folder`` (where ``text`` is to be written) exists as a folder and can be written."""
    import os

    if folder.exists() and not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} is a file, not a folder "
                                         f"(choose a path in a folder)")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: the folder {folder} does not "
                                         f"exist (create it first with `mkdir -p {folder}`, or "
                                         f"choose another path)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: the folder {folder} is not "
                                         f"writable (choose a folder of your own)")


def _output_file(suffix: str):
    """An argparse type for a file to write, checked before any work (a long run must not fail
    at its end): a ``suffix`` file name, not a folder, not a system path, in a folder that exists
    and is writable. An existing file is refused later, in ``refuse_replacing``, unless --force."""
    def check(text: str) -> Path:
        import os

        path = Path(text)
        if not text.strip():
            raise argparse.ArgumentTypeError(f"give a file name, e.g. out{suffix}")
        _check_name_lengths(text)
        if text.endswith(("/", os.sep)) or path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder: give a {suffix} file name "
                                             f"in it, e.g. {path / ('out' + suffix)}")
        if path.suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(f"expected a {suffix} file name, got {text!r} (e.g. "
                                             f"{path.with_suffix(suffix).name})")
        if _is_system_path(path):
            raise argparse.ArgumentTypeError(f"{text} is in a system folder: write to a folder "
                                             f"of your own, e.g. ./{path.name}")
        _check_writable_folder(path.parent, text)
        if path.exists() and not path.is_file():
            raise argparse.ArgumentTypeError(f"{text} exists and is not a regular file: choose "
                                             f"another name")
        if path.exists() and not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text} is read-only: choose another name")
        return path
    return check


def _output_folder(text: str) -> Path:
    """An argparse type for a folder to write files into: not a file, not a system path; made
    if missing, so its nearest existing parent must be a writable folder."""
    path = Path(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("give a folder name, e.g. feedback/")
    _check_name_lengths(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder: name a folder")
    if _is_system_path(path):
        raise argparse.ArgumentTypeError(f"{text} is in a system folder: write to a folder of "
                                         f"your own, e.g. ./{path.name or 'out'}")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    _check_writable_folder(existing, text)
    return path


def _folder(must_exist: bool):
    """An argparse type for a folder: never a file; ``must_exist`` for one that is read, else one
    that is written (``_output_folder``: not a system folder, made if missing)."""
    def check(text: str) -> Path:
        if not must_exist:
            return _output_folder(text)
        path = Path(text)
        if not text.strip():
            raise argparse.ArgumentTypeError("give a folder name")
        _check_name_lengths(text)
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a file, not a folder: name a folder")
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"folder {text} does not exist: check the path")
        return path
    return check


def _force_option(parser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="replace output files that exist already (never done without it)")


def refuse_replacing(paths, force: bool) -> None:
    """Before any work: an output file that exists already is someone's; replace it only with
    --force. One error naming the first such file."""
    existing = [p for p in paths if p is not None and Path(p).exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ValueError(f"{existing[0]} exists{more}: pass --force to replace it, or choose "
                         f"another name")


# ---------------------------------------------------------------- course models
def _model_arguments(parser):
    parser.add_argument("--model", choices=MODEL_CHOICES, default=None,
                        help="which course model (default: gpt)")
    parser.add_argument("--layers", type=_layers, help="number of blocks")
    parser.add_argument("--batch", type=_batch, help="batch size (default: 8; hand-trace 512)")
    parser.add_argument("--seq", type=_seq, help="sequence length (GPT and Llama)")


def _course_model(args, dropout: float = 0.0):
    """The model ``args`` name, its batch size and sequence length, checked before any work."""
    args.model = args.model or "gpt"
    if args.model == "hand-trace" and args.seq is not None:
        raise ValueError("--seq applies to GPT and Llama; the hand-trace net takes no sequence: "
                         "drop --seq")
    model = build_model(args.model, args.layers, dropout=dropout)
    longest = longest_sequence(model)
    if args.seq is not None and longest is not None and args.seq > longest:
        raise ValueError(f"--seq {args.seq} is longer than {args.model} supports ({longest}, its "
                         f"position table): use --seq {longest} or less")
    batch_size = args.batch or COURSE_MODELS[args.model]
    tokens = batch_size * (args.seq or getattr(getattr(model, "cfg", None), "seq_len", 1))
    check_step_fits(model_step_bytes(model, tokens), f"{args.model} at batch {batch_size}",
                    "--batch, --seq or --layers")
    return model, batch_size, args.seq


def _model_of(args):
    """A course model (--model) or a small real instance of an --hf-config, never both."""
    if args.hf_config is None:
        return _course_model(args)
    if args.model is not None:
        raise ValueError(f"--model and --hf-config both name the model (--model {args.model}): "
                         "drop one of them")
    from .hf import small_model

    return small_model(args.hf_config, args.layers, args.batch, args.seq)


# ---------------------------------------------------------------- tape, train
def cmd_tape(args) -> int:
    from .tape import record_tape

    model, batch_size, seq = _course_model(args)
    batch = model.example_batch(batch_size, seq)
    print(record_tape(model, batch[0]))  # the forward pass only, as the lessons count it
    return 0


def trace_outputs(args) -> list[Path]:
    """The files ``trace`` writes: the page and, beside it, memory_viz's snapshot (checked as
    the page is, before any work: a folder of that name is refused even with --force)."""
    snapshot = args.html.with_suffix(".pickle")
    try:
        _output_file(".pickle")(str(snapshot))
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"the snapshot beside --html: {error}") from None
    return [args.html, snapshot]


def cmd_trace(args) -> int:
    """One training step's memory timeline: an offline page and memory_viz's snapshot."""
    from .memviz import MEMORY_VIZ_URL, step_timeline, timeline_page
    from .units import fmt_bytes

    model, batch_size, seq = _model_of(args)
    html_path, snapshot_path = trace_outputs(args)
    timeline = step_timeline(model, args.policy, batch_size, seq)
    html_path.write_text(timeline_page(timeline, snapshot_path.name), encoding="utf-8")
    snapshot_path.write_bytes(timeline.snapshot)
    print(f"wrote {html_path}: one AdamW step under {args.policy}, peak "
          f"{fmt_bytes(timeline.peak_bytes)} of live tensor bytes (the meter's, exact). Open it in "
          "any browser, offline: drag to zoom, hover a point for its op, phase, category and "
          "bytes.")
    print(f"wrote {snapshot_path}: the same step for PyTorch's memory_viz (drag it onto "
          f"{MEMORY_VIZ_URL}; allocator bytes, with Python stacks).")
    return 0


def cmd_train(args) -> int:
    from .train import train
    from .units import fmt_bytes, fmt_flops

    model, batch_size, seq = _course_model(args, dropout=args.dropout)
    records = train(model, args.policy, steps=args.steps, batch_size=batch_size, seq_len=seq,
                    device=args.device)
    print(f"{'step':>4}  {'loss':>8}  {'time':>8}  {'peak':>11}  {'saved':>11}  recompute")
    for r in records:
        print(f"{r.step:>4}  {r.loss:>8.4f}  {r.time_s * 1e3:>6.1f}ms  "
              f"{fmt_bytes(r.peak_bytes):>11}  {fmt_bytes(r.saved_bytes):>11}  "
              f"{fmt_flops(r.recompute_flops)}")
    return 0


# ---------------------------------------------------------------- compare
def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ckpt-course compare`` (a tiny GPT; every size can be changed)."""
    from .compare import DEFAULT_POLICIES
    from .models import GPTConfig

    d = GPTConfig()
    parser.add_argument("--policies", type=_policy_list, default=list(DEFAULT_POLICIES),
                        help=f"comma-separated policies (default: {','.join(DEFAULT_POLICIES)}); "
                             "an op list of a selective policy stays with it, or separate "
                             "policies with ';'")
    parser.add_argument("--layers", type=_layers, default=d.n_layer,
                        help="number of blocks (default: %(default)s)")
    parser.add_argument("--width", type=_width, default=d.d_model,
                        help="model width d_model (default: %(default)s)")
    parser.add_argument("--heads", type=_width, default=d.n_head,
                        help="attention heads; must divide --width (default: %(default)s)")
    parser.add_argument("--batch", type=_batch, default=8, help="batch size (default: 8)")
    parser.add_argument("--seq", type=_seq, default=d.seq_len,
                        help="sequence length (default: %(default)s)")
    parser.add_argument("--steps", type=_at_most(1000, "the ratios settle long before"), default=6,
                        help="timed, interleaved rounds per policy (default: %(default)s)")
    parser.add_argument("--budget", type=_budget_arg, default=None,
                        help="memory budget, e.g. 32MiB: policies over it are reported as OOM")
    parser.add_argument("--device", type=_device_name, default="cpu",
                        help="cpu or cuda (default: cpu)")
    parser.add_argument("--out", type=_output_file(".png"), default="compare.png",
                        help="where to write the plot, a PNG (default: %(default)s)")
    _force_option(parser)
    parser.set_defaults(outputs=lambda args: [args.out])


def run_compare(args) -> int:
    """Run ``compare`` on the embedded tiny GPT; print the table; write the plot to ``--out``."""
    from .compare import compare
    from .models import GPTConfig

    if args.width % args.heads:
        raise ValueError(f"--heads ({args.heads}) must divide --width ({args.width}), "
                         f"e.g. --heads {math.gcd(args.width, 4)}")
    cfg = GPTConfig(n_layer=args.layers, d_model=args.width, n_head=args.heads, seq_len=args.seq)
    need = guess_step_bytes(13 * cfg.n_layer * cfg.d_model ** 2 + 2 * cfg.vocab_size * cfg.d_model,
                            cfg.d_model, cfg.n_layer, args.batch * args.seq, cfg.vocab_size)
    check_step_fits(need, f"a tiny GPT of width {cfg.d_model} at batch {args.batch}",
                    "--batch, --seq, --layers or --width")
    result = compare(cfg, args.policies, steps=args.steps, batch_size=args.batch,
                     device=args.device, budget=args.budget, live=False)
    print(f"tiny GPT: {args.layers} layers, width {args.width}, {args.heads} heads")
    print(result)
    result.save_png(args.out)
    print(f"plot written to {args.out}")
    return 0


# ---------------------------------------------------------------- plan
def add_plan_arguments(parser) -> None:
    """``ckpt-course plan``: --model or --config, --batch, --seq, --budget, --devices."""
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--model", choices=MODEL_CHOICES,
                      help="a course model, measured for real (default: gpt)")
    what.add_argument("--config", type=_config_arg, metavar="NAME",
                      help=f"a config measured on fake tensors: {', '.join(config_names())}")
    _hf_config_option(what)
    parser.add_argument("--layers", type=_layers, help="number of blocks (course models)")
    parser.add_argument("--batch", type=_batch, help="batch size (default: 8; configs 1)")
    parser.add_argument("--seq", type=_seq, help="sequence length")
    parser.add_argument("--budget", type=_budget_arg, required=True,
                        help="memory per device, e.g. 80GiB, 40MiB or 80GB (decimal)")
    parser.add_argument("--devices", type=_devices, default=1,
                        help="shard parameters, gradients and optimizer state over N devices "
                             "(FSDP / ZeRO-3 estimate; default 1)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="dtype of a --config or --hf-config (default bf16)")
    parser.add_argument("--master-weights", action="store_true",
                        help="--hf-config: count a fp32 master copy of the weights (4 B/param)")
    parser.add_argument("--objective", choices=("time", "flops"), default=None,
                        help="what the plan minimises: measured time (default for --model) or "
                             "recomputed FLOPs (default, and the only one, for --config)")
    parser.add_argument("--op-points", type=_op_points, default=0, metavar="N",
                        help="also up to N op-level options per distinct block: which op "
                             "outputs a checkpoint keeps (selective:ops=...; --model and "
                             "--config; default: the menu alone)")
    parser.add_argument("--trunk", action="store_true",
                        help="--model: also weigh the trunk checkpointed (menu:...,suffix=full "
                             "or selective:ops=..., prefix=full), as auto_checkpoint(..., "
                             "trunk=True) does; plans by recomputed FLOPs")
    parser.add_argument("--micro-batches", type=_micro_batches, default=1, metavar="N",
                        help="--model: plan a step of N forward/backward passes whose gradients "
                             "add up before one optimizer step (gradient accumulation), as "
                             "auto_checkpoint(..., micro_batches=N) does (default 1)")


def costs_from_args(args):
    """The measured costs that ``args`` (from ``add_plan_arguments``) describe."""
    import torch

    from .costs import MENU, config_costs, measure_costs

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if args.objective == "time" and (args.config is not None
                                     or getattr(args, "hf_config", None) is not None):
        raise ValueError("--objective time needs a course model measured for real (--model); a "
                         "config is costed on fake tensors: use --objective flops")
    points, micro_batches = getattr(args, "op_points", 0), getattr(args, "micro_batches", 1)
    _check_trunk(args)
    if micro_batches > 1 and (args.config is not None
                              or getattr(args, "hf_config", None) is not None):
        raise ValueError("--micro-batches applies to a course model measured for real (--model); "
                         "a config is costed on fake tensors for one pass: drop --micro-batches")
    if getattr(args, "hf_config", None) is not None:
        from .hf import hf_config_costs, longest

        if points:
            raise ValueError("--op-points applies to --model and --config; an --hf-config is "
                             "planned with the menu: drop --op-points")

        if args.layers is not None:
            raise ValueError("--layers applies to course models; an --hf-config has its own depth "
                             f"({args.hf_config.num_hidden_layers} layers): drop --layers")
        seq = args.seq or min(longest(args.hf_config), 4096)
        if seq > longest(args.hf_config):
            raise ValueError(f"--seq {seq} is longer than the config allows "
                             f"({longest(args.hf_config)}): use --seq {longest(args.hf_config)} "
                             f"or less")
        return hf_config_costs(args.hf_config, args.batch or 1, seq, dtype[args.dtype or "bf16"],
                               args.master_weights)
    if args.master_weights:
        raise ValueError("--master-weights applies to an --hf-config: drop it")
    if args.config is not None:
        if args.layers is not None:
            raise ValueError(f"--layers applies to course models (--model); a named config has "
                             f"its own depth ({args.config.n_layer} blocks): drop --layers")
        seq = args.seq or args.config.seq_len
        if seq > args.config.seq_len:
            raise ValueError(f"--seq {seq} is longer than the config supports "
                             f"({args.config.seq_len}): use --seq {args.config.seq_len} or less")
        return config_costs(args.config, args.batch or 1, seq, dtype[args.dtype or "bf16"],
                            menu=MENU, op_points=points)
    if args.dtype is not None:
        raise ValueError("--dtype applies to a --config; course models run in fp32: drop --dtype")
    args.model = args.model or "gpt"
    model, batch_size, seq = _course_model(args)
    costs = measure_costs(model, batch_size, seq, menu=MENU, times=args.objective != "flops",
                          op_points=points, suffix=getattr(args, "trunk", False),
                          accumulate=micro_batches > 1)
    if micro_batches == 1:
        return costs
    note = (f"a step of {micro_batches} micro-batches of this batch: from the first one's "
            f"backward every gradient is there, so the peak is a later micro-batch's")
    return replace(costs, notes=(*costs.notes, note))


def _check_trunk(args) -> None:
    """``--trunk``: the suffix and prefix clauses are measured on a real course model and
    weighed by the FLOPs objective only (``plan._trunk_variants``), so it plans by FLOPs."""
    if not getattr(args, "trunk", False):
        return
    if args.config is not None or getattr(args, "hf_config", None) is not None:
        raise ValueError("--trunk applies to a course model measured for real (--model); a "
                         "config is costed on fake tensors: drop --trunk")
    if args.objective == "time":
        raise ValueError("--trunk weighs the suffix= and prefix= clauses by recomputed FLOPs: "
                         "use --objective flops, or drop --trunk")
    args.objective = "flops"


def run_plan(args) -> int:
    """Print the plan. Exit code 0 if a placement fits, 1 if none does (the report says why
    and, for configs, how many devices sharding needs)."""
    from .plan import make_plan
    from .sharding import min_devices, shard
    from .units import fmt_bytes

    whole = costs_from_args(args)
    costs = shard(whole, args.devices)
    plan = make_plan(costs, args.budget, args.objective)
    print(plan.report())
    if plan.fits and args.hf_config is not None:
        from .hf import handback

        code = handback(plan.best.placement, costs.n, args.hf_config, costs)
        print("\nIn transformers:\n" + str(code))
    if plan.fits:
        return 0
    if args.config is not None or args.hf_config is not None:
        found = min_devices(whole, args.budget)  # the fewest in all: more than --devices
        if found is not None:
            n, best = found
            print(f"Sharded over {n} devices it fits: {best.policy}, peak "
                  f"{fmt_bytes(best.peak_bytes)} per device, recompute {best.overhead:+.1%} of a "
                  f"step (ckpt-course plan ... --devices {n}).")
    return 1


# ---------------------------------------------------------------- doctor
def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    """``ckpt-course doctor``: --model, --layers, --batch, --seq, --budget, --steps."""
    _model_arguments(parser)
    parser.add_argument("--budget", type=_budget_arg,
                        help="memory to fit in, e.g. 20MiB (on CPU the meter enforces it); "
                        "without it, lesson 4's demo: a budget that step 2 overflows")
    parser.add_argument("--steps", type=_at_most(100, "the fix is verified in a few"), default=3,
                        help="training steps (default 3)")
    parser.add_argument("--no-timing", action="store_true", help="skip the step-time comparison")
    _hf_config_option(parser)


def run_doctor(args) -> int:
    """Print the report. Exit code 0 if the setup fits or the fix was verified to fit, 1 if not
    (e.g. only sharding would help, which a single process cannot verify). With no budget and
    no model options: lesson 4's demo, which says so in its first line."""
    from .doctor import demo, doctor

    as_given = (args.model in (None, "gpt") and (args.layers, args.batch, args.seq)
                == (None, None, None))
    if args.hf_config is not None:
        model, batch_size, seq = _model_of(args)
        print(f"{model.cfg.name}: random weights, measured for real")
        report = doctor(model, args.budget, batch_size, seq, args.steps,
                        timing=not args.no_timing)
    elif args.budget is None and as_given:
        report = demo(timing=not args.no_timing)
    else:
        model, batch_size, seq = _course_model(args)
        report = doctor(model, args.budget, batch_size, seq, args.steps,
                        timing=not args.no_timing)
    print(report)
    if args.hf_config is not None and report.fix is not None and report.fix.kind == "policy":
        from .hf import handback

        print("\nIn transformers:\n" + str(handback(report.fix.policy, len(model.blocks), model)))
    fits = report.run.fits or (report.verification is not None and report.verification.run.fits)
    return 0 if fits else 1


# ---------------------------------------------------------------- grade
def add_grade_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("notebooks", nargs="+", metavar="NOTEBOOK", help="learners' .ipynb files")
    parser.add_argument("--exercises", type=_folder(must_exist=True), default=Path("exercises"),
                        metavar="DIR",
                        help="folder of the pristine exercises (and src/), default: exercises")
    parser.add_argument("--timeout", type=_grade_seconds, default=60, metavar="S",
                        help="seconds allowed per cell and per checked call (default 60)")
    parser.add_argument("--jobs", type=_jobs, default=None,
                        help="notebooks graded at once (default: the number of cores)")
    parser.add_argument("--csv", type=_output_file(".csv"), metavar="FILE",
                        help="write a gradebook: a row per notebook, a column per check")
    parser.add_argument("--json", type=_output_file(".json"), metavar="FILE",
                        help="write the scorecards as JSON")
    parser.add_argument("--feedback", type=_output_folder, metavar="DIR",
                        help="write each learner a markdown report of their checks and hints")
    _force_option(parser)
    parser.set_defaults(outputs=grade_outputs)
    return parser


def grade_outputs(args) -> list[Path]:
    """The files ``grade`` writes: gradebook, scorecards, and one report per learner."""
    outputs = [args.csv, args.json]
    if args.feedback is not None:
        from .grading import _report_names  # the names write_feedback will use

        outputs += [args.feedback / name for name in _report_names(args.notebooks)]
    return outputs


def run_grade(args) -> int:
    """0: every notebook graded with full marks; 1: some lost points or could not be graded;
    2: bad options (nothing graded); 3: the grader itself failed (on a file, or at all)."""
    from . import grading

    try:
        return _grade_class(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return grading.EXIT_USAGE
    except Exception as e:  # a grader bug: one line, its own exit code, never a traceback
        print(f"error: the grader failed: {type(e).__name__}: {e}", file=sys.stderr)
        return grading.EXIT_GRADER_FAILED


def _grade_class(args) -> int:
    from . import grading
    from .grading import format_scorecards, grade, write_csv, write_feedback, write_json

    cards = grade(args.notebooks, args.exercises, args.timeout, jobs=args.jobs,
                  progress=lambda card: print(format_scorecards([card]), flush=True))
    failed = [c for c in cards if c.error]
    if len(cards) > 1:
        print(f"\n{len(cards)} notebooks, {sum(c.earned for c in cards):g}/"
              f"{sum(c.points for c in cards):g} points; {len(failed)} could not be graded")
    for card in cards:
        if card.duplicate_of:
            print(f"warning: {grading.clean(card.notebook)} has the same answers as "
                  f"{grading.clean(card.duplicate_of)}", file=sys.stderr)
    for why in sorted({c.sandbox for c in cards if c.sandbox}):
        print(f"warning: learners' code ran without a full sandbox ({why}); see grading.py",
              file=sys.stderr)
    if args.csv:
        write_csv(cards, args.csv)
    if args.json:
        write_json(cards, args.json)
    if args.feedback:
        write_feedback(cards, args.feedback)
    if any(c.grader_failed for c in cards):
        print("error: the grader failed on some files (see their rows): exit code 3",
              file=sys.stderr)
        return grading.EXIT_GRADER_FAILED
    return grading.EXIT_FULL_MARKS if all(c.full_marks for c in cards) else grading.EXIT_NOT_FULL


# ---------------------------------------------------------------- build-exercises, reset-exercises
def add_build_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--src", type=_folder(must_exist=True), default=Path("exercises/src"),
                        help="folder of percent-format sources")
    parser.add_argument("--solutions", type=_folder(must_exist=False), default=Path("solutions"),
                        help="where solutions are written")
    parser.add_argument("--exercises", type=_folder(must_exist=False), default=Path("exercises"),
                        help="where exercises are written")
    parser.add_argument("--force", action="store_true",
                        help="overwrite exercise notebooks even if someone edited them")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a notebook is out of date")
    return parser


def _distinct_folders(**folders: Path) -> None:
    """Before any work: no two of these folders are one (the notebooks written into one would
    replace those written into the other, or land among the sources)."""
    seen: dict[Path, str] = {}
    for option, folder in folders.items():
        resolved = Path(folder).resolve()
        if resolved in seen:
            raise ValueError(f"--{seen[resolved]} and --{option} are the same folder "
                             f"({folder}): give each its own")
        seen[resolved] = option


def run_build(args) -> int:
    from .authoring import AuthoringError, build_all, check_fresh

    _distinct_folders(src=args.src, solutions=args.solutions, exercises=args.exercises)
    try:
        if args.check:
            check_fresh(args.src, args.solutions, args.exercises)
            print("all notebooks are up to date")
            return 0
        written = build_all(args.src, args.solutions, args.exercises, args.force)
    except AuthoringError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if not written:
        print("all notebooks are up to date")
    return 0


def cmd_reset(args) -> int:
    from .authoring import reset_exercises

    _distinct_folders(src=args.src, exercises=args.exercises)
    backups = reset_exercises(args.names, args.src, args.exercises)  # ValueError: usage error
    for backup in backups:
        print(f"your edited notebook was moved to {backup}")
    print("exercises reset to their pristine state")
    return 0


# ---------------------------------------------------------------- the learner's copy
def add_copy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--course", type=_folder(must_exist=True), default=None, metavar="DIR",
                        help="the course's clone (default: the one this package is in)")
    parser.add_argument("--into", type=_output_folder, default=None, metavar="DIR",
                        help="your copy (default: the copy you are in, else my-course/ in the "
                             "course)")


def _copy_paths(args) -> tuple[Path, Path]:
    from .workcopy import course_root, find_copy

    course = args.course or course_root()
    return course, args.into or find_copy(course)


def cmd_sync(args) -> int:
    from .workcopy import sync_course

    print(sync_course(*_copy_paths(args)))
    return 0


def cmd_reset_lessons(args) -> int:
    from .workcopy import reset_lessons

    print(reset_lessons(args.names, *_copy_paths(args)))
    return 0


# ---------------------------------------------------------------- the parser
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt-course", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, run, help, add=None):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(run=run, parser=p, outputs=lambda args: [])
        (add or _model_arguments)(p)
        return p

    command("tape", cmd_tape, "print the activation tape of one forward pass")
    trace = command("trace", cmd_trace, "write one training step's memory timeline: an "
                    "offline HTML page and PyTorch's memory_viz snapshot")
    _hf_config_option(trace)
    trace.add_argument("--policy", type=_policy_arg, default="none",
                       help="the checkpoint policy of the step (default: none)")
    trace.add_argument("--html", type=_output_file(".html"), required=True, metavar="FILE",
                       help="where the page goes, e.g. step.html (FILE.pickle, memory_viz's "
                            "snapshot, goes beside it)")
    _force_option(trace)
    trace.set_defaults(outputs=trace_outputs)
    train = command("train", cmd_train, "train a course model under a policy and print each step")
    train.add_argument("--policy", type=_policy_arg, default="none",
                       help="none, full, every-K, sqrt, segments:a-b,c, selective:save=OPS, "
                            "selective:recompute=OPS, offload (default: none)")
    train.add_argument("--steps", type=_steps, default=3)
    train.add_argument("--dropout", type=_probability, default=0.0)
    train.add_argument("--device", type=_device_name, default=None,
                       help="cpu or cuda (default: cpu)")
    command("compare", run_compare, "train under several policies side by side: table and PNG "
            "plot", add_compare_arguments)
    command("plan", run_plan, "cheapest checkpoint placement that fits a budget (fake tensors, "
            "up to 70B)", add_plan_arguments)
    command("doctor", run_doctor, "run until out of memory, diagnose, prescribe a fix and verify "
            "it", add_doctor_arguments)
    command("grade", run_grade, "grade learners' exercise notebooks (never modifies them)",
            add_grade_arguments)
    command("build-exercises", run_build, "make exercises/ and solutions/ from exercises/src",
            add_build_arguments)

    def reset_arguments(p):
        p.add_argument("names", nargs="*", metavar="NAME", help="e.g. 1_why_activations (all "
                       "if none)")
        p.add_argument("--src", type=_folder(must_exist=True), default=Path("exercises/src"))
        p.add_argument("--exercises", type=_folder(must_exist=False), default=Path("exercises"))

    command("reset-exercises", cmd_reset, "fresh exercise notebooks; edited ones are moved to "
            "backups/", reset_arguments)
    command("sync-course", cmd_sync, "copy the lessons and exercises into your own folder "
            "(my-course/), or bring a course update into it, keeping your work",
            add_copy_arguments)

    def reset_lessons_arguments(p):
        p.add_argument("names", nargs="*", metavar="NAME", help="lessons or exercises, e.g. "
                       "1_why_activations_eat_memory (all if none)")
        add_copy_arguments(p)

    command("reset-lessons", cmd_reset_lessons, "fresh copies of lessons or exercises in your "
            "folder; yours are moved to backups/", reset_lessons_arguments)
    return parser


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _out_of_memory(error: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError, or the CPU allocator's "can't allocate memory"."""
    said = str(error).lower()
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in said or "cannot allocate memory" in said)


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """One parser per process (building it takes about 20 ms; parsing does not change it)."""
    return make_parser()


def _budget_joined(argv: list[str]) -> list[str]:
    """``--budget -5MiB`` as ``--budget=-5MiB``: argparse reads a dash-led value that is not a
    plain number as an option and says "expected one argument"; joined, the budget's parser
    says what is wrong with it (``meter.parse_budget``)."""
    out = []
    for arg in argv:
        if out and out[-1] == "--budget" and re.match(r"-\.?\d", arg):
            out[-1] = f"--budget={arg}"
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    """Parse, refuse to replace existing outputs (before any work), run. Bad input, seen by the
    parser or by the work itself, exits with code 2 and one line naming the fix."""
    args = _parser().parse_args(_budget_joined(sys.argv[1:] if argv is None else argv))
    try:
        refuse_replacing(args.outputs(args), getattr(args, "force", False))
        return args.run(args)
    except ValueError as error:  # bad input the parser could not see, e.g. --seq too long
        args.parser.error(_first_line(error))
    except (MemoryError, RuntimeError) as error:  # the allocator's own out of memory
        if not _out_of_memory(error):
            raise
        args.parser.error(f"this machine ran out of memory ({_first_line(error)[:120]}): use a "
                          f"smaller --batch, --seq or --layers")
    except BrokenPipeError:  # the reader went away (`ckpt-course plan ... | head`): not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as error:  # a write that failed anyway (disk full, a file that went away)
        args.parser.error(f"{error.strerror or error}: {error.filename or ''} (check the path "
                          f"and free space)")


def build_main(argv=None) -> int:
    """``ckpt-course build-exercises`` (kept for callers of ``authoring.build_main``)."""
    return main(["build-exercises", *(argv or [])])


def grade_main(argv=None) -> int:
    """``ckpt-course grade`` (kept for callers of ``grading.grade_main``)."""
    return main(["grade", *(argv or [])])


if __name__ == "__main__":
    sys.exit(main())
