"""One watched forward of the model, before any block is measured: how it calls its blocks,
what it hands them, and the refusals of what the planner cannot predict exactly.

``_record_calls(model, blocks, batch)`` runs one plain forward (and loss) with hooks on the
blocks and returns what ``costs.measure_costs`` measures each block with: its input and the last
block's output (copies), the arguments the model passes it besides the hidden state
(``_outside_tensors``), the autocast it runs under (``_autocast_state``), whether the model adds
each block's input to its output (``_Joints``), the parameters the step's backward reaches and
those the code before and after the blocks uses (``_trunk_parameters``). From these,
``_given_gradients`` says which gradients each block's backward finds already there or makes
for others (``_Given``: weights tied to a later block, parameters the model passes it), and
``_last_users`` which block makes the gradient of a passed tensor that carries the model's graph.

While it watches, it refuses in one line, before any block is measured, what no term of the
memory model holds: a block that returns a view of a larger tensor (``_refusing_views``) or
changes its input in place (``_refusing_inplace_inputs``), a block run inside the model's own
checkpoint (``_refuse_own_checkpoint``), blocks not run once each in list order, blocks that all
return their input, code between the blocks other than ``x = block(x)`` or ``x = x + block(x)``,
a suffix that reads a tensor made before the last block returned
(``_refuse_suffix_reaching_back``), a tensor with a graph kept on a block
(``_graphs_kept_on``), a tensor the forward makes and passes the blocks, and blocks whose work
differs from one random draw to another (``_check_same_work_every_draw``: stochastic depth).
``check_no_policy`` and ``_check_distinct`` refuse a block list before anything runs.

Separate from ``costs.py`` because it measures nothing: it says what the model does around its
blocks and whether the planner may plan on it at all; ``costs.py`` then measures each block as
recorded here. It imports nothing from ``costs`` (``costs`` imports it).
"""

from __future__ import annotations

import contextlib
import gc
import random
import sys
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from . import step


