"""End to end: sampler + per-sample statistics + controller with AdaGrad-Norm, Adagrad and Adam."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from largebatch.batching import AdaptiveBatchSize, GrowingBatchSampler, gradient_statistics, per_sample_gradients
from largebatch.optimizers import AdaGradNorm
from largebatch.schedules import BatchSizeCoupledLR

INITIAL_BATCH, MAX_BATCH, STEPS = 4, 256, 40
# θ = ν = 0.5 (the paper's CIFAR value): with 0.1 this noisy problem jumps to MAX_BATCH at once.
TOLERANCE = 0.5


def half_squared_error(output, target):
    return 0.5 * (output - target).square().mean()


def regression_data(seed=0, samples=1024, dim=5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, dim, generator=generator)
    y = x @ torch.randn(dim, 1, generator=generator) + 0.3 * torch.randn(samples, 1, generator=generator)
    return TensorDataset(x, y)


def train(make_optimizer, make_coupling=None):
    torch.manual_seed(0)
    data = regression_data()
    model = torch.nn.Linear(5, 1)
    optimizer = make_optimizer(model.parameters())
    coupling = None if make_coupling is None else make_coupling(optimizer)
    controller = AdaptiveBatchSize(
        INITIAL_BATCH,
        MAX_BATCH,
        test="augmented_inner_product",
        theta=TOLERANCE,
        nu=TOLERANCE,
        interval=2,
        lr_coupling=coupling,
    )
    loader = DataLoader(data, batch_sampler=GrowingBatchSampler(data, controller, seed=0))

    def full_loss():
        with torch.no_grad():
            return float(half_squared_error(model(data.tensors[0]), data.tensors[1]))

    initial_loss, batch_sizes, step = full_loss(), [], 0
    while step < STEPS:
        for x, y in loader:
            optimizer.zero_grad()
            half_squared_error(model(x), y).backward()
            statistics = None
            if controller.needs_statistics:
                grads = per_sample_gradients(model, half_squared_error, x, y)
                statistics = gradient_statistics(grads.values(), mean_gradient=[p.grad for p in model.parameters()])
            optimizer.step()
            batch_sizes.append(controller.batch_size)  # len(x), except at an epoch's short tail
            controller.step(statistics)
            step += 1
            if step == STEPS:
                break
    return initial_loss, full_loss(), batch_sizes, controller, optimizer


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: AdaGradNorm(params, lr=0.5),
        lambda params: torch.optim.Adagrad(params, lr=0.3),
    ],
    ids=["AdaGradNorm", "Adagrad"],
)
def test_adagrad_methods_train_while_the_batch_grows(make_optimizer):
    initial_loss, final_loss, batch_sizes, controller, optimizer = train(make_optimizer)
    assert final_loss < 0.2 * initial_loss
    assert batch_sizes[0] == INITIAL_BATCH and batch_sizes[-1] > 8 * INITIAL_BATCH
    assert len(set(batch_sizes)) >= 4  # grown in several steps, not one jump
    assert all(a <= b for a, b in zip(batch_sizes, batch_sizes[1:])) and max(batch_sizes) <= MAX_BATCH
    unchanged_lr = 0.5 if isinstance(optimizer, AdaGradNorm) else 0.3  # no coupling by default
    assert optimizer.param_groups[0]["lr"] == pytest.approx(unchanged_lr)


def test_adam_with_sqrt_coupled_lr_follows_the_batch():
    base_lr = 0.05

    def coupling(optimizer):
        return BatchSizeCoupledLR(optimizer, base_batch_size=INITIAL_BATCH, rule="sqrt")

    initial_loss, final_loss, batch_sizes, controller, optimizer = train(
        lambda params: torch.optim.Adam(params, lr=base_lr), coupling
    )
    assert final_loss < 0.2 * initial_loss
    assert controller.batch_size > 4 * INITIAL_BATCH
    expected_lr = base_lr * (controller.batch_size / INITIAL_BATCH) ** 0.5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr, rel=1e-6)
