"""The llama-cpp-python release this build of ggml-powerinfer is compiled against.

The backend fills ggml's internal structs, whose layout changes between ggml versions, so the
version must match exactly (see vendor/llama-cpp-python.pin, which must agree with this)."""

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
