/* The boundary between the backend library and the CUDA backend module.
 *
 * The CUDA backend (backend_cuda.cu) is built as a separate shared module,
 * libsy_backend_cuda.so, linked with the CUDA runtime and cuBLAS; the backend library loads it
 * with dlopen only when a CUDA backend is asked for (cuda_loader.c). So a CPU process never maps
 * the CUDA libraries (libcublasLt alone is hundreds of MiB of address space: `ulimit -v` limits
 * and CPU-only containers keep working with the same binaries), and the module needs nothing of
 * the project's libraries: the host hands it what it needs (logging, the draw tags' hashes)
 * through sy_cuda_host_api, and it reports errors as text.
 *
 * The module exports one symbol, sy_cuda_module (SY_CUDA_MODULE_SYMBOL), returning its table.
 * ABI: the two structs below; SY_CUDA_MODULE_ABI changes whenever they do. */
#ifndef SY_CUDA_MODULE_INTERNAL_H
#define SY_CUDA_MODULE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"

#define SY_CUDA_MODULE_ABI 1
#define SY_CUDA_MODULE_FILE "libsy_backend_cuda.so"
#define SY_CUDA_MODULE_SYMBOL "sy_cuda_module"

typedef struct {
    int abi;
    /* one log line at level (base/log.h sy_log_level: 0 debug .. 3 error) */
    void (*log)(int level, const char *msg);
    uint64_t tag_jitter, tag_dropout; /* sy_fnv1a64("router.jitter"), ("expert.dropout") */
} sy_cuda_host_api;

typedef struct {
    int abi;
    /* CUDA devices usable: >= 0, or -1 when the runtime cannot start; why gets the reason */
    int (*devices)(char *why, size_t why_len);
    /* the backend on `device` (returns an sy_status; err gets the message on failure) */
    int (*backend_new)(const sy_cuda_host_api *host, int device, bool bf16, sy_backend_t **out,
                       char *err, size_t err_len);
    /* backend.h sy_backend_cuda_gemm_tflops; negative with err on failure */
    double (*gemm_tflops)(const sy_cuda_host_api *host, int device, int M, int N, int K,
                          int iters, char *err, size_t err_len);
} sy_cuda_module_api;

typedef const sy_cuda_module_api *(*sy_cuda_module_fn)(void);

#endif
