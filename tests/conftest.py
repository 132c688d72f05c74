"""The pytest fixtures; the helpers tests import (ROOT, micro_config, make_imagenet, ...) are in fixtures.py."""
import os
import sys

# One compute thread per core for each xdist worker (2 workers on the 2 cores of CI: one thread each), set
# before torch is imported and inherited by every process a test starts (several tests give theirs
# OMP_NUM_THREADS=1 explicitly already). With more threads than cores, two workers' OpenMP threads spin
# against each other and a 30-s training crawls for minutes. An OMP_NUM_THREADS of the caller's wins.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    if "torch" in sys.modules:  # imported by a plugin before this file: the setting would come too late
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402
from fixtures import logger_as_found, make_imagenet, micro_config  # noqa: E402
from slurm_cluster import LocalSlurm, SlurmUnavailable  # noqa: E402


@pytest.fixture
def micro_cfg(tmp_path):
    return lambda *overrides, out="run": micro_config(tmp_path / out, overrides)


@pytest.fixture(scope="session")
def imagenet(tmp_path_factory):
    """One miniature ImageNet for the whole session (read-only for tests)."""
    return make_imagenet(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(autouse=True)
def project_logger_as_found():
    """The ``rcmae`` logger put back after each test (fixtures.logger_as_found)."""
    with logger_as_found():
        yield


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
