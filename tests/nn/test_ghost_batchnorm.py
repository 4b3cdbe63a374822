"""Ghost BatchNorm against an oracle that loops BatchNorm over the ghost batches, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from largebatch.nn import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, convert_to_ghost_batchnorm

GHOST_CLASSES = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
BATCHNORM_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
# float64 end to end: the oracle and the module differ only by summation order.
TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}


def ghost_oracle(x, ghost_batch_size, weight, bias, state, momentum, eps):
    """BatchNorm applied to each ghost batch in turn, as torch's BatchNorm forward would.

    ``state`` holds running_mean, running_var and num_batches_tracked (or None for untracked
    statistics) and is updated in place, one ghost batch at a time. A last ghost batch of one
    value per channel joins the one before it.
    """
    outputs = []
    for chunk in ghost_chunks(x, ghost_batch_size):
        if state is None:
            outputs.append(F.batch_norm(chunk, None, None, weight, bias, True, 0.0, eps))
            continue
        state["num_batches_tracked"] += 1
        factor = 1.0 / state["num_batches_tracked"] if momentum is None else momentum
        outputs.append(
            F.batch_norm(chunk, state["running_mean"], state["running_var"], weight, bias, True, factor, eps)
        )
    return torch.cat(outputs)


def ghost_chunks(x, ghost_batch_size):
    """The ghost batches of ``x``, written out: slices of ``ghost_batch_size`` samples, and a last
    slice of a single value per channel added to the one before it."""
    bounds = list(range(0, x.shape[0], ghost_batch_size)) + [x.shape[0]]
    values_per_sample = x[0, 0].numel()
    if len(bounds) > 2 and (bounds[-1] - bounds[-2]) * values_per_sample == 1:
        del bounds[-2]
    return [x[start:stop] for start, stop in zip(bounds, bounds[1:])]


def random_input(batch, channels, dims, spatial, generator):
    shape = (batch, channels) + (spatial,) * dims
    return torch.randn(shape, dtype=torch.float64, generator=generator) * 3 + 1


def make_pair(dims, channels, ghost_batch_size, momentum, affine, track, generator):
    """A ghost module and the oracle's copies of its parameters and state."""
    module = GHOST_CLASSES[dims](
        channels, ghost_batch_size=ghost_batch_size, momentum=momentum, affine=affine, track_running_stats=track
    ).double()
    with torch.no_grad():
        if affine:
            module.weight.copy_(torch.randn(channels, dtype=torch.float64, generator=generator))
            module.bias.copy_(torch.randn(channels, dtype=torch.float64, generator=generator))
        if track:
            module.running_mean.copy_(torch.randn(channels, dtype=torch.float64, generator=generator))
            module.running_var.copy_(torch.rand(channels, dtype=torch.float64, generator=generator) + 0.5)
    weight = module.weight.detach().clone().requires_grad_() if affine else None
    bias = module.bias.detach().clone().requires_grad_() if affine else None
    state = None
    if track:
        state = {
            "running_mean": module.running_mean.clone(),
            "running_var": module.running_var.clone(),
            "num_batches_tracked": 0,
        }
    return module, weight, bias, state


@st.composite
def ghost_cases(draw):
    """(dims, batch, ghost, channels, spatial) with more than one value per channel in a full ghost
    batch (a last ghost batch of one value is folded into the one before)."""
    dims = draw(st.sampled_from([0, 1, 2, 3]))  # 0: BatchNorm1d on (N, C)
    spatial = 1 if dims == 0 else draw(st.integers(1, 3))
    batch = draw(st.integers(2, 24))
    ghost = draw(st.integers(1, 26))
    assume(ghost * spatial**dims > 1)
    return dims, batch, ghost, draw(st.integers(1, 4)), spatial


