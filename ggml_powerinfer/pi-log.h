// Error reporting: ggml's logger is internal to ggml, so we print to stderr with a prefix.
#pragma once

#include <cstdarg>
#include <cstdio>

static inline void pi_log_error(const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::fputs("powerinfer: ", stderr);
    std::vfprintf(stderr, fmt, args);
    va_end(args);
}
