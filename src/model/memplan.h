/* Memory bound of a run: the bytes a config needs on one process, estimated before anything
 * is allocated, and the check against the machine (train.max_memory_gb, else MemAvailable), so
 * an oversized config (say --set model.n_experts=100000) is a clear error at start instead of
 * the kernel's OOM killer minutes later.
 *
 * The estimate follows what sy_model_new, sy_adamw_new and the checkpoint saver allocate:
 * parameters (fp32 master), gradients (fp32), the fp64 gradient accumulator, the bf16 work copy
 * (bf16 mode), AdamW's two moments, the async checkpoint snapshot (parameters + moments), and
 * one micro-batch of activations (per layer and the head, including the B·H·T² attention
 * matrix and the B·T·V logits); for a worker of a cluster of W >= 2 with cluster.replicas K >= 1,
 * also its peer replicas (issue 18, src/worker/replica.h): two host copies of dense + the experts
 * it owns (at most ceil(E/W)) and two slots of its K' = min(K, W-1) buddies' experts, 12 bytes a
 * parameter (fp32 weights + 2 moments), and the gradients of delta exchanges (4 bytes a parameter
 * of its and its buddies' experts). It ignores small tables and the OpenBLAS / OpenMP buffers, so it
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
    double expert_params; /* parameters of one expert over all Switch layers */
    double replica_bytes; /* peer replicas (sy_memplan_estimate_world; 0 for one process) */
    double total_bytes;
} sy_memplan;

/* The estimate for one process holding the whole model (train, or a worker). */
sy_memplan sy_memplan_estimate(const sy_config_t *cfg);

/* The estimate for one worker of a cluster of `world`: sy_memplan_estimate plus its peer
 * replicas (none for world < 2 or cluster.replicas 0). */
sy_memplan sy_memplan_estimate_world(const sy_config_t *cfg, int world);

/* Memory this machine offers (bytes): MemAvailable of /proc/meminfo (MemTotal if absent);
 * 0 if unknown. */
uint64_t sy_memplan_available(void);

/* Checks `copies` processes of this config (the workers of a local cluster; 1 for train)
 * against train.max_memory_gb (0: sy_memplan_available()). SY_EINVAL with a message giving
 * the estimate, its main parts and the bound; SY_OK when the bound is unknown. */
sy_status sy_memplan_check(const sy_config_t *cfg, int copies);

/* The same for `copies` workers of a cluster of `world` (their peer replicas counted). */
sy_status sy_memplan_check_world(const sy_config_t *cfg, int copies, int world);

#endif
