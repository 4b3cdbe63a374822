"""Shared test configuration.

* `tests/` on sys.path so that `oracles` (the plain numpy transcriptions) imports everywhere.
* Hypothesis: no deadlines (CI's two cores are slow and shared); derandomized on CI so that a
  submission's result does not depend on the luck of the draw, random locally to keep exploring.
"""

import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Under pytest-xdist every worker would otherwise start one torch thread per core: on CI's two
# cores that oversubscribes the machine and slows the suite. One thread per worker.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
