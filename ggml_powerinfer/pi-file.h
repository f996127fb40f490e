// Model file access for disk-resident weights: a tensor index built from the GGUF header and
// reads that bypass the page cache (O_DIRECT, 4 KiB aligned) when the file system allows it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>

struct pi_tensor_loc {
    uint64_t offset; // absolute offset of the tensor data in the file
    uint64_t size;   // bytes
};

// A growable buffer aligned for direct I/O.
struct pi_aligned_buf {
    void * data     = nullptr;
    size_t capacity = 0;
};

bool pi_aligned_buf_reserve(pi_aligned_buf * buf, size_t size);
void pi_aligned_buf_free(pi_aligned_buf * buf);

struct pi_file {
    std::string path;
    int      fd_direct   = -1; // O_DIRECT descriptor, or -1 when refused
    int      fd_buffered = -1; // ordinary descriptor, for unaligned tails and fallback
    uint64_t file_size   = 0;
    std::unordered_map<std::string, pi_tensor_loc> tensors;
};

constexpr size_t PI_IO_ALIGN = 4096;

struct gguf_context;

// Opens and indexes a GGUF file. Returns false and fills err on failure. With `header`, the
// parsed header is handed to the caller (who frees it with gguf_free) instead of being freed.
bool pi_file_open(pi_file * file, const char * path, std::string * err, struct gguf_context ** header = nullptr);
void pi_file_close(pi_file * file);

// Reads [offset, offset+size) into buf (grown as needed) and returns a pointer to the first byte
// inside buf, or nullptr on an I/O error (err filled).
const void * pi_file_read(pi_file * file, uint64_t offset, size_t size, pi_aligned_buf * buf,
                          std::string * err);
