/* The resume check and error attribution of the config (issue 16 #9 and the --set report):
 * sy_config_check_resume names a changed model / data-order field with both values, lets
 * through the fields that may change and those in run.resume_allow, and skips fields an older
 * checkpoint did not record; sy_config_validate_from names the --set that gave a bad value (also
 * for a cross-field rule), else the YAML file; sy_memplan_check refuses a config over
 * train.max_memory_gb with the estimate. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "base/config.h"
#include "model/memplan.h"

static void test_resume_check(void **state) {
    (void)state;
    sy_config_t saved, now;
    assert_int_equal(sy_config_defaults(&saved), SY_OK);
    assert_int_equal(sy_config_set(&saved, "model.n_heads=2"), SY_OK);
    json_t *j = sy_config_to_json(&saved);
    assert_non_null(j);

    assert_int_equal(sy_config_copy(&now, &saved), SY_OK);
    assert_int_equal(sy_config_check_resume(&now, j, "ckpt X"), SY_OK);
    /* free to change */
    const char *free_sets[] = {"run.steps=5000", "run.log_every=1", "train.threads=3", "data.val=",
                               "checkpoint.every=7", "cluster.heartbeat_ms=100", "train.max_memory_gb=3",
                               "run.state_dir=elsewhere", "model.eval_capacity_factor=3"};
    for (size_t i = 0; i < sizeof free_sets / sizeof *free_sets; i++)
        assert_int_equal(sy_config_set(&now, free_sets[i]), SY_OK);
    assert_int_equal(sy_config_check_resume(&now, j, "ckpt X"), SY_OK);
    /* math-changing fields */
    const char *bad[] = {"model.n_heads=4", "run.seed=7", "train.lr=0.1", "data.train=other_*.bin",
                         "model.vocab_size=512", "train.precision=bf16", "train.micro_batch_seqs=4"};
    const char *field[] = {"model.n_heads", "run.seed", "train.lr", "data.train", "model.vocab_size",
                           "train.precision", "train.micro_batch_seqs"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        sy_config_t c;
        assert_int_equal(sy_config_copy(&c, &saved), SY_OK);
        assert_int_equal(sy_config_set(&c, bad[i]), SY_OK);
        assert_int_equal(sy_config_check_resume(&c, j, "ckpt X"), SY_EINVAL);
        assert_non_null(strstr(sy_err_msg(), field[i]));
        assert_non_null(strstr(sy_err_msg(), "ckpt X"));
        assert_non_null(strstr(sy_err_msg(), "run.resume_allow"));
        /* the explicit override */
        char allow[128];
        snprintf(allow, sizeof allow, "run.resume_allow=%s", field[i]);
        assert_int_equal(sy_config_set(&c, allow), SY_OK);
        assert_int_equal(sy_config_validate(&c), SY_OK);
        assert_int_equal(sy_config_check_resume(&c, j, "ckpt X"), SY_OK);
        sy_config_free(&c);
    }
    /* both values in the message */
    sy_config_t c;
    assert_int_equal(sy_config_copy(&c, &saved), SY_OK);
    assert_int_equal(sy_config_set(&c, "model.n_heads=4"), SY_OK);
    assert_int_equal(sy_config_check_resume(&c, j, "ckpt X"), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "model.n_heads is 4 here but 2 in ckpt X"));
    /* a field the checkpoint did not record is not compared */
    json_object_del(json_object_get(j, "model"), "n_heads");
    assert_int_equal(sy_config_check_resume(&c, j, "ckpt X"), SY_OK);
    /* ... except one whose older runs had a fixed value: a checkpoint written before data.order
     * existed was shuffled by fisher-yates, so resuming it with the default feistel is refused
     * with the fix named, and accepted with data.order=fisher-yates */
    assert_int_equal(sy_config_set(&c, "model.n_heads=2"), SY_OK);
    assert_int_equal(sy_config_check_resume(&c, j, "ckpt X"), SY_OK); /* recorded: feistel = feistel */
    json_object_del(json_object_get(j, "data"), "order");
    assert_int_equal(sy_config_check_resume(&c, j, "ckpt X"), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "data.order is \"feistel\" here but \"fisher-yates\" in ckpt X"));
    assert_non_null(strstr(sy_err_msg(), "predates the field"));
    assert_non_null(strstr(sy_err_msg(), "--set data.order=fisher-yates"));
    assert_int_equal(sy_config_set(&c, "data.order=fisher-yates"), SY_OK);
    assert_int_equal(sy_config_check_resume(&c, j, "ckpt X"), SY_OK);
    /* a checkpoint without a config */
    assert_int_equal(sy_config_check_resume(&c, NULL, "ckpt X"), SY_ECORRUPT);
    sy_config_free(&c);
    /* resume_allow must name fields */
    assert_int_equal(sy_config_set(&now, "run.resume_allow=model.nope"), SY_OK);
    assert_int_equal(sy_config_validate(&now), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "model.nope"));
    json_decref(j);
    sy_config_free(&now);
    sy_config_free(&saved);
}

