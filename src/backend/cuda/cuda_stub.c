/* The CUDA backend's entry points in a build without CUDA (no nvcc at configure time, or
 * -DSY_CUDA=OFF): a clear error instead of a link failure. CMakeLists.txt compiles this file
 * instead of the .cu files of src/backend/cuda. */
#include <stdio.h>

#include "backend/backend.h"

#define SY_NO_CUDA_MSG                                                                     \
    "this switchyard was built without CUDA (no nvcc found when CMake configured it, or "  \
    "-DSY_CUDA=OFF): rebuild on a machine with the CUDA toolkit (nvcc on PATH or "          \
    "/usr/local/cuda) to use cluster.backend: cuda"

sy_status sy_backend_cuda_new(int device, bool bf16, sy_backend_t **out) {
    (void)bf16;
    *out = NULL;
    return sy_err_set(SY_EINVAL, "cuda backend (device %d): %s", device, SY_NO_CUDA_MSG);
}

int sy_backend_cuda_devices(char *why, size_t why_len) {
    if (why && why_len) snprintf(why, why_len, "%s", SY_NO_CUDA_MSG);
    return -1;
}

bool sy_backend_cuda_built(void) { return false; }

double sy_backend_cuda_gemm_tflops(int device, int M, int N, int K, int iters) {
    (void)M, (void)N, (void)K, (void)iters;
    sy_err_set(SY_EINVAL, "cuda backend (device %d): %s", device, SY_NO_CUDA_MSG);
    return -1.0;
}