def _record_calls(model: nn.Module, blocks, batch):
    """One plain forward of the model, watched: each block's input (a copy), the last block's
    output (a copy), what the model passes each block besides the hidden state (``extras``),
    and the parameters the step's backward reaches (``_parameters_reached``). Refuses, in one
    line, what the memory model cannot predict (``_refuse_suffix_reaching_back``,
    ``_outside_tensors``)."""
    inputs, outputs, order, extras, first, made, marks = [], [], [], [], [], [], {}
    autocasts = []
    uses = (set(), set())
    outside = _checkpoint_context()
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(),
                                                      *batch] if not isinstance(t, FakeTensor)}

    def grab_input(module, args, kwargs):
        order.append(index[id(module)])
        _refuse_own_checkpoint(index[id(module)], outside)
        marks.setdefault("before", _next_sequence_number())
        if args and isinstance(args[0], torch.Tensor):
            inputs.append(args[0].detach().clone().requires_grad_(args[0].requires_grad))
            extras.append(_outside_tensors(index[id(module)], args[1:], kwargs, owned, made))
            autocasts.append(_autocast_state())
            if not first and not isinstance(args[0], FakeTensor):  # fake: no pointers
                first.append(args[0].untyped_storage().data_ptr())

    def grab_output(module, args, out):
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"block {len(blocks) - 1} ({type(module).__name__}) returns "
                             f"{type(out).__name__}, not a tensor: the planner measures blocks "
                             f"that take the hidden state first and return the next one")
        # refused below, after the random-draw check (a block skipped at random is named)
        marks["through"] = bool(first) and out.untyped_storage().data_ptr() == first[0]
        outputs.append(out.detach().clone())
        marks.update(last=out.grad_fn, after=_next_sequence_number())

    index = {id(b): k for k, b in enumerate(blocks)}
    joints = _Joints(blocks)
    handles = [b.register_forward_pre_hook(grab_input, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(grab_output))
    try:
        with torch.random.fork_rng(devices=[]), _refusing_views(blocks), \
                _refusing_inplace_inputs(blocks), joints.watching():
            drawn = _random_states()
            loss = model.loss(batch)
            drawn = _random_states() != drawn  # the forward drew random numbers
            trained = _parameters_reached(loss)
            residual = joints.residual()  # refuses other code between the blocks, first
            if (summed := joints.last_sum()) is not None:  # the suffix starts after the add
                marks["last"] = summed.grad_fn
            kept = _graphs_kept_on(blocks)
            _refuse_suffix_reaching_back(loss, marks.get("last"), marks.get("after"), kept)
            if kept:  # read by nobody, it still holds its graph's memory past the forward
                raise ValueError(
                    f"{next(iter(kept.values()))} keeps a tensor with a graph after the "
                    f"forward (an attention map or input kept for a plot?): it holds that "
                    f"graph's memory, which the planner does not predict; drop it while "
                    f"planning, or keep it outside the step")
            if "after" in marks:
                uses = _trunk_parameters(loss, marks["before"], marks["after"])
            del loss
            marks.pop("last", None)
    finally:
        for h in handles:
            h.remove()
    del joints, summed  # they hold the ops' tensors: one the forward made must be free to die
    if drawn:
        _check_same_work_every_draw(model, batch, blocks)
    if marks.get("through"):
        raise ValueError("every block returns its input (nn.Identity, Dropout(0), ...): there "
                         "is nothing to checkpoint; give the planner a block list with at least "
                         "one block that computes its output")
    _check_block_order(order, len(blocks), len(inputs))
    if made:  # the forward's own reference cycles (closures, frames) must not keep one alive
        gc.collect()
    for k, name, ref, nbytes in made:
        if ref() is None:
            raise ValueError(
                f"block {k} gets {name}, a tensor the model makes in its forward ({nbytes:,} B), "
                f"besides the hidden state: a block that saves it, or a checkpoint, keeps it "
                f"into backward, which the planner does not predict; "
                f"{_made_tensor_fix(model)}")
    return inputs, outputs, extras, trained, uses, autocasts, residual



def _made_tensor_fix(model: nn.Module) -> str:
    """What to do about a tensor the forward makes and passes the blocks: in a Hugging Face
    model it is transformers' own mask (GPT-2's eager attention builds a float one), which the
    learner does not write; in their own model, a buffer made once."""
    if type(model).__name__ == "HFCausalLM":
        return "build the model with attn='sdpa' (hf.build(config, attn='sdpa'))"
    return ("make it once as a buffer (self.register_buffer(..., persistent=False)) or inside "
            "each block")



def _parameters_reached(loss) -> set[int] | None:
    """The ids of the parameters the backward of ``loss`` gives a gradient (its graph's leaves).
    A parameter the forward never uses (a pooler or second head left unused) gets none, and
    torch's optimizers keep no state for a parameter without a gradient."""
    if not isinstance(loss, torch.Tensor):
        return None  # not a loss this can read: every parameter, as before
    reached, seen, todo = set(), set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf that gets a gradient
            reached.add(id(node.variable))
        todo += [n for n, _ in node.next_functions]
    return reached



def _trunk_parameters(loss, before: int, after: int) -> tuple[set[int], set[int]]:
    """The ids of the parameters the prefix (nodes made before the first block ran) and the
    suffix (made after the last block returned) use, from the graph of ``loss``."""
    prefix, suffix, seen, todo = set(), set(), set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen or hasattr(node, "variable"):
            continue
        seen.add(node)
        at = node._sequence_nr()
        for child, _ in node.next_functions:
            if hasattr(child, "variable") and (at < before or at >= after):
                (prefix if at < before else suffix).add(id(child.variable))
            todo.append(child)
    return prefix, suffix



_AUTOCAST_DEVICES = ("cpu", "cuda")



def _autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    """The autocast regions open now: (device type, dtype) of each enabled one. A model that
    runs its blocks under ``torch.autocast`` (mixed precision in its forward) has them cast
    their matmuls' inputs: a block measured outside it is not the block the model runs."""
    return tuple((device, torch.get_autocast_dtype(device)) for device in _AUTOCAST_DEVICES
                 if torch.is_autocast_enabled(device))



@dataclass(frozen=True, eq=False)
class _Given:
    """The gradients a block's backward finds already there, or makes for others: ``names``,
    its own parameters tied to a later block (``_tied_to_later``); ``outside``, parameters the
    model passes it as arguments (a shared gate), each with whether its gradient exists when
    the block's backward starts (a later block or the suffix made it: the block adds into it
    in place) or is the block's to make (it counts it, once, as tied weights are counted)."""

    names: frozenset = frozenset()
    outside: tuple = ()  # ((parameter, exists), ...)

    def __contains__(self, name) -> bool:
        return name in self.names

    def _key(self):
        return self.names, tuple((id(p), exists) for p, exists in self.outside)

    def __eq__(self, other):
        return isinstance(other, _Given) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())



