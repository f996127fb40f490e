// GGUF metadata through ggml's own gguf code: reading a header (gguf-py takes tens of seconds on
// a 262k-token vocabulary) and writing a new header that copies another file's metadata.
#include "gguf_meta.h"

#include "ggml.h"
#include "gguf.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <unistd.h>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

struct gguf_deleter {
    void operator()(gguf_context * c) const { gguf_free(c); }
};
struct ggml_deleter {
    void operator()(ggml_context * c) const { ggml_free(c); }
};
using gguf_ptr = std::unique_ptr<gguf_context, gguf_deleter>;
using ggml_ptr = std::unique_ptr<ggml_context, ggml_deleter>;

gguf_ptr open_gguf(const std::string & path, ggml_context ** tensors) {
    gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ tensors };
    gguf_context * ctx = gguf_init_from_file(path.c_str(), params);
    if (ctx == nullptr) {
        throw py::value_error("not a readable GGUF file: " + path);
    }
    return gguf_ptr(ctx);
}

py::object scalar_value(const gguf_context * ctx, int64_t id, gguf_type type) {
    switch (type) {
        case GGUF_TYPE_UINT8:   return py::int_(gguf_get_val_u8(ctx, id));
        case GGUF_TYPE_INT8:    return py::int_(gguf_get_val_i8(ctx, id));
        case GGUF_TYPE_UINT16:  return py::int_(gguf_get_val_u16(ctx, id));
        case GGUF_TYPE_INT16:   return py::int_(gguf_get_val_i16(ctx, id));
        case GGUF_TYPE_UINT32:  return py::int_(gguf_get_val_u32(ctx, id));
        case GGUF_TYPE_INT32:   return py::int_(gguf_get_val_i32(ctx, id));
        case GGUF_TYPE_UINT64:  return py::int_(gguf_get_val_u64(ctx, id));
        case GGUF_TYPE_INT64:   return py::int_(gguf_get_val_i64(ctx, id));
        case GGUF_TYPE_FLOAT32: return py::float_(gguf_get_val_f32(ctx, id));
        case GGUF_TYPE_FLOAT64: return py::float_(gguf_get_val_f64(ctx, id));
        case GGUF_TYPE_BOOL:    return py::bool_(gguf_get_val_bool(ctx, id));
        case GGUF_TYPE_STRING:  return py::str(gguf_get_val_str(ctx, id));
        default:                return py::none();
    }
}

template <typename T>
py::list array_as_list(const gguf_context * ctx, int64_t id) {
    const T * data = (const T *) gguf_get_arr_data(ctx, id);
    py::list out;
    for (size_t i = 0; i < gguf_get_arr_n(ctx, id); i++) {
        out.append(data[i]);
    }
    return out;
}

py::object value(const gguf_context * ctx, int64_t id) {
    const gguf_type type = gguf_get_kv_type(ctx, id);
    if (type != GGUF_TYPE_ARRAY) {
        return scalar_value(ctx, id, type);
    }
    switch (gguf_get_arr_type(ctx, id)) {
        case GGUF_TYPE_UINT32:  return array_as_list<uint32_t>(ctx, id);
        case GGUF_TYPE_INT32:   return array_as_list<int32_t>(ctx, id);
        case GGUF_TYPE_UINT64:  return array_as_list<uint64_t>(ctx, id);
        case GGUF_TYPE_INT64:   return array_as_list<int64_t>(ctx, id);
        case GGUF_TYPE_FLOAT32: return array_as_list<float>(ctx, id);
        case GGUF_TYPE_STRING: {
            py::list out;
            for (size_t i = 0; i < gguf_get_arr_n(ctx, id); i++) {
                out.append(py::str(gguf_get_arr_str(ctx, id, i)));
            }
            return out;
        }
        default: return py::none();
    }
}

