"""AdAdaGrad: adaptive batch-size growth from gradient-variance tests.

Lau, Liu & Kolar (2024), "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods".

* `statistics`: per-sample (`torch.func`) or micro-batch gradient statistics, DDP-reduced.
* `criteria`: the norm, inner-product, orthogonality, augmented and coordinate-wise tests.
* `controller`: `AdaptiveBatchSize`, b_{k+1} = min(b_max, max(b_k, ⌈b_req⌉)).
* `sampler`: `GrowingBatchSampler`, index batches at the controller's current size.
"""

from largebatch.batching.controller import AdaptiveBatchSize, BatchSizeCoupling, BatchSizeRecord
from largebatch.batching.criteria import (
    augmented_inner_product_test,
    batch_size_test,
    coordinate_test,
    inner_product_test,
    norm_test,
    orthogonality_test,
)
from largebatch.batching.sampler import GrowingBatchSampler
from largebatch.batching.statistics import (
    GradientStatistics,
    MicroBatchGradients,
    gradient_statistics,
    per_sample_gradients,
)

__all__ = [
    "AdaptiveBatchSize",
    "BatchSizeCoupling",
    "BatchSizeRecord",
    "GradientStatistics",
    "GrowingBatchSampler",
    "MicroBatchGradients",
    "augmented_inner_product_test",
    "batch_size_test",
    "coordinate_test",
    "gradient_statistics",
    "inner_product_test",
    "norm_test",
    "orthogonality_test",
    "per_sample_gradients",
]
