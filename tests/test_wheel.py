"""The wheel, installed: it ships the example configs, and from a folder outside the repository the installed
package runs `mtkit --help`, a `mtkit train --config mtkit:configs/...`, the README's Python example, and an
export that `SentenceTransformer` encodes exactly as `mtkit.load(...).encode`.

The wheel is built offline (no build isolation) from a copy of the sources, so no stale build/ folder leaks
into it. It goes into a fresh venv with pip's --no-deps; the dependencies (torch, transformers, ...) come
from this interpreter's site-packages through a .pth file added after the install, and every script checks
that no module was imported from the repository.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import CONFIGS, REPO, write_toy_data
from test_api import readme_python_example

pytestmark = pytest.mark.slow

# Appended to every script run in the venv: nothing may come from the source tree (the dependencies' folder
# DEPS aside, which is the repository's own .venv under `make test`).
NOT_FROM_REPO = textwrap.dedent("""
    import os, sys
    deps = tuple(os.environ["DEPS"].split(os.pathsep))
    leaked = sorted(n for n, m in list(sys.modules.items())
                    if (f := getattr(m, "__file__", None) or "").startswith(os.environ["REPO"] + os.sep)
                    and not f.startswith(deps))
    assert not leaked, f"imported from the repository: {leaked}"
""")


def run(args, cwd, env, timeout=600) -> str:
    """stdout and stderr of a command that has to succeed."""
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def python(venv, code: str, cwd, env) -> str:
    script = cwd / "script.py"
    script.write_text(code + NOT_FROM_REPO)
    return run([venv / "bin" / "python", script], cwd, env)


def test_installed_wheel_ships_configs_and_runs_from_outside_the_repository(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", ".cache", "build", "*.egg-info", "__pycache__", "out", ".pytest_cache"))
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "--no-index",
         "-w", tmp_path / "dist"], tmp_path, clean)
    (wheel,) = (tmp_path / "dist").glob("mtkit-*.whl")

    # The example configs are package data, byte for byte.
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        shipped = {n for n in names if n.startswith("mtkit/configs/")}
        want = {f"mtkit/configs/{p.relative_to(CONFIGS)}" for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".json")}
        assert want and shipped == want
        for name in want:
            assert z.read(name) == (CONFIGS / name[len("mtkit/configs/"):]).read_bytes(), name
        assert {"mtkit/api.py", "mtkit/cli.py", "diagnostics/__init__.py"} <= names
        assert not any(n.startswith(("tests/", "launchers/", "configs/")) for n in names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, clean)
    run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index",
         wheel], tmp_path, clean)
    # Only now the dependencies: pip, seeing another mtkit through them, might have skipped the install.
    purelib = run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                  tmp_path, clean).strip()
    assert (Path(purelib) / "mtkit" / "configs" / "debug_tiny.yaml").is_file()
    deps = site.getsitepackages()
    (Path(purelib) / "deps.pth").write_text("\n".join(deps) + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**clean, "REPO": str(REPO), "VENV": str(venv), "DEPS": os.pathsep.join(deps), "OMP_NUM_THREADS": "2",
           "MTKIT_DATA": str(write_toy_data(tmp_path / "data"))}
    assert "Multi-task fine-tuning" in run([venv / "bin" / "mtkit", "--help"], work, env)  # fire: on stderr

    python(venv, textwrap.dedent("""
        import importlib.metadata, os
        import mtkit
        from mtkit import config
        assert mtkit.__file__.startswith(os.environ["VENV"] + os.sep), mtkit.__file__
        assert mtkit.__version__ == importlib.metadata.version("mtkit")
        config.load_pipeline("mtkit:configs/simcse_minilm.yaml")           # and every stage config beside it
        config.load("mtkit:configs/mtl_minilm.yaml", {"deepspeed.config": "mtkit:configs/deepspeed/zero2.json"})
    """), work, env)
    run([venv / "bin" / "mtkit", "train", "--config", "mtkit:configs/debug_tiny.yaml", "--out", "runs/cli",
         "--train.max_steps=2", "--diagnostics.mode=off"], work, env)
    assert (work / "runs/cli/results.json").is_file()

    python(venv, readme_python_example(), work, env)
    run([venv / "bin" / "mtkit", "export", "runs/api_demo", "--out", "exported"], work, env)
    python(venv, textwrap.dedent("""
        import numpy as np
        from sentence_transformers import SentenceTransformer
        import mtkit
        sentences = ["a good film", "the plot was very dull and the actor was not funny", "great"]
        st = SentenceTransformer("exported", device="cpu").encode(sentences)
        np.testing.assert_allclose(st, mtkit.load("runs/api_demo", device="cpu").encode(sentences), atol=1e-5)
    """), work, env)
