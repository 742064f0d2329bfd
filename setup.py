from setuptools import find_packages, setup

setup(
    name="fastcifar",
    version="0.1.0",
    description="High-throughput CIFAR-10 trainer: FFCV data, compiled channels-last fp16 "
                "training, fused Triton BN-ReLU, and every report's ResNet in minutes.",
    python_requires=">=3.10",
    packages=find_packages(include=["fastcifar", "fastcifar.*", "kernels", "kernels.*",
                                    "beton_data", "beton_data.*"]),
    install_requires=[
        "torch>=2.4",
        "ffcv>=1.0.2",
        "numba",
        "triton",
        "numpy",
        "typer>=0.9",
        "pillow",
        "tqdm",
        "matplotlib",
        "scipy",        # confidence intervals and Welch tests of speedrun and leaderboard results
    ],
    extras_require={
        "tensorboard": ["tensorboard"],          # `fastcifar train` logs to TensorBoard when present
        "test": ["pytest", "tensorboard"],
    },
    entry_points={"console_scripts": ["fastcifar=fastcifar.cli:main"]},
)
