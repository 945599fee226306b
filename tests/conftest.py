import os

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis profiles (tests/test_properties.py), chosen by HYPOTHESIS_PROFILE (default "ci"):
# "ci" is small and reproducible (the same examples every run), "dev" searches far more widely.
# Each property test scales its example count from the profile's max_examples.
settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def gloo_world(tmp_path_factory):
    """A one-process gloo group (the world) for the vocabulary-parallel op, torn down after the module."""
    import torch.distributed as dist

    if dist.is_initialized():  # set up by another module of this run: use it as it is
        yield dist.group.WORLD
        return
    init = tmp_path_factory.mktemp("gloo") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
