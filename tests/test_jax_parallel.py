"""Vocabulary-parallel JAX op on 4 fake CPU devices (a subprocess: the device count is fixed at JAX start)."""

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "multidevice", "jax_vocab_parallel.py")


def test_vocab_parallel_matches_unsharded_on_four_cpu_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok  ") >= 7, result.stdout
