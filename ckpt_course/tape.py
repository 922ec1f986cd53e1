"""The activation tape: every tensor autograd saves during a forward pass, for backward to read.

Training memory is dominated by these saved tensors. ``record_tape`` runs a forward pass and lists
them, one row per *storage*, with who saved it::

    tape = record_tape(model, x)      # tape.output is model(x): call backward on it later
    print(tape)                       # module | saved by | shape | dtype | bytes | x saved
    tape.activation_bytes             # what checkpointing can give back

How it works, in three small pieces of real torch machinery:

- ``torch.autograd.graph.saved_tensors_hooks``: autograd hands every tensor it saves to our pack
  hook. We keep nothing extra: pack returns the tensor itself, so memory behaves as without us.
- Forward pre/post hooks on the model's modules tell which module was running at each save.
- A light ``TorchDispatchMode`` logs each aten op, so a save can be named after the op that made
  it, in the words of autograd's node attributes (``AddmmBackward0.mat1``). Autograd saves an op's
  *inputs* just before the op reaches the dispatch mode and its *outputs* just after, so a save
  falling between ops k and k+1 is either an output of op k or an input of op k+1.

Why deduplicate by storage: the raw stream of saves over-counts. ``Linear`` saves ``weight.t()``,
a view of a parameter (no new memory); ReLU saves its output and the next ``addmm`` saves the
same tensor again as ``mat1``. One storage costs memory once, however often it is saved, so every
row is a storage, and ``times_saved`` says how often it was saved.

What the tape does not see: inside a region wrapped in (non-reentrant) ``torch.utils.checkpoint``
the checkpoint installs its own inner hooks, so the tape is "what autograd saved *outside*
checkpointed regions". The live bytes kept under a checkpoint policy are measured by
``ckpt_course.meter``. The tape never unpacks a saved tensor, so it never triggers a recompute.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .units import fmt_bytes


@dataclass(frozen=True)
class TapeEntry:
    """One storage that autograd saved for backward."""

    module: str  # innermost module running at the first save, e.g. "blocks.2.attn" ("" = top level)
    op: str  # the autograd node that saved it, e.g. "AddmmBackward0" (aten name if no node)
    attr: str  # which of the node's saved fields, e.g. "mat1", "result", "logsumexp"
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # bytes of the whole storage: what stays alive until backward
    is_param: bool  # storage of a parameter or buffer of the model: exists anyway, not activation
    times_saved: int  # how many saves pointed at this storage (views and repeats included)
    saved_by: tuple[str, ...] = ()  # every "op.attr" that saved it, in order

    @property
    def label(self) -> str:
        return f"{self.op}.{self.attr}"


@dataclass
class Tape:
    """What one forward pass left on the tape. ``output`` is what the function returned."""

    entries: list[TapeEntry]
    output: object = field(default=None, repr=False)

    @property
    def activation_bytes(self) -> int:
        """Bytes of the unique non-parameter storages: the memory checkpointing can trade away."""
        return sum(e.nbytes for e in self.entries if not e.is_param)

    @property
    def param_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries if e.is_param)

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.param_bytes

    def by_module(self) -> dict[str, int]:
        """Activation bytes per top-level block ("blocks.0", ..., "head"), in forward order."""
        out: dict[str, int] = {}
        for e in self.entries:
            if not e.is_param:
                out[layer_of(e.module)] = out.get(layer_of(e.module), 0) + e.nbytes
        return out

    def to_rows(self) -> list[dict]:
        """One plain dict per entry, for pandas or plotting (dtype as text)."""
        return [dict(asdict(e), dtype=str(e.dtype).removeprefix("torch.")) for e in self.entries]

    def _table(self) -> tuple[list[str], list[list[str]], str]:
        head = ["module", "saved by", "shape", "dtype", "bytes", "x saved", "param"]
        rows = [
            [e.module or "(top)", e.label, "x".join(map(str, e.shape)) or "scalar",
             str(e.dtype).removeprefix("torch."), fmt_bytes(e.nbytes), str(e.times_saved),
             "yes" if e.is_param else ""]
            for e in self.entries
        ]
        total = (f"activations {fmt_bytes(self.activation_bytes)} in "
                 f"{sum(not e.is_param for e in self.entries)} storages; "
                 f"parameters {fmt_bytes(self.param_bytes)} (not counted as activations)")
        if not self.entries:
            total = ("nothing saved: did the forward run under torch.no_grad(), with nothing "
                     "requiring grad, or entirely inside a checkpointed region?")
        return head, rows, total

    def __str__(self) -> str:
        head, rows, total = self._table()
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [head, ["-" * w for w in widths], *rows]
        text = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                for r in lines]
        return "\n".join([*text, total])

    def _repr_html_(self) -> str:
        head, rows, total = self._table()
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
        )
        return f"<table><tr>{th}</tr>{trs}</table><p>{html.escape(total)}</p>"


def record_tape(fn, *args, model: nn.Module | None = None, **kwargs) -> Tape:
    """Run ``fn(*args, **kwargs)`` (a forward pass) and record what autograd saves for backward.

    ``model`` names modules and marks parameters; it defaults to ``fn`` when ``fn`` is a module.
    Run it on real or fake tensors (``FakeTensorMode``); call backward on ``tape.output`` after.
    """
    if not callable(fn):
        raise TypeError(f"record_tape needs a callable that runs the forward pass (a model or a "
                        f"function), got {type(fn).__name__}")
    if model is None and isinstance(fn, nn.Module):
        model = fn
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (it names modules and parameters), "
                        f"got {type(model).__name__}")
    rec = _Recorder(model)
    with rec.module_hooks(), torch.autograd.graph.saved_tensors_hooks(rec.pack, _unpack), rec:
        output = fn(*args, **kwargs)
    return Tape(rec.finish(), output)


# ---------------------------------------------------------------- recording machinery
def _unpack(t):
    return t


def _storage(t: torch.Tensor):
    """The storage object of ``t``; ``id()`` of it identifies the memory (views share it)."""
    try:
        return t.untyped_storage()
    except (NotImplementedError, RuntimeError):  # sparse and wrapper tensors hide their storage
        return _WholeTensor(t)


class _WholeTensor:
    """Stands in for a storage we cannot see: counts the tensor's own elements."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def nbytes(self) -> int:
        return self.t.numel() * self.t.element_size()


