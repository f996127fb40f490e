"""ggml-powerinfer: sparse, predictor-gated FFN inference for llama.cpp.

``from powerinfer import Llama`` is a drop-in replacement for ``llama_cpp.Llama`` whose FFN
layers run on the PowerInfer ggml backend.
"""
from __future__ import annotations

from ._pin import LLAMA_CPP_PYTHON_VERSION

__version__ = "0.1.0"


def _check_llama_cpp_version() -> None:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ImportError(
            f"ggml-powerinfer needs llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}, which is not "
            f"installed: pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}") from exc
    found = getattr(llama_cpp, "__version__", "unknown")
    if found != LLAMA_CPP_PYTHON_VERSION:
        raise ImportError(
            f"ggml-powerinfer {__version__} was built for llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}, "
            f"but llama-cpp-python {found} is installed; ggml's internal structures differ between "
            f"versions. Install the matching one: pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}")


# llama_cpp must be imported (and checked) before the native core: the core binds by SONAME to
# the ggml libraries that llama_cpp has loaded, so that there is one backend registry.
_check_llama_cpp_version()

from . import _core  # noqa: E402

_core.register_backend()

from .llama import Llama, ModelFileError, StockLlama  # noqa: E402

__all__ = ["Llama", "ModelFileError", "StockLlama", "LLAMA_CPP_PYTHON_VERSION", "__version__"]
