"""Feature inversion by an up-convolutional network (Dosovitskiy & Brox, CVPR 2016), as used in Fig. 3 and A2.

The generators paper shows what a generator does to features by "inverting"
them to an image with the method of Dosovitskiy & Brox: a decoder trained to map
the features ``φ(x)`` of one AlexNet layer back to the image ``x`` by minimising
``‖D(φ(x)) - x‖²`` over a set of images, with the AlexNet fixed. A decoder
trained on bottom-up features is then applied to warped features (a generator's
output), whose inversion shows the transformation they encode.

Architecture, after D&B's conv decoders: ``convs`` 3x3 convolutions at the
feature map's resolution (``width`` channels), then up-convolutions (4x4,
stride 2) that double the resolution and halve the channels (not below 32) until the
map is at least half the image side, a 3x3 convolution to RGB, and a bilinear resize to
the exact image side (AlexNet's maps are 55 or 13 px, not powers of two of 224).
Leaky ReLU (slope 0.2) after every layer but the last. The output is in the
input's normalised colour space (ImageNet mean/std).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UpconvDecoder(nn.Module):
    """Features ``[B, C, h, h]`` -> image ``[B, 3, S, S]`` (D&B 2016 up-convolutional decoder).

    Args:
        in_channels, in_size: the layer's channels and map side (AlexNet at 224 px: conv1 64 x 55,
            conv5 256 x 13).
        image_size: side of the reconstructed image.
        width: channels of the first convolutions (halved by every up-convolution, at least 32).
        convs: 3x3 convolutions before the first up-convolution.
    """

    def __init__(self, in_channels: int, in_size: int, image_size: int = 224, width: int = 256, convs: int = 2):
        super().__init__()
        if in_size < 1 or image_size < in_size:
            raise ValueError(f"UpconvDecoder: cannot grow a {in_size} px map to a {image_size} px image")
        self.in_channels, self.in_size, self.image_size = in_channels, in_size, image_size
        layers: list[nn.Module] = []
        ch = in_channels
        for _ in range(convs):
            layers += [nn.Conv2d(ch, width, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            ch = width
        # Up-convolutions until the map is at least half the image (the last factor is a resize).
        ups = max(0, math.ceil(math.log2(image_size / (2 * in_size))))
        for _ in range(ups):
            out = max(32, ch // 2)
            layers += [nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            ch = out
        layers.append(nn.Conv2d(ch, 3, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.num_upconvs = ups

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"UpconvDecoder expects [B, {self.in_channels}, H, W] features, "
                             f"got {tuple(features.shape)}")
        x = self.net(features)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised ``[..., 3, H, W]`` -> RGB in [0, 1] (for pictures)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images * std + mean).clamp(0, 1)
