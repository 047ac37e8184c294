/* The CUDA side of switchyard, behind plain C functions (built only when nvcc is present).
 * For now a probe; the bf16 CUDA backend of a later issue implements sy_backend_t here. */
#ifndef SY_CUDA_BACKEND_H
#define SY_CUDA_BACKEND_H

#ifdef __cplusplus
extern "C" {
#endif

/* Number of CUDA devices visible (0 when there is no driver or device). */
int sy_cuda_device_count(void);
/* Fills n floats of device memory with v; 0 on success. */
int sy_cuda_fill(float *dev, float v, int n);

#ifdef __cplusplus
}
#endif

#endif