py::list tensor_list(const gguf_context * ctx, ggml_context * tensors) {
    py::list out;
    const size_t data_offset = gguf_get_data_offset(ctx);
    for (int64_t i = 0; i < gguf_get_n_tensors(ctx); i++) {
        const char * name = gguf_get_tensor_name(ctx, i);
        const ggml_tensor * t = ggml_get_tensor(tensors, name);
        py::list ne;
        for (int d = 0; d < ggml_n_dims(t); d++) {
            ne.append(t->ne[d]);
        }
        py::dict d;
        d["name"]   = name;
        d["type"]   = (int) gguf_get_tensor_type(ctx, i);
        d["ne"]     = ne;
        d["offset"] = data_offset + gguf_get_tensor_offset(ctx, i);
        d["nbytes"] = gguf_get_tensor_size(ctx, i);
        out.append(d);
    }
    return out;
}

// Reads a GGUF's header: keys that start with one of `prefixes` (all keys if empty), tensors.
py::dict read_header(const std::string & path, const std::vector<std::string> & prefixes) {
    ggml_context * tensors = nullptr;
    gguf_ptr ctx = open_gguf(path, &tensors);
    ggml_ptr tensors_owner(tensors);
    py::dict kv;
    for (int64_t i = 0; i < gguf_get_n_kv(ctx.get()); i++) {
        const std::string key = gguf_get_key(ctx.get(), i);
        bool wanted = prefixes.empty();
        for (const auto & p : prefixes) {
            wanted = wanted || key.compare(0, p.size(), p) == 0;
        }
        if (wanted) {
            kv[py::str(key)] = value(ctx.get(), i);
        }
    }
    py::dict out;
    out["kv"]          = kv;
    out["tensors"]     = tensor_list(ctx.get(), tensors);
    out["data_offset"] = gguf_get_data_offset(ctx.get());
    out["alignment"]   = gguf_get_alignment(ctx.get());
    return out;
}

// A new header that copies a source GGUF's metadata and tensor infos, to which keys are added.
class HeaderWriter {
public:
    HeaderWriter(const std::string & src_path, uint32_t alignment) {
        if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
            throw py::value_error("alignment must be a power of two");
        }
        ggml_context * tensors = nullptr;
        src_ = open_gguf(src_path, &tensors);
        tensors_.reset(tensors);
        dst_ = empty_with_alignment(alignment);
        gguf_set_kv(dst_.get(), src_.get());
        gguf_set_val_u32(dst_.get(), "general.alignment", alignment);
    }
    void set_str(const std::string & k, const std::string & v) { gguf_set_val_str(dst_.get(), k.c_str(), v.c_str()); }
    void set_u32(const std::string & k, uint32_t v) { gguf_set_val_u32(dst_.get(), k.c_str(), v); }
    void set_u64(const std::string & k, uint64_t v) { gguf_set_val_u64(dst_.get(), k.c_str(), v); }
    void set_f32(const std::string & k, float v) { gguf_set_val_f32(dst_.get(), k.c_str(), v); }
    void set_u32_array(const std::string & k, const std::vector<uint32_t> & v) {
        gguf_set_arr_data(dst_.get(), k.c_str(), GGUF_TYPE_UINT32, v.data(), v.size());
    }
    void set_u64_array(const std::string & k, const std::vector<uint64_t> & v) {
        gguf_set_arr_data(dst_.get(), k.c_str(), GGUF_TYPE_UINT64, v.data(), v.size());
    }
    void set_f32_array(const std::string & k, const std::vector<float> & v) {
        gguf_set_arr_data(dst_.get(), k.c_str(), GGUF_TYPE_FLOAT32, v.data(), v.size());
    }
    void set_str_array(const std::string & k, const std::vector<std::string> & v) {
        std::vector<const char *> ptrs;
        for (const std::string & x : v) {
            ptrs.push_back(x.c_str());
        }
        gguf_set_arr_str(dst_.get(), k.c_str(), ptrs.data(), ptrs.size());
    }

    // Adds the source's tensor infos (same names, types, shapes) except those named in `skip`,
    // then new ones: `add` holds (name, ggml type, [ne0, ne1]). Returns one dict per tensor in
    // file order with its destination offset (relative to data start); source offsets only for
    // copied tensors.
    py::list add_source_tensors(const std::vector<std::string> & skip, const std::vector<py::tuple> & add) {
        py::list src = tensor_list(src_.get(), tensors_.get());
        py::list out;
        for (int64_t i = 0; i < gguf_get_n_tensors(src_.get()); i++) {
            const std::string name = gguf_get_tensor_name(src_.get(), i);
            if (std::find(skip.begin(), skip.end(), name) != skip.end()) {
                continue;
            }
            gguf_add_tensor(dst_.get(), ggml_get_tensor(tensors_.get(), name.c_str()));
            out.append(src[i]);
        }
        ggml_init_params params = { (add.size() + 1) * ggml_tensor_overhead(), nullptr, /*.no_alloc =*/ true };
        extra_.reset(ggml_init(params));
        for (const py::tuple & t : add) {
            const std::string name = t[0].cast<std::string>();
            const int type = t[1].cast<int>();
            const std::vector<int64_t> ne = t[2].cast<std::vector<int64_t>>();
            if (type < 0 || type >= GGML_TYPE_COUNT || ne.size() != 2 || ne[0] % ggml_blck_size((ggml_type) type) != 0) {
                throw py::value_error("bad tensor to add: " + name);
            }
            ggml_tensor * x = ggml_new_tensor_2d(extra_.get(), (ggml_type) type, ne[0], ne[1]);
            ggml_set_name(x, name.c_str());
            gguf_add_tensor(dst_.get(), x);
            py::dict d;
            d["name"]   = name;
            d["type"]   = type;
            d["ne"]     = ne;
            d["offset"] = py::none();
            d["nbytes"] = ggml_nbytes(x);
            out.append(d);
        }
        for (int64_t i = 0; i < gguf_get_n_tensors(dst_.get()); i++) {
            out[i].cast<py::dict>()["dst_offset"] = gguf_get_tensor_offset(dst_.get(), i);
        }
        return out;
    }

    // The header bytes, padded to the alignment: tensor data starts right after them.
    py::bytes meta() const {
        std::vector<char> buf(gguf_get_meta_size(dst_.get()));
        gguf_get_meta_data(dst_.get(), buf.data());
        return py::bytes(buf.data(), buf.size());
    }