@settings(max_examples=60, deadline=None)
@given(
    case=ghost_cases(),
    momentum=st.one_of(st.none(), st.floats(0.0, 1.0)),
    affine=st.booleans(),
    track=st.booleans(),
    steps=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    channels_last=st.booleans(),
)
def test_training_matches_a_loop_of_batchnorm_over_ghost_batches(
    case, momentum, affine, track, steps, seed, channels_last
):
    dims, batch, ghost, channels, spatial = case
    generator = torch.Generator().manual_seed(seed)
    module, weight, bias, state = make_pair(max(dims, 1), channels, ghost, momentum, affine, track, generator)
    memory_format = CHANNELS_LAST.get(dims) if channels_last else None
    for _ in range(steps):
        x = random_input(batch, channels, dims, spatial, generator)
        x_oracle = x.clone().requires_grad_()
        if memory_format is not None:
            x = x.to(memory_format=memory_format)
        x.requires_grad_()
        upstream = torch.randn(x.shape, dtype=torch.float64, generator=generator)

        output = module(x)
        expected = ghost_oracle(x_oracle, ghost, weight, bias, state, momentum, module.eps)
        torch.testing.assert_close(output, expected, **TOLERANCE)
        if memory_format is not None:  # like BatchNorm: the input's memory format
            assert output.is_contiguous(memory_format=memory_format)

        output.backward(upstream)
        expected.backward(upstream)
        torch.testing.assert_close(x.grad, x_oracle.grad, **TOLERANCE)
        if affine:
            torch.testing.assert_close(module.weight.grad, weight.grad, **TOLERANCE)
            torch.testing.assert_close(module.bias.grad, bias.grad, **TOLERANCE)
        if track:
            torch.testing.assert_close(module.running_mean, state["running_mean"], **TOLERANCE)
            torch.testing.assert_close(module.running_var, state["running_var"], **TOLERANCE)
            assert module.num_batches_tracked.item() == state["num_batches_tracked"]


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("ghost_batch_size", [8, 9])
def test_ghost_batch_at_least_the_batch_is_batchnorm_exactly(dims, momentum, ghost_batch_size):
    torch.manual_seed(dims)
    batchnorm = BATCHNORM_CLASSES[dims](5, momentum=momentum)
    ghost = GHOST_CLASSES[dims](5, ghost_batch_size=ghost_batch_size, momentum=momentum)
    with torch.no_grad():
        batchnorm.weight.uniform_(0.5, 2)
        batchnorm.bias.uniform_(-1, 1)
    ghost.load_state_dict(batchnorm.state_dict())
    x = torch.randn((8, 5) + (3,) * dims)
    upstream = torch.randn(x.shape)
    for _ in range(2):
        x_ghost = x.clone().requires_grad_()
        x_batchnorm = x.clone().requires_grad_()
        output = ghost(x_ghost)
        expected = batchnorm(x_batchnorm)
        assert torch.equal(output, expected)
        output.backward(upstream)
        expected.backward(upstream)
        assert torch.equal(x_ghost.grad, x_batchnorm.grad)
        assert torch.equal(ghost.weight.grad, batchnorm.weight.grad)
        assert torch.equal(ghost.bias.grad, batchnorm.bias.grad)
        for name, buffer in batchnorm.named_buffers():
            assert torch.equal(ghost.get_buffer(name), buffer), name


