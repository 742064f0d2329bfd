"""Squeeze-and-excitation ResNets of report 001: the basic SE ResNet and the dense, kernel-sharing one.

Squeeze-and-excitation rescales each channel by a gate computed from the channel means:
x * sigmoid(W2 relu(W1 mean(x))), W1 reducing the channels 16-fold.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcifar.models.norm import NormAct
from fastcifar.models.registry import register
from fastcifar.models.resnet import ResNet, conv3x3, projection
from fastcifar.recipe import Recipe


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, bias: bool = True):
        super().__init__()
        hidden = channels // reduction
        # 1x1 convs on the pooled map: a Linear pair that needs no reshape and keeps channels-last
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=bias)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=bias)

    def forward(self, x):
        gate = self.fc1(x.mean((2, 3), keepdim=True))
        return x * torch.sigmoid(self.fc2(F.relu(gate)))


_R001 = "001_d2e037756061fb24.txt"
_R001_TITLE = "RESNET MODEL FOR CIFAR 10 (Kriti, Wang, Shetty; New York University)"

_R001_AUG_SOURCE = ('"Random Crop with padding, which crops images at random locations after padding them, '
                    'thereby varying their spatial context; Random Horizontal Flip, which mirrors images '
                    'horizontally to simulate directional variability"')
_R001_AUG_NOTES = (
    "Augmentation beyond flip + crop, which no Recipe field holds: \"Random Resized Crop, which "
    "adjusts the scale and aspect ratio of images; Random Rotation, which randomly rotates images by "
    "up to 10 degrees\" and \"Color Jitter, which slightly alters the brightness, contrast, saturation, "
    "and hue of images\". The report does not give the crop padding; 2 pixels is what the code it "
    "links uses (with RandomResizedCrop scale 0.95-1.0, ratio 0.9-1.1 and ColorJitter 0.1 for each "
    "of the four). Normalisation mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010). ")
_R001_STANDARD = ('"In our evaluation of different architectures, we refined our model\'s design using a '
                  'standard hyperparameter set: 200 epochs, batch size of 128, learning rate of 0.1, '
                  'weight decay of $5e-4$, and momentum of 0.9."')

_R001_BASIC_RECIPE = Recipe(
    tag="report", epochs=200, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9,
    weight_decay=5e-4, schedule="cosine", final_lr_frac=0.01, lookahead_k=5, lookahead_alpha=0.5,
    grad_clip_value=0.1, flip=True, translate=2,
    sources={
        "epochs": _R001_STANDARD, "batch_size": _R001_STANDARD, "lr": _R001_STANDARD,
        "weight_decay": _R001_STANDARD, "momentum": _R001_STANDARD,
        "optimizer": '"Stochastic Gradient Descent (SGD) [6] was the chosen optimizer, coupled with '
                     'Cross-Entropy loss to optimize our model\'s weights."',
        "schedule": '"Additionally, we utilized a CosineAnnealingLR scheduler that dynamically adjusts the '
                    'learning rate from an initial rate of 0.1 down to 0.001, following a cosine curve."',
        "final_lr_frac": '"a CosineAnnealingLR scheduler that dynamically adjusts the learning rate from an '
                         'initial rate of 0.1 down to 0.001"',
        "lookahead_k": '"Lookahead operates by alternating updates between two sets of weights: fast weights '
                       'that update regularly, and slow weights that synchronize with the fast weights every '
                       'five iterations ($k=5$)."',
        "grad_clip_value": '"We also incorporated gradient clipping [7] with the optimizer to prevent the '
                           'exploding gradient problem, ensuring that updates remain within reasonable bounds '
                           'and contribute to stable training."',
        "flip": _R001_AUG_SOURCE, "translate": _R001_AUG_SOURCE,
    },
    notes=_R001_AUG_NOTES + "The report names gradient clipping without its threshold and Lookahead "
          "without its alpha: 0.1 by value is what the linked code clips at, alpha 0.5 is Lookahead's "
          "usual default. Published: 95.6% test accuracy.",
)


@register("se_resnet_443", report=_R001, title=_R001_TITLE, published_params=4_697_742,
          published_acc=95.6, recipe=_R001_BASIC_RECIPE,
          notes="Basic SE ResNet: 3 stages 64/128/256 of BasicBlocks [4,4,3], one SE block after the stem.")
def se_resnet_443(num_classes: int = 10) -> nn.Module:
    """The "Basic SE Resnet" of report 001 (Figure 5: 3 residual layers, blocks [4, 4, 3], 3x3
    convs, 1x1 shortcuts, channels [64, 128, 256], average pool 8, batch norm, SE: True).

    Without SE the network has 4,697,162 parameters: stem 1,856 + stage1 295,936 + stage2
    1,116,416 + stage3 3,280,384 + linear 2,570. The published total, 4,697,742, is 580 more,
    exactly one SE block over 64 channels with reduction 16 and biased layers: 64*4 + 4 + 4*64 +
    64 = 580. One per block (11 blocks) would add 22,260 even bias-free, so the SE block sits
    once, on the 64-channel stem output; this is also where the Efficient_ResNets design that the
    report builds on ([2]) places it. The 8x8 average pool over the final 8x8 map is a global pool.
    """
    return ResNet(widths=(64, 128, 256), blocks=(4, 4, 3),
                  post_stem=SqueezeExcite(64, reduction=16, bias=True), num_classes=num_classes)


class SEBasicBlock(nn.Module):
    """BasicBlock with SE on the residual branch before the join; convs may share one kernel."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shared: nn.Parameter | None = None):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = NormAct(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = NormAct(cout, act=None)
        if shared is not None:
            # Kernel sharing: every 3x3 conv of the stage whose shape is (cout, cout, 3, 3) holds
            # the same Parameter, so it is trained (and counted) once.
            if cin == cout and stride == 1:
                self.conv1.weight = shared
            self.conv2.weight = shared
        self.se = SqueezeExcite(cout, reduction=16, bias=False)
        self.shortcut = projection(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class DenseSEResNet(ResNet):
    """CIFAR SE-ResNet: 16-channel stem, three stages of SE BasicBlocks, global pool, linear."""

    def __init__(self, widths=(64, 128, 256), blocks=6, share=(False, False, True), stem: int = 16,
                 num_classes: int = 10):
        def stage_options(i):
            # A stage that shares gets one kernel of its blocks' (width, width, 3, 3) shape.
            width = widths[i]
            return dict(shared=nn.Parameter(conv3x3(width, width).weight.detach().clone()) if share[i] else None)

        super().__init__(widths, [blocks] * len(widths), stem=stem, block=SEBasicBlock,
                         stage_options=stage_options, num_classes=num_classes)


_R001_DENSE_RECIPE = Recipe(
    tag="report", epochs=200, batch_size=128, optimizer="sgd", lr=0.01, momentum=0.9,
    weight_decay=5e-4, schedule="multistep", milestones=(85, 110, 135, 160, 185), gamma=0.1,
    flip=True, translate=2,
    sources={
        "epochs": _R001_STANDARD, "batch_size": _R001_STANDARD,
        "optimizer": '"Conversely, SGD [6], set with an initial learning rate of 0.01, momentum of 0.9, and '
                     'weight decay of $5e-4$, demonstrated superior performance by achieving an accuracy '
                     'of 93.83%."',
        "lr": '"SGD [6], set with an initial learning rate of 0.01, momentum of 0.9, and weight decay of $5e-4$"',
        "momentum": '"SGD [6], set with an initial learning rate of 0.01, momentum of 0.9, and weight decay '
                    'of $5e-4$"',
        "weight_decay": '"SGD [6], set with an initial learning rate of 0.01, momentum of 0.9, and weight '
                        'decay of $5e-4$"',
        "schedule": '"For both Adam [4] and SGD [6], we implemented the MultiStepLR scheduler, reducing the '
                    'learning rate by a factor of 0.1 initially after the first 85 epochs and subsequently '
                    'every 25 epochs."',
        "milestones": '"reducing the learning rate by a factor of 0.1 initially after the first 85 epochs '
                      'and subsequently every 25 epochs."',
        "gamma": '"reducing the learning rate by a factor of 0.1 initially after the first 85 epochs"',
        "flip": _R001_AUG_SOURCE, "translate": _R001_AUG_SOURCE,
    },
    notes=_R001_AUG_NOTES + "The 200 epochs and batch size 128 are the report's \"standard "
          "hyperparameter set\". The report gives this model 93.7% in its abstract and discussion "
          "and 93.83% in its optimizer comparison.",
)


@register("se_resnet_666_shared", report=_R001, title=_R001_TITLE, published_params=None,
          published_acc=93.7, recipe=_R001_DENSE_RECIPE,
          notes="Dense SE ResNet: 16-channel stem, 3 stages 64/128/256 x 6 SE blocks, one 3x3 kernel "
                "shared by the 256->256 convs of stage 3.")
def se_resnet_666_shared(num_classes: int = 10) -> nn.Module:
    """The "Dense SE Resnet with Shared Parameter" of report 001.

    From the text: the CIFAR SE-ResNets of the SE paper (16-channel stem, three stages of SE
    BasicBlocks), with "channel counts across the three stages [increased] to 64, 128, and 256,
    keeping the depth of each stage to 6 blocks", and kernel sharing "exclusively in the third
    stage". SE blocks sit on each block's residual branch, reduction 16, bias-free as in the SE
    paper's FC formulation. Sharing: all 3x3 convs of stage 3 whose kernel is 256x256x3x3 (conv2
    of block 1, both convs of blocks 2-6: 11 convs) hold one kernel; block 1's conv1 (128->256)
    cannot. No total is printed; the count follows as
      stem    3*16*9 + 2*16                                                      =       464
      stage1  (16*64*9 + 64*64*9 + 16*64 + 6*64 + 2*64*4) + 5*(2*64*64*9 + 4*64 + 2*64*4)
                                                                                 =   420,480
      stage2  (64*128*9 + 128*128*9 + 64*128 + 6*128 + 2*128*8) + 5*(2*128*128*9 + 4*128 + 2*128*8)
                                                                                 = 1,719,552
      stage3  128*256*9 + 256*256*9 (shared, once) + 128*256 + 6*256 + 2*256*16
              + 5*(4*256 + 2*256*16)                                             =   973,312
      linear  256*10 + 10                                                        =     2,570
      total                                                                      = 3,116,378
    the same figure the code linked from the report prints for its model.
    """
    return DenseSEResNet(widths=(64, 128, 256), blocks=6, share=(False, False, True), stem=16,
                         num_classes=num_classes)
