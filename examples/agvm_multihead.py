"""Single learning rate vs AGVM on a small two-head model at batch 4096 (CPU, about a minute).

A toy dense-prediction network: a shared MLP backbone and two heads,

- ``cls``: 10-way classification of every sample, labels from a fixed teacher network (clean:
  the two half-batch gradients agree, so the backbone's disagreement d is small);
- ``box``: a scalar regression with heavy label noise (the target is mostly Gaussian noise of
  std ``BOX_NOISE``) from the backbone features and an extra "geometry" input of large scale
  ``GEOMETRY_SCALE``, like unnormalised box coordinates. The noise makes the box head's two
  half-batch gradients disagree (d near 1); the large input makes its loss sharp: the Hessian
  of ``BOX_WEIGHT · mse`` in the geometry weights is about ``2 · BOX_WEIGHT · GEOMETRY_SCALE²``
  = 20, and heavy-ball SGD with momentum μ is stable only while ``lr · λ < 2(1 + μ)`` = 3.6,
  i.e. for a box-head lr below about 0.18 (in the runs: 0.16 is stable, 0.18 diverges).

AGVM (reference: the backbone) gives the box head the factor
``s = sqrt(clamp(d_backbone / d_box, 0.5, 10))``, at most ``sqrt(0.5) ≈ 0.71`` lower; after
60 measurements from ``s = 1`` (EMA momentum 0.97) it is about 0.76, so the head stays
stable up to a peak lr of about 0.18 / 0.76 ≈ 0.24 while the backbone trains at the full
rate. The cls head's gradient is more coherent than the backbone's, so AGVM also raises its
lr a little (s_cls of 1.05 to 1.25 depending on the seed).

Measurement window. The factors are measured on every step (``interval=1``) of the first
``--measure-steps`` steps of the warmup and frozen afterwards (``stop_step``). This matters:
the cosine sees noise, not sharpness. Once the box head's lr nears its stability limit, its
own oscillation is common to both halves, d_box falls below d_backbone and AGVM *raises* the
box factor (to about 2), which makes the oscillation worse: measured to the end
(``--measure-steps 300``) AGVM diverges even at peak lr 0.14, where the single lr is stable.

Every run uses the same seed, data stream (fresh samples each step, so the loss on a batch
before its step is a held-out loss) and linear warmup; the single-lr run is the same loop
with the AGVM wrapper ``static`` at factors 1, which is exactly the base SGD. A run diverged
when a loss is non-finite or above ``DIVERGED_LOSS``; the box loss cannot go below about
``BOX_NOISE² = 9``.

    python examples/agvm_multihead.py [--lrs 0.14 0.16 0.18 0.2 0.22] [--seed 0] [--measure-steps 60]
"""

import argparse
import math

import torch
from torch import Tensor, nn

from largebatch.optimizers.agvm import AGVM, agvm_param_groups

