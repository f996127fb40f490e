from __future__ import annotations

import os
from pathlib import Path

import pytest

from powerinfer import format as fmt
from powerinfer.calibration import calibration_texts
from powerinfer.models import gemma3_270m
from powerinfer.profile import ModelProfile, profile_model
from powerinfer.testmodels import write_test_model

# Threads for every model in the suite: the CI machine has two cores (fewer on a shared machine:
# POWERINFER_TEST_THREADS=1).
THREADS = int(os.environ.get("POWERINFER_TEST_THREADS", "2"))


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


@pytest.fixture(scope="session")
def profiles(synthetic_models: dict[str, Path]) -> dict[str, ModelProfile]:
    return {w: profile_model(p, calibration_texts(), max_tokens=1024, threads=THREADS)
            for w, p in synthetic_models.items()}


@pytest.fixture(scope="session")
def converted(synthetic_models: dict[str, Path], profiles: dict[str, ModelProfile],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, fmt.PowerInferFile]:
    """The synthetic models converted with their declared activation (relu)."""
    out = tmp_path_factory.mktemp("converted")
    return {w: fmt.convert(p, out / f"{w}.gguf", profiles[w].frequencies(), profile_tokens=profiles[w].tokens)
            for w, p in synthetic_models.items()}


@pytest.fixture(scope="session")
def with_predictors(synthetic_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The Q8_0 synthetic model converted with trained predictors, and the held-out profile
    (documents neither training nor threshold setting saw)."""
    from powerinfer.gguf_io import gate_matrices
    from powerinfer.predictor import train_layer_predictors

    path = synthetic_models["q8_0"]
    train = profile_model(path, calibration_texts(part="train"), max_tokens=4096, threads=THREADS, max_samples=4096)
    val = profile_model(path, calibration_texts(part="validation"), max_tokens=512, threads=THREADS, max_samples=512)
    held = profile_model(path, calibration_texts(part="held_out"), max_tokens=512, threads=THREADS, max_samples=512)
    ffn_bytes = {il: 3 * 2048 * 544 for il in range(4)}  # Q8_0 rows of 512: 544 bytes
    predictors = train_layer_predictors(train.layers, val.layers, held.layers, ffn_bytes,
                                        gates=gate_matrices(path))
    out = tmp_path_factory.mktemp("predicted") / "q8_0-predicted.gguf"
    pf = fmt.convert(path, out, train.frequencies(), predictors=predictors)
    return pf, held, ffn_bytes
