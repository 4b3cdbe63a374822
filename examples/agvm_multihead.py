"""draft"""

import argparse
import math

import torch
from torch import nn

from largebatch.optimizers.agvm import AGVM, agvm_param_groups

INPUTS, GEOMETRY, HIDDEN, CLASSES = 32, 8, 64, 10
DIVERGED_LOSS = 1e3


class MultiHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.cls = nn.Linear(HIDDEN, CLASSES)
        self.box = nn.Linear(HIDDEN + GEOMETRY, 1)
        nn.init.zeros_(self.box.weight)
        nn.init.zeros_(self.box.bias)

    def losses(self, x, geometry, label, box):
        features = self.backbone(x)
        predicted = self.box(torch.cat([features, geometry], 1)).squeeze(1)
        return nn.functional.cross_entropy(self.cls(features), label), nn.functional.mse_loss(predicted, box)


def make_batch(gen, teacher, size, args):
    x = torch.randn(size, INPUTS, generator=gen)
    geometry = args.scale * torch.randn(size, GEOMETRY, generator=gen)
    hidden = torch.relu(x @ teacher[0])
    label = (hidden @ teacher[1]).argmax(1)
    box = geometry @ teacher[2] / args.scale + args.noise * torch.randn(size, generator=gen)
    return x, geometry, label, box


def train(use_agvm, lr, args):
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    teacher = (
        torch.randn(INPUTS, HIDDEN, generator=gen) / math.sqrt(INPUTS),
        torch.randn(HIDDEN, CLASSES, generator=gen),
        torch.randn(GEOMETRY, generator=gen) / math.sqrt(GEOMETRY),
    )
    model = MultiHead()
    base = torch.optim.SGD(agvm_param_groups(model), lr=lr, momentum=args.momentum)
    agvm = AGVM(base, interval=args.interval, start_step=0, stop_step=args.stop, static=not use_agvm)
    schedule = torch.optim.lr_scheduler.LambdaLR(agvm, lambda step: min(1.0, (step + 1) / args.warmup))
    half = args.batch // 2
    history = []
    ds = []
    for step in range(args.steps):
        x, geometry, label, box = make_batch(gen, teacher, args.batch, args)
        parts = []

        def loss(sl):
            cls_loss, box_loss = model.losses(x[sl], geometry[sl], label[sl], box[sl])
            parts.append((cls_loss.item(), box_loss.item()))
            return cls_loss + args.box_weight * box_loss

        agvm.zero_grad()
        agvm.backward_halves(lambda: loss(slice(None, half)), lambda: loss(slice(half, None)))
        cls_loss = (parts[0][0] + parts[1][0]) / 2
        box_loss = (parts[0][1] + parts[1][1]) / 2
        history.append((cls_loss, box_loss))
        if not math.isfinite(box_loss + cls_loss) or box_loss > DIVERGED_LOSS:
            break
        agvm.step()
        schedule.step()
        if args.verbose and step % 20 == 0:
            print(step, f"{cls_loss:.4f} {box_loss:.4f}", agvm.scale_factors.tolist())
    tail = history[-args.tail:]
    return {
        "diverged": len(history) < args.steps,
        "steps": len(history),
        "cls": sum(h[0] for h in tail) / len(tail),
        "box": sum(h[1] for h in tail) / len(tail),
        "factors": dict(zip(agvm.module_names, agvm.scale_factors.tolist())),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--stop", type=int, default=None)
    p.add_argument("--interval", type=int, default=1)
    p.add_argument("--tail", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--noise", type=float, default=2.0)
    p.add_argument("--box_weight", type=float, default=1.0)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--only", choices=["single", "agvm"], default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    for lr in args.lrs:
        for use in (False, True):
            if args.only and args.only != ("agvm" if use else "single"):
                continue
            r = train(use, lr, args)
            print(lr, "AGVM" if use else "single", r, flush=True)


if __name__ == "__main__":
    main()
