"""The step runner: one peak for one placement everywhere, an OOM in any phase undone, seeds that
reproduce, bad input refused before any work."""

import copy
import resource
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

from ckpt_course.costs import measure_costs
from ckpt_course.doctor import DEMO_BATCH, DEMO_CONFIG, demo, doctor, run_steps
from ckpt_course.meter import MemoryMeter
from ckpt_course.models import GPTConfig, HandTraceNet, Llama, TinyGPT, llama_config
from ckpt_course.plan import measure_peaks, predict
from ckpt_course.step import make_batch, make_optimizer, run_step, seeded
from ckpt_course.train import check_gradients, measure_step, train

CFG = GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16, dropout=0.1)


# ---------------------------------------------------------------- one peak everywhere
def test_the_reproduction_fits_where_predict_says():
    """issue 9: step 2's batch used to be made inside the meter and pushed train over budget."""
    model = HandTraceNet()
    budget = predict(measure_costs(model, 512), "none").peak_bytes
    records = train(model, "none", steps=2, batch_size=512, budget=budget, progress=False)
    assert [r.peak_bytes for r in records] == [budget, budget]


@pytest.mark.parametrize("name, batch", [("hand-trace", 64), ("gpt", 4)])
@pytest.mark.parametrize("policy", ["none", "full"])
def test_train_measure_peaks_the_doctor_and_predict_agree(name, batch, policy):
    def fresh():
        with seeded(0):
            return HandTraceNet(width=128) if name == "hand-trace" else TinyGPT(CFG)

    trained = [r.peak_bytes for r in train(fresh(), policy, steps=2, batch_size=batch,
                                           progress=False)]
    doctored = [s.peak_bytes for s in run_steps(fresh(), None, policy, batch, steps=2).steps]
    peaks = measure_peaks(fresh(), policy, batch, steps=2)
    predicted = predict(measure_costs(fresh(), batch), policy).peak_bytes
    assert trained == doctored == peaks  # step 1 (no AdamW state yet) included
    assert trained[1] == predicted


# ---------------------------------------------------------------- an OOM undone, in any phase
def _phase_highs(model, optimizer, batch) -> dict:
    """Highest live bytes above the step's baseline in each phase of one step, run on copies
    (the real ones stay untouched)."""
    with _disable_current_modes():
        model, optimizer = _copies(model, optimizer)
    meter = MemoryMeter(timeline=True)
    with _disable_current_modes(), torch.random.fork_rng(devices=[]), meter:
        meter.track(model, optimizer)
        base = run_step(model, optimizer, batch, meter).baseline_bytes
    meter.untrack()
    highs = {}
    for point in meter.timeline:
        highs[point.phase] = max(highs.get(point.phase, 0), point.live_bytes - base)
    return highs


def _copies(model, optimizer):
    model2 = copy.deepcopy(model)
    optimizer2 = make_optimizer(model2)
    optimizer2.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return model2, optimizer2


@_disable_current_modes()
def _state(model, optimizer):
    """Copies of parameters and optimizer state, made where no meter sees them."""
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [v.clone() for s in optimizer.state.values() for v in s.values()]
    return tensors, [len(s) for s in optimizer.state.values()], torch.get_rng_state()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _counted_bytes(meter, batches) -> int:
    """Bytes of the batches' storages that the meter counts (a view of one, returned by an op,
    makes it count; a batch's tensors may share one storage)."""
    storages = {id(t.untyped_storage()): t.untyped_storage() for b in batches for t in b}
    return sum(s.nbytes() for key, s in storages.items()
               if key in meter._live and meter._live[key]() is s)


PHASE_CASES = {  # phase that fails: (the step it fails in, the model, batch size)
    "forward": (2, lambda: TinyGPT(CFG), 4),
    "backward": (2, lambda: TinyGPT(CFG), 4),
    "optimizer, step 1": (1, lambda: TinyGPT(CFG), 1),  # AdamW creates its state
    "optimizer, later": (2, lambda: TinyGPT(CFG), 1),  # small activations: the update peaks
}
EARLIER = {"forward": [None], "backward": [None, "forward"],
           "optimizer, step 1": [None, "forward", "backward"],
           "optimizer, later": [None, "forward", "backward"]}


