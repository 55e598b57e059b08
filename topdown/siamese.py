"""The Siamese baseline of the zero-shot task (generators paper §3.2).

"Each branch is structured to match AlexNet layers from conv1 up to pool5 [...]
We then stack the channels from the respective pool5 layers from each branch.
The resulting stack is provided as input to a fully-connected layer, fc6, with
4096 units; fc7 takes these 4096 units of input and produces 4096 units of
output; finally, fc8 produces a single scalar output": the logit of "rotated by
more than 60°".

The two branches are one module applied to both images (shared weights), run as
one batch of ``2B`` images. fc6 and fc7 are followed by ReLU and dropout, as in
AlexNet.
"""
from __future__ import annotations

import torch
from torch import nn

from topdown.generators import PAPER_LAYERS, ConvFeatures


class SiameseAlexNet(nn.Module):
    """Two weight-sharing AlexNet towers (conv1..pool5), pool5 maps stacked by channel, fc6-fc7-fc8 -> 1 logit.

    Args:
        weights: AlexNet weights file for the towers (a state dict or a Lightning checkpoint,
            :func:`topdown.backbones.load_state`); ``None``: random init from ``init_seed``.
        image_size: input side (fixes fc6's input size: 2 x 256 x 6 x 6 at 224 px).
        hidden: units of fc6 and fc7 (paper: 4096).
        dropout: dropout after fc6 and fc7.
    """

    def __init__(self, weights: str | None = None, image_size: int = 224, hidden: int = 4096, dropout: float = 0.5,
                 init_seed: int = 0):
        super().__init__()
        trunk = ConvFeatures(PAPER_LAYERS, weights, init_seed=init_seed)
        # ConvFeatures keeps AlexNet's features up to conv5's ReLU; pool5 is torchvision's features.12.
        self.tower = nn.Sequential(*trunk.features, nn.MaxPool2d(kernel_size=3, stride=2))
        with torch.no_grad():
            pool5 = self.tower(torch.zeros(1, 3, image_size, image_size))
        if pool5.shape[-1] < 1:
            raise ValueError(f"image_size {image_size} is too small for AlexNet's pool5")
        self.pool5_shape = tuple(pool5.shape[1:])
        self.fc6 = nn.Linear(2 * pool5.numel(), hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)

    def stacked_pool5(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """``[B, 2·256, h, w]``: pool5 of ``first`` then pool5 of ``second``, stacked by channel."""
        if first.shape != second.shape:
            raise ValueError(f"the two images of a pair must have one shape, got {tuple(first.shape)} "
                             f"and {tuple(second.shape)}")
        maps = self.tower(torch.cat((first, second)))
        return torch.cat(maps.chunk(2), dim=1)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` of "the rotation from ``first`` to ``second`` exceeds the threshold"."""
        x = self.stacked_pool5(first, second).flatten(1)
        x = self.drop(torch.relu(self.fc6(x)))
        x = self.drop(torch.relu(self.fc7(x)))
        return self.fc8(x)[:, 0]
