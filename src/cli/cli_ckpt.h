/* A committed checkpoint opened as a model for `switchyard eval` and `switchyard sample`: the
 * checkpoint named by --checkpoint DIR (sy_cli_ckpt_dir_parse), its manifest's config with the
 * command's --set overrides, and its weights in a model on the CPU backend (every expert local;
 * no optimizer state). Thread: the calling thread. */
#ifndef SY_CLI_CKPT_H
#define SY_CLI_CKPT_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "base/config.h"
#include "base/status.h"
#include "model/model.h"
#include "storage/store.h"

typedef struct {
    sy_store_t *store;
    char run[256];
    int64_t step;       /* the checkpoint's step (the latest committed one when DIR named a run) */
    json_t *man;        /* its manifest */
    sy_config_t cfg;    /* the manifest's config, --set applied, validated */
    sy_backend_t *be;   /* sy_cli_ckpt_load_model: the CPU backend of cfg (threads, precision) */
    sy_model_dims dims; /* sy_cli_ckpt_load_model: cfg's model */
    sy_model_t *model;  /* sy_cli_ckpt_load_model: the checkpoint's weights */
} sy_cli_ckpt;

/* c must start zeroed ({0}). Parses DIR, opens its store, finds the step, reads the manifest and
 * its config, applies sets[0..n_sets) and validates. On failure the error is set (sy_err_msg)
 * and *bad_set says whether it was one of the --set overrides that was refused. */
sy_status sy_cli_ckpt_open(sy_cli_ckpt *c, const char *ckdir, char **sets, int n_sets,
                           bool *bad_set);

/* After sy_cli_ckpt_open: creates c->be and c->model from c->cfg and loads the weights. */
sy_status sy_cli_ckpt_load_model(sy_cli_ckpt *c);

/* Frees all that c holds (safe on a zeroed or half-opened c, and twice). */
void sy_cli_ckpt_close(sy_cli_ckpt *c);

#endif
