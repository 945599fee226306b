"""Vocabulary-parallel torch op, DDP and DTensor refusal with 2 and 3 gloo processes (a subprocess)."""

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "multidevice", "torch_vocab_parallel.py")


def test_vocab_parallel_ddp_and_dtensor_on_gloo():
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok  ") == 25, result.stdout + result.stderr  # 5 cases x (2 + 3) ranks
