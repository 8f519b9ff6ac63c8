"""DeepSpeed's CPU all-reduce workspaces in /dev/shm: stale ones are found and removed, mapped ones kept.
(That a real 2-rank launch leaves none behind is checked after every launch in distributed_util.)"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mtkit.distributed import SHM_DIR, SHM_PREFIX, remove_stale_shm_workspaces, stale_shm_workspaces

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm on this system")


@pytest.fixture
def workspace():
    path = SHM_DIR / f"{SHM_PREFIX}_{os.getuid()}_mtkit-test_{os.getpid()}_0"
    path.write_bytes(b"\0" * 4096)
    yield path
    path.unlink(missing_ok=True)


def test_unmapped_workspace_is_stale_and_removed(workspace):
    assert workspace in stale_shm_workspaces()
    removed = remove_stale_shm_workspaces()
    assert (workspace, 4096) in removed and not workspace.exists()


def test_workspace_mapped_by_a_live_process_is_kept(workspace):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import mmap, sys; f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 0); f.close(); "
        "print('mapped', flush=True); sys.stdin.read()"), str(workspace)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        assert workspace not in stale_shm_workspaces()
        remove_stale_shm_workspaces()
        assert workspace.exists()
    finally:
        holder.communicate("")
    assert workspace in stale_shm_workspaces()  # the holder exited: nothing maps it any more

