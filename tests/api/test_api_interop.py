"""States of timm Lamb, apex FusedLAMB, timm Adan and the official Adan load into ours and training
continues on the source's trajectory.

The sources are transcribed in `_foreign_optimizers` (float64, their update and their state_dict
layout). Each test runs the source for some steps, loads its state_dict into a largebatch
optimizer over copies of the parameters, then steps both with the same gradients: the
parameters must stay together.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _foreign_optimizers import ADAN_LAYOUTS, LAMB_LAYOUTS, ForeignAdan, ForeignLamb
from largebatch.interop import (
    load_apex_lamb_state,
    load_official_adan_state,
    load_timm_adan_state,
    load_timm_lamb_state,
)
from largebatch.optimizers import LAMB, Adan

SHAPES = [(3,), (2, 3), (4, 1, 2), (1,)]
# Without clipping both sides compute the same float64 expressions up to rounding.
EXACT = dict(rtol=1e-10, atol=1e-12)
# Our clip divides by norm + 1e-6 (as clip_grad_norm_), the sources by the bare norm (apex, timm) or
# norm + eps (official Adan): a relative difference of about 1e-6 / norm in the clipped gradient.
CLIPPED = dict(rtol=1e-5, atol=1e-7)
ADAN_LOADERS = {
    "official": load_official_adan_state,
    "official-pre_grad": load_official_adan_state,
    "timm": load_timm_adan_state,
    "timm-pre_grad": load_timm_adan_state,
}


def make_groups(shape_groups, generator):
    return [
        [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes] for shapes in shape_groups
    ]


def make_grads(params, generator, skip_last=False):
    """One gradient per parameter; with skip_last the very last parameter never gets one."""
    grads = [[torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in group] for group in params]
    if skip_last:
        grads[-1][-1] = None
    return grads


def continue_both(foreign, ours, params_ours, generator, steps, skip_last):
    for _ in range(steps):
        grads = make_grads(params_ours, generator, skip_last)
        foreign.step(grads)
        for group, group_grads in zip(params_ours, grads):
            for p, g in zip(group, group_grads):
                p.grad = None if g is None else g.clone()
        ours.step()


def assert_same_params(foreign, params_ours, tolerance):
    for group, ours in zip(foreign.groups, params_ours):
        for expected, got in zip(group["params"], ours):
            torch.testing.assert_close(got, expected, **tolerance)


shape_groups = st.lists(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=2), min_size=1, max_size=2)


@settings(max_examples=30, deadline=None)
@given(
    layout=st.sampled_from(LAMB_LAYOUTS),
    shapes=shape_groups,
    weight_decays=st.lists(st.sampled_from([0.0, 0.01, 0.1]), min_size=2, max_size=2),
    trust_clip=st.booleans(),
    always_adapt=st.booleans(),
    bias_correction=st.booleans(),
    grad_averaging=st.booleans(),
    max_grad_norm=st.sampled_from([None, 0.5]),
    steps_before=st.integers(1, 3),
    steps_after=st.integers(1, 3),
    skip_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lamb_state_continues_the_source_trajectory(
    layout, shapes, weight_decays, trust_clip, always_adapt, bias_correction, grad_averaging,
    max_grad_norm, steps_before, steps_after, skip_last, seed,
):
    generator = torch.Generator().manual_seed(seed)
    params = make_groups(shapes, generator)
    hyper = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, bias_correction=bias_correction,
                 grad_averaging=grad_averaging, max_grad_norm=max_grad_norm)
    if layout != "apex":
        hyper.update(trust_clip=trust_clip, always_adapt=always_adapt)
    foreign_groups = [dict(hyper, params=group, weight_decay=wd) for group, wd in zip(params, weight_decays)]
    foreign = ForeignLamb(foreign_groups, layout, use_nvlamb=always_adapt)
    for _ in range(steps_before):
        foreign.step(make_grads(params, generator, skip_last))

    ours_params = [[p.clone() for p in group] for group in params]
    # Different hyper-parameters on our side: the loader must take the source's.
    ours = LAMB([{"params": group} for group in ours_params], lr=0.5, betas=(0.5, 0.5), weight_decay=0.3, foreach=False)
    if layout == "apex":
        load_apex_lamb_state(ours, foreign.state_dict(), use_nvlamb=always_adapt)
    else:
        load_timm_lamb_state(ours, foreign.state_dict())

    continue_both(foreign, ours, ours_params, generator, steps_after, skip_last)
    assert_same_params(foreign, ours_params, EXACT if max_grad_norm is None else CLIPPED)


@settings(max_examples=30, deadline=None)
@given(
    layout=st.sampled_from(ADAN_LAYOUTS),
    shapes=shape_groups,
    weight_decays=st.lists(st.sampled_from([0.0, 0.02]), min_size=2, max_size=2),
    no_prox=st.booleans(),
    max_grad_norm=st.sampled_from([0.0, 0.5]),
    steps_before=st.integers(1, 3),
    steps_after=st.integers(1, 3),
    skip_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_adan_state_continues_the_source_trajectory(
    layout, shapes, weight_decays, no_prox, max_grad_norm, steps_before, steps_after, skip_last, seed
):
    generator = torch.Generator().manual_seed(seed)
    params = make_groups(shapes, generator)
    clips = layout.startswith("official") and max_grad_norm > 0  # timm's Adan does not clip
    hyper = dict(lr=0.01, betas=(0.98, 0.92, 0.99), eps=1e-8, no_prox=no_prox, max_grad_norm=max_grad_norm)
    foreign = ForeignAdan([dict(hyper, params=g, weight_decay=wd) for g, wd in zip(params, weight_decays)], layout)
    for _ in range(steps_before):
        foreign.step(make_grads(params, generator, skip_last))

    ours_params = [[p.clone() for p in group] for group in params]
    ours = Adan(
        [{"params": group} for group in ours_params], lr=0.5, betas=(0.5, 0.5, 0.5), max_grad_norm=7.0, foreach=False
    )
    ADAN_LOADERS[layout](ours, foreign.state_dict())

    continue_both(foreign, ours, ours_params, generator, steps_after, skip_last)
    assert_same_params(foreign, ours_params, CLIPPED if clips else EXACT)


def two_step_foreign_adan(layout):
    generator = torch.Generator().manual_seed(0)
    params = make_groups([[(2, 3)]], generator)
    hyper = dict(lr=0.01, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0, no_prox=False, max_grad_norm=0.0)
    foreign = ForeignAdan([dict(hyper, params=params[0])], layout)
    for _ in range(2):
        foreign.step(make_grads(params, generator))
    return foreign, params


def test_older_timm_adan_buffers_are_swapped_back():
    foreign, params = two_step_foreign_adan("timm-pre_grad")
    saved = foreign.state_dict()
    ours = Adan([p.clone() for p in params[0]])
    load_timm_adan_state(ours, saved)
    state = ours.state[ours.param_groups[0]["params"][0]]
    torch.testing.assert_close(state["exp_avg_sq"], saved["state"][0]["exp_avg_diff"], rtol=0, atol=0)
    torch.testing.assert_close(state["exp_avg_diff"], saved["state"][0]["exp_avg_sq"], rtol=0, atol=0)
    torch.testing.assert_close(state["prev_grad"], saved["state"][0]["pre_grad"], rtol=0, atol=0)
    assert state["step"].dtype == torch.float32 and state["step"].item() == 2.0


def test_negated_previous_gradient_is_negated_back():
    foreign, params = two_step_foreign_adan("official")
    saved = foreign.state_dict()
    ours = Adan([p.clone() for p in params[0]])
    load_official_adan_state(ours, saved)
    state = ours.state[ours.param_groups[0]["params"][0]]
    torch.testing.assert_close(state["prev_grad"], -saved["state"][0]["neg_pre_grad"], rtol=0, atol=0)


def test_a_state_in_the_other_layout_is_refused():
    """The official layout stores the difference average under its own name; read with timm's
    older (crossed) mapping it would become a second moment with negative entries."""
    foreign, params = two_step_foreign_adan("official-pre_grad")
    ours = Adan([p.clone() for p in params[0]])
    with pytest.raises(ValueError, match="negative"):
        load_timm_adan_state(ours, foreign.state_dict())


def test_the_optimizers_own_settings_are_kept_and_the_sources_taken():
    generator = torch.Generator().manual_seed(0)
    params = make_groups([[(3,)], [(2, 2)]], generator)
    hyper = dict(lr=0.03, betas=(0.8, 0.9), eps=1e-7, weight_decay=0.05, bias_correction=True,
                 grad_averaging=False, max_grad_norm=None, trust_clip=True, always_adapt=False)
    foreign = ForeignLamb([dict(hyper, params=g) for g in params], "timm")
    foreign.step(make_grads(params, generator))
    ours = LAMB(
        [{"params": [p.clone() for p in params[0]], "layer_adaptation": False, "tag": "bias"},
         {"params": [p.clone() for p in params[1]]}],
        lr=1.0, max_grad_norm=3.0, maximize=True, foreach=True,
    )
    load_timm_lamb_state(ours, foreign.state_dict())
    first, second = ours.param_groups
    assert (first["layer_adaptation"], first["tag"], first["maximize"], first["foreach"]) == (False, "bias", True, True)
    assert second["layer_adaptation"] is True
    for group in (first, second):
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.03, (0.8, 0.9), 1e-7, 0.05)
        assert (group["grad_averaging"], group["trust_clip"], group["max_grad_norm"]) == (False, 1.0, None)
        assert "step" not in group


def test_a_parameter_never_stepped_by_the_source_has_no_state():
    generator = torch.Generator().manual_seed(0)
    params = make_groups([[(3,), (2,)]], generator)
    hyper = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                 grad_averaging=True, max_grad_norm=1.0)
    foreign = ForeignLamb([dict(hyper, params=params[0])], "apex")
    foreign.step(make_grads(params, generator, skip_last=True))
    ours = LAMB([p.clone() for p in params[0]])
    load_apex_lamb_state(ours, foreign.state_dict())
    first, second = ours.param_groups[0]["params"]
    assert set(ours.state[first]) == {"step", "exp_avg", "exp_avg_sq"}
    assert second not in ours.state


@pytest.mark.parametrize(
    "flag, loader",
    [("caution", load_timm_lamb_state), ("decoupled_decay", load_timm_lamb_state),
     ("corrected_weight_decay", load_timm_lamb_state), ("caution", load_timm_adan_state)],
)
def test_source_options_without_an_equivalent_are_refused(flag, loader):
    param = torch.zeros(2)
    optimizer = LAMB([param]) if loader is load_timm_lamb_state else Adan([param])
    state_dict = {"state": {}, "param_groups": [{"params": [0], "lr": 0.1, "betas": (0.9, 0.99, 0.9), "eps": 1e-6,
                                                 "weight_decay": 0.0, "bias_correction": True,
                                                 "grad_averaging": True, flag: True}]}
    with pytest.raises(ValueError, match=flag):
        loader(optimizer, state_dict)


def test_apex_l2_mode_is_refused():
    with pytest.raises(ValueError, match="adam_w_mode"):
        load_apex_lamb_state(LAMB([torch.zeros(2)]), {"state": {}, "param_groups": []}, adam_w_mode=False)


def test_wrong_optimizer_type_is_refused():
    with pytest.raises(TypeError, match="LAMB"):
        load_timm_lamb_state(Adan([torch.zeros(2)]), {"state": {}, "param_groups": []})
    with pytest.raises(TypeError, match="Adan"):
        load_official_adan_state(LAMB([torch.zeros(2)]), {"state": {}, "param_groups": []})


def test_mismatched_groups_and_shapes_are_refused():
    foreign, params = two_step_foreign_adan("official")
    with pytest.raises(ValueError, match="param groups"):
        two_groups = Adan([{"params": [torch.zeros(2, 3)]}, {"params": [torch.zeros(1)]}])
        load_official_adan_state(two_groups, foreign.state_dict())
    with pytest.raises(ValueError, match="parameters"):
        load_official_adan_state(Adan([torch.zeros(2, 3), torch.zeros(1)]), foreign.state_dict())
    with pytest.raises(ValueError, match="shape"):
        load_official_adan_state(Adan([torch.zeros(3, 2)]), foreign.state_dict())


def test_a_missing_key_is_named():
    foreign, params = two_step_foreign_adan("official")
    saved = foreign.state_dict()
    del saved["state"][0]["exp_avg_diff"]
    with pytest.raises(ValueError, match="exp_avg_diff"):
        load_official_adan_state(Adan([p.clone() for p in params[0]]), saved)
