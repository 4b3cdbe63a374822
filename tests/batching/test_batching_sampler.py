"""`GrowingBatchSampler`: coverage while the size changes, resume, DataLoader use."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from largebatch.batching import AdaptiveBatchSize, GradientStatistics, GrowingBatchSampler


def statistics_requiring(batch_size: float) -> GradientStatistics:
    """Statistics for which the norm test with eta = 1 asks for `batch_size`."""
    one = torch.tensor(1.0, dtype=torch.float64)
    return GradientStatistics(one, one, one, torch.tensor(batch_size, dtype=torch.float64), one, one, (one,))


def draw(sampler, controller, growth: dict[int, int], epochs: int):
    """Run `epochs` epochs; after batch number k (counted over the run) the test asks for growth[k].

    Returns, per epoch, the batches with the controller's size when each was drawn.
    """
    seen, drawn = [], 0
    for _ in range(epochs):
        epoch = []
        for batch in sampler:
            epoch.append((batch, controller.batch_size))
            drawn += 1
            controller.step(statistics_requiring(growth.get(drawn, 0)))
        seen.append(epoch)
    return seen


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(1, 200),
    b0=st.integers(2, 8),
    growth=st.dictionaries(st.integers(1, 60), st.integers(2, 64), max_size=6),
    shuffle=st.booleans(),
)
def test_every_index_once_per_epoch_while_the_size_changes(length, b0, growth, shuffle):
    controller = AdaptiveBatchSize(b0, 64, eta=1.0)
    sampler = GrowingBatchSampler(length, controller, shuffle=shuffle, seed=3)
    for epoch in draw(sampler, controller, growth, epochs=3):
        assert sorted(i for batch, _ in epoch for i in batch) == list(range(length))
        assert all(len(batch) == size for batch, size in epoch[:-1])  # only the tail may differ:
        last_batch, size = epoch[-1]
        assert min(2, length) <= len(last_batch) <= size + 1  # short, or holding a lone last index


@settings(max_examples=30, deadline=None)
@given(
    length=st.integers(1, 120),
    b0=st.integers(2, 8),
    growth=st.dictionaries(st.integers(1, 40), st.integers(2, 64), max_size=5),
)
def test_drop_last_yields_only_full_batches_of_distinct_indices(length, b0, growth):
    controller = AdaptiveBatchSize(b0, 64, eta=1.0)
    sampler = GrowingBatchSampler(length, controller, shuffle=True, drop_last=True)
    seen, drawn = [], 0
    for _ in range(2):
        epoch = []
        for batch in sampler:
            assert len(batch) == controller.batch_size  # the size in effect when it was drawn
            epoch += batch
            drawn += 1
            controller.step(statistics_requiring(growth.get(drawn, 0)))
        assert len(epoch) == len(set(epoch)) and length - len(epoch) < 64
        seen.append(epoch)


@settings(max_examples=30, deadline=None)
@given(
    length=st.integers(1, 150),
    growth=st.dictionaries(st.integers(1, 50), st.integers(2, 64), max_size=5),
    stop=st.integers(0, 60),
    drop_last=st.booleans(),
)
def test_resume_from_state_dict_continues_the_same_sequence(length, growth, stop, drop_last):
    assume(not drop_last or length >= 64)  # else every epoch is dropped whole and the run never ends
    def run(controller, sampler, batches, start):
        out, drawn = [], start
        iterator = iter(sampler)
        while len(out) < batches:
            batch = next(iterator, None)
            if batch is None:  # end of an epoch: the next iter() starts the next one
                iterator = iter(sampler)
                continue
            out.append(batch)
            drawn += 1
            controller.step(statistics_requiring(growth.get(drawn, 0)))
        return out

    total = 60
    controller = AdaptiveBatchSize(2, 64, eta=1.0)
    reference = run(controller, GrowingBatchSampler(length, controller, drop_last=drop_last, seed=5), total, 0)

    controller = AdaptiveBatchSize(2, 64, eta=1.0)
    sampler = GrowingBatchSampler(length, controller, drop_last=drop_last, seed=5)
    head = run(controller, sampler, stop, 0)
    saved_sampler, saved_controller = sampler.state_dict(), controller.state_dict()

    controller = AdaptiveBatchSize(2, 64, eta=1.0)
    controller.load_state_dict(saved_controller)
    sampler = GrowingBatchSampler(length, controller, drop_last=drop_last, seed=5)
    sampler.load_state_dict(saved_sampler)
    tail = run(controller, sampler, total - stop, stop)
    assert head + tail == reference


def test_epochs_are_fresh_permutations_and_no_shuffle_is_in_order():
    controller = AdaptiveBatchSize(4, 4)
    shuffled = GrowingBatchSampler(40, controller, shuffle=True, seed=0)
    first, second = [i for b in shuffled for i in b], [i for b in shuffled for i in b]
    assert first != second and sorted(first) == sorted(second) == list(range(40))
    assert shuffled.epoch == 1
    shuffled.set_epoch(0)
    assert [i for b in shuffled for i in b] == first
    ordered = GrowingBatchSampler(10, controller, shuffle=False)
    assert list(ordered) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(GrowingBatchSampler(9, controller, shuffle=False)) == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    assert list(GrowingBatchSampler(9, controller, shuffle=False, drop_last=True)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_dataloader_batches_follow_the_controller():
    data = TensorDataset(torch.arange(100).float())
    controller = AdaptiveBatchSize(4, 32, eta=1.0)
    sampler = GrowingBatchSampler(data, controller, seed=1)
    assert len(sampler) == 25
    loader = DataLoader(data, batch_sampler=sampler)
    sizes, values = [], []
    for (x,) in loader:
        sizes.append(len(x))
        values += x.long().tolist()
        controller.step(statistics_requiring(2 * len(x)))
    assert sorted(values) == list(range(100))
    assert sizes[:4] == [4, 8, 16, 32] and all(s == 32 for s in sizes[4:-1])
    assert len(sampler) == 4  # at the grown size


def test_bad_arguments_raise_value_errors_naming_them():
    controller = AdaptiveBatchSize(2, 8)
    with pytest.raises(ValueError, match="Invalid data_source"):
        GrowingBatchSampler(0, controller)
    with pytest.raises(ValueError, match="Invalid data_source"):
        GrowingBatchSampler(object(), controller)
    with pytest.raises(ValueError, match="Invalid controller"):
        GrowingBatchSampler(10, 4)
    with pytest.raises(ValueError, match="Invalid shuffle"):
        GrowingBatchSampler(10, controller, shuffle=1)
    with pytest.raises(ValueError, match="Invalid seed"):
        GrowingBatchSampler(10, controller, seed=1.5)
    sampler = GrowingBatchSampler(10, controller)
    with pytest.raises(ValueError, match="Invalid epoch"):
        sampler.set_epoch(-1)
    with pytest.raises(ValueError, match="saved length=11"):
        sampler.load_state_dict({"epoch": 0, "position": 0, "length": 11, "seed": 0})
    with pytest.raises(ValueError, match=r"position 12 \(must be an int in \[0, 10\]"):
        sampler.load_state_dict({"epoch": 0, "position": 12, "length": 10, "seed": 0})
