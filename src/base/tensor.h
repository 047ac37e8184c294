/* A named view of an fp32 tensor owned by someone else: how the model hands its parameters,
 * gradients and optimizer moments to checkpoints and exports without copying. */
#ifndef SY_TENSOR_H
#define SY_TENSOR_H

#include <stdint.h>

#define SY_MAX_DIMS 4

typedef struct {
    const char *name;          /* model spec §7 name, e.g. "blocks.1.moe.experts.3.fc.weight" */
    int ndim;
    int64_t shape[SY_MAX_DIMS];
    float *data;               /* row-major fp32, not owned */
} sy_tensor_ref;

static inline int64_t sy_tensor_numel(const sy_tensor_ref *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

#endif
