/* safetensors files (see shared/spec/storage-notes.md): u64 LE header length N, N bytes of
 * JSON (padded with spaces to a multiple of 8), then the raw tensor bytes.
 *
 * Writing: fp32 tensors stored as F32, or as BF16 (round-to-nearest-even) when asked; the
 * metadata holds {"format": "pt"}. Reading: the whole header is validated (size limit, dtype,
 * shape × element size = span, no gaps, no overlaps, no trailing bytes) before any tensor is
 * used; errors name the file and the tensor. Readable dtypes: F32, BF16, F16; at most
 * SY_MAX_DIMS dimensions. Tensor names may not repeat; the header order is kept (sy_st_name).
 * Host byte order must be little-endian (checked at compile time).
 *
 * Ownership: buffers passed in stay the caller's; sy_st_file_t owns its bytes. Thread: any. */
#ifndef SY_SAFETENSORS_H
#define SY_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"
#include "base/tensor.h"

typedef enum { SY_ST_F32 = 0, SY_ST_BF16 = 1 } sy_st_dtype;

/* Serialises tensors into one malloc'ed buffer (*out, *out_len); the caller frees it. */
sy_status sy_st_serialize(const sy_tensor_ref *tensors, int n, sy_st_dtype dtype, void **out,
                          size_t *out_len);

/* Only the head of that file: the 8-byte header length and the padded JSON header (*out,
 * malloc'ed, *out_len bytes; the caller frees it), and the size of the data that follows
 * (*data_len). The file sy_st_serialize builds is exactly this head followed by each tensor's
 * data in order (numel × element size, no gaps); for SY_ST_F32 that data is each t->data as it
 * lies in memory (little-endian host), so a writer can send the tensors from their own buffers
 * without building the file (sy_store_putv) and get the same bytes. */
sy_status sy_st_header(const sy_tensor_ref *tensors, int n, sy_st_dtype dtype, void **out, size_t *out_len,
                       uint64_t *data_len);

/* A parsed, validated file held in memory. */
typedef struct sy_st_file sy_st_file_t;

/* Parses and validates `len` bytes (copied). `what` names the source in error messages. */
sy_status sy_st_parse(const void *bytes, size_t len, const char *what, sy_st_file_t **out);
/* Same, but takes ownership of the malloc'ed *bytes (no copy; *bytes is set to NULL and freed
 * by the parser, on failure too). */
sy_status sy_st_parse_take(void **bytes, size_t len, const char *what, sy_st_file_t **out);
/* Reads and parses a file from disk. */
sy_status sy_st_read_file(const char *path, sy_st_file_t **out);
void sy_st_destroy(sy_st_file_t **self_p);

int sy_st_count(const sy_st_file_t *f);
const char *sy_st_name(const sy_st_file_t *f, int i);
/* Copies tensor `name` into dst (converted to fp32) after checking its shape equals `t`'s:
 * fills t->data. SY_ENOTFOUND if absent, SY_EFORMAT on a shape mismatch (message names both). */
sy_status sy_st_load(const sy_st_file_t *f, const sy_tensor_ref *t);
/* Shape of tensor i (ndim returned, shape filled up to SY_MAX_DIMS). */
int sy_st_shape(const sy_st_file_t *f, int i, int64_t shape[SY_MAX_DIMS]);
/* Index of tensor `name`, or -1. */
int sy_st_find(const sy_st_file_t *f, const char *name);
/* Stored dtype of tensor i as written in the header: "F32", "BF16" or "F16" (F16 is read, never
 * written). Static string. */
const char *sy_st_dtype_name(const sy_st_file_t *f, int i);

/* Serialises and writes a file at `path` (temp file in the same folder + fsync + rename, so a
 * reader never sees half a file). */
sy_status sy_st_write_file(const char *path, const sy_tensor_ref *tensors, int n,
                           sy_st_dtype dtype);

#endif