def test_uneven_last_ghost_batch_float32():
    # 10 = 4 + 4 + 2: the last ghost batch is smaller.
    torch.manual_seed(0)
    module = GhostBatchNorm2d(3, ghost_batch_size=4)
    x = torch.randn(10, 3, 5, 5) * 2 + 3
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    expected = torch.cat(
        [
            F.batch_norm(x[i : i + 4], running_mean, running_var, module.weight, module.bias, True, 0.1, 1e-5)
            for i in (0, 4, 8)
        ]
    )
    torch.testing.assert_close(module(x), expected)
    torch.testing.assert_close(module.running_mean, running_mean)
    torch.testing.assert_close(module.running_var, running_var)
    assert module.num_batches_tracked.item() == 3
    for start in (0, 4, 8):
        chunk = module(x)[start : start + 4]
        torch.testing.assert_close(chunk.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_running_statistics_closed_form_in_float64():
    """The closed-form EMA against the recursion written out: r ← (1 − m) r + m s, per ghost batch."""
    torch.manual_seed(1)
    momentum, ghost = 0.3, 3
    module = GhostBatchNorm1d(2, ghost_batch_size=ghost, momentum=momentum).double()
    x = torch.randn(11, 2, dtype=torch.float64)
    module(x)
    mean, var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    for start in range(0, 11, ghost):
        chunk = x[start : start + ghost]
        count = chunk.shape[0]
        chunk_mean = chunk.sum(0) / count
        chunk_var = ((chunk - chunk_mean) ** 2).sum(0) / (count - 1)
        mean = (1 - momentum) * mean + momentum * chunk_mean
        var = (1 - momentum) * var + momentum * chunk_var
    torch.testing.assert_close(module.running_mean, mean, **TOLERANCE)
    torch.testing.assert_close(module.running_var, var, **TOLERANCE)


def test_momentum_none_keeps_the_average_over_all_ghost_batches():
    torch.manual_seed(2)
    module = GhostBatchNorm1d(3, ghost_batch_size=4, momentum=None).double()
    batches = [torch.randn(12, 3, dtype=torch.float64) for _ in range(2)]
    for x in batches:
        module(x)
    chunks = [x[i : i + 4] for x in batches for i in range(0, 12, 4)]
    torch.testing.assert_close(module.running_mean, torch.stack([c.mean(0) for c in chunks]).mean(0), **TOLERANCE)
    torch.testing.assert_close(module.running_var, torch.stack([c.var(0) for c in chunks]).mean(0), **TOLERANCE)
    assert module.num_batches_tracked.item() == 6


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_eval_mode_is_batchnorm(dims):
    torch.manual_seed(3)
    ghost = GHOST_CLASSES[dims](4, ghost_batch_size=2)
    x = torch.randn((8, 4) + (2,) * dims)
    ghost(x)  # training step: running statistics move away from their initial values
    batchnorm = BATCHNORM_CLASSES[dims](4)
    batchnorm.load_state_dict(ghost.state_dict())
    ghost.eval()
    batchnorm.eval()
    assert torch.equal(ghost(x), batchnorm(x))
    assert not torch.equal(ghost.running_mean, torch.zeros(4))


def test_untracked_statistics_in_eval_mode_use_the_whole_batch_like_batchnorm():
    torch.manual_seed(4)
    ghost = GhostBatchNorm2d(3, ghost_batch_size=2, track_running_stats=False).eval()
    batchnorm = nn.BatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(8, 3, 2, 2)
    assert torch.equal(ghost(x), batchnorm(x))


def test_one_batch_norm_call_when_even_and_one_more_when_uneven(monkeypatch):
    calls = []
    batch_norm = F.batch_norm

    def counting_batch_norm(*args, **kwargs):
        calls.append(args[0].shape)
        return batch_norm(*args, **kwargs)

    monkeypatch.setattr(F, "batch_norm", counting_batch_norm)
    module = GhostBatchNorm2d(3, ghost_batch_size=4)
    module(torch.randn(32, 3, 2, 2))
    assert calls == [torch.Size([4, 24, 2, 2])]
    calls.clear()
    module(torch.randn(30, 3, 2, 2))
    assert calls == [torch.Size([4, 21, 2, 2]), torch.Size([2, 3, 2, 2])]


def test_gradcheck_and_double_backward():
    torch.manual_seed(5)
    module = GhostBatchNorm2d(2, ghost_batch_size=2, track_running_stats=False).double()
    x = torch.randn(5, 2, 2, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))
    assert torch.autograd.gradgradcheck(module, (x,))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("batch", [12, 14])