def _oom_cycles(case: str, cycles: int) -> None:
    fail_step, build, batch_size = PHASE_CASES[case]
    with seeded(0):
        model = build()
    reference = copy.deepcopy(model)
    batches = [make_batch(model, batch_size, generator=torch.Generator().manual_seed(k))
               for k in range(2)]

    with seeded(1):  # a fresh run: the losses a retry must reproduce
        ref_opt = make_optimizer(reference)
        expected = [run_step(reference, ref_opt, b).loss for b in batches]

    optimizer = make_optimizer(model)
    meter = MemoryMeter()
    rss = []
    with seeded(1), meter:
        meter.track(model, optimizer)
        losses = []
        for step, batch in enumerate(batches, start=1):
            if step == fail_step:
                highs = _phase_highs(model, optimizer, batch)
                above = max(highs.get(p, 0) for p in EARLIER[case])
                phase = case.split(",")[0]
                assert highs[phase] > above, "the case must overflow in its phase"
                model.zero_grad(set_to_none=True)
                budget = meter.live_bytes + above  # the step's baseline + what it may add
                for _ in range(cycles):
                    before = _state(model, optimizer)
                    meter.budget = budget
                    with pytest.raises(torch.OutOfMemoryError) as caught:
                        run_step(model, optimizer, batch, meter, step=step)
                    assert caught.value.phase == phase
                    del caught  # its traceback would keep the failed step's frames
                    meter.budget = None
                    after = _state(model, optimizer)
                    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0],
                                                                 strict=True))
                    assert before[1] == after[1] and torch.equal(before[2], after[2])
                    assert all(p.grad is None for p in model.parameters())
                    # live: parameters, the optimizer state that exists and the batch the
                    # caller holds (if an op returned a view of it), nothing else
                    assert meter.live_bytes == (sum(t.nbytes for t in after[0])
                                                + _counted_bytes(meter, batches))
                    rss.append(_rss_bytes())
            losses.append(run_step(model, optimizer, batch, meter, step=step).loss)
    meter.untrack()
    assert losses == expected  # bit-identical to the run that never failed
    if cycles >= 100:  # a leak of the undo copies alone would be their size, 0.5 MiB, a cycle
        assert rss[-1] - rss[10] < 2 * 2**20


@pytest.mark.parametrize("case", PHASE_CASES)
def test_an_oom_in_any_phase_leaves_the_model_as_before_the_step(case):
    _oom_cycles(case, cycles=3)


@pytest.mark.slow
@pytest.mark.parametrize("case", PHASE_CASES)
def test_a_hundred_oom_cycles_leave_memory_flat(case):
    _oom_cycles(case, cycles=100)


def test_train_can_retry_after_an_oom_with_another_policy():
    model = TinyGPT(GPTConfig(n_layer=4, d_model=32, n_head=2, seq_len=16))
    costs = measure_costs(model, 4)
    budget = (predict(costs, "none").peak_bytes + predict(costs, "full").peak_bytes) // 2
    with pytest.raises(torch.OutOfMemoryError):
        train(model, "none", steps=2, batch_size=4, budget=budget, progress=False)
    records = train(model, "full", steps=2, batch_size=4, budget=budget, progress=False)
    assert max(r.peak_bytes for r in records) == predict(costs, "full").peak_bytes


def _half_then_allocator_oom(original):
    """AdamW's update kernel, patched: the first half of the parameters (and their state) is
    updated, then the allocator runs out, as a CUDA allocator would half-way through a step."""
    def run(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *args, **kw):
        h = len(params) // 2
        original(params[:h], grads[:h], exp_avgs[:h], exp_avg_sqs[:h], max_exp_avg_sqs[:h],
                 state_steps[:h], *args, **kw)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
    return run


@pytest.fixture
def allocator_oom_in_adamw(monkeypatch):
    """Call it to make AdamW fail half-way; ``.undo()`` (of the monkeypatch) to stop."""
    from torch.optim import adam

    def install():
        for name in ("_single_tensor_adam", "_multi_tensor_adam"):
            monkeypatch.setattr(adam, name, _half_then_allocator_oom(getattr(adam, name)))
        return monkeypatch
    return install


