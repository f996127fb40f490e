"""The sparse FFN of PowerInfer models: single tokens run predictor-gated neurons.

Oracle mode (every gate row, up/down only for neurons that fire) must give exactly the dense
result for ReLU-family layers; predicted mode is measured against dense (top-1, KL) and must do
less work. Kernels are checked against ggml's dequantization with hypothesis.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import powerinfer
from conftest import THREADS
from powerinfer import _core
from powerinfer import format as fmt
from powerinfer import quality
from powerinfer.profile import ModelProfile

PROMPT = "The quick brown fox jumps over the lazy dog, and then"
KW = dict(n_ctx=256, n_threads=THREADS, verbose=False, logits_all=True)

# ggml type ids of the down_t types the converter writes, and a few more
AXPY_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12,
              "q5_k": 13, "q6_k": 14, "bf16": 30}


def _tokens(llm: powerinfer.Llama, n: int) -> list[int]:
    """The prompt and `n` tokens of the model's greedy continuation."""
    tokens = llm.tokenize(PROMPT.encode())
    out = list(tokens)
    for tok in llm.generate(list(tokens), temp=0.0):
        out.append(tok)
        if len(out) >= len(tokens) + n:
            break
    return out


def _decode_logits(llm: powerinfer.Llama, mode: str, tokens: list[int]) -> np.ndarray:
    llm.sparse_mode = mode
    return quality.logits(llm, tokens, one_at_a_time=True)


