/* SY_HD: the qualifier of a kernel body, a function written once for the host and the device.
 *
 * Under nvcc (__CUDACC__) a body is `__host__ __device__`: the CUDA backend calls it from a
 * trivial __global__ wrapper, one call per grid thread. In C it is `static inline`: the CPU
 * emulation backend (backend_emu.c) calls it from host loops over the same index space, and
 * the CPU backend calls it where its own loop is no faster (backend_cpu*.c).
 *
 * What a body may use: integer and fp32/fp64 arithmetic, <math.h> functions both sides have
 * (sqrtf, expf, logf), memcpy for bit casts, loops. Never shared memory, warp intrinsics,
 * atomics, or anything a host cannot run: where a GPU version will want a block reduction, the
 * body is the serial per-row loop in the pinned order, and a device kernel that reduces in a
 * tree must keep that order or be checked against the body.
 *
 * Floating point: the bodies assume no contraction into FMAs (C11 mode: GCC's
 * -ffp-contract=off; nvcc needs --fmad=false, set for sy_cuda in CMakeLists.txt). The device's
 * expf/logf are not glibc's (within 2 ulp): bodies that call them (router, cross-entropy) agree
 * to an ulp, not bit for bit, until the CUDA backend pins them. */
#ifndef SY_HD_H
#define SY_HD_H

#ifdef __CUDACC__
#define SY_HD static inline __host__ __device__
#else
#define SY_HD static inline
#endif

#endif
