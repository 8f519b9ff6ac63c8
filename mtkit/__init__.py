"""mtkit: multi-task fine-tuning of sentence encoders, with gradient-conflict diagnostics.

    import mtkit
    results = mtkit.train("mtkit:configs/debug_tiny.yaml", out="runs/x", train__max_steps=4)
    model = mtkit.load("runs/x")
    model.encode(["a sentence"])          # np.ndarray [1, hidden]
    model.predict("sst", ["a sentence"])  # the task head's labels

`train`, `load` and `Model` live in `mtkit.api`; they are imported on first use, so `import mtkit` (and the
`mtkit` command's start-up) stays free of torch.
"""

__version__ = "0.1.0"  # the only copy: setup.py reads it from here

_API = ("train", "load", "Model")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from mtkit import api
        return getattr(api, name)
    raise AttributeError(f"module 'mtkit' has no attribute {name!r}")
