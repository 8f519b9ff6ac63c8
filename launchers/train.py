"""Training entry point for every launcher.

    python launchers/train.py --config configs/debug_tiny.yaml --out runs/tiny [--a.b=value ...]
    torchrun --nproc_per_node 2 launchers/train.py --config ... --out ...
    deepspeed --num_gpus 2 launchers/train.py --config ... --out ...

Flags are parsed exactly (no fire value guessing); `--local_rank` from the deepspeed launcher is accepted
and ignored in favour of the LOCAL_RANK environment variable.
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtkit import config as config_mod  # noqa: E402
from mtkit.tasks import DataError  # noqa: E402


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even with settings that differ from the checkpoint's (recorded)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"overrides look like --section.key=value, got {item!r}")
        key, value = item[2:].split("=", 1)
        overrides[key] = value
    return args, overrides


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    from mtkit.checkpoint import RunFolderError
    from mtkit.loop import TrainingStopped
    from mtkit.pipeline import run_any
    try:
        results = run_any(args.config, args.out, overrides, args.resume, args.overwrite,
                          args.allow_config_change)
    except (config_mod.ConfigError, DataError, RunFolderError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(("error: " if e.exit_code else "") + str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"dev": results["dev"], "out": args.out}, indent=2))


if __name__ == "__main__":
    main()