static void test_validate_names_the_source(void **state) {
    (void)state;
    sy_config_t c;
    char *sets[] = {"run.steps=10", "model.d_model=0"};
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    for (int i = 0; i < 2; i++) assert_int_equal(sy_config_set(&c, sets[i]), SY_OK);
    assert_int_equal(sy_config_validate_from(&c, "cfg.yaml", sets, 2), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "--set model.d_model=0: model.d_model = 0"));
    assert_null(strstr(sy_err_msg(), "cfg.yaml"));
    sy_config_free(&c);
    /* a cross-field rule broken by a --set of the other field */
    char *sets2[] = {"model.n_heads=7"};
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    assert_int_equal(sy_config_set(&c, sets2[0]), SY_OK);
    assert_int_equal(sy_config_validate_from(&c, "cfg.yaml", sets2, 1), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "--set model.n_heads=7"));
    sy_config_free(&c);
    /* from the file */
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    c.model.d_model = 0;
    assert_int_equal(sy_config_validate_from(&c, "cfg.yaml", sets, 1), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "cfg.yaml: model.d_model = 0"));
    sy_config_free(&c);
}

static void test_memory_bound(void **state) {
    (void)state;
    sy_config_t c;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    sy_memplan m = sy_memplan_estimate(&c);
    assert_true(m.params > 1e5 && m.params < 1e7);
    assert_true(m.total_bytes > m.params * 24);
    assert_int_equal(sy_config_set(&c, "train.max_memory_gb=10"), SY_OK);
    assert_int_equal(sy_memplan_check(&c, 1), SY_OK);
    assert_int_equal(sy_config_set(&c, "model.n_experts=100000"), SY_OK);
    assert_int_equal(sy_memplan_check(&c, 1), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "GiB"));
    assert_non_null(strstr(sy_err_msg(), "train.max_memory_gb"));
    assert_int_equal(sy_config_set(&c, "model.n_experts=8"), SY_OK);
    assert_int_equal(sy_config_set(&c, "train.max_memory_gb=0.0001"), SY_OK);
    assert_int_equal(sy_memplan_check(&c, 1), SY_EINVAL);
    assert_true(sy_memplan_available() > 0);
    sy_config_free(&c);
}

/* Peer replicas (issue 18) in the estimate of a cluster worker. Independent reference: with 2
 * workers, an even expert count and one replica, each worker holds two copies of [dense + its
 * half of the experts] and two of the other half: two whole copies of the model's weights and
 * moments, 24 bytes a parameter; and a delta exchange's gradients of its half (sent) and of the
 * other half (received): 4 bytes an expert parameter. */
static void test_memory_replicas(void **state) {
    (void)state;
    sy_config_t c;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    assert_int_equal(sy_config_set(&c, "model.n_experts=8"), SY_OK);
    assert_int_equal(sy_config_set(&c, "cluster.replicas=1"), SY_OK);
    sy_memplan one = sy_memplan_estimate(&c), w1 = sy_memplan_estimate_world(&c, 1);
    assert_true(one.replica_bytes == 0 && w1.replica_bytes == 0 && w1.total_bytes == one.total_bytes);
    assert_true(one.expert_params > 0);
    sy_memplan w2 = sy_memplan_estimate_world(&c, 2), w3 = sy_memplan_estimate_world(&c, 3);
    assert_true(fabs(w2.replica_bytes - 24.0 * w2.params - 4.0 * 8 * w2.expert_params) < 1e-6 * w2.replica_bytes);
    assert_true(fabs(w2.total_bytes - one.total_bytes - w2.replica_bytes) < 1.0);
    assert_true(w3.replica_bytes > 0 && w3.replica_bytes < w2.replica_bytes); /* 3 experts + 3 of a buddy's, not 8 */
    assert_int_equal(sy_config_set(&c, "cluster.replicas=0"), SY_OK);
    assert_true(sy_memplan_estimate_world(&c, 3).replica_bytes == 0);
    /* a bound between the model alone and the model with replicas is refused, naming them */
    assert_int_equal(sy_config_set(&c, "cluster.replicas=1"), SY_OK);
    char b[64];
    snprintf(b, sizeof b, "train.max_memory_gb=%.9f", (one.total_bytes + w2.replica_bytes / 2) / (1024.0 * 1024.0 * 1024.0));
    assert_int_equal(sy_config_set(&c, b), SY_OK);
    assert_int_equal(sy_memplan_check(&c, 1), SY_OK);
    assert_int_equal(sy_memplan_check_world(&c, 1, 2), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "of peer replicas (cluster.replicas)"));
    sy_config_free(&c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_resume_check),
        cmocka_unit_test(test_validate_names_the_source),
        cmocka_unit_test(test_memory_bound),
        cmocka_unit_test(test_memory_replicas),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
