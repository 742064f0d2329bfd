"""fastcifar: train the CIFAR-10 ResNets of five student reports in minutes on one GPU."""

__version__ = "0.1.0"
