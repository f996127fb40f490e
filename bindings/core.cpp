// powerinfer._core: registers the backend and exposes model slots to Python.
#include "ggml-powerinfer.h"
#include "gguf_meta.h"

#include "pi-activation.h"
#include "pi-axpy.h"
#include "pi-bundle.h"
#include "pi-matmul.h"
#include "pi-profile.h"
#include "pi-threadpool.h"

#include "ggml-cpu.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Python handle of a model slot. The buffer type pointer is handed to llama.cpp through
// tensor_buft_overrides; the slot outlives this handle while llama.cpp holds buffers of it.
class ModelSlot {
public:
    ModelSlot(const std::string & path, bool on_disk, bool repack) {
        char err[1024] = {0};
        slot_ = pi_model_slot_new(path.c_str(), on_disk ? PI_RESIDENCY_DISK : PI_RESIDENCY_RAM, repack, err, sizeof(err));
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
        d["sparse_layer_tokens"] = s.sparse_layer_tokens;
        d["neurons_total"]     = s.neurons_total;
        d["neurons_predicted"] = s.neurons_predicted;
        d["neurons_active"]    = s.neurons_active;
        d["batch_repacks"]     = s.batch_repacks;
        d["down_transposes"]   = s.down_transposes;
        return d;
    }

    // "off", "predicted", "predictor" or "oracle"
    void set_sparse_mode(const std::string & mode) {
        enum pi_sparse_mode m;
        if (mode == "off") {
            m = PI_SPARSE_OFF;
        } else if (mode == "predicted") {
            m = PI_SPARSE_PREDICTED;
        } else if (mode == "oracle") {
            m = PI_SPARSE_ORACLE;
        } else if (mode == "predictor") {
            m = PI_SPARSE_PREDICTOR;
        } else {
            throw py::value_error("sparse mode must be 'off', 'predicted', 'predictor' or 'oracle', not '" + mode + "'");
        }
        if (!pi_model_slot_set_sparse_mode(checked(), m)) {
            throw py::value_error("sparse modes need a PowerInfer model with its FFN in memory, opened without repacking");
        }
    }

