"""FSDP2 on 2 gloo processes: the model state halves per rank, the activations do not."""

import pytest

from ckpt_course.models import TinyGPT
from ckpt_course.sharding import SMALL, measure_single, min_gpus, per_gpu_bytes, run_fsdp


def test_one_process_holds_the_whole_state():
    single = measure_single(SMALL, "full", batch_size=4, steps=1)
    params = list(TinyGPT(SMALL).parameters())
    n = sum(p.numel() for p in params)
    assert single.param_bytes == single.grad_bytes == 4 * n
    assert single.optimizer_bytes == 2 * 4 * n  # exp_avg and exp_avg_sq in float32
    assert single.step_counter_bytes == 4 * len(params)
    # full checkpointing: the blocks keep only their inputs, (4, 32, 64) float32 each
    assert single.activation_bytes < measure_single(SMALL, "none", batch_size=4,
                                                    steps=1).activation_bytes
    assert single.activation_bytes >= SMALL.n_layer * 4 * 32 * 64 * 4


@pytest.mark.slow
def test_fsdp_on_two_processes_halves_the_state_not_the_activations():
    result = run_fsdp(world_size=2, batch_size=4, steps=2)
    single, ranks = result.single, result.ranks
    assert [r.rank for r in ranks] == [0, 1] and all(r.world_size == 2 for r in ranks)
    for r in ranks:
        assert 2 * r.param_bytes == single.param_bytes
        assert 2 * r.grad_bytes == single.grad_bytes
        assert 2 * r.optimizer_bytes == single.optimizer_bytes
        assert r.step_counter_bytes == single.step_counter_bytes  # scalars are not sharded
        assert r.activation_bytes == single.activation_bytes
    assert "rank 1 of 2" in str(result)


def test_the_arithmetic_for_n_gpus():
    n_params, acts, gpu = 70 * 10**9, 6 * 2**30, 80 * 10**9
    assert per_gpu_bytes(n_params, 1, 0) == 12 * n_params  # bf16 weights + grads, fp32 Adam
    assert per_gpu_bytes(n_params, 8, acts) == 12 * n_params / 8 + acts
    n = min_gpus(n_params, acts, gpu)
    assert per_gpu_bytes(n_params, n, acts) <= gpu < per_gpu_bytes(n_params, n - 1, acts)
    assert min_gpus(n_params, gpu + 1, gpu) is None  # activations alone do not fit
    with pytest.raises(ValueError, match="n_gpus"):
        per_gpu_bytes(n_params, 0, acts)


def test_the_closed_form_is_shard_without_the_running_block():
    """``per_gpu_bytes`` is ``shard``'s split of the state in closed form; ``shard`` also knows
    when activations, gradients and the gathered block are alive, which the closed form adds up
    as if all were at once."""
    from ckpt_course.estimate import parameter_count
    from ckpt_course.models import llama_config
    from ckpt_course.plan import config_costs, predict
    from ckpt_course.sharding import min_devices, shard

    costs = config_costs("7b", 1, 4096)
    n_params = parameter_count(llama_config("7b"))
    for n in (1, 3, 8, 64):
        sharded = shard(costs, n)
        state = sharded.param_bytes + sharded.optimizer_bytes  # bf16 weights, fp32 Adam moments
        assert abs(state - per_gpu_bytes(n_params, n, 0, bytes_per_param=2 + 8)) < 2
        # the whole sharded state (weights, gradients, moments) is alive at the optimizer step
        assert per_gpu_bytes(n_params, n, 0) <= predict(sharded, "full").peak_bytes
    budget = 24 * 2**30
    n, best = min_devices(costs, budget)
    assert best.peak_bytes <= budget < predict(shard(costs, n - 1), "full").peak_bytes