def _given_gradients(blocks, extras, prefix: set[int], suffix: set[int]) -> list[_Given]:
    """Per block, the gradients its backward finds or makes (``_Given``): its own weights tied
    to a later block, and the parameters the model passes it. Backward runs the blocks last to
    first, after the suffix: a passed parameter's gradient exists for a block if the suffix or
    a later block uses it, and is the block's to make otherwise. One the prefix uses too would
    get its gradient from the last block and be counted by the prefix again: refused."""
    passed = [_tensors_in((args, kwargs), True) for args, kwargs in extras]
    later, out = set(suffix), []
    for k in reversed(range(len(blocks))):
        for p in passed[k]:
            if id(p) in prefix and id(p) not in suffix:
                raise ValueError(f"block {k} gets a parameter ({tuple(p.shape)}) that the code "
                                 f"before the blocks uses too: the planner counts a passed "
                                 f"parameter's gradient once, from the last block that uses "
                                 f"it; pass the blocks their own parameter, or leave it out of "
                                 f"the code before the blocks")
        out.append(tuple((p, id(p) in later) for p in passed[k]))
        later |= {id(p) for p in passed[k]}
    tied = _tied_to_later(blocks)
    return [_Given(names, outside) for names, outside in zip(tied, out[::-1], strict=True)]



def _tied_to_later(blocks) -> list[frozenset[str]]:
    """Per block, the names of its parameters that a later block also has (weights tied
    across blocks). Backward runs the later block first, which makes their gradient; this
    block adds into it in place: measured with it there, the block counts it not again."""
    later, out = set(), []
    for block in reversed(blocks):
        named = list(block.named_parameters())
        out.append(frozenset(name for name, p in named if id(p) in later and p.requires_grad))
        later |= {id(p) for _, p in named}
    return out[::-1]



def _tensors_in(value, parameters_only: bool = False) -> list:
    """The tensors in a block's other arguments (``parameters_only``: the leaves that need a
    gradient), each once. A loop, not a recursive closure: that would be a reference cycle,
    keeping the tensors it found alive until the garbage collector ran (a tensor the forward
    made must be free to die when the forward is over)."""
    found, todo = {}, [value]
    while todo:
        value = todo.pop()
        if isinstance(value, (tuple, list)):
            todo.extend(reversed(value))
        elif isinstance(value, dict):
            todo.extend(reversed(list(value.values())))
        elif isinstance(value, torch.Tensor) and (not parameters_only or (
                value.requires_grad and value.grad_fn is None)):
            found.setdefault(id(value), value)
    return list(found.values())



def _last_users(extras) -> list[int]:
    """Per block, the bytes of the graph-carrying arguments (``_carries_graph``) it is the last
    block to get (``LayerCost.extra_grad_bytes``)."""
    last = {}
    for k, (args, kwargs) in enumerate(extras):
        for t in [*args, *kwargs.values()]:
            if _carries_graph(t):
                last[id(t)] = (k, t.untyped_storage().nbytes())
    out = [0] * len(extras)
    for k, nbytes in last.values():
        out[k] += nbytes
    return out



def _carries_graph(t) -> bool:
    """A tensor made by the model's own differentiable code (not a leaf such as a parameter)."""
    return isinstance(t, torch.Tensor) and t.requires_grad and not t.is_leaf



def _next_sequence_number() -> int:
    """The sequence number autograd gives the next node it makes: nodes made before are
    numbered lower (per thread, in the order they are made)."""
    with torch.enable_grad():
        return (torch.empty(0, requires_grad=True) * 1).grad_fn._sequence_nr()



