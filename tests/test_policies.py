import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint_sequential,
    create_selective_checkpoint_contexts,
)

from ckpt_course.models import GPTConfig, HandTraceNet, Llama, TinyGPT, llama_config
from ckpt_course.policies import (
    EveryK,
    NoCheckpoint,
    Offload,
    Segments,
    Selective,
    Sqrt,
    applied,
    apply_policy,
    parse_policy,
)
from ckpt_course.recompute import OpCounter

POLICIES = ["none", "full", "every-2", "every-3", "sqrt", "selective:save=mm",
            "selective:save=mm,sdpa", "selective:recompute=sdpa", "attn-core",
            "selective:save=mm,softmax,dropout", "selective:recompute=mm", "offload"]


def gpt(attention, dropout=0.1):
    return TinyGPT(GPTConfig(n_layer=4, d_model=32, n_head=2, seq_len=16, dropout=dropout,
                             attention=attention))


MODELS = {
    "hand": lambda: HandTraceNet(width=16, depth=4),
    "gpt-naive": lambda: gpt("naive"),
    "gpt-sdpa": lambda: gpt("sdpa"),
    "llama-tiny": lambda: Llama(llama_config("llama-tiny")),
}


def small_batch(model):
    g = torch.Generator().manual_seed(0)
    if isinstance(model, HandTraceNet):
        return model.example_batch(8, generator=g)
    return model.example_batch(2, seq_len=16, generator=g)


def gradients(model, batch, seed=1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks in every run
    model.loss(batch).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@functools.cache
def reference(name):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    batch = small_batch(model)
    return model, batch, gradients(model, batch)


# ---------------------------------------------------------------- exact gradients
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", MODELS)
def test_every_policy_gives_bit_identical_gradients(name, policy):
    model, batch, expected = reference(name)
    with applied(model, policy):
        got = gradients(model, batch)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected), policy


def test_without_preserved_rng_state_dropout_gradients_differ():
    model, batch, expected = reference("gpt-naive")
    with applied(model, "segments:0..3;preserve_rng_state=False"):
        got = gradients(model, batch)
    # the recompute drew new dropout masks, so backward used masks forward never applied
    assert not torch.equal(got["blocks.0.mlp.0.weight"], expected["blocks.0.mlp.0.weight"])


def test_naming_ops_alone_is_not_enough_for_selective_dropout():
    """Why ``Selective`` has rules for in-place ops: the naive policy gives wrong gradients.

    Recomputing dropout (bernoulli_) while saving everything else hands the recompute the cached
    mask buffer, refills it, then skips the cached ``div_``: the mask loses its 1/(1-p) scale.
    """
    model, batch, expected = reference("gpt-naive")
    named = {torch.ops.aten.bernoulli_}

    def naive_policy(ctx, op, *args, **kwargs):
        recompute = op.overloadpacket in named
        return CheckpointPolicy.PREFER_RECOMPUTE if recompute else CheckpointPolicy.MUST_SAVE

    class NaiveSelective(EveryK):
        def context_fn(self):
            return create_selective_checkpoint_contexts(naive_policy,
                                                        allow_cache_entry_mutation=True)

    with applied(model, NaiveSelective(1)):
        wrong = gradients(model, batch)
    assert not all(torch.equal(wrong[n], expected[n]) for n in expected)
    with applied(model, "selective:recompute=dropout"):
        right = gradients(model, batch)
    assert all(torch.equal(right[n], expected[n]) for n in expected)


