"""AdAdaGrad on softmax regression: an adaptive batch against fixed small and large batches.

Multinomial logistic regression on scikit-learn's handwritten digits (1797 images of 8×8, no
download), trained with AdaGrad-Norm. Three runs from the same initialisation:

* adaptive: batch 8 at first, grown by the norm test (η = 0.5, the paper's CIFAR value; its
  default 0.1 jumps to hundreds at the first test here) every 5 steps, up to 1024,
* fixed small: batch 8 throughout,
* fixed large: batch 1024 throughout,

each until the test accuracy reaches the target. The table reports the optimizer steps and the
samples (gradient evaluations) it took, and the batch size at the end.

    python examples/adadagrad_regression.py [--target 0.95] [--lr 0.5] [--eta 0.5] [--interval 5]
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from largebatch.batching import AdaptiveBatchSize, GrowingBatchSampler, gradient_statistics, per_sample_gradients
from largebatch.optimizers import AdaGradNorm

INITIAL_BATCH, MAX_BATCH = 8, 1024
MAX_STEPS = 20_000
EVALUATE_EVERY = 5  # steps between test-accuracy checks


def digits(seed: int) -> tuple[TensorDataset, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return TensorDataset(as_x(x_train), torch.tensor(y_train)), as_x(x_test), torch.tensor(y_test)


def steps_to_target(controller: AdaptiveBatchSize, adaptive: bool, target: float, lr: float, seed: int) -> dict:
    train, x_test, y_test = digits(seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 10)
    optimizer = AdaGradNorm(model.parameters(), lr=lr)
    loader = DataLoader(train, batch_sampler=GrowingBatchSampler(train, controller, seed=seed))
    loss_fn = torch.nn.functional.cross_entropy
    step, samples = 0, 0
    while step < MAX_STEPS:
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            statistics = None
            if adaptive and controller.needs_statistics:
                grads = per_sample_gradients(model, loss_fn, x, y)
                statistics = gradient_statistics(grads.values(), mean_gradient=[p.grad for p in model.parameters()])
            optimizer.step()
            if adaptive:
                controller.step(statistics)
            step, samples = step + 1, samples + len(x)
            if step % EVALUATE_EVERY == 0:
                with torch.no_grad():
                    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
                if accuracy >= target:
                    return {"steps": step, "samples": samples, "final_batch": controller.batch_size}
            if step == MAX_STEPS:
                break
    return {"steps": None, "samples": samples, "final_batch": controller.batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.95, help="test accuracy to reach")
    parser.add_argument("--lr", type=float, default=0.5, help="AdaGrad-Norm step size (same for all runs)")
    parser.add_argument("--eta", type=float, default=0.5, help="norm-test tolerance")
    parser.add_argument("--interval", type=int, default=5, help="steps between norm tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    runs = {
        "adaptive 8 → 1024": (
            AdaptiveBatchSize(INITIAL_BATCH, MAX_BATCH, eta=args.eta, interval=args.interval),
            True,
        ),
        "fixed 8": (AdaptiveBatchSize(INITIAL_BATCH, INITIAL_BATCH), False),
        "fixed 1024": (AdaptiveBatchSize(MAX_BATCH, MAX_BATCH), False),
    }
    print(f"| run | steps to {args.target:.0%} test accuracy | samples seen | final batch |")
    print("|---|---:|---:|---:|")
    for name, (controller, adaptive) in runs.items():
        result = steps_to_target(controller, adaptive, args.target, args.lr, args.seed)
        steps = "not reached" if result["steps"] is None else str(result["steps"])
        print(f"| {name} | {steps} | {result['samples']} | {result['final_batch']} |")
    adaptive_controller = runs["adaptive 8 → 1024"][0]
    sizes = sorted({record.batch_size for record in adaptive_controller.history})
    print("\nadaptive batch sizes:", " → ".join(map(str, [INITIAL_BATCH] + sizes)))


if __name__ == "__main__":
    main()