    std::string sparse_mode() const {
        switch (pi_model_slot_sparse_mode(checked())) {
            case PI_SPARSE_PREDICTED: return "predicted";
            case PI_SPARSE_ORACLE:    return "oracle";
            case PI_SPARSE_PREDICTOR: return "predictor";
            default:                  return "off";
        }
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

using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using u8_array  = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

// The backend's dense matmul on raw rows: for kernel tests.
py::array_t<float> matmul(int type, u8_array w, int64_t n_in, int64_t n_out, f32_array x, int n_threads) {
    const ggml_type t = (ggml_type) type;
    if (t < 0 || t >= GGML_TYPE_COUNT || !pi_matmul_supports_type(t) || n_in % ggml_blck_size(t) != 0) {
        throw py::value_error("unsupported weight type or row length");
    }
    const size_t row = ggml_row_size(t, n_in);
    if ((size_t) w.size() != row * (size_t) n_out || x.ndim() != 2 || x.shape(1) != n_in) {
        throw py::value_error("shape mismatch");
    }
    const int64_t n_cols = x.shape(0);
    py::array_t<float> out({n_cols, n_out});
    pi_matmul_args a;
    a.w = (const char *) w.data(); a.w_stride = row; a.w_type = t; a.n_in = n_in; a.n_out = n_out;
    a.x = x.data(); a.x_stride = n_in * sizeof(float); a.n_cols = n_cols;
    a.dst = out.mutable_data(); a.dst_stride = n_out * sizeof(float);
    std::vector<char> scratch;
    pi_threadpool * pool = pi_threadpool_new(n_threads);
    pi_matmul(pool, a, scratch);
    pi_threadpool_free(pool);
    return out;
}

// Rows of floats quantized to `type` with ggml's own quantizers (any type ggml can quantize
// without an importance matrix).
py::array_t<uint8_t> quantize_rows(int type, f32_array rows) {
    const ggml_type t = (ggml_type) type;
    if (t < 0 || t >= GGML_TYPE_COUNT || rows.ndim() != 2 || ggml_quantize_requires_imatrix(t) ||
        rows.shape(1) % ggml_blck_size(t) != 0) {
        throw py::value_error("cannot quantize these rows to this type");
    }
    const int64_t n_rows = rows.shape(0), n_per_row = rows.shape(1);
    const size_t row_bytes = ggml_row_size(t, n_per_row);
    py::array_t<uint8_t> out({(py::ssize_t) n_rows, (py::ssize_t) row_bytes});
    {
        py::gil_scoped_release release;
        ggml_quantize_chunk(t, rows.data(), out.mutable_data(), 0, n_rows, n_per_row, nullptr);
    }
    return out;
}

// Pointers to the rows of data, one row of n_per_row values of type t per coefficient.
static std::vector<const char *> coefficient_rows(ggml_type t, const u8_array & data, int64_t n_per_row,
                                                  py::ssize_t n_rows) {
    if (t < 0 || t >= GGML_TYPE_COUNT || n_per_row <= 0 || n_per_row % ggml_blck_size(t) != 0) {
        throw py::value_error("bad type or row length");
    }
    const size_t row_bytes = ggml_row_size(t, n_per_row);
    if (data.size() != (py::ssize_t) (row_bytes * n_rows)) {
        throw py::value_error("data must hold one row per coefficient");
    }
    std::vector<const char *> rows((size_t) n_rows);
    for (py::ssize_t r = 0; r < n_rows; r++) {
        rows[(size_t) r] = (const char *) data.data() + r * row_bytes;
    }
    return rows;
}

static py::array_t<float> zeroed(int64_t n) {
    py::array_t<float> out((py::ssize_t) n);
    std::fill(out.mutable_data(), out.mutable_data() + n, 0.0f);
    return out;
}

// sum_i coefs[i] * row_i with the sparse down projection's kernels: for kernel tests.
py::array_t<float> axpy_rows(int type, u8_array data, int64_t n_per_row, f32_array coefs) {
    const ggml_type t = (ggml_type) type;
    const std::vector<const char *> rows = coefficient_rows(t, data, n_per_row, coefs.size());
    const pi_axpy_fn axpy = pi_axpy_kernel(t);
    if (axpy == nullptr) {
        throw py::value_error("bad type or row length");
    }
    py::array_t<float> out = zeroed(n_per_row);
    // groups of 1, 2, .. PI_AXPY_ROWS rows in turn, so every row count of the kernel runs
    for (py::ssize_t r = 0, g = 1; r < coefs.size(); r += g, g = g % PI_AXPY_ROWS + 1) {
        const int n_rows = (int) std::min<py::ssize_t>(g, coefs.size() - r);
        const int n_next = (int) std::min<py::ssize_t>(g % PI_AXPY_ROWS + 1, coefs.size() - r - n_rows);
        axpy(n_per_row, n_rows, coefs.data() + r, rows.data() + r, n_next, rows.data() + r + n_rows,
             out.mutable_data());
    }
    return out;
}

// The same sum with the integer kernel (Q4_0, Q5_0), each row's scale_max from its own blocks.
py::array_t<float> axpy_rows_int(int type, u8_array data, int64_t n_per_row, f32_array coefs) {
    const ggml_type t = (ggml_type) type;
    const std::vector<const char *> rows = coefficient_rows(t, data, n_per_row, coefs.size());
    const pi_axpy_int_fn axpy = pi_axpy_int_kernel(t);
    if (axpy == nullptr) {
        throw py::value_error("no integer kernel for this type on this CPU");
    }
    py::array_t<float> out = zeroed(n_per_row);
    std::vector<float> scale_max((size_t) coefs.size());
    for (size_t r = 0; r < rows.size(); r++) {
        scale_max[r] = pi_row_scale_max(t, rows[r], n_per_row);
    }
    {
        py::gil_scoped_release release;
        axpy(n_per_row, (int64_t) coefs.size(), coefs.data(), scale_max.data(), rows.data(), out.mutable_data());
    }
    return out;
}

// Quantized rows back to floats with ggml's to_float.
py::array_t<float> dequantize_rows(int type, u8_array data, int64_t n_per_row) {
    const ggml_type t = (ggml_type) type;
    if (t < 0 || t >= GGML_TYPE_COUNT || n_per_row <= 0 || n_per_row % ggml_blck_size(t) != 0) {
        throw py::value_error("bad type or row length");
    }
    const size_t row_bytes = ggml_row_size(t, n_per_row);
    if (data.size() % row_bytes != 0) {
        throw py::value_error("data is not a whole number of rows");
    }
    const int64_t n_rows = data.size() / row_bytes;
    py::array_t<float> out({(py::ssize_t) n_rows, (py::ssize_t) n_per_row});
    const struct ggml_type_traits * tr = ggml_get_type_traits(t);
    if (t == GGML_TYPE_F32) {
        std::memcpy(out.mutable_data(), data.data(), data.size());
        return out;
    }
    if (tr->to_float == nullptr) {
        throw py::value_error("type has no dequantizer");
    }
    {
        py::gil_scoped_release release;
        for (int64_t r = 0; r < n_rows; r++) {
            tr->to_float(data.data() + r * row_bytes, out.mutable_data() + r * n_per_row, n_per_row);
        }
    }
    return out;
}

// ggml's own arithmetic, row by row with vec_dot: the reference for the test above.
py::array_t<float> matmul_vec_dot_reference(int type, u8_array w, int64_t n_in, int64_t n_out, f32_array x) {
    const ggml_type t = (ggml_type) type;
    const struct ggml_type_traits_cpu * tr = ggml_get_type_traits_cpu(t);
    const ggml_type dt = tr->vec_dot_type;
    const size_t row = ggml_row_size(t, n_in);
    const int64_t n_cols = x.shape(0);
    std::vector<char> xq(ggml_row_size(dt, n_in));
    py::array_t<float> out({n_cols, n_out});
    for (int64_t c = 0; c < n_cols; c++) {
        const float * xc = x.data() + c * n_in;
        const void * y = xc;
        if (dt != GGML_TYPE_F32) {
            ggml_get_type_traits_cpu(dt)->from_float(xc, xq.data(), n_in);
            y = xq.data();
        }
        for (int64_t r = 0; r < n_out; r++) {
            tr->vec_dot((int) n_in, out.mutable_data() + c * n_out + r, 0,
                        (const char *) w.data() + r * row, 0, y, 0, 1);
        }
    }
    return out;
}

// Owns a profiler; Python hands its callback and pointer to llama.cpp's cb_eval.
pi_glu_fn glu_fn_of(const std::string & name) {
    if (name.empty()) {
        return PI_GLU_NONE;
    }
    if (name == "silu") {
        return PI_GLU_SILU;
    }
    if (name == "gelu") {
        return PI_GLU_GELU;
    }
    throw py::value_error("unknown gate function '" + name + "' (silu, gelu or empty)");
}

class Profiler {
public:
    Profiler(int64_t max_samples, const std::string & glu, const std::vector<float> & thresholds, bool emulate)
        : p_(pi_profiler_new(max_samples, glu_fn_of(glu), thresholds.data(), (int) thresholds.size(), emulate)) {}
    ~Profiler() { pi_profiler_free(p_); }
    Profiler(const Profiler &) = delete;
    Profiler & operator=(const Profiler &) = delete;

    uintptr_t callback_address() const { return (uintptr_t) &pi_profiler_eval_callback; }
    uintptr_t user_data() const { return (uintptr_t) p_; }
    int n_layers() const { return (int) p_->layers.size(); }
    bool emulate() const { return p_->emulate; }
    void set_emulate(bool on) { p_->emulate = on; } // between evaluations only

    py::dict layer(int il) const {
        if (il < 0 || il >= (int) p_->layers.size()) {
            throw py::index_error("no such layer");
        }
        const pi_layer_profile & L = p_->layers[il];
        py::dict d;
        d["tokens"] = L.tokens;
        d["n_embd"] = L.n_embd;
        d["n_ff"]   = L.n_ff;
        d["gate_positive"] = py::array_t<uint64_t>(L.gate_positive.size(), L.gate_positive.data());
        d["both_positive"] = py::array_t<uint64_t>(L.both_positive.size(), L.both_positive.data());
        d["abs_act_sum"]   = py::array_t<double>(L.abs_act_sum.size(), L.abs_act_sum.data());
        d["hist"]          = py::array_t<uint64_t>(PI_HIST_BINS, L.hist);
        d["fhist"]         = py::array_t<uint64_t>(L.fhist.size(), L.fhist.data());
        d["above"]         = py::array_t<uint64_t>(L.above.size(), L.above.data());
        d["threshold"]     = p_->threshold(il);
        const size_t mask_bytes = (size_t) (L.n_ff + 7) / 8;
        py::array_t<uint16_t> x({(py::ssize_t) L.samples, (py::ssize_t) L.n_embd});
        if (L.samples > 0) {
            std::memcpy(x.mutable_data(), L.x.data(), L.x.size() * sizeof(ggml_fp16_t));
        }
        py::array_t<uint8_t> bits({(py::ssize_t) L.samples, (py::ssize_t) mask_bytes});
        if (L.samples > 0) {
            std::memcpy(bits.mutable_data(), L.active_bits.data(), L.active_bits.size());
        }
        d["samples_x_f16"]       = x;
        d["samples_active_bits"] = bits;
        return d;
    }

private:
    pi_profiler * p_;
};

} // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "ggml-powerinfer native core";

