from collections import Counter

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

from ckpt_course.models import GPTConfig, HandTraceNet, Llama, TinyGPT, llama_config
from ckpt_course.recompute import count_step, counting, measure_recompute

B, W, DEPTH = 8, 16, 4  # HandTraceNet: batch, width, blocks


def hand_net():
    model = HandTraceNet(width=W, depth=DEPTH)
    return model, model.example_batch(B, generator=torch.Generator().manual_seed(0))


def gpt(attention):
    model = TinyGPT(GPTConfig(n_layer=4, d_model=32, n_head=2, seq_len=16, dropout=0.1,
                              attention=attention)).train()
    return model, model.example_batch(2, generator=torch.Generator().manual_seed(0))


def llama():
    model = Llama(llama_config("llama-tiny"))
    return model, model.example_batch(1, seq_len=16, generator=torch.Generator().manual_seed(0))


MODELS = {"hand": hand_net, "gpt-naive": lambda: gpt("naive"), "gpt-sdpa": lambda: gpt("sdpa"),
          "llama-tiny": llama}


def blocks_forward_flops(model, batch) -> int:
    """FLOPs of one forward of the blocks alone: catch each block's input, then re-run it."""
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
             for b in model.blocks]
    with torch.no_grad():
        model.loss(batch)
    for h in hooks:
        h.remove()
    with torch.no_grad(), counting() as c:
        for block, x in zip(model.blocks, inputs, strict=True):
            block(x)
    return c.flops


def test_hand_trace_net_full_recomputes_each_block_once_exactly():
    model, batch = hand_net()
    r = measure_recompute(model, batch, "full")
    # each block again: weight.t() (a view), the Linear's addmm, the ReLU
    assert r.ops == Counter({"aten.t": DEPTH, "aten.addmm": DEPTH, "aten.relu": DEPTH})
    assert r.flops == DEPTH * 2 * B * W * W
    assert r.flops_by_op == {"aten.addmm": DEPTH * 2 * B * W * W}
    # plain step: forward 4 addmm; backward 7 mm (the first block's input needs no gradient)
    assert r.forward_flops == DEPTH * 2 * B * W * W
    assert r.step_flops == (DEPTH + 2 * DEPTH - 1) * 2 * B * W * W
    assert r.overhead == pytest.approx(DEPTH / (3 * DEPTH - 1))
    assert str(r).startswith("full: recomputes 16.38 kFLOP (+36% of a plain step's 45.06 kFLOP)")


def trailing_flops(name, model) -> int:
    """FLOPs of the matmul that ends each block when nothing after it saves a tensor: Llama's
    SwiGLU down-projection w2 (TinyGPT's last Linear is followed by dropout, which saves a mask)."""
    if name != "llama-tiny":
        return 0
    return 2 * 16 * model.cfg.d_ff * model.cfg.d_model  # batch 1 x 16 tokens


@pytest.mark.parametrize("name", MODELS)
def test_full_recomputes_one_forward_of_the_blocks(name):
    model, batch = MODELS[name]()
    forward = blocks_forward_flops(model, batch)
    with set_checkpoint_early_stop(False):  # re-run each region to its end
        assert measure_recompute(model, batch, "full").flops == forward > 0
    # by default torch stops a region's re-run once every saved tensor is rebuilt
    n = len(model.blocks)
    skipped = n * trailing_flops(name, model)
    assert measure_recompute(model, batch, "full").flops == forward - skipped


@pytest.mark.parametrize("name", MODELS)
def test_every_2_on_4_blocks_recomputes_the_same_flops_as_full(name):
    model, batch = MODELS[name]()
    with set_checkpoint_early_stop(False):
        full, every2 = (measure_recompute(model, batch, p) for p in ("full", "every-2"))
    assert every2.flops == full.flops and every2.flops_by_op == full.flops_by_op
    # with early stop, every-2 still re-runs the trailing matmul of each segment's first block
    full, every2 = (measure_recompute(model, batch, p) for p in ("full", "every-2"))
    assert every2.flops - full.flops == 2 * trailing_flops(name, model)


def test_early_stop_skips_a_regions_trailing_ops():
    """A GPT block ends with dropout's multiply (its mask is saved before it runs) and the residual
    add: early stop skips both. every-2 re-runs them in the first block of its 2 segments."""
    model, batch = gpt("sdpa")
    full, every2 = (measure_recompute(model, batch, p) for p in ("full", "every-2"))
    assert every2.ops - full.ops == Counter({"aten.mul": 2, "aten.add": 2})
    assert full.ops - every2.ops == Counter()


def test_selective_save_mm_recomputes_no_matmul():
    model, batch = gpt("naive")
    r = measure_recompute(model, batch, "selective:save=mm")
    assert r.flops == 0 and r.flops_by_op == {}
    assert not {"aten.mm", "aten.addmm", "aten.bmm"} & set(r.ops)
    assert r.ops["aten.gelu"] == 4 and r.ops["aten._softmax"] == 4  # the cheap ops are re-run


def sdpa_forward_flops(cfg, batch, seq) -> int:
    # QK^T and PV, 2 FLOPs per multiply-add, causal mask ignored (as torch counts it)
    return 2 * (2 * batch * cfg.n_head * seq * seq * cfg.head_dim)


def test_cpu_sdpa_flops_are_counted():
    model, batch = llama()
    cfg = model.cfg
    counts = count_step(model, batch)
    sdpa = "aten._scaled_dot_product_flash_attention_for_cpu"
    assert counts.forward.flops_by_op[sdpa] == cfg.n_layer * sdpa_forward_flops(cfg, 1, 16)
    # backward: recompute scores, then 4 more matmuls of the same size
    backward = counts.backward.flops_by_op[sdpa + "_backward"]
    assert backward == cfg.n_layer * sdpa_forward_flops(cfg, 1, 16) * 5 // 2


def test_selective_save_mm_on_llama_recomputes_only_attention():
    model, batch = llama()
    r = measure_recompute(model, batch, "selective:save=mm")
    sdpa = sdpa_forward_flops(model.cfg, 1, 16) * model.cfg.n_layer
    assert r.flops_by_op == {"aten._scaled_dot_product_flash_attention_for_cpu": sdpa}
    assert measure_recompute(model, batch, "selective:save=mm,sdpa").flops == 0


def test_none_and_offload_recompute_nothing():
    model, batch = hand_net()
    assert measure_recompute(model, batch, "none").ops == Counter()
    r = measure_recompute(model, batch, "offload")
    assert r.flops == 0
    assert r.ops == Counter({"aten.clone": DEPTH + 1})  # the copies back from host, no compute


def test_measuring_leaves_no_trace():
    model, batch = gpt("naive")
    model.loss(batch).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    measure_recompute(model, batch, "full")
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all("forward" not in vars(b) for b in model.blocks)


def test_forward_and_backward_are_counted_separately():
    model, batch = hand_net()
    counts = count_step(model, batch)
    assert counts.forward.ops["aten.addmm"] == DEPTH and "aten.mm" not in counts.forward.ops
    assert counts.backward.ops["aten.threshold_backward"] == DEPTH
    assert counts.flops == counts.forward.flops + counts.backward.flops
