"""LeNet-5 as the TWN paper (arXiv 1605.04711, Table 1) and the seed study define it.

    32-C5 -> BN -> ReLU -> MP2 -> 64-C5 -> BN -> ReLU -> MP2 -> FC 1024->512 -> ReLU -> FC 512->10

Two exact speed-ups (benchmarks/README.md): ReLU runs after the max-pool (relu(maxpool(z)) ==
maxpool(relu(z)) because both are monotone, on 4x fewer values), and the conv weights are kept channels_last
(NHWC), which the CPU's oneDNN convolutions and BN prefer (the arithmetic is the same up to summation order).

Its four weight layers (conv1, conv2, fc1, fc2; 581,408 weights) are the quantizable ones. Each is a
`QuantConv2d` / `QuantLinear`: an ordinary layer whose forward passes its weight through an optional
`quantizer` module first, so a method changes what the layer computes without changing the model.
"""
import torch
import torch.nn.functional as F
from torch import nn

QUANT_LAYERS = ("conv1", "conv2", "fc1", "fc2")
BN_OF_LAYER = {"conv1": "bn1", "conv2": "bn2"}  # the BN that follows a layer (for BN folding)


class QuantConv2d(nn.Conv2d):
    """Conv2d whose weight goes through `self.quantizer` (if set) on every forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.quantizer = None  # a module set by the method (an instance attribute, so nn.Module registers it)

    def forward(self, x):
        w = self.weight if self.quantizer is None else self.quantizer(self.weight)
        if w.stride() != self.weight.stride():
            # Keep the weight's channels_last strides: elementwise ops normalise conv1's (C_in = 1) strides
            # to NCHW, and an NCHW weight sends the conv, BN and pool down their slower NCHW paths (TWN's
            # step was ~1.3x FP's until this copy; it is 800 floats for conv1, and skipped for conv2).
            w = torch.empty_like(self.weight).copy_(w)
        return F.conv2d(x, w, self.bias)


class QuantLinear(nn.Linear):
    """Linear whose weight goes through `self.quantizer` (if set) on every forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.quantizer = None  # a module set by the method (an instance attribute, so nn.Module registers it)

    def forward(self, x):
        w = self.weight if self.quantizer is None else self.quantizer(self.weight)
        return F.linear(x, w, self.bias)


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = QuantConv2d(1, 32, 5)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = QuantConv2d(32, 64, 5)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc1 = QuantLinear(64 * 4 * 4, 512)
        self.fc2 = QuantLinear(512, 10)
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.bn1(self.conv1(x)), 2))
        x = F.relu(F.max_pool2d(self.bn2(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)

    def quant_layers(self):
        """(name, layer) for the four quantizable weight layers, in forward order."""
        return [(name, getattr(self, name)) for name in QUANT_LAYERS]