def _refuse_suffix_reaching_back(loss, last, after, kept=None) -> None:
    """Refuses a suffix whose backward sends a gradient past the blocks, straight to the
    prefix or into a block (``head(x + x0)``, a skip from x_0 to the head): that gradient waits
    there until the blocks' backward has run, which the memory model does not hold. ``kept``:
    the graphs of tensors the blocks keep on themselves (``_graphs_kept_on``), named when the
    gradient reaches one (an auxiliary loss stored on the block and summed after it)."""
    if not isinstance(loss, torch.Tensor) or loss.grad_fn is None or last is None:
        return
    seen, todo = {last}, [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # a leaf's gradient: parameters are counted elsewhere
            continue
        if node._sequence_nr() < after and node in (kept or {}):
            raise ValueError(
                f"{kept[node]} stores a tensor with a graph that the model reads after the "
                f"blocks (e.g. an auxiliary loss kept on the block, MoE load-balancing style): "
                f"the planner measures each block alone, where that graph takes no part; add the "
                f"term from the blocks' outputs after them, or plan with it detached "
                f"(.detach()) and leave headroom for it")
        if node._sequence_nr() < after:
            raise ValueError(
                f"the code after the last block uses a tensor made before it returned (its "
                f"{node.name()}; e.g. the prefix's output in head(x + x0)) besides the last "
                f"block's output: that gradient waits through the blocks' backward, which the "
                f"planner does not predict; use only the last block's output after the blocks")
        todo += [n for n, _ in node.next_functions]



def _graphs_kept_on(blocks) -> dict:
    """The autograd nodes of tensors with a graph that the blocks (or their submodules) keep
    as attributes after the forward (``self.aux_loss = ...``), each named by where it is."""
    kept = {}
    for k, block in enumerate(blocks):
        for path, module in block.named_modules():
            for name, value in vars(module).items():
                if name.startswith("_"):  # torch's own: parameters, buffers, hooks
                    continue
                for t in _tensors_in(value):
                    if t.grad_fn is not None:
                        where = f"self.{path + '.' if path else ''}{name}"
                        kept.setdefault(t.grad_fn, f"block {k} ({type(block).__name__}, {where})")
    return kept



@contextlib.contextmanager
def _refusing_inplace_inputs(blocks):
    """Inside, a block that changes its input in place (``x.mul_(0.9)``, ``x += ...``) raises
    a one-line error: a checkpoint recomputes the block from the input it was given, which by
    then holds the changed values (torch raises a multi-line error in backward, or the
    recompute differs)."""
    versions = {}

    def before(module, args):
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_inference():
            versions[id(module)] = args[0]._version

    def after(module, args, out):
        if id(module) in versions and args[0]._version != versions.pop(id(module)):
            k = next(k for k, b in enumerate(blocks) if b is module)
            raise ValueError(f"block {k} ({type(module).__name__}) changes its input in place "
                             f"(e.g. x.mul_(...), x += ..., x[...] = ...): a checkpoint "
                             f"recomputes the block from that input, changed by then; make a "
                             f"new tensor instead (x = x * 0.9)")

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(before),
                                          b.register_forward_hook(after))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()



def _outside_tensors(k: int, args, kwargs, owned: set[int], made: list):
    """Block ``k``'s arguments besides the hidden state, as the block is measured with them.
    A tensor the model makes in its forward (not a parameter, buffer or batch) becomes a copy,
    and a weak reference to it goes to ``made``: if nothing of the model keeps it past the
    forward, only the blocks and checkpoints that keep it decide when it dies, which is refused
    (``_record_calls``). One that carries the model's graph is kept as it is: the block is
    measured with a detached copy and its gradient counted (``costs._called_as_in_model``)."""
    def outside(name, value):
        if isinstance(value, (tuple, list)):
            return type(value)(outside(f"{name}[{i}]", v) for i, v in enumerate(value))
        if isinstance(value, dict):
            return {key: outside(f"{name}[{key!r}]", v) for key, v in value.items()}
        if not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor) or \
                value.untyped_storage().nbytes() == 0 or \
                value.untyped_storage().data_ptr() in owned:
            return value
        if value.requires_grad:
            # a leaf that is no parameter of the model lives all step; one that carries the
            # model's graph is measured as a detached copy (``costs._called_as_in_model``)
            return value
        made.append((k, name, _storage_ref(value), value.untyped_storage().nbytes()))
        return value.detach().clone()

    return tuple(outside(f"argument {i + 2}", a) for i, a in enumerate(args)), \
        {key: outside(f"keyword {key!r}", v) for key, v in kwargs.items()}