    m.def("register_backend", [] {
        ggml_backend_reg_t reg = ggml_backend_powerinfer_reg();
        return std::string(ggml_backend_reg_name(reg));
    }, "Register the PowerInfer backend with ggml (idempotent); returns its name.");

    register_gguf_meta(m);

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

    m.def("matmul", &matmul, py::arg("type"), py::arg("w"), py::arg("n_in"), py::arg("n_out"),
          py::arg("x"), py::arg("n_threads") = 1, "The backend's dense matmul (for tests).");
    m.def("matmul_vec_dot_reference", &matmul_vec_dot_reference, py::arg("type"), py::arg("w"),
          py::arg("n_in"), py::arg("n_out"), py::arg("x"), "ggml's vec_dot row by row (for tests).");

    m.def("quantize_rows", &quantize_rows, py::arg("type"), py::arg("rows"),
          "Quantize float rows to a ggml type with ggml's quantizers.");
    m.def("dequantize_rows", &dequantize_rows, py::arg("type"), py::arg("data"), py::arg("n_per_row"),
          "Dequantize rows of a ggml type to floats.");
    m.def("axpy_rows", &axpy_rows, py::arg("type"), py::arg("data"), py::arg("n_per_row"), py::arg("coefs"),
          "Sum of coefs[i] * row i, with the sparse FFN's down_t kernels.");
    m.def("axpy_rows_int", &axpy_rows_int, py::arg("type"), py::arg("data"), py::arg("n_per_row"), py::arg("coefs"),
          "sum_i coefs[i] * row_i with the integer down kernel (Q4_0, Q5_0)");
    m.def("gate_activations", [](const std::string & activation, float threshold, f32_array g) {
        pi_bundle_layer L = {};
        if (!pi_activation_from_name(activation.c_str(), &L.activation)) {
            throw py::value_error("unknown activation '" + activation + "'");
        }
        L.act_threshold = threshold;
        py::array_t<float> a(g.size());
        pi_gate_activations(&L, g.data(), a.mutable_data(), g.size());
        return a;
    }, py::arg("activation"), py::arg("threshold"), py::arg("g"),
          "The backend's gate activation of each value (0: the neuron does not fire), as the "
          "batch and sparse ops compute it.");
    m.def("predictor_decode_bytes", &pi_predictor_decode_bytes, py::arg("n_embd"), py::arg("n_ff"), py::arg("rank"), py::arg("linear"),
          "Bytes sparse decode reads per token for a predictor of stored rank `rank`, held linear "
          "(stored as ReLU pairs) or not: its cost model.");
    m.def("row_size", [](int type, int64_t n) { return ggml_row_size((ggml_type) type, n); },
          py::arg("type"), py::arg("n"));

