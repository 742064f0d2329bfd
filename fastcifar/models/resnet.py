"""ResNets of BasicBlocks (reports 004 and 000): conv-BN-ReLU stem, stages of BasicBlocks, pool, linear.

A BasicBlock is conv3x3-BN-ReLU, conv3x3-BN, + shortcut, ReLU; the shortcut is the identity,
or a 1x1 conv + BN where the block changes width or resolution. The first stage keeps the
resolution, every later stage halves it in its first block.
"""
from __future__ import annotations

from torch import nn

from fastcifar.models.norm import NormAct
from fastcifar.models.registry import register
from fastcifar.recipe import Recipe


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def projection(cin: int, cout: int, stride: int) -> nn.Module:
    """1x1 conv + BN shortcut for a block that changes width or resolution."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                         NormAct(cout, act=None))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = NormAct(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = NormAct(cout)  # BN, + shortcut, ReLU in one call
        self.shortcut = projection(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(out), residual=self.shortcut(x))


def residual_stages(block, cin: int, widths, blocks, stage_options=None, **options):
    """Stages of residual blocks, each built as ``block(cin, width, stride=..., **options)``.

    Stage i holds ``blocks[i]`` blocks of output width ``widths[i]``; the first stage keeps the
    resolution, every later stage halves it in its first block. ``stage_options(i)``, called as
    stage i starts, adds keyword arguments for that stage's blocks (e.g. a kernel they share).
    Returns the stages as one nn.Sequential and the number of channels they output.
    """
    stages = []
    for i, (width, n) in enumerate(zip(widths, blocks)):
        kw = {**options, **(stage_options(i) if stage_options else {})}
        layers = []
        for j in range(n):
            layers.append(block(cin, width, stride=2 if i > 0 and j == 0 else 1, **kw))
            cin = width
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages), cin


class ResNet(nn.Module):
    """stem conv (3 -> stem) + BN-ReLU, then ``post_stem``, stages of ``block``, global pool, linear.

    All four report families (this file, resnet_dropout, se_resnet, resnext) are this skeleton and
    differ only in the block (``block_options`` go to every block, ``stage_options`` as in
    ``residual_stages``), the stem's width and kernel size, and ``post_stem``.
    """

    def __init__(self, widths, blocks, stem: int | None = None, block=BasicBlock,
                 post_stem: nn.Module | None = None, num_classes: int = 10, *, stem_kernel: int = 3,
                 stage_options=None, **block_options):
        super().__init__()
        stem = stem or widths[0]
        self.conv1 = nn.Conv2d(3, stem, kernel_size=stem_kernel, padding=stem_kernel // 2, bias=False)
        self.bn1 = NormAct(stem)
        self.post_stem = post_stem or nn.Identity()
        self.layers, cout = residual_stages(block, stem, widths, blocks, stage_options, **block_options)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cout, num_classes)

    def forward(self, x):
        out = self.post_stem(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out)).flatten(1)
        return self.linear(out)


# ---------------------------------------------------------------------------------------------
# Report 004_9a17163d1e54e00e.txt

_R004 = "004_9a17163d1e54e00e.txt"
_R004_TITLE = "Mini-Project Report (Wang, Zhao, Qin; NYU Deep Learning Fall 2022)"

_R004_RECIPE = Recipe(
    tag="report", epochs=70, optimizer="adam", lr=0.01, weight_decay=1e-6,
    schedule="onecycle", pct_start=0.3, final_lr_frac=0.0, grad_clip_value=0.1,
    flip=True, translate=4,
    sources={
        "epochs": 'Figure 4 (Settings): "epochs = 70"',
        "optimizer": 'Figure 4 (Settings): "opt_func = torch.optim.Adam"',
        "lr": 'Figure 4 (Settings): "max_lr = 0.01"; "the learning rate starts at a low value, and '
              'gradually increases for 0.3 of the iterations to a maximum value of 0.01"',
        "weight_decay": 'Figure 4 (Settings): "weight_decay = 1e-6"',
        "schedule": '"There are many strategies for varying the learning rate during training, and we '
                    'used the "One Cycle Learning Rate Policy"."',
        "pct_start": '"the learning rate starts at a low value, and gradually increases for 0.3 of the '
                     'iterations to a maximum value of 0.01"',
        "final_lr_frac": '"and then gradually decreases to a very small value."',
        "grad_clip_value": 'Figure 4 (Settings): "grad_clip = 0.1"; "We also added gradient clipping, '
                           'which helps limit the values of gradients to a small range"',
        "flip": '"we will pad each image by 4 pixels, and then take a random crop of size 32 x 32 '
                'pixels, and then flip the image horizontally with a 0.5 probability."',
        "translate": '"we will pad each image by 4 pixels, and then take a random crop of size 32 x 32 '
                     'pixels"',
    },
    notes="Crops pad by reflection (Figure 1: RandomCrop(32, padding=4, padding_mode='reflect')). "
          "Normalisation mean (0.4914, 0.4822, 0.4465), std (0.2021, 0.1964, 0.2019) (Figure 1). "
          "The batch size is not given (\"large batch size makes little difference in our test\"). "
          "Published curve: 93.81% test accuracy after 70 epochs, about 25 minutes.",
)


@register("resnet_2111", report=_R004, title=_R004_TITLE, published_params=4_977_226,
          published_acc=93.81, recipe=_R004_RECIPE,
          notes="4 stages of BasicBlocks [2,1,1,1], widths 64/128/256/512.")
def resnet_2111(num_classes: int = 10) -> nn.Module:
    """ResNet-18 layout with blocks [2, 1, 1, 1], widths 64/128/256/512 (report 004, Figure 5).

    The layer table (Figure 5) prints three rows that no 3x3/1x1 conv of this network can have:
    Conv2d-20 "294,512" (a 3x3 128->256 conv has 294,912), Conv2d-27 "1,179,448" (3x3 256->512:
    1,179,648) and Conv2d-31 "131,672" (1x1 256->512: 131,072). The misprints cancel (-400,
    -200, +600), and with the true sizes the rows still sum to the printed total, so they are
    typos and the network is the plain one: stem 1,856 + stage1 147,968 + stage2 230,144 +
    stage3 919,040 + stage4 3,673,088 + linear 5,130 = 4,977,226.
    """
    return ResNet(widths=(64, 128, 256, 512), blocks=(2, 1, 1, 1), num_classes=num_classes)


@register("resnet_6543", report=_R004, title=_R004_TITLE, published_params=None,
          published_acc=93.87, recipe=_R004_RECIPE,
          notes="Report 004's second model: half the channels (32/64/128/256), blocks [6,5,4,3]; "
                "the report gives its best accuracy as 0.9387 and only 'around 4.9 million' parameters.")
def resnet_6543(num_classes: int = 10) -> nn.Module:
    """Report 004's second model: "cuts the number of channel in half for each layer and increases
    the residual block number to 6 for first layer, 5 for second layer, 4 for third layer and 3
    for fourth layer", kept at "around 4.9 million" trainable parameters.

    Halving every width of resnet_2111 (stem included) gives widths 32/64/128/256 and a 256->10
    linear. No total is printed; the count follows from the text as
      stem    3*32*9 + 2*32                                            =       928
      stage1  6 blocks * (2*32*32*9 + 4*32)                            =   111,360
      stage2  (32*64*9 + 64*64*9 + 32*64 + 6*64) + 4 * (2*64*64*9 + 4*64)  =   353,664
      stage3  (64*128*9 + 128*128*9 + 64*128 + 6*128) + 3 * (...)      = 1,116,416
      stage4  (128*256*9 + 256*256*9 + 128*256 + 6*256) + 2 * (...)    = 3,280,384
      linear  256*10 + 10                                              =     2,570
      total                                                            = 4,865,322
    which matches "around 4.9 million".
    """
    return ResNet(widths=(32, 64, 128, 256), blocks=(6, 5, 4, 3), num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# Report 000_29b2964ca4a6d86d.txt

_R000_RECIPE = Recipe(
    tag="report", epochs=60, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine",
    flip=True, translate=4,
    sources={
        "epochs": '"Modified ResNet developed for the CIFAR-10 image classification task demonstrated '
                  'substantial progress over the course of 60 epochs."',
        "optimizer": '"Utilization of the CrossEntropyLoss function to handle multiclass classification, '
                     'combined with the Adam optimizer for efficient backpropagation."',
        "schedule": '"Adoption of a learning rate scheduler to adjust the learning rate over epochs, '
                    'optimizing the training process and improving model convergence."',
        "flip": '"Application of data augmentation techniques such as random crops and horizontal flips '
                'to the training dataset"',
        "translate": '"Application of data augmentation techniques such as random crops and horizontal '
                     'flips to the training dataset"',
    },
    notes="The report names neither the learning rate, the weight decay, the batch size nor the "
          "kind of scheduler: lr 1e-3 and weight decay 0 are torch's Adam defaults, cosine stands "
          "in for the unnamed scheduler, and the crop padding of 4 pixels is the usual CIFAR value. "
          "Runs are seeded and deterministic in the report. Published: 94.16% test accuracy "
          "(94.25% validation at epoch 59).",
)


@register("resnet_343w66", report="000_29b2964ca4a6d86d.txt",
          title="Deep Learning Mini Project - Image Classification (Spring 24 - NYU): Enhancing "
                "CIFAR-10 Performance With Modified ResNet",
          published_params=4_916_284, published_acc=94.16, recipe=_R000_RECIPE,
          notes="3 stages of BasicBlocks [3,4,3], widths 66/132/264.")
def resnet_343w66(num_classes: int = 10) -> nn.Module:
    """Stem 3->66, three stages of BasicBlocks [3, 4, 3] at widths 66/132/264 (report 000, Figure 1).

    The model summary is garbled in its second half (rows merged, "BasicBlock-29 156 916" and
    "BasicBlock-34 204" print parameters for a parameter-free row, and the stage-3 rows are cut
    off), but the text fixes the layout ("three major stages, each of which doubles the number
    of feature channels from 66 to 132, and then to 264") and the legible rows give 3 blocks in
    stage 1, 4 in stage 2 (Conv2d-18..BasicBlock-39) and, by the total, 3 in stage 3:
    stem 1,914 + stage1 236,016 + stage2 1,187,208 + stage3 3,488,496 + linear 2,650
    = 4,916,284, the printed total.
    """
    return ResNet(widths=(66, 132, 264), blocks=(3, 4, 3), num_classes=num_classes)