def _storage_ref(t):
    return weakref.ref(t.untyped_storage())



def _random_states() -> list:
    """The global random streams (torch's CPU one and each CUDA device's in use, Python's
    ``random``, numpy's if loaded: LayerDrop is often drawn with ``np.random``), to tell whether
    a forward drew from them."""
    states = [torch.random.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += torch.cuda.get_rng_state_all()
    out = [t.tolist() for t in states] + [random.getstate()]
    if (np := sys.modules.get("numpy")) is not None:
        kind, keys, pos, *_ = np.random.get_state()
        out.append((kind, keys.tobytes(), pos))
    return out



class _OpCount(TorchDispatchMode):
    """Counts the ops run under it."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))



_DRAWS = 4  # forwards under different random draws compared (a block skipped with p = 0.5
# looks the same in all four with probability 1/8; three such blocks, 1/512)


def _work_per_draw(model, batch, blocks) -> list[tuple[int, bool, int, tuple]]:
    """The blocks' work in one training forward (no autograd graph): per block call, (block,
    did it return its input, how many ops it ran, the shape of what it returned)."""
    index, counter, started, calls = {id(b): k for k, b in enumerate(blocks)}, _OpCount(), {}, []

    def begin(module, args):
        started[id(module)] = counter.ops, args[0] if args else None

    def end(module, args, out):
        ops, x = started.pop(id(module))
        calls.append((index[id(module)], out is x, counter.ops - ops,
                      tuple(getattr(out, "shape", ()))))

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(begin),
                                           b.register_forward_hook(end))]
    try:
        with torch.no_grad(), counter:
            model.loss(batch)
    finally:
        for h in handles:
            h.remove()
    return calls



def _check_same_work_every_draw(model, batch, blocks) -> None:
    """For a model whose forward draws random numbers: the blocks do the same work under
    ``_DRAWS`` different draws, or a one-line error. A block skipped on a random draw
    (stochastic depth, LayerDrop) keeps nothing in one step and its tape in the next: a plan
    measured on one draw does not hold for the others (dropout draws, but its work is fixed)."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    draws = []
    for seed in range(_DRAWS):
        with step.seeded(seed, f"cuda:{devices[0]}" if devices else None):
            draws.append(_work_per_draw(model, batch, blocks))
    for other in draws[1:]:
        if other != draws[0]:
            k, what = _first_difference(draws[0], other)
            raise ValueError(
                f"block {k} ({type(blocks[k]).__name__}) does different work from one random "
                f"draw to another (stochastic depth or LayerDrop?): it {what}, so no plan "
                f"measured on one draw holds at every step; plan with its drop probability at "
                f"0, its worst case (set it to 0 while planning, then back)")



def _first_difference(a: list, b: list) -> tuple[int, str]:
    """(block, what it did differently) between two draws' ``_work_per_draw``."""
    ran = sorted({k for k, *_ in a} ^ {k for k, *_ in b})
    if ran:
        return ran[0], "ran in one training forward and not in another"
    for (k, returned_a, ops_a, shape_a), (_, returned_b, ops_b, shape_b) in zip(a, b,
                                                                              strict=False):
        if returned_a != returned_b:
            return k, "returned its input in one training forward and not in another"
        if ops_a != ops_b:
            return k, f"ran {ops_a} ops in one training forward and {ops_b} in another"
        if shape_a != shape_b:
            return k, (f"returned shape {list(shape_a)} in one training forward and "
                       f"{list(shape_b)} in another")
    return a[0][0], "ran a different number of times in two training forwards"



