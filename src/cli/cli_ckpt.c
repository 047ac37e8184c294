/* cli/cli_ckpt.h: a checkpoint opened as a model for eval and sample */
#include "cli/cli_ckpt.h"

#include <string.h>

#include "backend/cpu_setup.h"
#include "cli/train.h"
#include "model/model_ckpt.h"
#include "storage/ckpt.h"

sy_status sy_cli_ckpt_open(sy_cli_ckpt *c, const char *ckdir, char **sets, int n_sets,
                           bool *bad_set) {
    *bad_set = false;
    char store_url[4096];
    sy_status s;
    SY_CHECK(sy_cli_ckpt_dir_parse(ckdir, store_url, c->run, &c->step));
    SY_CHECK(sy_store_open(store_url, &c->store));
    if (c->step < 0 && sy_ckpt_latest(c->store, c->run, &c->step) != SY_OK)
        return sy_err_prefix(SY_ENOTFOUND, "no committed checkpoint in %s", ckdir);
    SY_CHECK(sy_ckpt_read_manifest(c->store, c->run, c->step, &c->man));
    json_t *jc = json_object_get(c->man, "config");
    if (!jc)
        return sy_err_set(SY_ECORRUPT, "%s: manifest of step %lld has no config", ckdir,
                          (long long)c->step);
    SY_CHECK(sy_config_defaults(&c->cfg));
    SY_CHECK(sy_config_from_json(&c->cfg, jc));
    for (int i = 0; i < n_sets; i++)
        if ((s = sy_config_set(&c->cfg, sets[i])) != SY_OK) {
            *bad_set = true;
            return s;
        }
    return sy_config_validate(&c->cfg);
}

sy_status sy_cli_ckpt_load_model(sy_cli_ckpt *c) {
    SY_CHECK(sy_backend_cpu_new(c->cfg.train.threads, c->cfg.train.precision == SY_PREC_BF16, &c->be));
    c->dims = sy_model_dims_from_config(&c->cfg);
    SY_CHECK(sy_model_new(&c->dims, c->be, &c->model));
    return sy_model_ckpt_load(c->store, c->run, c->step, c->model, NULL, NULL);
}

void sy_cli_ckpt_close(sy_cli_ckpt *c) {
    sy_model_destroy(&c->model);
    sy_backend_destroy(&c->be);
    sy_store_destroy(&c->store);
    sy_config_free(&c->cfg);
    json_decref(c->man);
    c->man = NULL;
}
