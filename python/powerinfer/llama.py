"""``powerinfer.Llama``: ``llama_cpp.Llama`` with every layer's FFN on the PowerInfer backend."""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Any, Callable, Iterator, Optional

import llama_cpp
import llama_cpp._internals as _internals

from . import _core

# Dense FFN weights of every layer. Mixture-of-experts tensors (ffn_*_exps, ffn_*_shexp) and
# biases do not match: they stay on the CPU backend.
FFN_WEIGHT_PATTERN = r"^blk\.\d+\.ffn_(gate|up|down)\.weight$"


class ModelFileError(ValueError):
    """The model file is missing, not a GGUF file, or damaged."""


class _BuftOverride(ctypes.Structure):
    # struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


_model_init_lock = threading.Lock()


@contextlib.contextmanager
def _params_hook(model: Optional[Callable[[Any], None]] = None,
                 context: Optional[Callable[[Any], None]] = None) -> Iterator[None]:
    """While the base constructor runs, let `model` / `context` edit the llama_model_params /
    llama_context_params it loads with.

    llama_cpp.Llama builds its params inside __init__ and exposes neither tensor_buft_overrides
    nor cb_eval, so we wrap the LlamaModel / LlamaContext factories, for this thread only.
    """
    owner = threading.get_ident()
    with _model_init_lock:
        originals = (_internals.LlamaModel, _internals.LlamaContext)

        def wrap(original: Any, edit: Optional[Callable[[Any], None]]) -> Any:
            def factory(*args: Any, **kwargs: Any) -> Any:
                if edit is not None and threading.get_ident() == owner:
                    edit(kwargs["params"])
                return original(*args, **kwargs)
            return factory

        _internals.LlamaModel = wrap(originals[0], model)  # type: ignore[misc]
        _internals.LlamaContext = wrap(originals[1], context)  # type: ignore[misc]
        try:
            yield
        finally:
            _internals.LlamaModel, _internals.LlamaContext = originals  # type: ignore[misc]


def check_model_file(path: str | os.PathLike[str]) -> Optional[str]:
    """Raise ModelFileError with a clear reason if `path` cannot be a loadable GGUF model.

    Returns the source architecture of a PowerInfer model (``powerinfer convert``), else None."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ModelFileError(f"model file does not exist: {p}")
    if os.path.isdir(p):
        raise ModelFileError(f"model path is a directory, not a GGUF file: {p}")
    try:
        _core.check_gguf(p)
        kv = _core.read_gguf_header(p, ["general.architecture", "powerinfer.source.architecture"])["kv"]
    except ValueError as exc:  # UnicodeDecodeError included: a corrupt string in the metadata
        raise ModelFileError(f"{p}: {exc}") from None
    if kv.get("general.architecture") != "powerinfer":
        return None
    source = kv.get("powerinfer.source.architecture")
    if not isinstance(source, str) or not source:
        raise ModelFileError(f"{p}: PowerInfer model without powerinfer.source.architecture")
    return source


class StockLlama(llama_cpp.Llama):
    """Stock ``llama_cpp.Llama`` with llama.cpp's ``use_extra_bufts`` exposed.

    With ``use_extra_bufts=False`` the CPU backend does not repack Q4_0/Q8_0/Q4_K weights: it
    computes with the plain vec_dot kernels (the arithmetic our backend reproduces) and can serve
    weights straight from the mmap, which is stock's best configuration under a memory limit.
    """

    def __init__(self, model_path: str, *, use_extra_bufts: bool = True, **kwargs: Any) -> None:
        def set_extra_bufts(params: llama_cpp.llama_model_params) -> None:
            params.use_extra_bufts = use_extra_bufts

        with _params_hook(model=set_extra_bufts):
            super().__init__(model_path, **kwargs)


def _sparse_mode(sparse: Optional[bool | str], is_powerinfer_model: bool) -> str:
    """The slot's sparse mode for a `sparse` argument: None means sparse where the model can be."""
    if sparse is None:
        return "predicted" if is_powerinfer_model else "off"
    if sparse is False or sparse == "off":
        return "off"
    mode = "predicted" if sparse is True else sparse
    if mode not in ("predicted", "predictor", "oracle"):
        raise ValueError(f"sparse must be True, False, 'predicted', 'predictor', 'oracle' or 'off', not {sparse!r}")
    if not is_powerinfer_model:
        raise ValueError("the sparse FFN needs a PowerInfer model: convert this GGUF with "
                         "`powerinfer convert MODEL.gguf OUT.gguf` first")
    return mode