class _Joints:
    """What the model's own code does between block k's output and block k+1's input, watched
    op by op while it runs: nothing (``x = block(x)``: block k+1 gets block k's output), or
    one add of block k's input and output (``x = x + block(x)``: the residual added by the
    model's loop, then the next block's input), which ``residual()`` reports per block and
    the blocks are measured with. Anything else there is code the planner does not measure,
    refused in one line (``residual``)."""

    def __init__(self, blocks):
        self.blocks, self.n = blocks, len(blocks)
        self.inputs, self.outputs, self.sums = {}, {}, {}
        self.after: dict[int, list] = {}  # per block: the ops run since it returned
        self.kinds: dict[int, str] = {}
        self.last = None  # the block that returned last

    @contextlib.contextmanager
    def watching(self):
        joints = self

        class Watch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                joints._op(func, args, kwargs or {}, out)
                return out

        def entered(module, args):
            k = self._index(module)
            if args and isinstance(args[0], torch.Tensor):
                self.inputs[k] = args[0]
            if k > 0:
                self.kinds[k - 1] = self._kind(k - 1, args[0] if args else None)
            self.last = None

        def returned(module, args, out):
            k = self._index(module)
            self.outputs[k], self.after[k], self.last = out, [], k

        # first in, last out: what other hooks do (copies of the block's input) is no op of
        # the model's own code
        handles = [h for b in self.blocks for h in (
            b.register_forward_pre_hook(entered, prepend=True), b.register_forward_hook(returned))]
        try:
            with Watch():
                yield
        finally:
            for h in handles:
                h.remove()

    def _index(self, module) -> int:
        return next(k for k, b in enumerate(self.blocks) if b is module)

    def _op(self, func, args, kwargs, out) -> None:
        if self.last is not None:
            self.after[self.last].append((func, args, kwargs, out))

    def _kind(self, k: int, given) -> str:
        """"chain", "residual" or "other": how block k's output reached block k+1 (``given``:
        what block k+1 got; None: after the last block, where the suffix starts)."""
        out = self.outputs.get(k)
        if isinstance(out, (tuple, list)):  # a Hugging Face layer's (hidden state, ...)
            out = next((t for t in out if isinstance(t, torch.Tensor)), None)
        if not isinstance(out, torch.Tensor):
            return "chain"  # (refused where the hidden state is taken: grab_output)
        if given is not None and _same_tensor(given, out):
            return "chain"
        ops = self.after.get(k, [])
        first = ops[0] if ops else None
        adds = first is not None and first[0] is torch.ops.aten.add.Tensor and \
            first[2].get("alpha", 1) == 1 and len(first[1]) == 2 and \
            all(isinstance(t, torch.Tensor) for t in first[1]) and \
            {_tensor_id(t) for t in first[1]} == {_tensor_id(self.inputs.get(k)),
                                                  _tensor_id(out)} and \
            first[3].shape == out.shape
        if given is None:
            return "residual" if adds else "chain"
        return "residual" if adds and len(ops) == 1 and _same_tensor(given, first[3]) \
            else "other"

    def last_sum(self):
        """The model's add after the last block (``x = x + block(x)``), or None: where the
        code after the blocks starts."""
        k = self.n - 1
        if self.n and self._kind(k, None) == "residual":
            return self.after[k][0][3]
        return None

    def residual(self) -> list[bool]:
        """Per block: is its output added to its input by the model (``x = x + block(x)``)?
        Refuses, in one line, a model with other code between its blocks."""
        if self.n:
            self.kinds[self.n - 1] = self._kind(self.n - 1, None)
        for k in range(self.n - 1):
            if self.kinds.get(k) == "other":
                raise ValueError(
                    f"block {k + 1} does not get block {k}'s output, nor block {k}'s input plus "
                    f"its output: the model's own code between the blocks does something the "
                    f"planner does not measure; write the loop as `x = block(x)` or "
                    f"`x = x + block(x)` and move that code into the blocks")
        adds = [self.kinds.get(k) == "residual" for k in range(self.n)]
        if any(adds) and not all(adds):
            added = [k for k, a in enumerate(adds) if a]
            raise ValueError(
                f"the model adds the input to the output of blocks {added} "
                f"only (x = x + block(x)), not of the others: the planner measures a loop that "
                f"does the same after every block; move the add into the blocks that need it")
        return adds



def _tensor_id(t) -> tuple | None:
    if not isinstance(t, torch.Tensor):
        return None
    if isinstance(t, FakeTensor):  # no pointers: the same tensor object
        return (("fake", id(t)), t.storage_offset(), tuple(t.shape), t.dtype)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)



