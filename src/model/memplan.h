/* Memory bound of a run: the bytes a config needs on one process, estimated before anything
 * is allocated, and the check against the machine (train.max_memory_gb, else MemAvailable), so
 * an oversized config (say --set model.n_experts=100000) is a clear error at start instead of
 * the kernel's OOM killer minutes later.
 *
 * The estimate follows what sy_model_new, sy_adamw_new and the checkpoint saver allocate:
 * parameters (fp32 master), gradients (fp32), the fp64 gradient accumulator, the bf16 work copy
 * (bf16 mode), AdamW's two moments, the async checkpoint snapshot (parameters + moments), and
 * one micro-batch of activations (per layer and the head, including the B·H·T² attention
 * matrix and the B·T·V logits). It ignores small tables and the OpenBLAS / OpenMP buffers, so it
 * is a lower bound within a few percent for real sizes.
 *
 * Thread: any. */
#ifndef SY_MEMPLAN_H
#define SY_MEMPLAN_H

#include <stdint.h>

#include "base/config.h"
#include "base/status.h"

typedef struct {
    double params;      /* parameter count */
    double state_bytes; /* parameters, gradients, accumulator, work copy, AdamW, snapshot */
    double act_bytes;   /* one micro-batch of activations and backward buffers */
    double total_bytes;
} sy_memplan;

/* The estimate for one process holding the whole model (train, or a worker). */
sy_memplan sy_memplan_estimate(const sy_config_t *cfg);

/* Memory this machine offers (bytes): MemAvailable of /proc/meminfo (MemTotal if absent);
 * 0 if unknown. */
uint64_t sy_memplan_available(void);

/* Checks `copies` processes of this config (the workers of a local cluster; 1 for train)
 * against train.max_memory_gb (0: sy_memplan_available()). SY_EINVAL with a message giving
 * the estimate, its main parts and the bound; SY_OK when the bound is unknown. */
sy_status sy_memplan_check(const sy_config_t *cfg, int copies);

#endif
