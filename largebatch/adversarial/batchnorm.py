r"""Auxiliary BatchNorm: a second BatchNorm for adversarial examples, ConAdv's "adv BN".

ConAdv's Algorithm 1 (Liu et al., ICLR 2022; as extracted at
https://ri.k117.org/papers/concurrent_adversarial_learning_for_largebatch_training__8c73e043)
computes the clean loss "using main BN" and the adversarial loss "using adv BN": AdvProp's auxiliary
BatchNorm (Xie et al., CVPR 2020), which gives adversarial examples, drawn from another
distribution, their own batch statistics, running statistics *and* affine parameters
:math:`\gamma, \beta`, while every other weight is shared.

:func:`convert_to_auxiliary_batchnorm` replaces each BatchNorm of a model by an
:class:`AuxiliaryBatchNorm` holding the original module as ``main`` and a copy of it as
``adversarial``. A forward pass uses ``main`` (so evaluation and any plain training step see the
model as before) unless :class:`~largebatch.adversarial.ConAdv` routes its adversarial passes
through ``adversarial``. Convert before building the optimizer and before wrapping the model in
``DistributedDataParallel``: the copies are new parameters, which both must know about.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["AuxiliaryBatchNorm", "convert_to_auxiliary_batchnorm"]


class AuxiliaryBatchNorm(nn.Module):
    """A BatchNorm (``main``) with a twin for adversarial examples (``adversarial``).

    Args:
        main: the BatchNorm module (any ``_BatchNorm``: BatchNorm1d/2d/3d, SyncBatchNorm, Ghost
            BatchNorm); it is kept as is, and ``adversarial`` starts as a copy of it (same
            parameters, running statistics and training mode, separate tensors).

    ``forward`` applies ``adversarial`` while :attr:`adversarial_active` is True, else ``main``.
    """

    def __init__(self, main: _BatchNorm) -> None:
        super().__init__()
        if not isinstance(main, _BatchNorm):
            raise ValueError(f"main must be a BatchNorm module, got {type(main).__name__}")
        self.main = main
        self.adversarial = copy.deepcopy(main)
        #: Which twin a forward pass uses; ConAdv sets it for its adversarial passes only.
        self.adversarial_active = False

    def forward(self, x: Tensor) -> Tensor:
        """``adversarial(x)`` while :attr:`adversarial_active`, else ``main(x)``."""
        return (self.adversarial if self.adversarial_active else self.main)(x)


def convert_to_auxiliary_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``module`` by an :class:`AuxiliaryBatchNorm` wrapping it.

    The original BatchNorm modules stay in the model as the ``main`` twins (their parameters are
    the same objects), so the converted model computes what the original did until ConAdv routes
    a pass through the ``adversarial`` twins. Already converted layers are left alone. A
    checkpoint of the converted model names the layers ``<name>.main.*`` and ``<name>.adversarial.*``.

    Returns:
        The converted module: a new one if ``module`` is itself a BatchNorm, else ``module``,
        converted in place.

    Raises:
        ValueError: ``module`` is a ``DistributedDataParallel`` wrapper (convert the model
            before wrapping it: DDP must see the new parameters).
    """
    if isinstance(module, DistributedDataParallel):
        raise ValueError("convert the model before wrapping it in DistributedDataParallel (its new parameters must be reduced)")
    if isinstance(module, AuxiliaryBatchNorm):
        return module
    if isinstance(module, _BatchNorm):
        return AuxiliaryBatchNorm(module)
    for name, child in module.named_children():
        converted = convert_to_auxiliary_batchnorm(child)
        if converted is not child:
            module.add_module(name, converted)
    return module


def find_batchnorms(module: nn.Module) -> tuple[list[AuxiliaryBatchNorm], list[str]]:
    """The :class:`AuxiliaryBatchNorm` layers of ``module``, and the names of its BatchNorm layers without a twin."""
    auxiliary, plain = [], []

    def visit(prefix: str, m: nn.Module) -> None:
        if isinstance(m, AuxiliaryBatchNorm):
            auxiliary.append(m)
            return  # its two twins are BatchNorms by design
        if isinstance(m, _BatchNorm):
            plain.append(prefix or type(m).__name__)
        for name, child in m.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", module)
    return auxiliary, plain


@contextmanager
def adversarial_route(layers: list[AuxiliaryBatchNorm]) -> Iterator[None]:
    """Forward passes inside use each layer's ``adversarial`` twin; ``main`` again afterwards, whatever happens."""
    for layer in layers:
        layer.adversarial_active = True
    try:
        yield
    finally:
        for layer in layers:
            layer.adversarial_active = False
