"""Mutation check of the core math: does some test fail when one line of it is wrong?

    nice -n 19 python -m bench.mutation              # every mutant below
    python -m bench.mutation --only fused/lars.py    # the mutants whose id contains a string
    python -m bench.mutation --list                  # list them, run nothing

Each mutant is one textual change to one line of `optimizers/`, `fused/`, `schedules/`,
`batching/criteria.py` or `nn/ghost_batchnorm.py`, with the test files that should catch it.
The package and the tests are copied to a temporary folder once; every mutant is applied there
(the working tree is never modified), and its test files run with `pytest -x` under
`TRITON_INTERPRET=1` and `CI=1` (hypothesis derandomized, as on CI, so the result repeats).
A mutant is *caught* when pytest fails (or runs past `--timeout`), *survived* when it passes.
Before the mutants, the unmutated copy runs every listed test file once: a red baseline stops
the run. A mutant whose original text is no longer found (the code moved on) is reported
*stale*: update its line here.

This is a developer tool, not part of CI: a caught mutant costs seconds, a surviving one the
full run of its test files. The score and the machine it was measured on are in docs/mutation.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
COPIED = ("largebatch", "tests", "pyproject.toml")

OPTIMIZER_TESTS = (
    "tests/optimizers/test_against_oracle.py",
    "tests/optimizers/test_foreach_matches_per_tensor.py",
    "tests/optimizers/test_properties.py",
)
VALIDATION_TESTS = ("tests/optimizers/test_validation.py",)
FUSED_TESTS = (
    "tests/fused/test_fused_corners.py",
    "tests/fused/test_fused_against_reference.py",
    "tests/fused/test_fused_against_oracle.py",
    "tests/fused/test_fused_amp.py",
)
PLAN_TESTS = ("tests/fused/test_fused_plans.py",)
SCHEDULE_TESTS = (
    "tests/schedules/test_lr_scaling_rules.py",
    "tests/schedules/test_lr_schedulers.py",
    "tests/schedules/test_batch_size_coupled_lr.py",
)
CRITERIA_TESTS = ("tests/batching/test_batching_controller.py",)
GHOST_BN_TESTS = ("tests/nn/test_ghost_batchnorm.py",)


@dataclass(frozen=True)
class Mutant:
    path: str  # inside largebatch/
    old: str  # the original text; must occur exactly once in the file unless `nth` is given
    new: str
    tests: tuple[str, ...]
    nth: int | None = None  # which occurrence of `old` (0-based), where the text repeats

    @property
    def id(self) -> str:
        where = "" if self.nth is None else f"#{self.nth}"
        return f"{self.path}{where}: {self.old.strip()} -> {self.new.strip()}"


MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------------ optimizers (reference, foreach)
    Mutant("optimizers/lamb.py", "exp_avg.mul_(beta1).add_(grad, alpha=grad_weight)",
       "exp_avg.mul_(beta1).add_(grad, alpha=1.0)", OPTIMIZER_TESTS),
    Mutant("optimizers/lamb.py", "exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)",
       "exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=beta2)", OPTIMIZER_TESTS),
    Mutant("optimizers/lamb.py", "ratio = trust_ratio(p_norm, u_norm, max_ratio=trust_clip)",
       "ratio = trust_ratio(p_norm, u_norm)", OPTIMIZER_TESTS),
    Mutant("optimizers/lamb.py", "torch._foreach_add_(updates, d_params, alpha=weight_decay)",
       "torch._foreach_add_(updates, d_params, alpha=-weight_decay)", OPTIMIZER_TESTS),
    Mutant("optimizers/lamb.py", "grad_weight = 1 - beta1 if grad_averaging else 1.0",
       "grad_weight = 1 - beta1", OPTIMIZER_TESTS, nth=1),
    Mutant("optimizers/_trust.py", "adaptable = (param_norm > 0) & (update_norm > 0)",
       "adaptable = update_norm > 0", OPTIMIZER_TESTS),
    Mutant("optimizers/_trust.py", "denominator = update_norm + weight_decay * param_norm + eps",
       "denominator = update_norm + weight_decay * param_norm", OPTIMIZER_TESTS),
    Mutant("optimizers/_trust.py", "ratio = torch.clamp(ratio, max=max_ratio)",
       "ratio = torch.clamp(ratio, min=max_ratio)", OPTIMIZER_TESTS),
    Mutant("optimizers/lars.py", "step_dir = direction.add(buf, alpha=momentum) if nesterov else buf",
       "step_dir = buf", OPTIMIZER_TESTS),
    Mutant("optimizers/lars.py", "buf.mul_(momentum).add_(direction, alpha=1 - dampening)",
       "buf.mul_(momentum).add_(direction, alpha=1)", OPTIMIZER_TESTS),
    Mutant("optimizers/lars.py", "local = torch.clamp(local / lr, max=1.0)",
       "local = torch.clamp(local, max=1.0)", OPTIMIZER_TESTS, nth=1),
    Mutant("optimizers/lars.py", "torch._foreach_add_(directions, d_buffers, alpha=momentum)",
       "torch._foreach_add_(directions, d_buffers, alpha=1.0)", OPTIMIZER_TESTS),
    Mutant("optimizers/adan.py", "nesterov_grad = grad.add(diff, alpha=beta2)",
       "nesterov_grad = grad.add(diff, alpha=1 - beta2)", OPTIMIZER_TESTS),
    Mutant("optimizers/adan.py", "param.div_(1 + lr * weight_decay)",
       "param.mul_(1 - lr * weight_decay)", OPTIMIZER_TESTS),
    Mutant("optimizers/adan.py", "[beta2 / bc for bc in debias_factors(beta2, d_steps, capturable)]",
       "[1.0 / bc for bc in debias_factors(beta2, d_steps, capturable)]", OPTIMIZER_TESTS),
    Mutant("optimizers/adan.py", "exp_avg_diff.mul_(beta2).add_(diff, alpha=1 - beta2)",
       "exp_avg_diff.mul_(beta2).add_(diff, alpha=beta2)", OPTIMIZER_TESTS),
    Mutant("optimizers/adagrad_norm.py", "scale = lr / (sum_sq.sqrt() + eps)",
       "scale = lr / (sum_sq + eps)", OPTIMIZER_TESTS, nth=0),
    Mutant("optimizers/adagrad_norm.py", "grads = [g.add(p, alpha=weight_decay) for p, g in zip(params, grads)]",
       "grads = list(grads)", OPTIMIZER_TESTS),
    # ------------------------------------------------------------------ optimizers/_base.py
    Mutant("optimizers/_base.py", "return [1 - power for power in torch._foreach_pow(beta, list(steps))]",
       "return [power for power in torch._foreach_pow(beta, list(steps))]", OPTIMIZER_TESTS),
    Mutant("optimizers/_base.py", "return 1 - beta**step", "return beta**step", OPTIMIZER_TESTS),
    Mutant("optimizers/_base.py", "return 1 - beta ** step.item()", "return 1 - beta ** (step.item() + 1)",
       OPTIMIZER_TESTS),
    Mutant("optimizers/_base.py", "return torch.clamp(max_norm / (total_norm + CLIP_NORM_EPS), max=1.0)",
       "return max_norm / (total_norm + CLIP_NORM_EPS)", OPTIMIZER_TESTS),
    Mutant("optimizers/_base.py", "if isinstance(value, bool) or not isinstance(value, numbers.Real):",
       "if not isinstance(value, numbers.Real):", VALIDATION_TESTS),  # bools admitted: eps=True taken as 1.0
    Mutant("optimizers/_base.py", "if value is None and allow_none:", "if value is None:", VALIDATION_TESTS, nth=1),
    # ------------------------------------------------------------------ fused kernels
    Mutant("fused/lamb.py", "adaptable = (param_norm > 0) & (update_norm > 0)", "adaptable = update_norm > 0",
       FUSED_TESTS),
    Mutant("fused/lamb.py", "update = tl.where(mask, update, 0.0)", "update = update", FUSED_TESTS),
    Mutant("fused/lamb.py", "one_minus_beta2 * (g * g)", "one_minus_beta2 * g", FUSED_TESTS),
    Mutant("fused/lamb.py", "ratio = tl.minimum(ratio, trust_clip)", "ratio = tl.maximum(ratio, trust_clip)",
       FUSED_TESTS),
    Mutant("fused/lamb.py", "2 * tensors + 1, (1.0 - tl.exp(step * log_beta2))", "2 * tensors + 1, (1.0 - tl.exp(step * log_beta1))",
       FUSED_TESTS),
    Mutant("fused/lars.py", "step = direction + momentum * b.to(tl.float32)", "step = b.to(tl.float32)", FUSED_TESTS),
    Mutant("fused/lars.py", "adaptable = (param_norm > 0) & (grad_norm > 0)", "adaptable = param_norm > 0",
       FUSED_TESTS),
    Mutant("fused/lars.py", "direction_scale = tl.minimum(direction_scale / lr, 1.0)",
       "direction_scale = tl.minimum(direction_scale, 1.0)", FUSED_TESTS),
    Mutant("fused/lars.py", "grad_norm + weight_decay * param_norm + eps, 1.0)", "grad_norm + eps, 1.0)", FUSED_TESTS),
    Mutant("fused/adan.py", "has_previous = tl.where(step > 1, 1.0, 0.0)", "has_previous = tl.where(step > 0, 1.0, 0.0)",
       FUSED_TESTS),
    Mutant("fused/adan.py", "x = (x - lr * update) / (1.0 + lr * weight_decay)",
       "x = (x - lr * update) * (1.0 - lr * weight_decay)", FUSED_TESTS),
    Mutant("fused/adan.py", "(beta2 / (1.0 - tl.exp(step * log_beta2)))", "(1.0 / (1.0 - tl.exp(step * log_beta2)))",
       FUSED_TESTS),
    Mutant("fused/lars.py", "tl.store(counter, tl.load(counter) + 1.0)", "tl.store(counter, tl.load(counter) + 2.0)",
       FUSED_TESTS),
    Mutant("fused/_engine.py", "chunk = tl.program_id(0) * CHUNKS_PER_PROGRAM + index",
       "chunk = tl.program_id(0) * CHUNKS_PER_PROGRAM", ("tests/fused/test_fused_layouts.py",)),
    Mutant("fused/_engine.py", "multiplier = multiplier / tl.load(grad_scale)",
       "multiplier = multiplier * tl.load(grad_scale)", FUSED_TESTS),
    Mutant("fused/_engine.py", "multiplier = -1.0 if MAXIMIZE else 1.0", "multiplier = 1.0", FUSED_TESTS),
    Mutant("fused/_norms.py", "in_segment = (rows < end)[:, None]", "in_segment = (rows <= end)[:, None]", FUSED_TESTS),
    # the step plans' checks, reused plan or new (a wrong one steps moved or mislaid tensors)
    Mutant("fused/_plan.py", "if list(map(Tensor.stride, lists[i])) != self.strides[i]:", "if False:", PLAN_TESTS),
    Mutant("fused/_plan.py", "return all(map(is_, lst, self._owned[index])) and sum(map(_version, lst))",
       "return all(map(is_, lst, self._owned[index])) or sum(map(_version, lst))", PLAN_TESTS),
    Mutant("fused/_plan.py", "moved = [i for i in checked if rows[i] != self.pointer_rows[i]]", "moved = []", PLAN_TESTS),
    Mutant("fused/_engine.py", "increment = tl.where(tl.load(found_inf) != 0, 0.0, 1.0)",
       "increment = tl.where(tl.load(found_inf) == 1, 0.0, 1.0)", PLAN_TESTS),
    Mutant("optimizers/_base.py", "prepared = self._prepare_groups()",
       "prepared = [self._prepare_group(i) for i in range(len(self.param_groups))]", PLAN_TESTS),
    # ------------------------------------------------------------------ schedules
    Mutant("schedules/rules.py", "if lr < 0:", "if lr <= 0:", SCHEDULE_TESTS),
    Mutant("schedules/rules.py", "return lr * (batch / base_batch) ** scaling_exponent(rule)",
       "return lr * (base_batch / batch) ** scaling_exponent(rule)", SCHEDULE_TESTS),
    Mutant("schedules/rules.py", "if exponent < 0:", "if exponent <= 0:", SCHEDULE_TESTS),
    Mutant("schedules/schedulers.py", "(warmup_steps - 1 - step) / (warmup_steps - 1)",
       "(warmup_steps - 1 - step) / warmup_steps", SCHEDULE_TESTS),
    Mutant("schedules/schedulers.py", "return 0.5 * (1.0 + math.cos(math.pi * x))",
       "return 0.5 * (1.0 + math.cos(math.pi * x / 2))", SCHEDULE_TESTS),
    Mutant("schedules/schedulers.py", "return min((step - decay_start) / decay_steps, 1.0)",
       "return (step - decay_start) / decay_steps", SCHEDULE_TESTS),
    Mutant("schedules/schedulers.py", "return _decayed((1.0 - x) ** self.power, self.end_factor)",
       "return _decayed((1.0 - x) * self.power, self.end_factor)", SCHEDULE_TESTS),
    Mutant("schedules/batch_coupled.py", "ratio = (new / self._batch_size) ** self.exponent",
       "ratio = (new / self.base_batch_size) ** self.exponent", SCHEDULE_TESTS),
    # ------------------------------------------------------------------ batching/criteria.py
    Mutant("batching/criteria.py", "return lambda statistics: orthogonality_test(statistics, nu)",
       "return lambda statistics: orthogonality_test(statistics, eta)", CRITERIA_TESTS),
    Mutant("batching/criteria.py", "return lambda statistics: augmented_inner_product_test(statistics, theta, nu)",
       "return lambda statistics: augmented_inner_product_test(statistics, nu, theta)", CRITERIA_TESTS),
    Mutant("batching/criteria.py", "torch.maximum(inner_product_test(statistics, theta), orthogonality_test(statistics, nu))",
       "torch.maximum(inner_product_test(statistics, nu), orthogonality_test(statistics, theta))", CRITERIA_TESTS),
    Mutant("batching/criteria.py", "return torch.where(variance == 0, torch.zeros_like(variance), variance / scale)",
       "return variance / scale", CRITERIA_TESTS),
    Mutant("batching/criteria.py", "theta**2 * statistics.mean_sq_norm.square()", "theta**2 * statistics.mean_sq_norm",
       CRITERIA_TESTS),
    Mutant("batching/criteria.py", "return _required(statistics.coordinate_variance, eta**2 * mean_sq).max()",
       "return _required(statistics.coordinate_variance, eta**2 * mean_sq).mean()", CRITERIA_TESTS),
    # ------------------------------------------------------------------ nn/ghost_batchnorm.py
    Mutant("nn/ghost_batchnorm.py", "weights = self.momentum * keep**powers",
       "weights = self.momentum * keep ** (powers + 1)", GHOST_BN_TESTS),
    Mutant("nn/ghost_batchnorm.py", "powers = torch.arange(count - 1, -1, -1,", "powers = torch.arange(0, count, 1,",
       GHOST_BN_TESTS),
)  # fmt: skip


def _apply(source: str, mutant: Mutant) -> str | None:
    """`source` with the mutant applied, or None when its original text is not found as specified."""
    starts = [m.start() for m in re.finditer(re.escape(mutant.old), source)]
    if mutant.nth is None:
        if len(starts) != 1:
            return None
        start = starts[0]
    else:
        if mutant.nth >= len(starts):
            return None
        start = starts[mutant.nth]
    return source[:start] + mutant.new + source[start + len(mutant.old) :]


def _pytest(workdir: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, str]:
    """('passed' | 'failed' | 'timeout', the first failing test or the last lines of output)."""
    env = dict(os.environ, TRITON_INTERPRET="1", CI="1", PYTHONPATH=str(workdir), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    try:
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    if done.returncode == 0:
        return "passed", ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, flags=re.MULTILINE)
    last_lines = done.stdout.strip().splitlines() or [""]
    return "failed", failed[0] if failed else last_lines[-1]


def _copy_project(destination: Path) -> None:
    for name in COPIED:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
        else:
            shutil.copy2(source, destination / name)


def run(mutants: list[Mutant], timeout: float, baseline: bool) -> int:
    """Run the mutants, print one line each and the score; 0 when none survived."""
    results: dict[str, list[Mutant]] = {"caught": [], "survived": [], "stale": []}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="largebatch-mutation-") as folder:
        workdir = Path(folder)
        _copy_project(workdir)
        if baseline:
            all_tests = tuple(sorted({t for mutant in mutants for t in mutant.tests}))
            outcome, detail = _pytest(workdir, all_tests, timeout=10 * timeout)
            if outcome != "passed":
                print(f"baseline {outcome}: {detail}: fix the tests before mutating", flush=True)
                return 2
            print(f"baseline passed ({time.monotonic() - started:.0f} s)", flush=True)
        for index, mutant in enumerate(mutants, 1):
            target = workdir / "largebatch" / mutant.path
            original = target.read_text()
            mutated = _apply(original, mutant)
            if mutated is None:
                results["stale"].append(mutant)
                print(f"[{index}/{len(mutants)}] STALE    {mutant.id}", flush=True)
                continue
            mutant_started = time.monotonic()
            target.write_text(mutated)
            try:
                outcome, detail = _pytest(workdir, mutant.tests, timeout)
            finally:
                target.write_text(original)
            verdict = "survived" if outcome == "passed" else "caught"
            results[verdict].append(mutant)
            by = f"  <- {detail}" if outcome == "failed" and detail else "  (timeout)" if outcome == "timeout" else ""
            print(f"[{index}/{len(mutants)}] {verdict.upper():8} {time.monotonic() - mutant_started:5.0f} s  "
                  f"{mutant.id}{by}", flush=True)  # fmt: skip
    tested = len(results["caught"]) + len(results["survived"])
    print(f"\n{len(results['caught'])} of {tested} mutants caught, {len(results['survived'])} survived, "
          f"{len(results['stale'])} stale; {time.monotonic() - started:.0f} s in all")  # fmt: skip
    for mutant in results["survived"]:
        print(f"  survived: {mutant.id}")
    return 1 if results["survived"] or results["stale"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="run the mutants whose id contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant before it counts as caught")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated tests")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or any(s in m.id for s in args.only)]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.id}\n    tests: {' '.join(mutant.tests)}")
        return 0
    if not mutants:
        parser.error("no mutant matches --only")
    return run(mutants, args.timeout, baseline=not args.no_baseline)


if __name__ == "__main__":
    sys.exit(main())