INPUTS, GEOMETRY, HIDDEN, CLASSES = 32, 8, 64, 10
GEOMETRY_SCALE = 10.0  # std of the box head's extra input: makes the box head the sharp module
BOX_NOISE = 3.0  # std of the box targets' label noise: makes the box head the noisy module
BOX_SIGNAL = 0.5  # std of the learnable part of the box target (a function of the inputs)
# Small so that the box head's noisy gradient, passed back through the features, does not
# swamp the backbone's (clean) classification gradient: AGVM's reference must stay coherent.
BOX_WEIGHT = 0.1
MOMENTUM = 0.8
DIVERGED_LOSS = 1e3


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.cls = nn.Linear(HIDDEN, CLASSES)
        self.box = nn.Linear(HIDDEN + GEOMETRY, 1)
        nn.init.zeros_(self.box.weight)  # start at the noise-only optimum of the geometry part
        nn.init.zeros_(self.box.bias)

    def losses(self, x: Tensor, geometry: Tensor, label: Tensor, box: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(x)
        predicted = self.box(torch.cat([features, geometry], 1)).squeeze(1)
        return nn.functional.cross_entropy(self.cls(features), label), nn.functional.mse_loss(predicted, box)


class Task:
    """Synthetic data drawn on the fly from fixed random teachers."""

    def __init__(self, gen: torch.Generator) -> None:
        self.gen = gen
        self.hidden = torch.randn(INPUTS, HIDDEN, generator=gen) / math.sqrt(INPUTS)
        self.classes = torch.randn(HIDDEN, CLASSES, generator=gen)
        self.box = torch.randn(INPUTS, generator=gen) / math.sqrt(INPUTS)

    def batch(self, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = torch.randn(size, INPUTS, generator=self.gen)
        geometry = GEOMETRY_SCALE * torch.randn(size, GEOMETRY, generator=self.gen)
        label = (torch.relu(x @ self.hidden) @ self.classes).argmax(1)
        box = BOX_SIGNAL * torch.tanh(x @ self.box) + BOX_NOISE * torch.randn(size, generator=self.gen)
        return x, geometry, label, box


def train(use_agvm: bool, lr: float, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    task = Task(torch.Generator().manual_seed(args.seed))
    model = TwoHeads()
    base = torch.optim.SGD(agvm_param_groups(model), lr=lr, momentum=MOMENTUM)  # backbone, cls, box
    agvm = AGVM(base, interval=1, start_step=0, stop_step=args.measure_steps - 1, static=not use_agvm)
    schedule = torch.optim.lr_scheduler.LambdaLR(agvm, lambda step: min(1.0, (step + 1) / args.warmup))
    half = args.batch // 2
    history: list[tuple[float, float]] = []
    for _ in range(args.steps):
        x, geometry, label, box = task.batch(args.batch)
        parts: list[tuple[Tensor, Tensor]] = []

        def half_loss(rows: slice) -> Tensor:
            cls_loss, box_loss = model.losses(x[rows], geometry[rows], label[rows], box[rows])
            parts.append((cls_loss.detach(), box_loss.detach()))
            return cls_loss + BOX_WEIGHT * box_loss

        agvm.zero_grad()
        agvm.backward_halves(lambda: half_loss(slice(None, half)), lambda: half_loss(slice(half, None)))
        history.append(tuple(float(a + b) / 2 for a, b in zip(*parts)))
        if not all(math.isfinite(v) and v < DIVERGED_LOSS for v in history[-1]):
            break
        agvm.step()
        schedule.step()
    tail = history[-args.tail :]
    return {
        "diverged_at": None if len(history) == args.steps else len(history) - 1,
        "cls": sum(h[0] for h in tail) / len(tail),
        "box": sum(h[1] for h in tail) / len(tail),
        "factors": dict(zip(agvm.module_names, agvm.scale_factors.tolist())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.14, 0.16, 0.18, 0.2, 0.22], help="peak lrs")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=200, help="linear warmup steps")
    parser.add_argument("--measure-steps", type=int, default=60, help="AGVM measures steps [0, this)")
    parser.add_argument("--tail", type=int, default=20, help="final loss: mean over the last TAIL steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"SGD momentum {MOMENTUM}, batch {args.batch}, {args.steps} steps, warmup {args.warmup}, "
        f"AGVM measures steps 0-{args.measure_steps - 1}, seed {args.seed}\n"
    )
    print("| peak lr | run | diverged | cls loss | box loss | s_cls | s_box |")
    print("|---|---|---|---|---|---|---|")
    for lr in args.lrs:
        for use_agvm in (False, True):
            r = train(use_agvm, lr, args)
            diverged = "no" if r["diverged_at"] is None else f"step {r['diverged_at']}"
            print(
                f"| {lr:g} | {'AGVM' if use_agvm else 'single lr'} | {diverged} | {r['cls']:.3f} | {r['box']:.3g} "
                f"| {r['factors']['cls']:.3f} | {r['factors']['box']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
