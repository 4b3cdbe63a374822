"""Memory: gradient release (each parameter stepped, and its gradient freed, inside backward)."""

from ._release import GradientRelease, prepare_for_gradient_release

__all__ = ["GradientRelease", "prepare_for_gradient_release"]