private:
    // gguf keeps the alignment it pads with apart from the general.alignment key, and sets it
    // only when reading a file: so write an empty header with the key and read it back.
    static gguf_ptr empty_with_alignment(uint32_t alignment) {
        gguf_ptr tmp(gguf_init_empty());
        gguf_set_val_u32(tmp.get(), "general.alignment", alignment);
        char path[] = "/tmp/powerinfer-header-XXXXXX";
        const int fd = mkstemp(path);
        if (fd < 0) {
            throw py::value_error("cannot create a temporary file");
        }
        close(fd);
        const bool ok = gguf_write_to_file(tmp.get(), path, /*only_meta =*/ true);
        gguf_ptr ctx;
        if (ok) {
            gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
            ctx.reset(gguf_init_from_file(path, params));
        }
        unlink(path);
        if (!ctx || gguf_get_alignment(ctx.get()) != alignment) {
            throw py::value_error("cannot set the GGUF alignment");
        }
        return ctx;
    }

    gguf_ptr src_;
    ggml_ptr tensors_;
    ggml_ptr extra_; // infos of tensors added to the copy
    gguf_ptr dst_;
};

} // namespace

void register_gguf_meta(py::module_ & m) {
    m.def("read_gguf_header", &read_header, py::arg("path"), py::arg("prefixes") = std::vector<std::string>{},
          "Keys (those starting with one of `prefixes`, or all) and tensor infos of a GGUF file.");
    py::class_<HeaderWriter>(m, "GgufHeaderWriter")
        .def(py::init<const std::string &, uint32_t>(), py::arg("source"), py::arg("alignment"))
        .def("set_str", &HeaderWriter::set_str)
        .def("set_u32", &HeaderWriter::set_u32)
        .def("set_u64", &HeaderWriter::set_u64)
        .def("set_f32", &HeaderWriter::set_f32)
        .def("set_u32_array", &HeaderWriter::set_u32_array)
        .def("set_u64_array", &HeaderWriter::set_u64_array)
        .def("set_f32_array", &HeaderWriter::set_f32_array)
        .def("set_str_array", &HeaderWriter::set_str_array)
        .def("add_source_tensors", &HeaderWriter::add_source_tensors,
             py::arg("skip") = std::vector<std::string>{}, py::arg("add") = std::vector<py::tuple>{})
        .def("meta", &HeaderWriter::meta);
}