@_disable_current_modes()
def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _same(a, b) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("steps_before", [0, 1])  # AdamW's state made by the failed step, or not
def test_an_allocator_oom_inside_adamw_is_undone_by_default(allocator_oom_in_adamw,
                                                            steps_before):
    with seeded(0):
        model = TinyGPT(replace(CFG, dropout=0.0))
    reference = copy.deepcopy(model)
    optimizer, ref_opt = make_optimizer(model), make_optimizer(reference)
    batches = [make_batch(model, 2, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    for b in batches[:steps_before]:
        run_step(model, optimizer, b)
        run_step(reference, ref_opt, b)
    patch = allocator_oom_in_adamw()  # this step fails half-way through AdamW
    before, grads_before = _state(model, optimizer), _grads(model)
    assert (steps_before == 0) == all(g is None for g in grads_before)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        run_step(model, optimizer, batches[steps_before])  # no meter, no budget, guard default
    assert caught.value.phase == "optimizer"
    after = _state(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0], strict=True))
    assert before[1] == after[1]  # no half-made AdamW state left behind
    assert _same(grads_before, _grads(model))  # the gradients put back, not cleared
    patch.undo()
    run_step(model, optimizer, batches[steps_before])  # the retry: as if it never failed
    run_step(reference, ref_opt, batches[steps_before])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(),
                                                 strict=True))


def test_without_the_guard_an_allocator_oom_leaves_adamw_half_done(allocator_oom_in_adamw):
    """What the default guard prevents (so the test above can fail)."""
    model = TinyGPT(replace(CFG, dropout=0.0))
    optimizer = make_optimizer(model)
    before = _state(model, optimizer)
    allocator_oom_in_adamw()
    with pytest.raises(torch.OutOfMemoryError):
        run_step(model, optimizer, make_batch(model, 2), guard=False)
    after = _state(model, optimizer)
    changed = [not torch.equal(a, b) for a, b in zip(before[0], after[0][:len(before[0])],
                                                     strict=True)]
    assert any(changed) and not all(changed)


def test_a_failed_step_leaves_the_callers_micro_batches_in_place():
    model = TinyGPT(replace(CFG, dropout=0.0))
    optimizer = make_optimizer(model)
    batch = make_batch(model, 4, generator=torch.Generator().manual_seed(0))
    halves = [tuple(t[:2] for t in batch), tuple(t[2:] for t in batch)]
    parts = list(halves)
    with MemoryMeter(budget=1) as meter, pytest.raises(torch.OutOfMemoryError):
        meter.track(model, optimizer)
        run_step(model, optimizer, parts, meter)
    meter.untrack()
    assert len(parts) == 2 and all(torch.equal(a, b) for p, h in zip(parts, halves, strict=True)
                                   for a, b in zip(p, h, strict=True))
    record = run_step(model, optimizer, parts)  # the retry trains on every sample
    assert record.batch_size == 4 and len(parts) == 2


# ---------------------------------------------------------------- seeds
def test_seed_reproduces_a_run_dropout_included():
    with seeded(0):
        model = TinyGPT(CFG)

    def losses(seed):
        return [r.loss for r in train(copy.deepcopy(model), steps=3, batch_size=2, seed=seed,
                                      progress=False)]

    first = losses(0)
    assert losses(0) == first
    assert losses(1) != first
    # dropout does draw: the same weights without it give other losses
    with seeded(0):
        plain = TinyGPT(replace(CFG, dropout=0.0))
    assert [r.loss for r in train(plain, steps=1, batch_size=2, progress=False)] != first[:1]