def layer_of(module: str) -> str:
    """The layer a module is in: its path down to the first block number. 'blocks.2.attn.qkv'
    -> 'blocks.2'; a Hugging Face model's 'lm.model.layers.2.mlp.act_fn' -> 'lm.model.layers.2'
    (one row per decoder layer, as for the course's models); 'head' -> 'head'; '' -> ''."""
    parts = module.split(".")
    number = next((i for i, part in enumerate(parts) if i and part.isdigit()), None)
    return ".".join(parts[:number + 1]) if number is not None else parts[0]


def _is_saved_tensor(save: list, b) -> bool:
    """Is ``b`` the tensor of ``save`` (the same object, or the same view of the same storage)?
    While a storage object is alive, torch hands out that same object for every view of it."""
    a, storage = save[0], save[1]
    if a is b:
        return True
    return (isinstance(b, torch.Tensor) and _storage(b) is storage and a.dtype == b.dtype
            and a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset())


def _named_tensors(names: list[str], values: list) -> list[tuple[str, torch.Tensor]]:
    """Pair schema names with tensor values; lists of tensors become name[0], name[1], ..."""
    out = []
    for name, v in zip(names, values, strict=False):
        if isinstance(v, torch.Tensor):
            out.append((name, v))
        elif isinstance(v, (list, tuple)):
            out += [(f"{name}[{j}]", x) for j, x in enumerate(v) if isinstance(x, torch.Tensor)]
    return out


