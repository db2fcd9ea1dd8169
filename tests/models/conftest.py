import pytest


@pytest.fixture(scope="module")
def tp1():
    """A one-process, TP=1 megatron setup for the module; torn down so other test modules start clean."""
    from pretrain.distributed import init_distributed, shutdown

    env = init_distributed(tp=1, seed=0)
    yield env
    shutdown()
