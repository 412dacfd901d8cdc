"""A convolutional net for any CxHxW input: Conv2d/activation(/MaxPool) blocks, then an MLP head.

Options (all on the model config): one kernel size per block (`kernel_sizes`), `same` or
`valid` padding, pooling after each block or only after the last, and dropout between the
conv stack and the head. With `channels=[32, 64]`, `padding=valid`, `pool=last`,
`conv_dropout=0.25`, `hidden=[128]`, `dropout=0.5` it is the pytorch/examples MNIST net.
"""

from torch import nn

from models.config import ModelConfig
from models.mlp import mlp_layers
from models.registry import activation
from tasks.errors import ModelError


def _kernel_sizes(cfg: ModelConfig) -> list[int]:
    sizes = list(cfg.kernel_sizes)
    if not sizes:
        return [cfg.kernel_size] * len(cfg.channels)
    if len(sizes) != len(cfg.channels):
        raise ModelError(
            f"model 'cnn': kernel_sizes {sizes} has {len(sizes)} entries but channels {list(cfg.channels)} "
            f"has {len(cfg.channels)}; give one kernel size per conv block (or none)"
        )
    return sizes


def build_cnn(input_shape: list[int], output_size: int, cfg: ModelConfig) -> nn.Module:
    if len(input_shape) != 3:
        raise ModelError(
            f"model 'cnn' needs image inputs shaped CxHxW; this dataset's inputs are shaped {input_shape} "
            f"(use 'mlp' or 'linear' for tables)"
        )
    channels, height, width = input_shape
    valid = cfg.padding == "valid"
    pool_each = cfg.pool == "each"
    kernels = _kernel_sizes(cfg)
    blocks: list[nn.Module] = []
    for i, (out_channels, k) in enumerate(zip(cfg.channels, kernels, strict=True)):
        if valid and (height < k or width < k):
            raise ModelError(
                f"model 'cnn': a {k}x{k} valid conv does not fit the {height}x{width} maps of block {i + 1}"
            )
        blocks.append(nn.Conv2d(channels, out_channels, k, padding=0 if valid else k // 2))
        if valid:
            height, width = height - k + 1, width - k + 1
        else:  # 'same' for odd kernels; an even kernel grows the map by one
            height, width = height + 2 * (k // 2) - k + 1, width + 2 * (k // 2) - k + 1
        if cfg.batch_norm:
            blocks.append(nn.BatchNorm2d(out_channels))
        blocks.append(activation(cfg.activation))
        last = i == len(cfg.channels) - 1
        if (pool_each or last) and height >= 2 and width >= 2:  # pool while there is something left to pool
            blocks.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        channels = out_channels
    if cfg.conv_dropout > 0:
        blocks.append(nn.Dropout(cfg.conv_dropout))
    head = mlp_layers(channels * height * width, list(cfg.hidden), output_size, cfg.activation, cfg.dropout)
    return nn.Sequential(*blocks, nn.Flatten(), *head)
