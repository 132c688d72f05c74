"""The pytest fixtures; the helpers tests import (ROOT, micro_config, make_imagenet, ...) are in fixtures.py."""
import logging
import os

import pytest
from fixtures import make_imagenet, micro_config
from slurm_cluster import LocalSlurm, SlurmUnavailable


@pytest.fixture
def micro_cfg(tmp_path):
    return lambda *overrides, out="run": micro_config(tmp_path / out, overrides)


@pytest.fixture(scope="session")
def imagenet(tmp_path_factory):
    """One miniature ImageNet for the whole session (read-only for tests)."""
    return make_imagenet(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(autouse=True)
def project_logger_as_found():
    """A run's set-up gives the ``rcmae`` logger its own handlers and stops propagation (so that nothing
    prints twice); put it back after each test, so that ``caplog`` in a later test sees its records."""
    logger = logging.getLogger("rcmae")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    yield
    for handler in logger.handlers[:]:
        if handler not in handlers:
            logger.removeHandler(handler)
            handler.close()
    logger.propagate, logger.level = propagate, level


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """One real single-node SLURM cluster per test session (tests/slurm_cluster.py), stopped at its end; the
    tests that need it skip with the reason when it cannot start here. RCMAE_SLURM_TESTS=0 turns them off."""
    if os.environ.get("RCMAE_SLURM_TESTS") == "0":
        pytest.skip("real-SLURM tests turned off: RCMAE_SLURM_TESTS=0")
    cluster = LocalSlurm()
    try:
        cluster.start(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as exc:
        pytest.skip(f"no local SLURM cluster: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm(slurm_cluster, monkeypatch):
    """The session's cluster, with os.environ pointing at it for this test (``sbatch``, ``scontrol`` and submitit
    read SLURM_CONF and PATH); SLURM_* variables inherited from an enclosing job would leak into submissions."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in slurm_cluster.env.items():
        monkeypatch.setenv(name, value)
    return slurm_cluster
