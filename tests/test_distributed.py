"""A real 2-process CPU (gloo) run: init, one step, demonstrations chosen on the global group."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("distributed_sdpo_step.py")


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["checkpointing", "no-checkpointing"])
def test_group_spanning_two_processes(tmp_path, checkpointing):
    """Without activation checkpointing, DDP looks for unused parameters: the LM head must not be one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parent.parent)}
    with socket.socket() as probe:  # torchrun's static rendezvous needs a concrete free port
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               str(SCRIPT), str(tmp_path), checkpointing]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    # rank 0 failed; its demonstration is rank 1's first completion (the first success of the global group)
    assert rank0["batch"]["sd_mask"] == [1.0, 1.0]
    demo = rank1["batch"]["completions"][0].strip()
    for text in rank0["batch"]["teacher"]:
        assert "Correct solution:" in text
        assert demo in text
    # rank 1: each success is demonstrated by the other success, never itself
    assert rank1["batch"]["sd_mask"] == [1.0, 1.0]
    assert rank0["teacher_updates"] == rank1["teacher_updates"] == 1
    # gradients were synchronised through DDP on the hidden-state loss path: the replicas agree
    assert rank0["hidden_state_path"]
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-9)
