"""The backend's matmul kernels against ggml's own vec_dot, bit for bit."""
from __future__ import annotations

import gguf
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from powerinfer import _core

TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q5_0": gguf.GGMLQuantizationType.Q5_0,
}


def _weights(rows: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return rows.astype(np.float32).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.F16:
        return rows.astype(np.float16).view(np.uint8)
    return gguf.quants.quantize(rows, qtype)


@given(
    wtype=st.sampled_from(sorted(TYPES)),
    blocks=st.integers(1, 12),
    n_out=st.integers(1, 70),
    n_cols=st.integers(1, 20),
    n_threads=st.integers(1, 3),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=80, deadline=None)
def test_matmul_equals_vec_dot(wtype: str, blocks: int, n_out: int, n_cols: int, n_threads: int,
                               scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_in = 32 * blocks
    qtype = TYPES[wtype]
    w = _weights(rng.standard_normal((n_out, n_in)).astype(np.float32) * np.float32(scale), qtype)
    x = rng.standard_normal((n_cols, n_in)).astype(np.float32)
    x[:, rng.integers(0, n_in)] = 0.0  # exact zeros and sign handling
    got = _core.matmul(int(qtype), w.reshape(-1), n_in, n_out, x, n_threads)
    want = _core.matmul_vec_dot_reference(int(qtype), w.reshape(-1), n_in, n_out, x)
    np.testing.assert_array_equal(got, want)


def test_matmul_rejects_bad_shapes() -> None:
    import pytest

    w = np.zeros(18 * 4, dtype=np.uint8)
    with pytest.raises(ValueError):
        _core.matmul(int(gguf.GGMLQuantizationType.Q4_0), w, 33, 4, np.zeros((1, 33), np.float32))
    with pytest.raises(ValueError):
        _core.matmul(int(gguf.GGMLQuantizationType.Q4_0), w, 32, 5, np.zeros((1, 32), np.float32))
