from __future__ import annotations

from pathlib import Path

import pytest

from powerinfer.models import gemma3_270m
from powerinfer.testmodels import write_test_model

# Threads for every model in the suite: the CI machine has two cores.
THREADS = 2


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def synthetic_models(model_dir: Path) -> dict[str, Path]:
    """Small synthetic llama models (4 layers, n_embd 512, n_ff 2048) in each weight type."""
    return {wtype: write_test_model(model_dir / f"small-{wtype}.gguf", preset="small", wtype=wtype)
            for wtype in ("f16", "q8_0", "q4_0")}


@pytest.fixture(scope="session")
def tiny_model(model_dir: Path) -> Path:
    return write_test_model(model_dir / "tiny-f16.gguf", preset="tiny", wtype="f16")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return gemma3_270m()
