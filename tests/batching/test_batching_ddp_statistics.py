"""On 2 gloo ranks: the DDP statistics hook, the rank-sharded sampler, the noise-scale warmup.

One spawn runs every check (starting two interpreters that import torch dominates the cost):

* the hook's statistics equal `gradient_statistics` of the rank gradients in one process, with
  one small all-reduce (four or six numbers), for equal and unequal local batches;
* averaged over many steps at a fixed w on linear regression, they equal the closed form;
* `GrowingBatchSampler` driven by the noise-scale policy: every index exactly once per epoch over
  both ranks while the size changes mid-epoch, identical size sequences, and a mid-epoch resume
  that continues the same sequence.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from largebatch.batching import (
    AdaptiveBatchSize,
    DDPGradientStatistics,
    GradientNoiseScale,
    GrowingBatchSampler,
    gradient_statistics,
    gradient_statistics_hook,
)

from _gloo import CountingAllReduce, init_process_group, spawn  # tests/batching/_gloo.py

WORLD_SIZE = 2
TIMEOUT_S = 240
FIELDS = ("num_units", "num_samples", "mean_sq_norm", "variance_trace", "inner_product_variance", "orthogonal_variance")

# Linear regression y = w*·x + σε with x ~ N(0, I_d), loss ½(w·x − y)², at w − w* = δ: the
# per-sample gradient has mean δ and covariance Σ = (‖δ‖² + σ²)·I + δδᵀ (see test_batching_noise_scale).
DIM, SIGMA = 4, 1.0
DELTA = torch.tensor([1.0, -0.5, 0.5, 0.0], dtype=torch.float64)
DELTA_SQ = float(DELTA.square().sum())
CLOSED_FORM = {
    "variance_trace": DIM * (DELTA_SQ + SIGMA**2) + DELTA_SQ,
    "inner_product_variance": DELTA_SQ * (2 * DELTA_SQ + SIGMA**2),
    "orthogonal_variance": (DIM - 1) * (DELTA_SQ + SIGMA**2),
}


def half_squared_error(output, target):
    return 0.5 * (output.squeeze(-1) - target).square().mean()


def linear_model():
    torch.manual_seed(0)
    return torch.nn.Linear(DIM, 1, bias=False).double()


def hooked(model, inner_products):
    ddp = DistributedDataParallel(model)
    state = DDPGradientStatistics(inner_products=inner_products)
    ddp.register_comm_hook(state, gradient_statistics_hook)
    return ddp, state


def check_against_one_process(rank, counter):
    """Hook statistics == one process on the concatenated batch, units = the ranks' shards."""
    generator = torch.Generator().manual_seed(1)  # the same data on both ranks; each takes its shard
    x = torch.randn(12, DIM, generator=generator, dtype=torch.float64)
    y = torch.randn(12, generator=generator, dtype=torch.float64)
    for sizes in ((6, 6), (5, 7)):
        shards = x.split(list(sizes)), y.split(list(sizes))
        model = linear_model()
        with torch.no_grad():  # closed-form per-shard mean gradients of ½(w·x − y)²
            residual = x @ model.weight.reshape(-1) - y
            units = torch.stack([(r[:, None] * xs).mean(0) for r, xs in zip(residual.split(list(sizes)), shards[0])])
        for inner_products in (True, False):
            ddp, state = hooked(linear_model(), inner_products)
            state.record_next_backward(sizes[rank])
            half_squared_error(ddp(shards[0][rank]), shards[1][rank]).backward()
            counter.calls = 0
            got = state.statistics()
            assert counter.calls == 1, counter.calls  # one all-reduce of four or six numbers
            assert not state.recording
            mean = units.mean(0)  # DDP's plain mean of the rank gradients
            torch.testing.assert_close(got.mean_gradient[0].reshape(-1), mean, rtol=1e-12, atol=1e-14)
            if sizes[0] == sizes[1]:
                expected = gradient_statistics([units], list(sizes))
                names = FIELDS if inner_products else FIELDS[:4]
                for name in names:
                    torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-10, atol=1e-12)
            # Unbiased for any local sizes: Σ_r ‖g_r − G‖² / ((1 − 1/W) Σ_r 1/m_r).
            dof = (1 - 1 / WORLD_SIZE) * sum(1 / m for m in sizes)
            centered = units - mean
            torch.testing.assert_close(got.variance_trace, centered.square().sum() / dof, rtol=1e-10, atol=1e-12)
            assert float(got.num_samples) == 12 and float(got.num_units) == 2
            if inner_products:
                inner = centered @ mean
                torch.testing.assert_close(got.inner_product_variance, inner.square().sum() / dof, rtol=1e-10, atol=0)
            else:
                assert torch.isnan(got.inner_product_variance) and torch.isnan(got.orthogonal_variance)
            one_process = GradientNoiseScale(beta=0.0).update_from_statistics(gradient_statistics([units], list(sizes)))
            if sizes[0] == sizes[1]:
                assert GradientNoiseScale(beta=0.0).update_from_statistics(got) == pytest.approx(one_process, rel=1e-9)
            # A step that is not recorded is DDP's plain mean and records nothing.
            ddp.zero_grad()
            half_squared_error(ddp(shards[0][rank]), shards[1][rank]).backward()
            torch.testing.assert_close(ddp.module.weight.grad.reshape(-1), mean, rtol=1e-12, atol=1e-14)
            with pytest.raises(ValueError, match="without record_next_backward"):
                state.statistics()
            with pytest.raises(ValueError, match="Invalid local_batch_size"):
                state.record_next_backward(0)
            state.record_next_backward(6)
            with pytest.raises(ValueError, match="no gradient bucket was recorded"):
                state.statistics()  # no backward ran
    with pytest.raises(ValueError, match="Invalid inner_products"):
        DDPGradientStatistics(inner_products=1)


