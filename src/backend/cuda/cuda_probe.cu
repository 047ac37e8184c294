// Minimal CUDA library for now: the CUDA backend (a later issue) grows here, behind plain C
// functions declared in cuda_backend.h. It builds whenever nvcc is present; the CPU build never
// needs it.
#include <cuda_runtime.h>

#include "cuda_backend.h"

__global__ static void sy_cuda_fill_kernel(float *x, float v, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = v;
}

extern "C" int sy_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
    return n;
}

extern "C" int sy_cuda_fill(float *dev, float v, int n) {
    int threads = 256;
    sy_cuda_fill_kernel<<<(n + threads - 1) / threads, threads>>>(dev, v, n);
    return cudaGetLastError() == cudaSuccess ? 0 : -1;
}