def _same_tensor(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
        _tensor_id(a) == _tensor_id(b)



def _check_distinct(blocks) -> None:
    """One module listed at several places (weights shared across depth, as in ALBERT) would
    be measured, hooked and placed as if it were several."""
    first = {}
    for k, block in enumerate(blocks):
        if id(block) in first:
            raise ValueError(f"blocks {first[id(block)]} and {k} are the same module (weights "
                             f"shared across depth): the planner measures and places distinct "
                             f"blocks; give each place in the list its own module")
        first[id(block)] = k



@contextlib.contextmanager
def _refusing_views(blocks):
    """Inside, a block that returns a view of a larger tensor (a slice of its storage) raises
    a one-line error. The memory model counts a block's output as the next block's input and
    frees it as one tensor, but a slice keeps its whole storage alive for as long as anything
    holds the slice, and which op frees that storage depends on who else saved it: no term of
    the model holds that exactly (predicted peaks were off both ways), so it is refused."""

    def check(module, args, out):
        if not isinstance(out, torch.Tensor) or isinstance(out, FakeTensor):
            return
        whole, own = out.untyped_storage().nbytes(), out.numel() * out.element_size()
        if whole > own:
            k = next(k for k, b in enumerate(blocks) if b is module)
            raise ValueError(f"block {k} ({type(module).__name__}) returns a view of a larger "
                             f"tensor ({own:,} B of a {whole:,} B storage), which the planner "
                             f"cannot predict exactly: return a tensor of its own, e.g. "
                             f"out[..., :w].contiguous() or out.clone()")

    handles = [b.register_forward_hook(check) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()



def check_no_policy(blocks, then: str) -> None:
    """Before any work: a block under a policy of this package would be measured under it
    (or refused as running inside a checkpoint, for the wrong reason), and a plan could not
    be installed on top. ``then``: what to do once it is undone."""
    from .policies import _installed

    for k, block in enumerate(blocks):
        if (forward := _installed(block)) is not None:
            raise ValueError(f"block {k} already runs under policy '{forward.handle.policy}': "
                             f"undo it first (report.undo(), or remove() on apply_policy's "
                             f"handle), then {then}")



def _checkpoint_context() -> tuple[int, object]:
    """Where torch's checkpointing shows while code runs: the frames of
    ``torch.utils.checkpoint`` on the stack (its ``checkpoint``, reentrant or not, and
    ``checkpoint_sequential``) and the innermost saved-tensor hooks (a non-reentrant
    checkpoint's, a composable ``checkpoint(module)``'s, ``save_on_cpu``'s)."""
    frame, frames = sys._getframe(1), 0
    while frame is not None:
        frames += frame.f_code.co_filename == _CHECKPOINT_FILE
        frame = frame.f_back
    return frames, torch._C._autograd._top_saved_tensors_default_hooks(False)



_CHECKPOINT_FILE = sys.modules[checkpoint.__module__].__file__



def _refuse_own_checkpoint(k: int, outside: tuple[int, object]) -> None:
    """Block ``k`` starts in the measuring pass, where the planner has installed nothing: a
    checkpoint (or saved-tensor hooks) there beyond those around the pass (``outside``) is the
    model's own. Measured as plain, the model's peak would be over-predicted, and a placement
    would checkpoint inside the model's checkpoints: refused before any work."""
    frames, hooks = _checkpoint_context()
    if frames > outside[0]:
        raise ValueError(f"block {k} runs inside torch.utils.checkpoint already: remove it and "
                         f"let the planner choose")
    if hooks is not None and hooks != outside[1]:
        raise ValueError(f"block {k} runs under saved-tensor hooks the model sets (a "
                         f"checkpoint or save_on_cpu of its own): remove them and let the "
                         f"planner choose")



def _check_block_order(order: list[int], n: int, tensors: int) -> None:
    """The chain the planner plans: each block once per forward, in list order, its first
    argument a tensor (the hidden state)."""
    if order != list(range(n)):
        shown = ", ".join(map(str, order[:12])) + (", ..." if len(order) > 12 else "")
        raise ValueError(f"the planner needs each of the {n} blocks to run once per forward, "
                         f"in list order; this model ran blocks [{shown}]: give the blocks in "
                         f"the order they run, or a model whose forward calls each once")
    if tensors != n:
        raise ValueError("a block was called without a tensor as its first argument: the "
                         "planner measures blocks that take the hidden state first")