def check_closed_form(rank):
    """Averaged over steps at a fixed w, the DDP statistics and B_simple equal the closed form."""
    model = linear_model()
    torch.nn.init.zeros_(model.weight)  # w = 0, w* = −δ
    ddp, state = hooked(model, inner_products=True)
    generator = torch.Generator().manual_seed(100 + rank)
    monitor = GradientNoiseScale(beta=0.995)
    steps, local = 1500, 512
    sums = dict.fromkeys(CLOSED_FORM, 0.0)
    for _ in range(steps):
        x = torch.randn(local, DIM, generator=generator, dtype=torch.float64)
        y = x @ -DELTA + SIGMA * torch.randn(local, generator=generator, dtype=torch.float64)
        ddp.zero_grad()
        state.record_next_backward(local)
        half_squared_error(ddp(x), y).backward()
        stats = state.statistics()
        monitor.update_from_statistics(stats)
        for name in sums:
            sums[name] += float(getattr(stats, name)) / steps
    # One degree of freedom per step (two rank gradients): each step's estimate has a relative
    # standard deviation of about √2, so 1500 steps leave about 3.7 %; 15 % is four of those.
    # (Projecting on the sample mean of 1024 samples biases Var_ip by about 0.6 %.)
    for name, value in CLOSED_FORM.items():
        assert sums[name] == pytest.approx(value, rel=0.15), (name, sums[name], value)
    assert monitor.b_simple == pytest.approx(CLOSED_FORM["variance_trace"] / DELTA_SQ, rel=0.15)


