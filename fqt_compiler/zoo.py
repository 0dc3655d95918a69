"""Plain-PyTorch models used by the benchmarks, tests and CLI examples.

Nothing here knows about fqt: these are the "unmodified models" that ``fqt.compile`` takes.
Factories take keyword arguments only, so ``fqt-compiler dump fqt_compiler.zoo:vgg16_cifar``
works from the shell.
"""
from __future__ import annotations

import torch
from torch import nn

# VGG-16 configuration "D": 13 3x3 convs, "M" = 2x2 max-pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs (the CIFAR variant of the paper's protocol):
    13 conv-BN-ReLU blocks, five max-pools down to 1x1, one linear classifier. Other configs
    and input sizes are average-pooled to 1x1 before the classifier."""

    def __init__(self, cfg=_VGG16, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        layers, c = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = max(1, int(v * width))
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)   # identity at 32x32 for VGG-16 (five pools -> 1x1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def vgg16_cifar(num_classes: int = 10, width: float = 1.0) -> VGG:
    return VGG(_VGG16, num_classes=num_classes, width=width)


def vgg_small(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> VGG:
    """A 6-conv VGG for 16x16 or 32x32 single-channel images (tests, digits experiments)."""
    return VGG((32, 32, "M", 64, 64, "M", 128, 128, "M"), num_classes=num_classes,
               in_channels=in_channels, width=width)


def resnet18(num_classes: int = 10):
    """torchvision's ResNet-18, unmodified (ImageNet stem: on 32x32 inputs its last stages see
    2x2 and 1x1 maps), as the paper's protocol uses it; there is no CIFAR variant here."""
    from torchvision import models
    return models.resnet18(num_classes=num_classes)


class MLP(nn.Module):
    def __init__(self, sizes=(64, 256, 256, 10)):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers += [nn.BatchNorm1d(b), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(torch.flatten(x, 1))


def mlp(in_features: int = 64, hidden: int = 256, num_classes: int = 10) -> MLP:
    return MLP((in_features, hidden, hidden, num_classes))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 conv-BN, identity or 1x1-conv-BN shortcut)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A ResNet-style net for 16x16 single-channel images: 3x3 stem, one basic block per
    stage at widths (16, 32, 64) x width (stride 2 between stages), global average pool,
    linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0,
                 stages=(16, 32, 64)):
        super().__init__()
        widths = [max(1, int(w * width)) for w in stages]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(c, w, stride=1 if i == 0 else 2))
            c = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet_small(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> ResNetSmall:
    """ResNetSmall for digits experiments (16x16 inputs)."""
    return ResNetSmall(num_classes=num_classes, in_channels=in_channels, width=width)
