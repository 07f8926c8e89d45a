"""albef_bal: ALBEF-style vision-language pretraining with DeepSpeed, WebDataset and
modality-balancing methods.

Install on a CPU machine with the pinned torch build (see README):
    pip install -c constraints.txt torch==2.13.0 && pip install -c constraints.txt -e '.[dev]'
"""
from setuptools import find_packages, setup

setup(
    name="albef_bal",
    version="0.1.0",
    description="ALBEF vision-language pretraining with DeepSpeed, WebDataset and modality balancing",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The config presets ship inside the package as albef_bal/configs (read through
    # importlib.resources), built from the one top-level configs/ that users read and edit.
    packages=find_packages(include=["albef_bal", "albef_bal.*"]) + ["albef_bal.configs"],
    package_dir={"albef_bal.configs": "configs"},
    package_data={"albef_bal.configs": ["*.yaml", "*.json", "**/*.yaml", "**/*.json"]},
    include_package_data=True,
    install_requires=[
        # Ranges that the pinned versions in constraints.txt satisfy, so that an installed
        # torch (CPU or CUDA) is kept and never replaced by pip's own choice.
        "torch>=2.2",
        "transformers>=4.40",
        "tokenizers",
        "safetensors>=0.4",
        # the ZeRO 1/2 gradient reads (engine/grads.py) and the autocast config are tested with
        # 0.19.8; the gradient layout they rely on is also checked when first used
        "deepspeed>=0.19.8",
        "webdataset>=0.2.86",
        "accelerate>=0.30",
        "faiss-cpu>=1.7",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        # timm imports torchvision at import time; install it only where a torchvision
        # build for your torch exists. The default ViT does not need it.
        "timm": ["timm>=0.9"],
        "wandb": ["wandb"],
        "dev": ["pytest>=7", "pytest-xdist"],
    },
    entry_points={"console_scripts": ["albef-bal=albef_bal.cli:main"]},
)