def regression_data():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(300, DIM, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(DIM, generator=generator, dtype=torch.float64) + 0.5 * torch.randn(
        300, generator=generator, dtype=torch.float64
    )
    return x, y


class Run:
    """DDP training whose batch size follows the noise-scale warmup, logging (epoch, indices, size)."""

    def __init__(self):
        self.ddp, self.state = hooked(linear_model(), inner_products=False)
        self.optimizer = torch.optim.SGD(self.ddp.parameters(), lr=0.1)
        self.controller = AdaptiveBatchSize(
            4, 64, test="noise_scale", noise_scale=GradientNoiseScale(beta=0.5), noise_scale_factor=2.0, multiple=2
        )
        self.sampler = GrowingBatchSampler(300, self.controller, seed=3)  # num_replicas, rank from dist
        self.data = regression_data()
        self.log = []

    def train(self, steps):
        iterator = iter(self.sampler)
        while steps:
            batch = next(iterator, None)
            if batch is None:  # end of an epoch: a fresh iter() starts the next one
                iterator = iter(self.sampler)
                continue
            self.log.append((self.sampler.epoch, batch, self.controller.batch_size))
            x, y = self.data[0][batch], self.data[1][batch]
            self.optimizer.zero_grad()
            measuring = self.controller.needs_statistics
            if measuring:
                self.state.record_next_backward(len(batch))
            half_squared_error(self.ddp(x), y).backward()
            self.optimizer.step()
            self.controller.step(self.state.statistics() if measuring else None)
            steps -= 1

    def snapshot(self):
        return copy.deepcopy(
            {
                "model": self.ddp.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "controller": self.controller.state_dict(),
                "sampler": self.sampler.state_dict(),
            }
        )

    def restore(self, snapshot):
        self.ddp.module.load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.controller.load_state_dict(snapshot["controller"])
        self.sampler.load_state_dict(snapshot["sampler"])


def check_sampler(rank):
    steps, stop = 40, 5  # stop mid-epoch while the batch still grows (and the EMA matters)
    reference = Run()
    reference.train(steps)
    logs = [None] * WORLD_SIZE
    dist.all_gather_object(logs, reference.log)
    sizes = [[size for _, _, size in log] for log in logs]
    assert sizes[0] == sizes[1]  # lockstep
    epochs = sorted({epoch for epoch, _, _ in reference.log})
    assert len(epochs) >= 2, epochs  # at least one whole epoch
    first_epoch_sizes = {size for epoch, _, size in reference.log if epoch == epochs[0]}
    assert len(first_epoch_sizes) > 1, first_epoch_sizes  # the size changed mid-epoch
    for epoch in epochs[:-1]:  # the finished epochs
        seen = [i for log in logs for e, batch, _ in log if e == epoch for i in batch]
        assert sorted(seen) == list(range(300)), epoch  # every index once, over both ranks
        for log in logs:  # each rank: half of every global batch but the epoch's last
            batches = [(batch, size) for e, batch, size in log if e == epoch]
            assert all(len(batch) * WORLD_SIZE == size for batch, size in batches[:-1])

    interrupted = Run()
    interrupted.train(stop)
    saved = interrupted.snapshot()
    assert saved["sampler"]["position"] not in (0, 300)  # mid-epoch
    resumed = Run()  # a fresh process would build the same objects
    resumed.restore(saved)
    resumed.train(steps - stop)
    assert interrupted.log + resumed.log == reference.log


def worker(rank: int, store: str) -> None:
    init_process_group(rank, WORLD_SIZE, store, timeout_s=120)
    try:
        counter = CountingAllReduce()
        dist.all_reduce = counter
        check_against_one_process(rank, counter)
        check_closed_form(rank)
        check_sampler(rank)
        dist.barrier()  # no rank tears its gloo pairs down while the other still uses them
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_statistics_sampler_and_warmup_on_two_gloo_ranks():
    spawn(worker, WORLD_SIZE, TIMEOUT_S)


def test_the_state_refuses_a_missing_process_group_and_a_single_rank():
    with pytest.raises(ValueError, match="needs torch.distributed to be initialised"):
        DDPGradientStatistics()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="Invalid process_group: world size 1"):
            DDPGradientStatistics()
    finally:
        dist.destroy_process_group()
