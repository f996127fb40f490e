// powerinfer._core: registers the backend and exposes model slots to Python.
#include "ggml-powerinfer.h"

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

namespace {

// Python handle of a model slot. The buffer type pointer is handed to llama.cpp through
// tensor_buft_overrides; the slot outlives this handle while llama.cpp holds buffers of it.
class ModelSlot {
public:
    ModelSlot(const std::string & path, bool on_disk) {
        char err[1024] = {0};
        slot_ = pi_model_slot_new(path.c_str(), on_disk ? PI_RESIDENCY_DISK : PI_RESIDENCY_RAM, err, sizeof(err));
        if (slot_ == nullptr) {
            throw py::value_error(err);
        }
    }
    ~ModelSlot() { close(); }
    ModelSlot(const ModelSlot &) = delete;
    ModelSlot & operator=(const ModelSlot &) = delete;

    void close() {
        pi_model_slot_release(slot_);
        slot_ = nullptr;
    }

    uintptr_t buft_address() const {
        return (uintptr_t) pi_model_slot_buft(checked());
    }

    py::dict stats() const {
        struct pi_stats s;
        pi_model_slot_get_stats(checked(), &s);
        py::dict d;
        d["ffn_bytes_read"]    = s.ffn_bytes_read;
        d["ffn_read_seconds"]  = s.ffn_read_ns * 1e-9;
        d["ffn_rows_computed"] = s.ffn_rows_computed;
        d["ffn_matmuls"]       = s.ffn_matmuls;
        d["ffn_graphs"]        = s.ffn_graphs;
        d["ffn_seconds"]       = s.ffn_ns * 1e-9;
        d["ffn_tokens"]        = s.ffn_tokens;
        d["ffn_weight_bytes"]  = pi_model_slot_weight_bytes(checked());
        d["ffn_resident_bytes"] = pi_model_slot_resident_bytes(checked());
        return d;
    }

    void reset_stats() { pi_model_slot_reset_stats(checked()); }
    bool direct_io() const { return pi_model_slot_direct_io(checked()); }

private:
    pi_model_slot_t checked() const {
        if (slot_ == nullptr) {
            throw py::value_error("the model slot is closed");
        }
        return slot_;
    }

    pi_model_slot_t slot_ = nullptr;
};

} // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "ggml-powerinfer native core";

    m.def("register_backend", [] {
        ggml_backend_reg_t reg = ggml_backend_powerinfer_reg();
        return std::string(ggml_backend_reg_name(reg));
    }, "Register the PowerInfer backend with ggml (idempotent); returns its name.");

    m.def("check_gguf", [](const std::string & path) {
        char err[1024] = {0};
        if (!pi_check_gguf(path.c_str(), err, sizeof(err))) {
            throw py::value_error(err);
        }
    }, py::arg("path"), "Raise ValueError if `path` is not a complete, readable GGUF file.");

    m.def("registered_device_names", [] {
        py::list names;
        for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
            names.append(std::string(ggml_backend_dev_name(ggml_backend_dev_get(i))));
        }
        return names;
    }, "Names of the devices in the ggml registry this module is linked to.");

    py::class_<ModelSlot>(m, "ModelSlot")
        .def(py::init<const std::string &, bool>(), py::arg("path"), py::arg("on_disk"))
        .def_property_readonly("buft_address", &ModelSlot::buft_address)
        .def_property_readonly("direct_io", &ModelSlot::direct_io)
        .def("stats", &ModelSlot::stats)
        .def("reset_stats", &ModelSlot::reset_stats)
        .def("close", &ModelSlot::close);
}
