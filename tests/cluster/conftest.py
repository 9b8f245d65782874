"""The compose deployment (deploy/compose/), brought up once for the fault tests: every
server its own container, on a project name and loopback ports of the tests' own, and taken
down with its volumes at the end. The images are built first, before any test starts (cached
after the first time); a deployment that cannot come up is an error, never a skip."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from citytel.config import load_settings
from citytel.devtools import cluster, stack
from citytel.devtools.settings import load_dev_settings


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the images once, before any test starts, when a cluster test is to run: on a fresh
    machine that takes about ten minutes, which no test's own timeout should have to hold."""
    if any(Path(str(item.fspath)).is_relative_to(Path(__file__).parent) for item in session.items):
        cluster.build_images()


# Module scope: the deployment's twelve containers are gone before the next tests run.
@pytest.fixture(scope="module")
def deployment() -> Iterator[cluster.Cluster]:
    directory = Path(tempfile.mkdtemp(prefix="citytel-cluster-"))
    deployment = cluster.Cluster(
        directory,
        project=f"citytel-test-{os.getpid()}",
        postgres_port=stack.free_port(),
        mqtt_port=stack.free_port(),
        prometheus_port=stack.free_port(),
    )
    try:
        cluster.up(deployment, load_settings(), load_dev_settings(), build=False, simulate=False)
        yield deployment
    finally:
        cluster.down(deployment, volumes=True)
        shutil.rmtree(directory, ignore_errors=True)
