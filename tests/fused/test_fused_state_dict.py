"""A checkpoint of a fused optimizer loads into a non-fused one and the other way round: the
same state keys, shapes and dtypes, and training continues as it would have on either path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _fused_cases import DEVICE, requires_kernels
from largebatch import LAMB, LARS, Adan

pytestmark = requires_kernels

OPTIMIZERS = pytest.mark.parametrize(
    "make",
    [
        lambda params, fused: LAMB(params, lr=0.01, weight_decay=0.01, fused=fused),
        lambda params, fused: LARS(params, lr=0.5, weight_decay=1e-4, fused=fused),
        lambda params, fused: Adan(params, lr=0.01, weight_decay=0.02, fused=fused),
    ],
    ids=["LAMB", "LARS", "Adan"],
)


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@OPTIMIZERS
@pytest.mark.parametrize("saved_fused", [True, False], ids=["fused_to_plain", "plain_to_fused"])
def test_state_dict_moves_between_paths(make, saved_fused):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(DEVICE)
    batches = [(torch.randn(8, 4, device=DEVICE), torch.randn(8, 2, device=DEVICE)) for _ in range(4)]

    saved_opt = make(model.parameters(), saved_fused)
    _train(model, saved_opt, batches[:2])
    checkpoint = copy.deepcopy(saved_opt.state_dict())

    other = copy.deepcopy(model)
    loading_opt = make(other.parameters(), not saved_fused)
    loading_opt.load_state_dict(checkpoint)
    # torch's load_state_dict takes every group key from the checkpoint, `fused` included:
    # put back the path this optimizer was built for, so the other path really runs.
    for group in loading_opt.param_groups:
        group["fused"] = not saved_fused
    for p_saved, p_loaded in zip(model.parameters(), other.parameters()):
        saved_state, loaded_state = saved_opt.state[p_saved], loading_opt.state[p_loaded]
        assert saved_state.keys() == loaded_state.keys()
        for key, value in saved_state.items():
            assert loaded_state[key].shape == value.shape and loaded_state[key].dtype == value.dtype
            assert torch.equal(loaded_state[key].cpu(), value.cpu())

    _train(model, saved_opt, batches[2:])
    _train(other, loading_opt, batches[2:])
    for a, b in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p_saved, p_loaded in zip(model.parameters(), other.parameters()):
        assert float(saved_opt.state[p_saved]["step"]) == float(loading_opt.state[p_loaded]["step"]) == 4.0
