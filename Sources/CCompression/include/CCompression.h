// The system's zlib (gzip layers) and zstd (zstd layers), for Images' streaming decompressor.
#pragma once
#include <zlib.h>
#include <zstd.h>

// inflateInit2 is a macro over inflateInit2_; Swift sees neither the macro nor the version string.
static inline int swiftlet_inflate_init(z_stream *stream, int window_bits) {
    return inflateInit2(stream, window_bits);
}