class _Op:
    """One aten op as the dispatch mode saw it, with its tensors named as in its schema."""

    def __init__(self, func, args, kwargs, out):
        schema = func._schema
        names = [a.name for a in schema.arguments]
        values = [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
        self.name = func.overloadpacket.__name__  # becomes the autograd node's name in settle()
        self.inputs = _named_tensors(names, values)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        single = len(schema.returns) == 1
        # autograd calls a saved output "result" (one return) or "result0", "result1", ...,
        # unless the schema names it (flash attention returns "output" and "logsumexp")
        self.outputs = [
            ((r.name, "result" if single else f"result{i}"), o)
            for i, (r, o) in enumerate(zip(schema.returns, outs, strict=False))
            if isinstance(o, torch.Tensor)
        ]
        self.saved_outputs: list[tuple[str, torch.Tensor]] = []
        self.custom_function = False  # a Python autograd.Function: it saves via save_for_backward

    def settle(self):
        """Once autograd has finished the op, its outputs carry the node: read its name and which
        outputs it saves (its ``_saved_*`` fields; reading names with dir() unpacks nothing)."""
        node = next((o.grad_fn for _, o in self.outputs if o.grad_fn is not None), None)
        if node is None:
            return
        self.name = node.name()
        self.custom_function = isinstance(node, torch.autograd.function.BackwardCFunction)
        fields = {a.removeprefix("_saved_") for a in dir(node) if a.startswith("_saved_")}
        for names, o in self.outputs:
            saved_as = next((n for n in names if n in fields), None)
            if saved_as is not None:
                self.saved_outputs.append((saved_as, o))

    def forget_tensors(self):
        self.inputs, self.outputs, self.saved_outputs = [], [], []


class _ModuleHooks:
    """Context manager: keep ``stack[-1]`` the dotted name of the innermost running module."""

    def __init__(self, model: nn.Module | None, stack: list[str]):
        self.model, self.stack, self.handles = model, stack, []

    def __enter__(self):
        for name, m in self.model.named_modules() if self.model is not None else []:
            self.handles += [m.register_forward_pre_hook(self._push(name)),
                             m.register_forward_hook(self._pop, always_call=True)]
        return self

    def _push(self, name: str):
        def hook(module, args):
            self.stack.append(name)
        return hook

    def _pop(self, module, args, output):
        self.stack.pop()  # returns None: a forward hook that returns a value replaces the output

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class _Recorder(TorchDispatchMode):
    def __init__(self, model: nn.Module | None):
        super().__init__()
        self.model = model
        self.module_stack = [""]
        self.saves: list[list] = []  # [tensor, storage, module, op, attr], in save order
        self.pending: list[list] = []  # saves since the last op ran: not named yet
        self.prev: _Op | None = None
        self.hidden_ops = False  # did ops run under someone else's hooks since the last op?
        self.state = {}  # storage id -> storage, for the model's parameters and buffers
        for t in [*model.parameters(), *model.buffers()] if model is not None else []:
            storage = _storage(t)
            self.state[id(storage)] = storage

    def module_hooks(self) -> _ModuleHooks:
        return _ModuleHooks(self.model, self.module_stack)

    def pack(self, t: torch.Tensor):
        """Autograd saves ``t``. Keep it and its storage referenced until the end of the
        recording so that storage ids are not reused."""
        save = [t, _storage(t), self.module_stack[-1], None, "?"]
        self.saves.append(save)
        self.pending.append(save)
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = _Op(func, args, kwargs, out)
        if not op.outputs:
            return out  # no tensor out, no autograd node, no saves (fake tensors ask prim.device)
        if torch._C._autograd._top_saved_tensors_default_hooks(True)[0] == self.pack:
            self.op_ran(op)
        else:  # inner hooks (a checkpointed region) take this op's saves: it names none of ours
            self.hidden_ops = True
        return out

    def op_ran(self, op: _Op | None):
        """``op`` ran (autograd saved its inputs just before and saves its outputs next): name
        the saves made since the previous op, then drop references to the previous op's tensors."""
        if self.prev is not None:
            self.prev.settle()  # autograd has finished the previous op by now
        self.name_pending(self.prev, op)
        if self.prev is not None:
            self.prev.forget_tensors()
        if op is not None:
            op.inputs = []
        self.prev = op

    def name_pending(self, prev: _Op | None, op: _Op | None):
        """Saves between ops ``prev`` and ``op`` are first outputs of prev (those its node saves),
        then inputs of op. The order settles a tensor that is both (ReLU output, then addmm)."""
        outputs = list(prev.saved_outputs) if prev is not None else []
        inputs = list(op.inputs) if op is not None else []
        for save in self.pending:
            hit = next((s for s in outputs if _is_saved_tensor(save, s[1])), None)
            if hit is not None:
                outputs.remove(hit)
                save[3], save[4] = prev, hit[0]
                continue
            outputs = []  # once an input was saved, no output of prev can follow
            hit = next((s for s in inputs if _is_saved_tensor(save, s[1])), None)
            if hit is not None:
                inputs.remove(hit)
                save[3], save[4] = op, hit[0]
            elif prev is not None and prev.custom_function:  # saved as apply() returned
                save[3], save[4] = prev, "saved_tensors"
            elif self.hidden_ops:  # non-reentrant checkpoint saves its region's inputs first
                save[3], save[4] = "checkpoint", "input"
        self.pending, self.hidden_ops = [], False

    def finish(self) -> list[TapeEntry]:
        self.op_ran(None)
        rows: dict[int, dict] = {}
        for t, storage, module, op, attr in self.saves:
            op = op.name if isinstance(op, _Op) else op or "?"
            row = rows.get(id(storage))
            if row is None:
                rows[id(storage)] = row = dict(
                    module=module, op=op, attr=attr,
                    shape=tuple(t.shape), dtype=t.dtype, nbytes=storage.nbytes(),
                    is_param=id(storage) in self.state, times_saved=0, saved_by=(),
                )
            row["times_saved"] += 1
            row["saved_by"] += (f"{op}.{attr}",)
        self.saves = []
        return [TapeEntry(**r) for r in rows.values()]