# ---------------------------------------------------------------- the step's parts
def test_micro_batches_average_their_gradients():
    """Two micro-batches of 2, then the mean of their gradients: the batch of 4's gradient (up
    to float rounding). The mean is taken right before the optimizer step (lr 0: no change)."""
    with seeded(0):
        model = TinyGPT(GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = make_batch(model, 4, generator=torch.Generator().manual_seed(0))
    halves = [tuple(t[:2] for t in batch), tuple(t[2:] for t in batch)]
    record = run_step(model, optimizer, list(halves))
    accumulated = [p.grad.clone() for p in model.parameters()]
    whole = run_step(model, optimizer, batch)
    assert record.loss == pytest.approx(whole.loss, rel=1e-6)
    assert record.tokens == whole.tokens == 4 * 16 and record.batch_size == 4
    for a, p in zip(accumulated, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-4)
    assert record.time_s >= sum(record.phase_s.values())  # the phases are parts of the step


def test_measure_step_counts_the_batch_and_train_does_not():
    model = HandTraceNet(width=64)
    params = sum(p.nbytes for p in model.parameters())
    batch = make_batch(model, 16)
    m = measure_step(model, "none", batch=batch)
    assert m.baseline_bytes == params + sum(t.nbytes for t in batch)
    first = train(model, "none", steps=1, batch_size=16, progress=False)[0]
    assert first.baseline_bytes == params


# ---------------------------------------------------------------- bad input, before any work
LLAMA = llama_config("llama-tiny")
BAD = [
    (dict(batch_size=0), "batch_size must be a positive whole number"),
    (dict(batch_size=-3), "batch_size must be a positive whole number"),
    (dict(batch_size=2.5), "batch_size must be a positive whole number"),
    (dict(batch_size=True), "batch_size must be a positive whole number"),
    (dict(batch_size="8"), "batch_size must be a positive whole number"),
    (dict(steps=0), "steps must be a positive whole number"),
    (dict(steps=1.5), "steps must be a positive whole number"),
    (dict(seq_len=0), "seq_len must be a positive whole number"),
    (dict(seq_len=CFG.seq_len + 1), f"use seq_len <= {CFG.seq_len}"),
    (dict(device="tpu"), "use 'cpu' or 'cuda'"),
    (dict(device="not a device"), "use 'cpu' or 'cuda'"),
]
if not torch.cuda.is_available():
    BAD.append((dict(device="cuda"), "use device='cpu'"))


@pytest.mark.parametrize("kwargs, message", BAD)
def test_train_refuses_bad_input_in_one_line(kwargs, message):
    model = TinyGPT(CFG)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message) as caught:
        train(model, **kwargs, progress=False)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("run", [
    lambda: train(Llama(LLAMA), seq_len=LLAMA.seq_len + 72, progress=False),
    lambda: train(HandTraceNet(width=64), seq_len=8, progress=False),
    lambda: run_steps(TinyGPT(CFG), None, batch_size=0),
    lambda: run_steps(TinyGPT(CFG), None, batch_size=4, micro_batches=3),
    lambda: measure_step(TinyGPT(CFG), seq_len=999),
    lambda: check_gradients(TinyGPT(CFG), "full", batch_size=-1),
])
def test_every_runner_shares_the_checks(run):
    with pytest.raises(ValueError) as caught:
        run()
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- the doctor's demo
def test_doctor_without_a_budget_runs_lesson_4s_demo():
    report = demo(timing=False)
    first = str(report).splitlines()[0]
    assert first.startswith("No budget given: lesson 4's demo")
    steps = run_steps(TinyGPT(DEMO_CONFIG), None, "none", DEMO_BATCH, steps=2).steps
    assert steps[0].peak_bytes < report.budget < steps[1].peak_bytes
    assert report.run.oom.step == 2 and report.verification.run.fits


def test_doctor_api_without_a_budget_uses_the_demo_budget():
    model = TinyGPT(GPTConfig(n_layer=4, d_model=32, n_head=2, seq_len=16))
    report = doctor(model, batch_size=4, steps=2, timing=False)
    assert str(report).startswith("No budget given")
    assert report.run.oom.step == 2 and len(report.run.steps) == 1


def test_the_cpu_allocators_failure_is_an_out_of_memory_error_and_undone():
    model = TinyGPT(replace(CFG, dropout=0.0))
    optimizer = make_optimizer(model)
    run_step(model, optimizer, make_batch(model, 2))
    before, grads = _state(model, optimizer), _grads(model)

    def loss_fn(batch):  # as torch's CPU allocator fails when malloc does
        model.loss(batch)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 149533581377536 bytes.")
    with pytest.raises(torch.OutOfMemoryError, match="can't allocate memory") as caught:
        run_step(model, optimizer, make_batch(model, 2), loss_fn=loss_fn)
    assert caught.value.phase == "forward"
    after = _state(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0], strict=True))
    assert _same(grads, _grads(model))
    with pytest.raises(RuntimeError, match="another error"):  # other errors pass through
        run_step(model, optimizer, make_batch(model, 2),
                 loss_fn=lambda b: (_ for _ in ()).throw(RuntimeError("another error")))


def test_the_undos_copies_are_not_the_steps_time():
    model = TinyGPT(replace(CFG, dropout=0.0))
    optimizer = make_optimizer(model)
    batch = make_batch(model, 2)
    record = run_step(model, optimizer, batch)  # guarded by default
    assert set(record.phase_s) == {"forward", "backward", "optimizer"}
    assert record.time_s >= sum(record.phase_s.values()) and record.phase_s["optimizer"] >= 0
    assert set(run_step(model, None, batch).phase_s) == {"forward", "backward"}