def test_channels_last_input_gives_channels_last_output_like_batchnorm(dims, batch):
    torch.manual_seed(6)
    module = GHOST_CLASSES[dims](3, ghost_batch_size=4)
    reference = copy.deepcopy(module)
    x = torch.randn((batch, 3) + (4,) * dims)
    memory_format = CHANNELS_LAST[dims]
    x_last = x.to(memory_format=memory_format).requires_grad_()
    output = module(x_last)
    assert output.is_contiguous(memory_format=memory_format)
    assert BATCHNORM_CLASSES[dims](3)(x_last).is_contiguous(memory_format=memory_format)  # torch's own
    x = x.requires_grad_()
    expected = reference(x)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(module.running_var, reference.running_var)
    upstream = torch.randn_like(x)
    output.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(x_last.grad, x.grad)
    torch.testing.assert_close(module.weight.grad, reference.weight.grad)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, None])
def test_bad_ghost_batch_size_raises(bad):
    with pytest.raises(ValueError, match="ghost_batch_size"):
        GhostBatchNorm2d(3, ghost_batch_size=bad)
    with pytest.raises(ValueError, match="ghost_batch_size"):
        convert_to_ghost_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), bad)


def test_ghost_batches_of_a_single_value_per_channel_raise():
    with pytest.raises(ValueError, match="single value per channel"):
        GhostBatchNorm1d(3, ghost_batch_size=1)(torch.randn(6, 3))
    with pytest.raises(ValueError, match="single value per channel"):
        GhostBatchNorm2d(3, ghost_batch_size=1)(torch.randn(6, 3, 1, 1))


@pytest.mark.parametrize(("shape", "cls"), [((9, 3), GhostBatchNorm1d), ((9, 3, 1, 1), GhostBatchNorm2d)])
def test_a_one_sample_tail_joins_the_ghost_batch_before_it(shape, cls):
    """9 = 4 + 5 rather than 4 + 4 + 1: a last ghost batch of one value has no variance."""
    torch.manual_seed(8)
    module = cls(3, ghost_batch_size=4).double()
    x = torch.randn(shape, dtype=torch.float64)
    running_mean, running_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    expected = torch.cat(
        [F.batch_norm(x[a:b], running_mean, running_var, None, None, True, 0.1, 1e-5) for a, b in ((0, 4), (4, 9))]
    )
    output = module(x)
    torch.testing.assert_close(output, expected, **TOLERANCE)
    torch.testing.assert_close(module.running_var, running_var, **TOLERANCE)
    assert module.num_batches_tracked.item() == 2
    # The last five samples are one ghost batch: zero mean, unit biased variance (eps aside).
    torch.testing.assert_close(output[4:].flatten(1).mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_a_batch_of_one_more_than_a_ghost_batch_is_batchnorm_exactly():
    torch.manual_seed(9)
    ghost, batchnorm = GhostBatchNorm1d(3, ghost_batch_size=4), nn.BatchNorm1d(3)
    x = torch.randn(5, 3)
    assert torch.equal(ghost(x), batchnorm(x))
    for name, buffer in batchnorm.named_buffers():
        assert torch.equal(ghost.get_buffer(name), buffer), name


@pytest.mark.parametrize(("cls", "shape"), [(GhostBatchNorm1d, (12, 5)), (GhostBatchNorm2d, (12, 5, 2, 2))])
@pytest.mark.parametrize("affine", [True, False])
def test_a_wrong_channel_count_is_reported_in_channels(cls, shape, affine):
    module = cls(4, ghost_batch_size=3, affine=affine)
    with pytest.raises(ValueError, match=r"input of 5 channels .*num_features=4"):
        module(torch.randn(shape))


def test_without_weights_or_running_statistics_any_channel_count_works_like_batchnorm():
    ghost = GhostBatchNorm1d(4, ghost_batch_size=3, affine=False, track_running_stats=False)
    x = torch.randn(6, 5)
    expected = torch.cat([nn.functional.batch_norm(x[i : i + 3], None, None, training=True) for i in (0, 3)])
    torch.testing.assert_close(ghost(x), expected)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, None])
