"""examples/training/context_parallel.py on 2 processes: its loss and gradients equal one process's."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))
from launch import launch  # noqa: E402

TINY = ["--dims", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--seq-len", "128", "--lr", "1e-2"]


def test_context_parallel_training_matches_the_whole_sequence_and_learns(tmp_path):
    launch(2, ROOT / "examples" / "training" / "context_parallel.py",
           [*TINY, "--steps", "6", "--check", "--out", tmp_path])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world"] == 2
    check = metrics["check"]
    assert abs(check["loss_context_parallel"] - check["loss_full"]) <= 1e-5 * abs(check["loss_full"])
    assert check["max_grad_diff"] <= 1e-5 * check["max_grad"]
    assert metrics["losses"][-1] < metrics["losses"][0]
