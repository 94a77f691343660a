"""Receptive field after every layer, computed from the layers themselves (not the comments).

rf_out = rf_in + (effective_kernel - 1) * jump_in;  jump_out = jump_in * stride,
with effective_kernel = dilation * (kernel - 1) + 1. An adaptive pool to 1x1 (GAP) is a kernel as
large as its input. Layers without a kernel (ReLU, BatchNorm, Dropout, Flatten) change nothing.
"""

import torch
from torch import nn


def pair(value) -> int:
    value = value[0] if isinstance(value, tuple) else value
    return int(value)


def kernel_of(layer: nn.Module, in_size: int) -> tuple[int, int] | None:
    """(effective kernel, stride) of a layer, or None if it has no spatial kernel."""
    if isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
        kernel, dilation = pair(layer.kernel_size), pair(getattr(layer, "dilation", 1))
        stride = pair(layer.stride) if layer.stride is not None else kernel
        return dilation * (kernel - 1) + 1, stride
    if isinstance(layer, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        out = pair(layer.output_size)
        stride = in_size // out
        return in_size - (out - 1) * stride, stride
    return None


def receptive_fields(model: nn.Module, input_size: int = 28) -> list[tuple[str, nn.Module, int, int]]:
    """[(layer name, layer, receptive field, jump)] for every leaf layer, in forward order."""
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    in_sizes = {}

    def record(layer, inputs, output):
        in_sizes[layer] = inputs[0].shape[-1]

    hooks = [m.register_forward_hook(record) for _, m in leaves]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, input_size, input_size))
    for h in hooks:
        h.remove()
    rf, jump, rows = 1, 1, []
    for name, layer in leaves:
        kernel = kernel_of(layer, in_sizes.get(layer, input_size))
        if kernel:
            rf, jump = rf + (kernel[0] - 1) * jump, jump * kernel[1]
        rows.append((name, layer, rf, jump))
    return rows
