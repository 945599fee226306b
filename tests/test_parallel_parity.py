"""torch-sharded equals JAX-sharded: 2 gloo ranks save their results, 4 JAX CPU devices recompute them."""

import os
import subprocess
import sys

HERE = os.path.join(os.path.dirname(__file__), "multidevice")


def test_torch_sharded_equals_jax_sharded(tmp_path):
    env = dict(os.environ, SHARDED_PARITY_FILE=str(tmp_path / "torch_sharded.npz"), JAX_PLATFORMS="cpu")
    for script in ("torch_vocab_parallel.py", "jax_vocab_parallel.py"):
        result = subprocess.run(
            [sys.executable, os.path.join(HERE, script)], capture_output=True, text=True, timeout=600, env=env
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   torch-sharded (2 ranks) vs JAX-sharded (4 devices)" in result.stdout, result.stdout
