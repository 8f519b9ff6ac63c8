"""Training entry point for every launcher; the same parser and flags as `mtkit train` (see --help).

    python launchers/train.py --config configs/debug_tiny.yaml --out runs/tiny [--a.b=value ...]
    torchrun --nproc_per_node 2 launchers/train.py --config ... --out ...
    deepspeed --num_gpus 2 launchers/train.py --config ... --out ...

`--local_rank` from the deepspeed launcher is accepted and ignored in favour of the LOCAL_RANK
environment variable.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtkit.args import parse as _parse, train_main  # noqa: E402

PROG = "launchers/train.py"


def parse(argv):
    return _parse(argv, PROG)


def main(argv=None):
    train_main(argv, PROG)


if __name__ == "__main__":
    main()
