"""`GrowingBatchSampler`: coverage while the size changes, resume, DataLoader use."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, TensorDataset

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


# ---------------------------------------------------------------------------- data-parallel ranks


@settings(max_examples=30, deadline=None)
@given(
    world=st.integers(2, 4),
    length=st.integers(4, 150),
    growth=st.dictionaries(st.integers(1, 30), st.integers(2, 64), max_size=5),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
)
def test_ranks_split_every_global_batch_and_see_every_index_once(world, length, growth, shuffle, drop_last):
    assume(length >= world)
    controllers = [AdaptiveBatchSize(2 * world, 16 * world, eta=1.0, multiple=world) for _ in range(world)]
    samplers = [
        GrowingBatchSampler(length, c, shuffle=shuffle, drop_last=drop_last, seed=2, num_replicas=world, rank=r)
        for r, c in enumerate(controllers)
    ]
    for _ in range(2):  # epochs
        iterators, steps, drawn = [iter(s) for s in samplers], [], 0
        while True:
            batches = [next(it, None) for it in iterators]
            if batches[0] is None:
                assert all(b is None for b in batches)  # all ranks end the epoch together
                break
            steps.append((batches, controllers[0].batch_size))
            drawn += 1
            for c in controllers:  # the same (all-reduced) statistics on every rank
                c.step(statistics_requiring(growth.get(drawn, 0)))
        full = steps if drop_last else steps[:-1]
        for batches, size in full:
            assert [len(b) for b in batches] == [size // world] * world
        if not drop_last:
            last, size = steps[-1]
            lengths = [len(b) for b in last]
            assert max(lengths) - min(lengths) <= 1  # the final batch is split evenly too
            assert sum(lengths) < size + 2 * world  # short, or holding a remainder too small to split
        seen = [i for batches, _ in steps for b in batches for i in b]
        assert len(seen) == len(set(seen))
        if not drop_last:
            assert sorted(seen) == list(range(length))
        else:
            assert length - len(seen) < controllers[0].batch_size


def test_one_rank_with_replicas_one_is_the_plain_sampler():
    plain = list(GrowingBatchSampler(50, AdaptiveBatchSize(4, 4), seed=7))
    sharded = list(GrowingBatchSampler(50, AdaptiveBatchSize(4, 4), seed=7, num_replicas=1, rank=0))
    assert plain == sharded


def test_two_ranks_take_consecutive_halves_of_each_global_batch():
    controller = AdaptiveBatchSize(4, 4, multiple=2)
    rank0 = list(GrowingBatchSampler(11, controller, shuffle=False, num_replicas=2, rank=0))
    rank1 = list(GrowingBatchSampler(11, controller, shuffle=False, num_replicas=2, rank=1))
    # Global batches [0..3], [4..10]: 3 indices left after the second would give one rank a
    # single sample, so they join it; its 7 split 3 / 4.
    assert rank0 == [[0, 1], [4, 5, 6]]
    assert rank1 == [[2, 3], [7, 8, 9, 10]]


def test_resume_on_another_number_of_ranks_continues_the_global_sequence():
    controller = AdaptiveBatchSize(4, 4, multiple=4)
    single = GrowingBatchSampler(40, controller, seed=1, num_replicas=1, rank=0)
    iterator = iter(single)
    head = [next(iterator) for _ in range(3)]
    saved = single.state_dict()
    rest = list(iterator)
    shards = []
    for rank in range(2):
        sampler = GrowingBatchSampler(40, controller, seed=1, num_replicas=2, rank=rank)
        sampler.load_state_dict(saved)
        shards.append(list(sampler))
    assert [a + b for a, b in zip(*shards)] == rest
    assert sorted(i for b in head + rest for i in b) == list(range(40))


def test_dataloader_workers_keep_ranks_in_lockstep_and_every_index_once():
    """With workers the loader draws ahead (a new size arrives late), the same on every rank."""
    data = TensorDataset(torch.arange(120))
    controllers = [AdaptiveBatchSize(4, 32, eta=1.0, multiple=2) for _ in range(2)]
    loaders = [
        DataLoader(data, batch_sampler=GrowingBatchSampler(data, c, seed=0, num_replicas=2, rank=r), num_workers=1)
        for r, c in enumerate(controllers)
    ]
    seen, sizes = [], [[], []]
    for (x0,), (x1,) in zip(*loaders):
        seen += x0.tolist() + x1.tolist()
        sizes[0].append(len(x0))
        sizes[1].append(len(x1))
        for c in controllers:
            c.step(statistics_requiring(4 * c.batch_size))
    assert sorted(seen) == list(range(120))
    assert sizes[0] == sizes[1] and sizes[0][0] == 2 and max(sizes[0]) > 2


def test_rank_arguments_are_validated():
    controller = AdaptiveBatchSize(4, 8, multiple=2)
    with pytest.raises(ValueError, match="Invalid num_replicas"):
        GrowingBatchSampler(10, controller, num_replicas=0, rank=0)
    with pytest.raises(ValueError, match="Invalid rank"):
        GrowingBatchSampler(10, controller, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="Invalid rank"):
        GrowingBatchSampler(10, controller, num_replicas=2, rank=-1)
    with pytest.raises(ValueError, match="multiple=1 is not a multiple of num_replicas=2"):
        GrowingBatchSampler(10, AdaptiveBatchSize(4, 8), num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="max_batch_size=9 is not a multiple of num_replicas=2"):
        GrowingBatchSampler(10, AdaptiveBatchSize(4, 9, multiple=2), num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="initial_batch_size=3 is not a multiple of num_replicas=2"):
        GrowingBatchSampler(10, AdaptiveBatchSize(3, 8, multiple=2), num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="length 3"):
        GrowingBatchSampler(3, AdaptiveBatchSize(4, 8, multiple=4), num_replicas=4, rank=0)


def test_a_sampler_as_data_source_is_refused():
    """A DistributedSampler's length is one rank's share: using it silently dropped half the data."""
    data = TensorDataset(torch.arange(300))
    controller = AdaptiveBatchSize(4, 8)
    for sampler in (DistributedSampler(data, num_replicas=2, rank=0), SequentialSampler(data)):
        with pytest.raises(ValueError, match="Invalid data_source: .*Sampler.*pass the dataset itself"):
            GrowingBatchSampler(sampler, controller)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"position": 3.5}, r"position 3.5 \(must be an int"),
        ({"position": True}, r"position True \(must be an int"),
        ({"position": -1}, r"position -1 \(must be an int in \[0, 10\]"),
        ({"epoch": 1.0}, r"epoch 1.0 \(must be an int >= 0"),
        ({"epoch": "2"}, r"epoch '2' \(must be an int >= 0"),
        ({"epoch": -1}, r"epoch -1 \(must be an int >= 0"),
        ({"epoch": None}, r"epoch None"),
        ({"seed": 3}, r"saved seed=3"),
    ],
)
def test_load_state_dict_refuses_bad_values_and_changes_nothing(change, message):
    controller = AdaptiveBatchSize(2, 8)
    sampler = GrowingBatchSampler(10, controller)
    iterator = iter(sampler)
    next(iterator)
    before = sampler.state_dict()
    with pytest.raises(ValueError, match=message):
        sampler.load_state_dict(before | change)
    assert sampler.state_dict() == before


def test_load_state_dict_refuses_a_missing_key_or_a_non_dict():
    sampler = GrowingBatchSampler(10, AdaptiveBatchSize(2, 8))
    with pytest.raises(ValueError, match=r"missing \['position'\]"):
        sampler.load_state_dict({"epoch": 0, "length": 10, "seed": 0})
    with pytest.raises(ValueError, match="must be a dict"):
        sampler.load_state_dict([0, 0, 10, 0])
