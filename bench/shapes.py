"""Parameter shapes of the models the optimizer-step benchmarks use, written out from the
architectures (no model library needed).

BERT-large (BertForPreTraining's encoder, embeddings and pooler): 391 tensors, 335,141,888
parameters. ResNet-50 (torchvision's): 161 tensors, 25,557,032 parameters. Smaller variants
of both, for CPU runs, keep the structure and shrink the widths.
"""

from __future__ import annotations

Shape = tuple[int, ...]


def bert_shapes(layers: int = 24, hidden: int = 1024, vocab: int = 30522, positions: int = 512) -> list[Shape]:
    intermediate = 4 * hidden
    shapes: list[Shape] = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 3  # query, key, value
        shapes += [(hidden, hidden), (hidden,), (hidden,), (hidden,)]  # attention output + LayerNorm
        shapes += [(intermediate, hidden), (intermediate,)]  # intermediate
        shapes += [(hidden, intermediate), (hidden,), (hidden,), (hidden,)]  # output + LayerNorm
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


def resnet50_shapes(width: int = 64, classes: int = 1000) -> list[Shape]:
    def conv_bn(out_channels: int, in_channels: int, kernel: int) -> list[Shape]:
        return [(out_channels, in_channels, kernel, kernel), (out_channels,), (out_channels,)]

    shapes = conv_bn(width, 3, 7)
    in_channels = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = width * 2**stage
        for block in range(blocks):
            shapes += conv_bn(planes, in_channels, 1) + conv_bn(planes, planes, 3) + conv_bn(4 * planes, planes, 1)
            if block == 0:
                shapes += conv_bn(4 * planes, in_channels, 1)  # downsample
            in_channels = 4 * planes
    shapes += [(classes, in_channels), (classes,)]
    return shapes


def numel(shape: Shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


# name -> shapes, as the GPU report runs them.
FULL_SIZE: dict[str, list[Shape]] = {"bert-large": bert_shapes(), "resnet-50": resnet50_shapes()}
