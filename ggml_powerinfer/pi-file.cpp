#include "pi-file.h"

#include "gguf.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

bool pi_aligned_buf_reserve(pi_aligned_buf * buf, size_t size) {
    if (buf->capacity >= size) {
        return true;
    }
    void * p = nullptr;
    size_t cap = (size + PI_IO_ALIGN - 1) / PI_IO_ALIGN * PI_IO_ALIGN;
    if (posix_memalign(&p, PI_IO_ALIGN, cap) != 0) {
        return false;
    }
    free(buf->data);
    buf->data     = p;
    buf->capacity = cap;
    return true;
}

void pi_aligned_buf_free(pi_aligned_buf * buf) {
    free(buf->data);
    buf->data     = nullptr;
    buf->capacity = 0;
}

bool pi_file_open(pi_file * file, const char * path, std::string * err, struct gguf_context ** header) {
    file->path = path;
    file->fd_buffered = open(path, O_RDONLY | O_CLOEXEC);
    if (file->fd_buffered < 0) {
        *err = std::string("cannot open ") + path + ": " + strerror(errno);
        return false;
    }
    struct stat st;
    if (fstat(file->fd_buffered, &st) != 0) {
        *err = std::string("cannot stat ") + path + ": " + strerror(errno);
        pi_file_close(file);
        return false;
    }
    file->file_size = (uint64_t) st.st_size;
    // tmpfs and some overlay file systems refuse O_DIRECT: fall back to buffered reads
    file->fd_direct = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);

    char magic[4] = {0};
    if (pread(file->fd_buffered, magic, sizeof(magic), 0) != (ssize_t) sizeof(magic) || memcmp(magic, "GGUF", 4) != 0) {
        *err = std::string("not a GGUF file (no GGUF magic at the start): ") + path;
        pi_file_close(file);
        return false;
    }

    struct gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
    struct gguf_context * gguf = gguf_init_from_file(path, params);
    if (gguf == nullptr) {
        *err = std::string("corrupt or truncated GGUF header: ") + path;
        pi_file_close(file);
        return false;
    }
    const uint64_t data_offset = gguf_get_data_offset(gguf);
    const int64_t n = gguf_get_n_tensors(gguf);
    for (int64_t i = 0; i < n; i++) {
        pi_tensor_loc loc;
        loc.offset = data_offset + gguf_get_tensor_offset(gguf, i);
        loc.size   = gguf_get_tensor_size(gguf, i);
        if (loc.offset + loc.size > file->file_size) {
            *err = std::string("truncated GGUF file: tensor ") + gguf_get_tensor_name(gguf, i) +
                   " ends past the end of " + path;
            gguf_free(gguf);
            pi_file_close(file);
            return false;
        }
        file->tensors[gguf_get_tensor_name(gguf, i)] = loc;
    }
    if (header != nullptr) {
        *header = gguf;
    } else {
        gguf_free(gguf);
    }
    return true;
}

void pi_file_close(pi_file * file) {
    if (file->fd_direct >= 0) {
        close(file->fd_direct);
    }
    if (file->fd_buffered >= 0) {
        close(file->fd_buffered);
    }
    file->fd_direct = file->fd_buffered = -1;
    file->tensors.clear();
}

static bool pread_full(int fd, char * dst, size_t size, uint64_t offset, size_t * got, std::string * err) {
    *got = 0;
    while (*got < size) {
        ssize_t n = pread(fd, dst + *got, size - *got, (off_t) (offset + *got));
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            *err = std::string("read failed: ") + strerror(errno);
            return false;
        }
        if (n == 0) {
            break; // end of file
        }
        *got += (size_t) n;
    }
    return true;
}

const void * pi_file_read(pi_file * file, uint64_t offset, size_t size, pi_aligned_buf * buf,
                          std::string * err) {
    if (offset + size > file->file_size) {
        *err = file->path + ": read past the end of the file (was it truncated?)";
        return nullptr;
    }
    const uint64_t start = offset / PI_IO_ALIGN * PI_IO_ALIGN;
    const uint64_t end   = (offset + size + PI_IO_ALIGN - 1) / PI_IO_ALIGN * PI_IO_ALIGN;
    if (!pi_aligned_buf_reserve(buf, end - start)) {
        *err = "out of memory for a read buffer";
        return nullptr;
    }
    char * dst = (char *) buf->data;
    size_t got = 0;
    const int fd = file->fd_direct >= 0 ? file->fd_direct : file->fd_buffered;
    if (!pread_full(fd, dst, end - start, start, &got, err)) {
        *err = file->path + ": " + *err;
        return nullptr;
    }
    if (start + got < offset + size) {
        *err = file->path + ": short read (was the file truncated?)";
        return nullptr;
    }
    return dst + (offset - start);
}