class Llama(llama_cpp.Llama):
    """A drop-in ``llama_cpp.Llama`` whose FFN layers run on the PowerInfer ggml backend.

    Extra keyword arguments:

    * ``ffn_on_disk``: keep FFN weights in the model file and read them (direct I/O) when a
      layer needs them, instead of holding them in memory.
    * ``memory_budget``: reserved for the neuron cache; not yet supported.
    * ``use_extra_bufts``: repack weights into the CPU backend's interleaved layouts where stock
      llama.cpp would (default, as stock); applies to the FFN in RAM mode too.
    * ``eval_callback``: ``(address, user_data)`` of a C ``ggml_backend_sched_eval_callback``
      installed as llama.cpp's ``cb_eval`` (used by the profiler).
    * ``load_progress``: called with the fraction loaded (0..1) as llama.cpp loads the weights
      (the command line's progress bar).
    * ``sparse``: for a converted PowerInfer model, run single tokens (decode) through the sparse,
      predictor-gated FFN (default) or, with ``False``, everything dense as the source model.
      By default a layer uses its predictor only where that is cheaper than computing every gate
      row; ``"predictor"`` uses every layer's predictor (to measure them), ``"oracle"`` none:
      every gate row, skipping only the neurons that do not fire (exact for ReLU-family models).
      Batches always run dense.
      ``sparse_mode`` reads and changes it on an open model.
    """

    def __init__(self, model_path: str, *, ffn_on_disk: bool = False,
                 memory_budget: Optional[int | str] = None, use_extra_bufts: bool = True,
                 eval_callback: Optional[tuple[int, int]] = None,
                 load_progress: Optional[Callable[[float], None]] = None,
                 sparse: Optional[bool | str] = None, **kwargs: Any) -> None:
        if memory_budget is not None:
            raise NotImplementedError(
                "memory_budget is not yet supported: it arrives with the neuron cache. "
                "Use ffn_on_disk=True to keep FFN weights out of memory.")
        source_arch = check_model_file(model_path)
        self.is_powerinfer_model = source_arch is not None
        self.ffn_on_disk = bool(ffn_on_disk)
        mode = _sparse_mode(sparse, self.is_powerinfer_model)
        try:
            # sparse rows need the plain layout: a PowerInfer model's FFN is not repacked
            self._pi_slot: Optional[_core.ModelSlot] = _core.ModelSlot(
                os.fspath(model_path), self.ffn_on_disk, use_extra_bufts and not self.is_powerinfer_model)
            self._pi_slot.sparse_mode = mode
        except ValueError as exc:
            raise ModelFileError(str(exc)) from None
        if source_arch is not None:
            # llama.cpp builds the source architecture's graph; the FFN comes from the bundles
            kwargs["kv_overrides"] = {**(kwargs.get("kv_overrides") or {}), "general.architecture": source_arch}
        self._pi_pattern = FFN_WEIGHT_PATTERN.encode()
        self._pi_overrides = (_BuftOverride * 2)()
        self._pi_overrides[0].pattern = self._pi_pattern
        self._pi_overrides[0].buft = self._pi_slot.buft_address
        self._pi_overrides[1].pattern = None
        self._pi_overrides[1].buft = None

        def report_progress(fraction: float, _: ctypes.c_void_p) -> bool:
            if load_progress is not None:
                load_progress(fraction)
            return True  # false would abort the load

        # kept referenced until the load is over: llama.cpp calls it from C
        progress_callback = llama_cpp.llama_progress_callback(report_progress)

        def route_ffn(params: llama_cpp.llama_model_params) -> None:
            params.tensor_buft_overrides = ctypes.cast(self._pi_overrides, ctypes.c_void_p)
            params.use_extra_bufts = use_extra_bufts
            if source_arch is not None and params.load_mode == llama_cpp.LLAMA_LOAD_MODE_NONE:
                # the FFN regions of the GGUF are holes the loader still reads: direct I/O
                # reads them as zeros without filling the page cache
                params.load_mode = llama_cpp.LLAMA_LOAD_MODE_DIRECT_IO
            if load_progress is not None:
                params.progress_callback = progress_callback

        # The FFN is copied into the backend (RAM) or not held at all (disk); with mmap,
        # llama.cpp maps and prefaults the whole file, which would keep the FFN resident a
        # second time. Without it the rest of the model is read into memory once, as with mmap.
        kwargs.setdefault("use_mmap", False)
        def set_eval_callback(params: llama_cpp.llama_context_params) -> None:
            if eval_callback is not None:
                address, user_data = eval_callback
                params.cb_eval = ctypes.cast(address, llama_cpp.ggml_backend_sched_eval_callback)
                params.cb_eval_user_data = user_data

        try:
            with _params_hook(model=route_ffn, context=set_eval_callback):
                super().__init__(model_path, **kwargs)
        except BaseException:
            self._pi_release()
            raise

    @property
    def sparse_mode(self) -> str:
        """How single tokens run the FFN: "predicted", "predictor", "oracle" or "off" (dense)."""
        if self._pi_slot is None:
            raise ValueError("the model is closed")
        return self._pi_slot.sparse_mode

    @sparse_mode.setter
    def sparse_mode(self, mode: bool | str) -> None:
        if self._pi_slot is None:
            raise ValueError("the model is closed")
        self._pi_slot.sparse_mode = _sparse_mode(mode, self.is_powerinfer_model)

    def powerinfer_stats(self) -> dict[str, Any]:
        """Counters of the FFN backend for this model: bytes read, rows computed, time."""
        if self._pi_slot is None:
            raise ValueError("the model is closed")
        stats = self._pi_slot.stats()
        stats["ffn_on_disk"] = self.ffn_on_disk
        stats["sparse_mode"] = self._pi_slot.sparse_mode
        stats["direct_io"] = self._pi_slot.direct_io if self.ffn_on_disk else False
        return stats

    def reset_powerinfer_stats(self) -> None:
        if self._pi_slot is not None:
            self._pi_slot.reset_stats()

    def _pi_release(self) -> None:
        slot = getattr(self, "_pi_slot", None)
        if slot is not None:
            slot.close()
            self._pi_slot = None

    def close(self) -> None:
        super().close()
        self._pi_release()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["ffn_on_disk"] = self.ffn_on_disk
        state["sparse"] = self.sparse_mode
        return state
