"""AdAdaGrad: adaptive batch-size growth from gradient-variance tests.

Lau, Liu & Kolar (2024), "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods".

* `statistics`: per-sample (`torch.func`) or micro-batch gradient statistics, DDP-reduced.
* `criteria`: the norm, inner-product, orthogonality, augmented and coordinate-wise tests.
* `noise_scale`: `GradientNoiseScale`, B_simple = tr(Σ)/|G|² (McCandlish et al. 2018), EMA-smoothed.
* `ddp_statistics`: `gradient_statistics_hook`, the statistics from DDP's all-reduce, no extra backward.
* `controller`: `AdaptiveBatchSize`, b_{k+1} = min(b_max, max(b_k, ⌈b_req⌉)); `test="noise_scale"`
  warms the batch up as b_req = k·B_simple.
* `sampler`: `GrowingBatchSampler`, index batches at the controller's current size, sharded over ranks.
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
from largebatch.batching.ddp_statistics import DDPGradientStatistics, gradient_statistics_hook
from largebatch.batching.noise_scale import GradientNoiseScale, NoiseScaleRecord
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
    "DDPGradientStatistics",
    "GradientNoiseScale",
    "GradientStatistics",
    "GrowingBatchSampler",
    "MicroBatchGradients",
    "NoiseScaleRecord",
    "augmented_inner_product_test",
    "batch_size_test",
    "coordinate_test",
    "gradient_statistics",
    "gradient_statistics_hook",
    "inner_product_test",
    "norm_test",
    "orthogonality_test",
    "per_sample_gradients",
]
