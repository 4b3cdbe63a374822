"""torch's state_dict / load_state_dict hooks see and decide what is saved and loaded, and an
optimizer whose groups hold a ProcessGroup (flat shards) deep-copies and saves from a hook."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist

from largebatch import LAMB, LARS, AdaGradNorm, Adan


def stepped_adagrad_norm():
    params = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
    opt = AdaGradNorm(params, lr=0.1)
    for p in params:
        p.grad = torch.ones(p.shape)
    opt.step()
    return opt, params


def test_adagrad_norm_loads_the_dict_a_pre_hook_returns():
    source, _ = stepped_adagrad_norm()
    target, _ = stepped_adagrad_norm()
    state_dict = source.state_dict()

    def replace_accumulator(optimizer, state_dict):
        edited = copy.deepcopy(state_dict)
        edited["state"][0]["sum_sq"] = torch.tensor(4.0)
        return edited

    target.register_load_state_dict_pre_hook(replace_accumulator)
    target.load_state_dict(state_dict)
    assert target.accumulator().item() == 4.0
    assert state_dict["state"][0]["sum_sq"].item() == 5.0  # the caller's dict is untouched


def test_adagrad_norm_keeps_what_a_post_hook_changed():
    source, _ = stepped_adagrad_norm()
    target, params = stepped_adagrad_norm()

    def reset_accumulator(optimizer):
        optimizer.state[params[0]]["sum_sq"] = torch.tensor(9.0)

    target.register_load_state_dict_post_hook(reset_accumulator)
    target.load_state_dict(source.state_dict())
    assert target.accumulator().item() == 9.0


def test_adagrad_norm_accumulator_keeps_float32_for_bf16_parameters():
    params = [torch.ones(3, dtype=torch.bfloat16, requires_grad=True)]
    opt = AdaGradNorm(params, lr=0.1, initial_accumulator_value=1.0 + 2**-20)
    params[0].grad = torch.zeros(3, dtype=torch.bfloat16)
    opt.step()
    resumed = AdaGradNorm([params[0].detach().clone().requires_grad_()], lr=0.1)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.accumulator().dtype == torch.float32
    assert resumed.accumulator().item() == 1.0 + 2**-20


def process_group():
    """A ProcessGroup object without a running job: enough for groups that are never stepped."""
    return dist.ProcessGroup(dist.HashStore(), 0, 1)


@pytest.mark.parametrize("cls", [LAMB, LARS, Adan, AdaGradNorm], ids=lambda c: c.__name__)
def test_state_dict_post_hooks_see_no_process_group_and_can_save(cls):
    opt = cls([{"params": [torch.zeros(2, requires_grad=True)], "shard_group": process_group()}])
    seen = []

    def save_in_hook(optimizer, state_dict):
        seen.append(dict(state_dict["param_groups"][0]))
        torch.save(state_dict, io.BytesIO())

    opt.register_state_dict_post_hook(save_in_hook)
    state_dict = opt.state_dict()
    assert "shard_group" not in seen[0] and "shard_group" not in state_dict["param_groups"][0]
    assert opt.param_groups[0]["shard_group"] is not None  # the live group keeps it


@pytest.mark.parametrize("cls", [LAMB, LARS, Adan, AdaGradNorm], ids=lambda c: c.__name__)
def test_deepcopy_shares_the_process_group_and_copies_the_rest(cls):
    group = process_group()
    params = [torch.ones(3, requires_grad=True)]
    opt = cls([{"params": params, "shard_group": group}], lr=0.1)
    opt.state[params[0]]["step"] = torch.tensor(2.0)
    copied = copy.deepcopy(opt)
    assert copied.param_groups[0]["shard_group"] is group
    (copied_param,) = copied.param_groups[0]["params"]
    assert copied_param is not params[0] and torch.equal(copied_param, params[0])
    assert copied.state[copied_param]["step"] is not opt.state[params[0]]["step"]
    assert copied.param_groups[0]["lr"] == 0.1 and type(copied) is cls


def test_deepcopy_of_a_plain_optimizer_still_steps_like_the_original():
    params = [torch.ones(3, requires_grad=True)]
    opt = LAMB(params, lr=0.1)
    params[0].grad = torch.ones(3)
    opt.step()
    copied = copy.deepcopy(opt)
    (copied_param,) = copied.param_groups[0]["params"]
    copied_param.grad = torch.ones(3)
    params[0].grad = torch.ones(3)
    opt.step()
    copied.step()
    assert torch.equal(copied_param, params[0])
