"""A convolutional net for any CxHxW input: Conv2d/activation/MaxPool blocks, then an MLP head."""

from torch import nn

from models.mlp import mlp_layers
from models.registry import ModelError, activation, register


@register("cnn")
def build_cnn(input_shape: list[int], output_size: int, cfg) -> nn.Module:
    if len(input_shape) != 3:
        raise ModelError(
            f"model 'cnn' needs image inputs shaped CxHxW; this dataset's inputs are shaped {input_shape} "
            f"(use 'mlp' or 'linear' for tables)"
        )
    channels, height, width = input_shape
    blocks: list[nn.Module] = []
    for out_channels in cfg.channels:
        blocks.append(nn.Conv2d(channels, out_channels, cfg.kernel_size, padding=cfg.kernel_size // 2))
        if cfg.batch_norm:
            blocks.append(nn.BatchNorm2d(out_channels))
        blocks.append(activation(cfg.activation))
        if height >= 2 and width >= 2:  # pool while there is something left to pool
            blocks.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        channels = out_channels
    head = mlp_layers(channels * height * width, list(cfg.hidden), output_size, cfg.activation, cfg.dropout)
    return nn.Sequential(*blocks, nn.Flatten(), *head)
