// GGUF header reading and rewriting for the Python converter (see gguf_meta.cpp).
#pragma once

#include <pybind11/pybind11.h>

void register_gguf_meta(pybind11::module_ & m);
