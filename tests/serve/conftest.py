"""A real Triton server (the nvidia-pytriton bundled binary) on a repository exported from a trained run."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from serve.triton_server import TritonServer, free_port
from tests.conftest import REPO

MODEL = "breast"


@dataclass
class Served:
    server: TritonServer
    repository: Path
    run_dir: Path
    model: str = MODEL


@pytest.fixture(scope="session")
def exported_repo(tmp_path_factory: pytest.TempPathFactory, trained_run: Path) -> Path:
    """``model_repository/breast/1``: the python-backend export of the trained run."""
    from export.build import export_model

    repo = tmp_path_factory.mktemp("serve") / "model_repository"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"run={trained_run}", f"name={MODEL}",
                                                      f"model_repository={repo}"])
    export_model(cfg)
    return repo


@pytest.fixture(scope="session")
def served(exported_repo: Path, trained_run: Path) -> Iterator[Served]:
    """Triton in explicit model-control mode with the model loaded; stopped at the end of the session."""
    server = TritonServer(exported_repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          model_control="explicit", load_models=[MODEL])
    server.start(timeout=120)
    try:
        yield Served(server, exported_repo, trained_run)
    finally:
        server.stop()
        assert server.process is None or server.process.poll() is not None, "Triton left running"