def test_assigning_a_bad_ghost_batch_size_raises_and_keeps_the_old_one(bad):
    module = GhostBatchNorm2d(3, ghost_batch_size=8)
    with pytest.raises(ValueError, match="ghost_batch_size"):
        module.ghost_batch_size = bad
    assert module.ghost_batch_size == 8
    module.ghost_batch_size = 2
    assert module.ghost_batch_size == 2 and "ghost_batch_size=2" in repr(module)
    assert module(torch.randn(6, 3, 2, 2)).shape == (6, 3, 2, 2) and module.num_batches_tracked.item() == 3


def test_a_module_pickled_with_the_plain_attribute_loads():
    module = GhostBatchNorm2d(3, ghost_batch_size=8)
    state = dict(module.__dict__)
    state["ghost_batch_size"] = state.pop("_ghost_batch_size")  # the layout before the property
    restored = GhostBatchNorm2d.__new__(GhostBatchNorm2d)
    restored.__setstate__(state)
    assert restored.ghost_batch_size == 8
    assert copy.deepcopy(restored).ghost_batch_size == 8


def test_wrong_input_rank_raises_like_batchnorm():
    with pytest.raises(ValueError, match="expected 4D input"):
        GhostBatchNorm2d(3, ghost_batch_size=2)(torch.randn(8, 3, 4))


def test_is_a_batchnorm_with_the_same_state_dict_and_converts_to_sync_batchnorm():
    ghost = GhostBatchNorm2d(4, ghost_batch_size=16)
    assert isinstance(ghost, nn.BatchNorm2d)
    assert list(ghost.state_dict()) == list(nn.BatchNorm2d(4).state_dict())
    assert "ghost_batch_size=16" in repr(ghost)
    with torch.no_grad():
        ghost.running_mean.fill_(0.25)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(ghost))
    assert isinstance(synced[0], nn.SyncBatchNorm)
    assert torch.equal(synced[0].running_mean, ghost.running_mean)
    assert synced[0].weight is ghost.weight


def test_convert_to_ghost_batchnorm_keeps_parameters_statistics_and_mode():
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=0.2),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5, affine=False)),
    )
    x = torch.randn(6, 3, 6, 6)
    model(x)  # non-trivial running statistics
    model.eval()
    before = model(x)
    batchnorm = model[1]
    weight, running_mean = batchnorm.weight, batchnorm.running_mean

    converted = convert_to_ghost_batchnorm(model, ghost_batch_size=2)
    assert converted is model
    assert type(model[1]) is GhostBatchNorm2d and type(model[2][2]) is GhostBatchNorm1d
    assert model[1].ghost_batch_size == 2 and model[1].momentum == 0.2 and not model[2][2].affine
    assert model[1].weight is weight and model[1].running_mean is running_mean
    assert not model[1].training
    assert torch.equal(model(x), before)

    model.train()
    model(x)
    assert model[1].num_batches_tracked.item() == 1 + 3  # one BatchNorm step, then 6/2 ghost batches


def test_convert_a_bare_batchnorm_and_reconvert_a_ghost():
    ghost = convert_to_ghost_batchnorm(nn.BatchNorm3d(2), ghost_batch_size=8)
    assert type(ghost) is GhostBatchNorm3d and ghost.ghost_batch_size == 8
    again = convert_to_ghost_batchnorm(ghost, ghost_batch_size=4)
    assert type(again) is GhostBatchNorm3d and again.ghost_batch_size == 4
    sync = nn.SyncBatchNorm(2)
    assert convert_to_ghost_batchnorm(sync, ghost_batch_size=4) is sync


@pytest.mark.parametrize(("batch", "ghost"), [(2, 1), (5, 2), (9, 4)])
def test_channels_last_stays_with_ghost_or_tail_batches_of_one_sample(batch, ghost):
    """A ghost batch of one sample (spatial size > 1) leaves torch free to pick either format."""
    module = GhostBatchNorm2d(2, ghost_batch_size=ghost)
    x = torch.randn(batch, 2, 2, 2).to(memory_format=torch.channels_last)
    output = module(x)
    assert output.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(output, copy.deepcopy(module)(x.contiguous()))