@given(type_name=st.sampled_from(sorted(AXPY_TYPES)), n_blocks=st.integers(1, 12), n_rows=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_axpy_kernels_match_ggml_dequantization(type_name: str, n_blocks: int, n_rows: int, seed: int) -> None:
    t = AXPY_TYPES[type_name]
    block = 256 if type_name.endswith("_k") else 32
    rng = np.random.default_rng(seed)
    rows = (rng.standard_normal((n_rows, n_blocks * block)) * rng.uniform(0.01, 10)).astype(np.float32)
    data = np.frombuffer(_core.quantize_rows(t, rows), dtype=np.uint8)
    coefs = rng.standard_normal(n_rows).astype(np.float32)
    want = coefs.astype(np.float64) @ _core.dequantize_rows(t, data, n_blocks * block).astype(np.float64)
    got = _core.axpy_rows(t, data, n_blocks * block, coefs)
    scale = np.abs(coefs).sum() * np.abs(rows).max() + 1e-30
    assert np.abs(got - want).max() <= 1e-6 * scale


@pytest.mark.parametrize("wtype", ["f16", "q4_0"])
def test_oracle_sparse_decode_equals_dense(converted: dict[str, fmt.PowerInferFile], wtype: str) -> None:
    """ReLU layers: skipping the neurons whose activation is zero changes nothing, bit for bit."""
    llm = powerinfer.Llama(converted[wtype].path, **KW)
    try:
        tokens = _tokens(llm, 48)
        dense = _decode_logits(llm, "off", tokens)
        llm.reset_powerinfer_stats()
        oracle = _decode_logits(llm, "oracle", tokens)
        stats = llm.powerinfer_stats()
    finally:
        llm.close()
    assert np.array_equal(dense, oracle)
    n_layers = len(converted[wtype].layers)
    assert stats["sparse_layer_tokens"] == n_layers * len(tokens)
    assert stats["neurons_predicted"] == stats["neurons_total"]  # oracle: every gate row
    assert 0 < stats["neurons_active"] < 0.5 * stats["neurons_total"]  # planted sparsity: about 10-20%


@pytest.mark.parametrize("activation", ["relu2", "drelu", "fatrelu"])
def test_relu_family_oracle_equals_dense(synthetic_models: dict[str, Path], profiles: dict[str, ModelProfile],
                                         tmp_path: Path, activation: str) -> None:
    path = fmt.convert(synthetic_models["f16"], tmp_path / f"{activation}.gguf", profiles["f16"].frequencies(),
                       activation=activation, thresholds={il: 0.05 for il in range(4)}).path
    llm = powerinfer.Llama(path, **KW)
    try:
        tokens = _tokens(llm, 24)
        dense = _decode_logits(llm, "off", tokens)
        llm.reset_powerinfer_stats()
        oracle = _decode_logits(llm, "oracle", tokens)
        active = llm.powerinfer_stats()["neurons_active"]
    finally:
        llm.close()
    assert np.array_equal(dense, oracle)
    assert active > 0


def test_predicted_sparse_decode_is_close_to_dense_and_skips_work(with_predictors: tuple) -> None:
    pf = with_predictors[0]
    llm = powerinfer.Llama(pf.path, **KW)
    try:
        assert llm.sparse_mode == "predicted"  # the default for PowerInfer models
        tokens = _tokens(llm, 128)
        dense = _decode_logits(llm, "off", tokens)
        llm.reset_powerinfer_stats()
        sparse = _decode_logits(llm, "predictor", tokens)  # every layer's predictor
        stats = llm.powerinfer_stats()
        batched = quality.logits(llm, tokens)  # batches run dense whatever the mode
    finally:
        llm.close()
    agree = quality.compare(dense, sparse)
    # held-out recall 0.99 per neuron and layer: measured 0.94 top-1, KL 0.012 on this model
    assert agree.top1 >= 0.9, agree
    assert agree.kl_mean < 0.03, agree
    assert not np.array_equal(dense, sparse)  # the predictor really gated something
    assert stats["neurons_predicted"] < 0.7 * stats["neurons_total"]
    assert stats["neurons_active"] <= stats["neurons_predicted"]
    # batches run ggml's batch kernels and the blocked down GEMM: dense up to summation order
    same = quality.compare(dense, batched)
    assert same.top1 >= 0.99 and same.kl_mean < 1e-4, same


def test_relu_pair_predictors_are_held_as_linear_maps(with_predictors: tuple, tmp_path: Path) -> None:
    """A predictor stored as ReLU pairs (fc1 = [A, -A], fc2 = [C; -C]) is the linear map C·A·x:
    the backend holds it at half the rank (half its RAM; decode reads each weight once) and
    selects the same neurons as the ReLU network it is stored as, up to Q8_0 rounding."""
    pf = with_predictors[0]
    # a copy in which one value of one pair is not the exact negation: the ReLU form is kept.
    # The value changed by one F16 step is layer 0's smallest, so scores barely move.
    unpaired = tmp_path / "unpaired.gguf"
    shutil.copyfile(pf.path, unpaired)
    info, L0 = pf.predictors[0], pf.layers[0]
    r, at = int(info["rank"]), pf.region_offset + int(info["offset"])
    fc1 = np.fromfile(pf.path, dtype=np.uint16, count=L0.n_embd * r, offset=at).reshape(L0.n_embd, r)
    magnitude = np.where(fc1[:, r // 2:] & 0x7FFF == 0, 0xFFFF, fc1[:, r // 2:] & 0x7FFF)
    j, k = np.unravel_index(int(np.argmin(magnitude)), magnitude.shape)
    with open(unpaired, "r+b") as f:
        f.seek(at + 2 * (j * r + r // 2 + k))
        f.write(np.uint16(fc1[j, r // 2 + k] + 1).tobytes())
    results = {}
    for path in (pf.path, unpaired):
        llm = powerinfer.Llama(str(path), **KW)
        try:
            tokens = _tokens(llm, 32)
            llm.reset_powerinfer_stats()
            logits = _decode_logits(llm, "predictor", tokens)
            results[path] = (logits, llm.powerinfer_stats())
        finally:
            llm.close()
    (paired, paired_stats), (relu, relu_stats) = results[pf.path], results[unpaired]
    # only layer 0 of the copy keeps its stored rank r: r/2 more hidden units, held as Q8_0 rows
    # (fc1: one row of n_embd per unit; fc2: one row of the rank per neuron)
    q8 = int(gguf.GGMLQuantizationType.Q8_0)
    saved = relu_stats["ffn_resident_bytes"] - paired_stats["ffn_resident_bytes"]
    assert saved == (r // 2) * _core.row_size(q8, L0.n_embd) + L0.n_ff * (_core.row_size(q8, r) - _core.row_size(q8, r // 2))
    # the same scores up to the Q8_0 rounding of h, quantized as relu(a) and relu(-a) in one form
    # and as a in the other: a handful of neurons at the threshold go the other way
    pairs, relus = paired_stats["neurons_predicted"], relu_stats["neurons_predicted"]
    assert abs(pairs - relus) <= 1e-3 * relus, (pairs, relus)
    same = quality.compare(paired, relu)
    assert same.top1 == 1.0 and same.kl_mean < 1e-6, same


def test_sparse_decode_does_not_depend_on_thread_count(with_predictors: tuple) -> None:
    results = []
    for threads in (1, 2):
        llm = powerinfer.Llama(with_predictors[0].path, **{**KW, "n_threads": threads})
        try:
            tokens = llm.tokenize(PROMPT.encode())
            results.append(_decode_logits(llm, "predictor", tokens))
        finally:
            llm.close()
    assert np.array_equal(results[0], results[1])


def test_sparse_needs_a_powerinfer_model(synthetic_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="powerinfer convert"):
        powerinfer.Llama(str(synthetic_models["f16"]), sparse=True, verbose=False)
    llm = powerinfer.Llama(str(synthetic_models["f16"]), n_ctx=64, verbose=False)
    try:
        assert llm.sparse_mode == "off"
        with pytest.raises(ValueError):
            llm.sparse_mode = "oracle"
    finally:
        llm.close()


def test_bad_sparse_argument(converted: dict[str, fmt.PowerInferFile]) -> None:
    with pytest.raises(ValueError, match="sparse must be"):
        powerinfer.Llama(converted["f16"].path, sparse="sometimes", verbose=False)


def test_predictor_as_held_keeps_its_held_out_recall(with_predictors: tuple) -> None:
    """The backend holds each predictor as Q8_0 rows, fc2 transposed to one row per neuron: on
    the same tokens, the neurons that fire under the predictor are nearly all of those that fire
    under the oracle (every gate row), as the recall measured at conversion says they should be."""
    pf = with_predictors[0]
    llm = powerinfer.Llama(pf.path, **KW)
    try:
        tokens = _tokens(llm, 64)
        fired = {}
        for mode in ("oracle", "predictor"):
            llm.reset_powerinfer_stats()
            _decode_logits(llm, mode, tokens)
            fired[mode] = llm.powerinfer_stats()["neurons_active"]
    finally:
        llm.close()
    held_out = min(float(p["recall"]) for p in pf.predictors.values())
    recall = fired["predictor"] / fired["oracle"]
    assert held_out - 0.02 <= recall <= 1.0, (recall, held_out)


# the integer down kernel's types: ggml type id, block bytes, quant offset
INT_AXPY_TYPES = {"q4_0": (2, 18, 8), "q5_0": (6, 22, 16)}


def _has_int_axpy() -> bool:
    try:
        _core.axpy_rows_int(2, np.zeros(18, dtype=np.uint8), 32, np.ones(1, dtype=np.float32))
    except ValueError:
        return False  # a CPU without AVX2: decode keeps the float kernels
    return True


needs_int_axpy = pytest.mark.skipif(not _has_int_axpy(), reason="no integer down kernel on this CPU")


def _int_axpy_bound(type_name: str, data: np.ndarray, deq: np.ndarray, coefs: np.ndarray) -> np.ndarray:
    """Per element: what the integer kernel may be off by. A row with v = |a_r| * (largest block
    scale) in [2^(4t), 2^(4t+4)) has each coefficient * block scale rounded to a multiple of its
    tier's step 2^(4t+4-14), so an element is off by at most sum_r step_r/2 * |q_r - offset|; plus
    float rounding of the result."""
    _, bsize, _ = INT_AXPY_TYPES[type_name]
    n_rows, n = deq.shape
    scales = np.abs(data.reshape(n_rows, -1, bsize)[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32))
    v = (np.abs(coefs.astype(np.float32)) * scales.max(axis=1)).astype(np.float64)
    _, e = np.frexp(v)                                   # v = m * 2^e, m in [0.5, 1)
    tier = np.floor_divide(e - 1, 4)
    step = np.where(v > 0, np.exp2(4.0 * (tier + 1) - 14), 0.0)
    per_elem = np.repeat(scales.astype(np.float64), 32, axis=1)
    q_off = np.divide(np.abs(deq), per_elem, out=np.zeros_like(deq), where=per_elem > 0)  # |q - offset|
    return (0.5001 * (step[:, None] * q_off).sum(axis=0) + 1e-6 * (np.abs(coefs)[:, None] * np.abs(deq)).sum(axis=0)
            + 1e-30)


@needs_int_axpy
@given(type_name=st.sampled_from(sorted(INT_AXPY_TYPES)), n_blocks=st.integers(1, 20), n_rows=st.integers(1, 40),
       heavy=st.booleans(), spread=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=80, deadline=None)
def test_int_axpy_kernel_stays_within_its_rounding_bound(type_name: str, n_blocks: int, n_rows: int, heavy: bool,
                                                         spread: bool, seed: int) -> None:
    t = INT_AXPY_TYPES[type_name][0]
    rng = np.random.default_rng(seed)
    rows = (rng.standard_normal((n_rows, n_blocks * 32)) * rng.uniform(0.01, 10, (n_rows, 1))).astype(np.float32)
    data = np.frombuffer(_core.quantize_rows(t, rows), dtype=np.uint8)
    coefs = rng.standard_normal(n_rows)
    if heavy:  # a few large activations, as ReLU layers have
        coefs *= np.where(rng.random(n_rows) < 0.1, 50.0, 1.0)
    if spread:  # rows in many tiers, down to subnormal coefficients (the float kernel's)
        coefs *= np.exp2(rng.integers(-140, 60, n_rows).astype(np.float64))
    coefs = coefs.astype(np.float32)
    deq = _core.dequantize_rows(t, data, n_blocks * 32).astype(np.float64)
    want = coefs.astype(np.float64) @ deq
    got = _core.axpy_rows_int(t, data, n_blocks * 32, coefs)
    assert np.all(np.abs(got - want) <= _int_axpy_bound(type_name, data, deq, coefs))


@needs_int_axpy
@pytest.mark.parametrize("type_name", sorted(INT_AXPY_TYPES))
def test_int_axpy_kernel_over_many_rows(type_name: str) -> None:
    """More rows than one int32 accumulation holds (4096): the sums are flushed, not wrapped.
    Constant blocks quantize to quant 0, the farthest from the offset, and equal coefficients to
    the largest integer coefficient: the worst case for the int32 sums."""
    t = INT_AXPY_TYPES[type_name][0]
    rows = np.ones((4500, 64), dtype=np.float32)
    data = np.frombuffer(_core.quantize_rows(t, rows), dtype=np.uint8)
    coefs = np.random.default_rng(7).uniform(0.99, 1.0, 4500).astype(np.float32)
    deq = _core.dequantize_rows(t, data, 64).astype(np.float64)
    got = _core.axpy_rows_int(t, data, 64, coefs)
    assert np.all(np.abs(got - coefs.astype(np.float64) @ deq) <= _int_axpy_bound(type_name, data, deq, coefs))


@needs_int_axpy
def test_int_axpy_kernel_passes_on_nan() -> None:
    rows = np.ones((3, 32), dtype=np.float32)
    data = np.frombuffer(_core.quantize_rows(INT_AXPY_TYPES["q5_0"][0], rows), dtype=np.uint8)
    got = _core.axpy_rows_int(INT_AXPY_TYPES["q5_0"][0], data, 32, np.array([1.0, np.nan, 2.0], dtype=np.float32))
    assert np.isnan(got).all()


def _activation_reference(activation: str, threshold: float, g: np.ndarray) -> np.ndarray:
    """The gate activation in float64, from its definition (GELU: ggml's tanh approximation)."""
    g = g.astype(np.float64)
    if activation in ("relu", "drelu"):
        return np.maximum(g, 0.0)
    if activation == "relu2":
        return np.maximum(g, 0.0) ** 2
    if activation == "fatrelu":
        return np.where(g > threshold, g, 0.0)
    if activation == "silu_threshold":
        f = g / (1.0 + np.exp(-g))
    else:
        # 0.5 * g * (1 + tanh(z)) without the cancellation of 1 + tanh(z) for negative g
        f = g / (1.0 + np.exp(-2.0 * 0.7978845608 * g * (1.0 + 0.044715 * g * g)))
    return np.where(np.abs(f) > threshold, f, 0.0)


@given(activation=st.sampled_from(["relu", "relu2", "drelu", "fatrelu", "silu_threshold", "gelu_threshold"]),
       n=st.integers(1, 300), scale=st.floats(0.01, 60.0), threshold=st.floats(1e-4, 2.0), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=80, deadline=None)
def test_gate_activations_match_their_definitions(activation: str, n: int, scale: float, threshold: float,
                                                   seed: int) -> None:
    # thresholds are positive: a thresholded layer without one runs the graph's own GLU
    g = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    with np.errstate(over="ignore"):
        want = _activation_reference(activation, threshold, g)
    got = _core.gate_activations(activation, threshold, g).astype(np.float64)
    if activation in ("relu", "relu2", "drelu", "fatrelu"):
        np.testing.assert_array_equal(got, want.astype(np.float32))
        return
    # a value within float rounding of the threshold may land on either side; nothing else may
    clear = np.abs(np.abs(want) - threshold) > 1e-5 * max(threshold, 1e-30)
    np.testing.assert_array_equal(got[clear] != 0, want[clear] != 0)
    both = clear & (want != 0)
    # float rounding of the sigmoid's exponent x moves e^x by about |x| ulp
    g64 = g.astype(np.float64)
    x = -g64 if activation == "silu_threshold" else -1.5957691216 * g64 * (1.0 + 0.044715 * g64 * g64)
    err = np.abs(got - want) / np.maximum(np.abs(want), 1e-37)
    assert np.all(err[both] <= 3e-7 * (2.0 + np.abs(x[both]))), err[both].max()
    # the value does not depend on its position in the array (the vector tail is no exception)
    np.testing.assert_array_equal(_core.gate_activations(activation, threshold, g[::-1].copy())[::-1], got)


def test_gate_activations_extremes_and_bad_name() -> None:
    g = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0, 200.0, -200.0], dtype=np.float32)
    for activation in ("silu_threshold", "gelu_threshold"):
        got = _core.gate_activations(activation, 0.1, g)
        np.testing.assert_array_equal(got, np.array([0, np.inf, 0, 1e30, 0, 0, 0, 200, 0], dtype=np.float32))
    with pytest.raises(ValueError, match="unknown activation"):
        _core.gate_activations("swish", 0.1, g)
