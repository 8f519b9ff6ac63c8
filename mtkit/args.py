"""The one argument parser of training, behind both `mtkit train` and `launchers/train.py`.

Parsing is exact: a config value reaches the config as the string that was typed, and the config's
dataclasses give it its type (`--name=1.10` stays "1.10"; `--train.predict=dev,test` is a list because
`train.predict` is a list field, `--name=a,b` is the string "a,b"). `--help` lists every config key with
its type, default and allowed values, generated from `mtkit/config.py`.
"""
from __future__ import annotations

import argparse
import faulthandler
import io
import json
import os
import signal
import sys

from mtkit import config as config_mod
from mtkit import lineage  # noqa: F401  imported first by every entry point: notes the launchers early
from mtkit import progress

USAGE_NOTE = """\
config keys: override any of them with --KEY=VALUE (the = is required); a list as a,b,c; none unsets an
optional value; a task's field as --tasks.<name>.<field>; one entry of a mapping as --model.arch.<key>=V.
A pipeline config passes overrides to every stage, or to one with a stage prefix (--<stage>.train.seed=1).
"""


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{prog} --config YAML --out DIR [flags] [--KEY=VALUE ...]",
        description="Train a run or a pipeline config into OUT.",
        epilog=USAGE_NOTE + "\n" + config_mod.keys_help())
    p.add_argument("--config", required=True, metavar="YAML", help="a run config or a pipeline config")
    p.add_argument("--out", required=True, metavar="DIR", help="the run folder")
    p.add_argument("--resume", default=None, metavar="auto|CHECKPOINT",
                   help="continue the run in OUT from its latest checkpoint (auto) or from CHECKPOINT, "
                        "refusing changed settings unless --allow-config-change")
    p.add_argument("--overwrite", action="store_true", help="delete the run in OUT and start over")
    p.add_argument("--allow-config-change", "--allow_config_change", action="store_true",
                   help="resume even with settings that differ from the checkpoint's (recorded in the run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no INFO logs; warnings, errors "
                   "and the final results still print")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse(argv: list[str], prog: str = "mtkit train") -> tuple[argparse.Namespace, dict[str, str]]:
    """(the flags, the config overrides as {dotted key: the string typed})."""
    p = parser(prog)
    args, rest = p.parse_known_args(argv)
    overrides = {}
    for item in rest:
        key, eq, value = item[2:].partition("=")
        if not item.startswith("--") or not eq or not key:
            p.error(f"config overrides look like --section.key=value, got {item!r} (see --help for the keys)")
        overrides[key] = value
    return args, overrides


def _stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` prints where a run that seems hung is (every thread's stack, on stderr) and lets it
    go on. Not where there is no SIGUSR1, or where stderr is no file (a notebook, a captured stream)."""
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (AttributeError, ValueError, io.UnsupportedOperation):
        pass


def train_main(argv: list[str] | None = None, prog: str = "mtkit train") -> None:
    args, overrides = parse(sys.argv[1:] if argv is None else argv, prog)
    progress.setup_logging(args.quiet)
    _stacks_on_sigusr1()
    from mtkit.checkpoint import RunFolderError
    from mtkit.loop import TrainingStopped
    from mtkit.pipeline import run_any
    from mtkit.tasks import DataError
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        results = run_any(args.config, args.out, overrides, args.resume, args.overwrite, args.allow_config_change)
    except (config_mod.ConfigError, DataError, RunFolderError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        if main_rank:
            print(("error: " if e.exit_code else "") + str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    if main_rank:
        print(json.dumps({"dev": results["dev"], "out": args.out}, indent=2))