    m.def("fhist_edges", [] {
        py::array_t<double> edges(PI_FHIST_BINS + 1);
        for (int b = 0; b <= PI_FHIST_BINS; b++) {
            edges.mutable_data()[b] = pi_fhist_edge(b);
        }
        return edges;
    }, "Edges of the profiler's |f(gate)| histogram bins (bin b: [edges[b], edges[b+1])).");
    m.def("fhist", [](f32_array values) {
        py::array_t<uint64_t> counts(PI_FHIST_BINS);
        std::fill(counts.mutable_data(), counts.mutable_data() + PI_FHIST_BINS, 0);
        for (py::ssize_t i = 0; i < values.size(); i++) {
            counts.mutable_data()[pi_fhist_bin(std::fabs(values.data()[i]))]++;
        }
        return counts;
    }, py::arg("values"), "The profiler's |f(gate)| histogram of arbitrary values (for tests).");
    m.def("glu_apply", [](const std::string & glu, f32_array g) {
        const pi_glu_fn fn = glu_fn_of(glu);
        py::array_t<float> out(g.size());
        for (py::ssize_t i = 0; i < g.size(); i++) {
            out.mutable_data()[i] = pi_glu_apply(fn, g.data()[i]);
        }
        return out;
    }, py::arg("glu"), py::arg("g"), "The profiler's gate function f (silu, gelu) of the values.");

    py::class_<Profiler>(m, "Profiler")
        .def(py::init<int64_t, const std::string &, const std::vector<float> &, bool>(), py::arg("max_samples") = 0,
             py::arg("glu") = "", py::arg("thresholds") = std::vector<float>(), py::arg("emulate") = false)
        .def_property_readonly("callback_address", &Profiler::callback_address)
        .def_property_readonly("user_data", &Profiler::user_data)
        .def_property_readonly("n_layers", &Profiler::n_layers)
        .def_property("emulate", &Profiler::emulate, &Profiler::set_emulate)
        .def("layer", &Profiler::layer, py::arg("il"));

    py::class_<ModelSlot>(m, "ModelSlot")
        .def(py::init<const std::string &, bool, bool>(), py::arg("path"), py::arg("on_disk"),
             py::arg("repack") = true)
        .def_property_readonly("buft_address", &ModelSlot::buft_address)
        .def_property_readonly("direct_io", &ModelSlot::direct_io)
        .def("stats", &ModelSlot::stats)
        .def("reset_stats", &ModelSlot::reset_stats)
        .def_property("sparse_mode", &ModelSlot::sparse_mode, &ModelSlot::set_sparse_mode)
        .def("close", &ModelSlot::close);
}
