"""Trust ratios and clipping under sharding: FSDP2, DDP and flat shards on two gloo CPU ranks equal
the unsharded single-process run; without the cross-rank reduction they do not; a distributed
checkpoint of the optimizer state resumes the run."""

import os
import sys

import pytest
import torch
from torch import nn

WORKER = os.path.join(os.path.dirname(__file__), "_sharded_worker.py")
sys.path.insert(0, os.path.dirname(__file__))
import _sharded_worker as worker  # noqa: E402
from _launch import run_worker  # noqa: E402

pytestmark = pytest.mark.distributed
# fp32: the sharded run sums squares across ranks in a different order, and FSDP averages the
# gradients with a reduce-scatter: a few ulps per step over 10 steps.
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    return run_worker(WORKER, tmp_path_factory.mktemp("dist") / "results.pt")


def _single_process(cls, kwargs, **options):
    model = worker.make_model()
    opt = cls(model.parameters(), **options, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(worker.STEPS):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 4, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def _assert_all_close(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


IMPLEMENTATIONS = ["per_tensor", "foreach", "fused"]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(worker.SETUPS))
def test_fsdp2_training_equals_unsharded(sharded_results, name, impl):
    if impl not in worker.IMPLEMENTATIONS:
        pytest.skip("the fused kernels run on CPU tensors only under TRITON_INTERPRET=1 (the test command sets it)")
    cls, kwargs = worker.SETUPS[name]
    want = _single_process(cls, kwargs, **worker.IMPLEMENTATIONS[impl])
    _assert_all_close(sharded_results[f"fsdp/{name}/{impl}"], want)


def test_without_the_reduction_fsdp2_lamb_trains_a_different_model(sharded_results):
    cls, kwargs = worker.SETUPS["lamb"]
    want = _single_process(cls, kwargs)
    got = sharded_results["fsdp/lamb/no_reduction"]
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) > 1e-3


def test_ddp_is_unchanged(sharded_results):
    cls, kwargs = worker.SETUPS["lamb"]
    _assert_all_close(sharded_results["ddp/lamb"], _single_process(cls, kwargs))


def test_flat_shards_with_a_process_group(sharded_results):
    cls, kwargs = worker.SETUPS["lars"]
    _assert_all_close(sharded_results["flat/lars"], _single_process(cls, kwargs))


def test_distributed_checkpoint_resume_continues_the_run(sharded_results):
    _assert_all_close(sharded_results["fsdp/lamb/resumed"], sharded_results["fsdp/lamb/per_tensor"])


def test_agvm_on_fsdp2_equals_one_process(sharded_results):
    """Each rank's halves, reduce-scattered by FSDP2, are the halves of the union of the ranks' data."""
    model = worker.make_model()
    base = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.2, momentum=0.9)
    agvm = worker.AGVM(base, start_step=0, interval=1, momentum=0.5)
    for ((xa0, ya0), (xb0, yb0)), ((xa1, ya1), (xb1, yb1)) in zip(worker.agvm_halves(0), worker.agvm_halves(1)):
        xa, ya, xb, yb = torch.cat([xa0, xa1]), torch.cat([ya0, ya1]), torch.cat([xb0, xb1]), torch.cat([yb0, yb1])
        agvm.zero_grad()
        agvm.backward_halves(lambda: nn.functional.mse_loss(model(xa), ya), lambda: nn.functional.mse_loss(model(xb), yb))
        agvm.step()
    *params, factors = sharded_results["fsdp/agvm"]
    assert not torch.equal(factors, torch.ones_like(factors))  # the factors moved: the test can fail
    torch.testing.assert_close(factors, agvm.scale_factors, rtol=1e-6, atol=1e-9)
    _assert_all_close(params, [p.detach() for p in model.parameters()])
