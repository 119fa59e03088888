"""Run a script on local ranks with ``mlx.launch --backend ring`` (for the multi-process tests)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[2]


def free_ports(count: int) -> int:
    """A port p with p .. p+count-1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for offset in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


def launch(world: int, script: Path, args: Sequence[str], timeout: float = 240) -> None:
    """Run ``script args`` on ``world`` local processes; raise if any rank fails or it times out."""
    launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable))
    assert launcher, "mlx.launch is installed with mlx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [launcher, "-n", str(world), "--backend", "ring", "--starting-port", str(free_ports(world)),
               "--python", sys.executable, str(script), *map(str, args)]
    # own process group: a hung rank is killed with the launcher, not left behind
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        assert proc.wait(timeout=timeout) == 0, f"mlx.launch exited with {proc.returncode}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