class Chain(nn.Module):
    """Two copies of ``block`` in ``blocks``: a minimal model for selective corner cases."""

    def __init__(self, block):
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class InPlaceOnView(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        y.view(-1).mul_(2)  # in place, through a view, on a matmul's output
        return torch.tanh(y)


class TwoRandomOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        keep = torch.bernoulli(torch.full_like(x, 0.5))  # a functional random op ("dropout")
        y = torch.tanh(self.lin(x * keep))
        return y * torch.rand_like(y)  # a second random op, not named


@pytest.mark.parametrize("block, policy", [
    (InPlaceOnView, "selective:save=mm"),  # mul_ must be replayed on the cached matmul output
    (TwoRandomOps, "selective:save=dropout"),  # rand_like must be cached too, or the RNG shifts
    (TwoRandomOps, "selective:recompute=dropout"),
])
def test_selective_corner_cases_stay_exact(block, policy):
    model, x = Chain(block), torch.randn(4, 8)

    def grads():
        model.zero_grad()
        torch.manual_seed(3)
        model(x).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = grads()
    with applied(model, policy):
        got = grads()
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize("spec, policy", [
    ("none", NoCheckpoint()), ("full", EveryK(1)), ("every-1", EveryK(1)), ("every-2", EveryK(2)),
    (" Every-12 ", EveryK(12)), ("sqrt", Sqrt()), ("offload", Offload()),
    ("selective:save=mm,sdpa", Selective(("mm", "sdpa"), "save")),
    ("selective:recompute=sdpa", Selective(("sdpa",), "recompute")),
    ("attn-core", Selective(("attn-core",), "recompute")),
])
def test_parse_policy(spec, policy):
    assert parse_policy(spec) == policy
    assert parse_policy(str(policy)) == policy  # str() is a spec that parses back
    assert parse_policy(policy) is policy


def test_policy_names_read_as_specs():
    assert [str(parse_policy(s)) for s in ("every-1", "every-4", "selective:save=mm, gelu")] == \
        ["full", "every-4", "selective:save=mm,gelu"]


@pytest.mark.parametrize("spec", ["every-0", "every-x", "every-", "every--1", "bogus", "",
                                  "selective:foo", "selective:save", "selective:keep=mm"])
def test_malformed_policies_say_what_is_accepted(spec):
    with pytest.raises(ValueError, match="every-K") as error:
        parse_policy(spec)
    assert repr(spec) in str(error.value)


@pytest.mark.parametrize("spec", ["selective:save=matmul", "selective:recompute=mm,foo",
                                  "selective:save="])
def test_unknown_op_names_list_the_known_ones(spec):
    with pytest.raises(ValueError, match="known: mm, sdpa, softmax, gelu"):
        parse_policy(spec)


def test_bad_objects_are_refused():
    with pytest.raises(ValueError, match="K >= 1"):
        EveryK(0)
    with pytest.raises(TypeError, match="not int"):
        parse_policy(2)


# ---------------------------------------------------------------- segments
def test_segments():
    assert EveryK(2).segments(5) == [range(0, 2), range(2, 4), range(4, 5)]
    assert EveryK(1).segments(3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert EveryK(8).segments(3) == [range(0, 3)]
    assert NoCheckpoint().segments(4) == []
    # sqrt: K = ceil(sqrt(L))
    assert Sqrt().segments(4) == EveryK(2).segments(4)
    assert Sqrt().segments(9) == EveryK(3).segments(9)
    assert Sqrt().segments(10) == [range(0, 4), range(4, 8), range(8, 10)]
    assert Selective(("mm",)).segments(2) == Offload().segments(2) == [range(0, 1), range(1, 2)]


def test_describe_names_the_boundaries():
    assert parse_policy("every-2").describe(5).startswith(
        "every-2 on 5 blocks: segments [0 1] [2 3] [4], boundaries at blocks 0, 2, 4")
    assert "K = ceil(sqrt(10)) = 4" in parse_policy("sqrt").describe(10)
    assert "nothing checkpointed" in parse_policy("none").describe(3)


def outer_saves(fn):
    """Tensors saved for backward as seen from outside: a checkpointed region shows only its
    input (checkpoint keeps it to re-run the region); what the region saves stays inside."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


def test_last_segment_is_checkpointed_unlike_checkpoint_sequential():
    model = HandTraceNet(width=16, depth=4)
    x, y = small_batch(model)
    with applied(model, "every-2"):
        saves = outer_saves(lambda: model.loss((x, y)))
    # the two segments' inputs (x, block 1's output), then mse_loss's input and target
    assert len(saves) == 2 + 2 and saves[0] is x and saves[3] is y
    # torch's checkpoint_sequential runs its last segment plainly: blocks 2 and 3 each save
    # addmm's input and weight.t(), and ReLU's output.
    seq = nn.Sequential(*model.blocks)
    saves = outer_saves(lambda: checkpoint_sequential(seq, 2, x, use_reentrant=False))
    assert len(saves) == 1 + 2 * 3


# ---------------------------------------------------------------- apply and remove
def test_remove_restores_the_model_exactly():
    model = gpt("sdpa").eval()
    x = small_batch(model)[0]
    before_out, before_state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    before_tree = repr(model)
    handle = apply_policy(model, "every-2")
    assert "forward" in vars(model.blocks[0]) and "forward" in vars(model.blocks[1])
    assert torch.equal(model(x), before_out)
    handle.remove()
    handle.remove()  # twice is harmless
    assert all("forward" not in vars(b) for b in model.blocks)
    assert torch.equal(model(x), before_out)
    assert repr(model) == before_tree
    state = model.state_dict()
    assert list(state) == list(before_state)
    assert all(torch.equal(state[k], before_state[k]) for k in state)


def test_applied_removes_even_on_error():
    model = HandTraceNet(width=16, depth=4)
    with pytest.raises(KeyError), applied(model, "full") as handle:
        assert "forward" in vars(model.blocks[3])
        raise KeyError("boom")
    assert all("forward" not in vars(b) for b in model.blocks)
    assert handle.policy == EveryK(1)
    apply_policy(model, "sqrt").remove()  # free to apply again


def test_applying_twice_asks_to_remove_first():
    model = HandTraceNet(width=16, depth=4)
    with applied(model, "none"):
        with pytest.raises(RuntimeError, match=r"already runs under policy 'none'.*remove\(\)"):
            apply_policy(model, "full")
    model.blocks[1].forward = lambda x: x  # someone else's wrapper
    with pytest.raises(RuntimeError, match="block 1 already has an instance-level forward"):
        apply_policy(model, "full")


def test_model_without_blocks_gets_a_clear_error():
    message = r"give the model a `blocks` nn.ModuleList .* or pass blocks= explicitly"
    with pytest.raises(ValueError, match=message):
        apply_policy(nn.Sequential(nn.Linear(4, 4)), "full")
    empty = HandTraceNet(width=4, depth=0)
    with pytest.raises(ValueError, match=message):
        apply_policy(empty, "full")


def test_explicit_blocks():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    x = torch.randn(3, 8, requires_grad=True)
    expected = torch.autograd.grad(model(x).sum(), [x, *model.parameters()])
    with applied(model, "every-2", blocks=list(model)):
        assert len(outer_saves(lambda: model(x))) == 2  # the inputs of [0 1] and [2]
        got = torch.autograd.grad(model(x).sum(), [x, *model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


# ---------------------------------------------------------------- offload
def test_offload_moves_each_saved_activation_once_each_way():
    batch, width, depth = 8, 16, 4
    model = HandTraceNet(width=width, depth=depth)
    x, y = small_batch(model)
    # What the blocks save, without parameters: the input x and each ReLU's output (the next
    # block's addmm saves that same tensor again): 1 + depth tensors of batch x width fp32.
    expected_bytes = (1 + depth) * batch * width * 4
    ops = OpCounter()
    with applied(model, "offload") as handle:
        with ops:
            loss = model.loss((x, y))
        assert "aten.clone" not in ops.ops  # host copies are invisible to dispatch modes
        assert handle.stats.bytes_to_host == expected_bytes
        assert handle.stats.tensors_to_host == 1 + depth
        assert handle.stats.bytes_to_device == 0
        with OpCounter() as back:
            loss.backward()
    assert back.ops["aten.clone"] == 1 + depth  # each copy back is a new device tensor
    assert handle.stats.bytes_to_device == expected_bytes
    assert handle.stats.tensors_to_device == 1 + depth
    assert str(handle.stats) == "to host 2.50 KiB (5 tensors), back 2.50 KiB (5 tensors)"


def test_offload_keeps_nothing_but_parameters_on_the_device_tape():
    model = HandTraceNet(width=16, depth=2)
    x, y = small_batch(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with applied(model, "offload"):
        saved = []
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                         lambda t: t)
        with hooks:
            model(x)
    # the offload hooks are innermost, so an outer hook sees nothing from inside the blocks
    assert saved == []
    with applied(model, "offload") as handle:
        model(x).sum().backward()
    assert handle.stats.bytes_to_host == 3 * 8 * 16 * 4  # x, relu1, relu2
    assert all(p.grad is not None for p in model.parameters())
    assert params == {p.untyped_storage().data_ptr() for p in model.parameters()}


def test_offload_moves_what_the_tape_says_the_blocks_save():
    from ckpt_course.tape import record_tape

    model, batch, _ = reference("gpt-naive")
    tape = record_tape(model.loss, batch, model=model)
    in_blocks = sum(e.nbytes for e in tape.entries
                    if not e.is_param and e.module.startswith("blocks"))
    with applied(model, "offload") as handle:
        model.loss(batch).backward()
    assert handle.stats.bytes_to_host == handle.stats.bytes_to_device == in_blocks > 0


# ---------------------------------------------------------------- blocks with keyword arguments
class DecoderLayer(nn.Module):
    """Shaped like a Hugging Face decoder layer: hidden states, keyword tensors (a mask, rotary
    cos/sin), a non-tensor flag and a per-layer keyword; returns a tuple or a tensor."""

    def __init__(self, index, d=16, as_tuple=True):
        super().__init__()
        self.index, self.as_tuple = index, as_tuple
        self.norm, self.q, self.k, self.v = (nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d),
                                             nn.Linear(d, d))
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(0.1)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None,
                use_cache=False, layer_idx=None, **kwargs):
        assert layer_idx == self.index and use_cache is False and kwargs == {"cache": None}
        cos, sin = position_embeddings
        h = self.norm(hidden_states)
        q, k = self.q(h) * cos + self.k(h) * sin, self.k(h) * cos - self.q(h) * sin
        att = (q @ k.transpose(-2, -1) / 4 + attention_mask).softmax(-1)
        x = hidden_states + self.drop(self.drop(att) @ self.v(h)) * (1 + layer_idx)
        x = x + self.drop(self.mlp(x))
        return (x, None) if self.as_tuple else x


class Decoder(nn.Module):
    """A model that loops its layers passing keyword arguments, as Hugging Face models do."""

    def __init__(self, as_tuple, n=4, d=16):
        super().__init__()
        self.embed, self.head = nn.Embedding(32, d), nn.Linear(d, 32)
        self.blocks = nn.ModuleList(DecoderLayer(i, d, as_tuple) for i in range(n))
        self.d = d

    def forward(self, idx):
        T = idx.shape[1]
        mask = torch.full((T, T), float("-inf")).triu(1)
        angles = torch.arange(T)[:, None] * torch.arange(self.d)[None] / self.d
        cos, sin = angles.cos(), angles.sin()
        x = self.embed(idx)
        for i, layer in enumerate(self.blocks):
            out = layer(x, attention_mask=mask, position_embeddings=(cos, sin), use_cache=False,
                        layer_idx=i, cache=None)
            x = out[0] if isinstance(out, tuple) else out
        return self.head(x)

    def example_batch(self, batch_size=2, seq_len=None, generator=None):
        idx = torch.randint(32, (batch_size, (seq_len or 8) + 1), generator=generator)
        return idx[:, :-1], idx[:, 1:]

    def loss(self, batch):
        idx, targets = batch
        return nn.functional.cross_entropy(self(idx).flatten(0, 1), targets.flatten())


KWARG_POLICIES = ["none", "full", "every-2", "sqrt", "every-4", "segments:0-1,3",
                  "segments:1-3", "selective:save=mm", "selective:recompute=softmax", "offload"]


@pytest.mark.parametrize("as_tuple", [True, False])
@pytest.mark.parametrize("policy", KWARG_POLICIES)
def test_blocks_with_keyword_arguments_train_with_bit_identical_gradients(policy, as_tuple):
    torch.manual_seed(0)
    model = Decoder(as_tuple).train()
    batch = model.example_batch(generator=torch.Generator().manual_seed(1))
    expected = gradients(model, batch)
    with applied(model, policy):
        got = gradients(model, batch)
        again = gradients(model, batch)  # the region closes: a second step runs the same
    assert all(torch.equal(got[n], expected[n]) and torch.equal(again[n], expected[n])
               for n in expected), policy


@pytest.mark.parametrize("policy", ["every-2", "segments:0-3"])
def test_a_segment_keeps_only_its_inputs_when_blocks_take_keywords(policy):
    """Across a segment of blocks called with keywords, only the segment's inputs stay saved."""
    torch.manual_seed(0)
    model = Decoder(as_tuple=True)
    idx = model.example_batch()[0]
    with applied(model, policy):
        saves = outer_saves(lambda: model(idx))
    segments = parse_policy(policy).segments(4)
    x0 = [t for t in saves if t.shape == (2, 8, 16)]
    assert len(x0) == len(segments)  # one hidden-states input per segment, nothing inside


def test_an_error_inside_a_segment_leaves_no_hooks_installed():
    torch.manual_seed(0)
    model = Decoder(as_tuple=True).train()
    batch = model.example_batch()
    expected = gradients(model, batch)

    def boom(*args, **kwargs):
        raise KeyError("boom")

    with applied(model, "every-4"):
        own = model.blocks[2].forward.run
        model.blocks[2].forward.run = boom
        with pytest.raises(KeyError):
            model.loss(batch)
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        model.blocks[2].forward.run = own
        got = gradients(model, batch)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


@pytest.mark.parametrize("policy", ["every-2", "segments:0-1"])
def test_a_segment_whose_blocks_are_not_chained_says_so(policy):
    model = HandTraceNet(width=8, depth=4)
    x = torch.randn(2, 8)
    with applied(model, policy), pytest.raises(RuntimeError, match="without block 0's output"):
        model.blocks[0](x)
        model.blocks[1](x)  # not block 0's output


# ---------------------------------------------------------------- one vocabulary
ALL_POLICIES = [NoCheckpoint(), EveryK(1), EveryK(3), Sqrt(), Offload(), Selective(("mm",)),
                Selective(("sdpa", "softmax"), "recompute"), Selective(("attn-core",), "recompute"),
                Segments(()), Segments(((0, 2),)), Segments(((0, 1), (1, 2), (2, 3), (5, 7))),
                Segments(((1, 2),), preserve_rng_state=False),
                Segments(((0, 1), (3, 4)), preserve_rng_state=False)]


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=str)
def test_every_policy_type_reads_back_from_its_string(policy):
    assert parse_policy(str(policy)) == policy
    assert parse_policy(f" {str(policy).upper()} ") == policy


def test_segments_text():
    assert str(Segments(((0, 1), (1, 2), (2, 3), (5, 7)))) == "segments:0..2,5-6"
    assert parse_policy("segments:0-2,5") == Segments(((0, 3), (5, 6)))
    assert parse_policy("segments:4..6") == Segments(((4, 5), (5, 6), (6, 7)))
    assert str(Segments(((1, 2),), False)) == "segments:1;preserve_rng_state=False"
    assert Segments.parse("0-1") == Segments(((0, 2),))


@pytest.mark.parametrize("policy", ["every-2", "segments:0-1,3", "offload"])
def test_train_runs_a_model_whose_blocks_take_keywords(policy):
    from ckpt_course.train import train

    def losses(p):
        torch.manual_seed(0)
        return [r.loss for r in train(Decoder(as_tuple=True), p, steps=2, batch_size=2,
                                      progress=False)]

    assert losses(policy) == losses("none")


# ---------------------------------------------------------------- running statistics, updated once
class _NormBlock(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.linear, self.norm, self.drop = nn.Linear(width, width), nn.BatchNorm1d(width), \
            nn.Dropout(0.2)

    def forward(self, x):
        return x + self.drop(torch.relu(self.norm(self.linear(x))))


class _NormNet(nn.Module):
    def __init__(self, momentum=0.1):
        super().__init__()
        self.blocks = nn.ModuleList(_NormBlock() for _ in range(4))
        for block in self.blocks:
            block.norm.momentum = momentum

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


def _norm_step(policy, momentum=0.1):
    torch.manual_seed(0)
    model, x = _NormNet(momentum), torch.randn(32, 16)
    torch.manual_seed(1)
    with applied(model, policy):
        model(x).backward()
        model(x * 2).backward()  # a second step: the statistics move on from the first's
    return [b.clone() for b in model.buffers()], [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("momentum", [0.1, None])  # None: BatchNorm's cumulative average
@pytest.mark.parametrize("policy", ["full", "every-2", "selective:save=mm", "offload",
                                    "menu:0-1=full,2=offload,3=selective:save=mm"])
def test_a_recompute_leaves_running_statistics_as_forward_left_them(policy, momentum):
    plain_buffers, plain_grads = _norm_step("none", momentum)
    buffers, grads = _norm_step(policy, momentum)
    assert all(torch.equal(a, b) for a, b in zip(plain_buffers, buffers, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, grads, strict=True))
    assert int(_NormNet().blocks[0].norm.num_batches_tracked) == 0  # a fresh one starts at 0


class _Counting(nn.Module):
    """Counts its calls in a buffer, in place: a side effect no policy can undo without a copy."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return torch.tanh(self.linear(x))


def test_a_buffer_updated_again_by_the_recompute_is_reported():
    model = nn.Module()
    model.blocks = nn.ModuleList(_Counting() for _ in range(2))
    x = torch.randn(4, 8, requires_grad=True)
    with applied(model, "full"), pytest.warns(UserWarning, match="buffer calls a second time"):
        y = x
        for block in model.blocks:
            y = block(y)
        y.sum().backward()
