/* Tests of src/base/config.c: defaults, YAML loading, --set, validation rules, JSON round trip,
 * copy/free and the generated docs. Expected values are written out here from the spec (the
 * brief's defaults), not read back from the implementation's table. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "base/config.h"
#include "base/bgsched.h"

#define SY_TESTDIR_PREFIX "/tmp/sy_test_config_"
#include "sy_test.h" /* setup_dir / teardown_dir around the group; tmpdir */

/* Writes text to <tmpdir>/<name> and returns the path (static buffer). */
static const char *write_yaml(const char *name, const char *text) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    assert_int_equal(fputs(text, fp) >= 0, 1);
    assert_int_equal(fclose(fp), 0);
    return path;
}

static void assert_msg_has(const char *needle) {
    const char *msg = sy_err_msg();
    if (!strstr(msg, needle)) fail_msg("error message \"%s\" does not contain \"%s\"", msg, needle);
}

/* Every field against the defaults given in the brief (configs/tiny.yaml's values). */
static void expect_tiny_values(const sy_config_t *c) {
    assert_string_equal(c->run.name, "tiny");
    assert_int_equal(c->run.steps, 300);
    assert_int_equal(c->run.seed, 1234);
    assert_string_equal(c->run.state_dir, "runs/tiny");
    assert_int_equal(c->run.log_every, 10);
    assert_int_equal(c->model.vocab_size, 256);
    assert_int_equal(c->model.seq_len, 128);
    assert_int_equal(c->model.d_model, 128);
    assert_int_equal(c->model.n_layers, 4);
    assert_int_equal(c->model.n_heads, 4);
    assert_int_equal(c->model.d_ff, 512);
    assert_int_equal(c->model.n_experts, 8);
    assert_int_equal(c->model.switch_every, 2);
    assert_true(c->model.capacity_factor == 1.25);
    assert_true(c->model.eval_capacity_factor == 2.0);
    assert_true(c->model.aux_loss_coef == 0.01);
    assert_true(c->model.z_loss_coef == 0.001);
    assert_true(c->model.router_jitter == 0.0);
    assert_true(c->model.expert_dropout == 0.0);
    assert_true(c->model.init_scale == 0.1);
    assert_int_equal(c->train.global_batch_seqs, 16);
    assert_int_equal(c->train.micro_batch_seqs, 8);
    assert_true(c->train.lr == 3e-3);
    assert_true(c->train.lr_min == 3e-4);
    assert_int_equal(c->train.warmup_steps, 200);
    assert_true(c->train.weight_decay == 0.1);
    assert_true(c->train.beta1 == 0.9);
    assert_true(c->train.beta2 == 0.95);
    assert_true(c->train.eps == 1e-8);
    assert_true(c->train.grad_clip == 1.0);
    assert_int_equal(c->train.precision, SY_PREC_FP32);
    assert_int_equal(c->train.threads, 0);
    assert_int_equal(c->data.train.n, 1);
    assert_string_equal(c->data.train.items[0], "data/fortunes/train_*.bin");
    assert_int_equal(c->data.val.n, 1);
    assert_string_equal(c->data.val.items[0], "data/fortunes/val_*.bin");
    assert_string_equal(c->checkpoint.store, "checkpoints");
    assert_int_equal(c->checkpoint.every, 100);
    assert_int_equal(c->checkpoint.keep_last, 3);
    assert_true(c->checkpoint.async);
    assert_int_equal(c->checkpoint.on_busy, SY_ONBUSY_WAIT);
    assert_string_equal(c->cluster.bind, "tcp://127.0.0.1:5555");
    assert_int_equal(c->cluster.min_workers, 1);
    assert_int_equal(c->cluster.max_workers, 64);
    assert_int_equal(c->cluster.heartbeat_ms, 500);
    assert_int_equal(c->cluster.failure_timeout_ms, 3000);
    assert_int_equal(c->cluster.data_timeout_ms, 10000);
    assert_string_equal(c->cluster.replica_cpus, "");
    assert_string_equal(c->cluster.backend, "cpu");
    assert_string_equal(c->cluster.curve_server_key, ""); /* CURVE off by default */
    assert_string_equal(c->cluster.curve_server_public, "");
    assert_string_equal(c->cluster.curve_worker_key, "");
    assert_string_equal(c->cluster.curve_authorized_keys, "");
    assert_string_equal(c->status.addr, "127.0.0.1:8080");
    assert_string_equal(c->status.token, "");
}

static void assert_list_equal(const sy_strlist *a, const sy_strlist *b) {
    assert_int_equal(a->n, b->n);
    for (int i = 0; i < a->n; i++) assert_string_equal(a->items[i], b->items[i]);
}

/* Field-by-field comparison written out independently of the implementation's table. */
static void assert_cfg_equal(const sy_config_t *a, const sy_config_t *b, bool with_token) {
    assert_string_equal(a->run.name, b->run.name);
    assert_int_equal(a->run.steps, b->run.steps);
    assert_true(a->run.seed == b->run.seed);
    assert_string_equal(a->run.state_dir, b->run.state_dir);
    assert_int_equal(a->run.log_every, b->run.log_every);
    assert_int_equal(a->model.vocab_size, b->model.vocab_size);
    assert_int_equal(a->model.seq_len, b->model.seq_len);
    assert_int_equal(a->model.d_model, b->model.d_model);
    assert_int_equal(a->model.n_layers, b->model.n_layers);
    assert_int_equal(a->model.n_heads, b->model.n_heads);
    assert_int_equal(a->model.d_ff, b->model.d_ff);
    assert_int_equal(a->model.n_experts, b->model.n_experts);
    assert_int_equal(a->model.switch_every, b->model.switch_every);
    assert_true(a->model.capacity_factor == b->model.capacity_factor);
    assert_true(a->model.eval_capacity_factor == b->model.eval_capacity_factor);
    assert_true(a->model.aux_loss_coef == b->model.aux_loss_coef);
    assert_true(a->model.z_loss_coef == b->model.z_loss_coef);
    assert_true(a->model.router_jitter == b->model.router_jitter);
    assert_true(a->model.expert_dropout == b->model.expert_dropout);
    assert_true(a->model.init_scale == b->model.init_scale);
    assert_int_equal(a->train.global_batch_seqs, b->train.global_batch_seqs);
    assert_int_equal(a->train.micro_batch_seqs, b->train.micro_batch_seqs);
    assert_true(a->train.lr == b->train.lr);
    assert_true(a->train.lr_min == b->train.lr_min);
    assert_int_equal(a->train.warmup_steps, b->train.warmup_steps);
    assert_true(a->train.weight_decay == b->train.weight_decay);
    assert_true(a->train.beta1 == b->train.beta1);
    assert_true(a->train.beta2 == b->train.beta2);
    assert_true(a->train.eps == b->train.eps);
    assert_true(a->train.grad_clip == b->train.grad_clip);
    assert_int_equal(a->train.precision, b->train.precision);
    assert_int_equal(a->train.threads, b->train.threads);
    assert_list_equal(&a->data.train, &b->data.train);
    assert_list_equal(&a->data.val, &b->data.val);
    assert_string_equal(a->checkpoint.store, b->checkpoint.store);
    assert_int_equal(a->checkpoint.every, b->checkpoint.every);
    assert_int_equal(a->checkpoint.keep_last, b->checkpoint.keep_last);
    assert_int_equal(a->checkpoint.async, b->checkpoint.async);
    assert_int_equal(a->checkpoint.on_busy, b->checkpoint.on_busy);
    assert_string_equal(a->cluster.bind, b->cluster.bind);
    assert_int_equal(a->cluster.min_workers, b->cluster.min_workers);
    assert_int_equal(a->cluster.max_workers, b->cluster.max_workers);
    assert_int_equal(a->cluster.heartbeat_ms, b->cluster.heartbeat_ms);
    assert_int_equal(a->cluster.failure_timeout_ms, b->cluster.failure_timeout_ms);
    assert_int_equal(a->cluster.data_timeout_ms, b->cluster.data_timeout_ms);
    assert_string_equal(a->cluster.backend, b->cluster.backend);
    assert_string_equal(a->status.addr, b->status.addr);
    if (with_token) assert_string_equal(a->status.token, b->status.token);
}

static void set_ok(sy_config_t *c, const char *assignment) {
    sy_status st = sy_config_set(c, assignment);
    if (st != SY_OK) fail_msg("--set %s failed: %s", assignment, sy_err_msg());
}

/* A config with a non-default value in every field. */
static void make_modified(sy_config_t *c) {
    static const char *const sets[] = {
        "run.name=exp-2.b_x", "run.steps=123456789012", "run.seed=18446744073709551615",
        "run.state_dir=/var/tmp/s d", "run.log_every=7", "model.vocab_size=50257",
        "model.seq_len=1024", "model.d_model=768", "model.n_layers=12", "model.n_heads=12",
        "model.d_ff=3072", "model.n_experts=64", "model.switch_every=3",
        "model.capacity_factor=1.0625", "model.eval_capacity_factor=3.5",
        "model.aux_loss_coef=0.02", "model.z_loss_coef=1e-4", "model.router_jitter=0.01",
        "model.expert_dropout=0.4", "model.init_scale=1.0", "train.global_batch_seqs=512",
        "train.micro_batch_seqs=32", "train.lr=6e-4", "train.lr_min=0.1e-5",
        "train.warmup_steps=700", "train.weight_decay=0", "train.beta1=0.85",
        "train.beta2=0.999", "train.eps=1e-6", "train.grad_clip=0", "train.precision=bf16",
        "train.threads=3", "data.train=s3://b/p/a_*.bin,/x/y.bin,z.bin", "data.val=",
        "checkpoint.store=s3://bucket/prefix", "checkpoint.every=0", "checkpoint.keep_last=9",
        "checkpoint.async=no", "checkpoint.on_busy=skip", "cluster.bind=tcp://0.0.0.0:6000",
        "cluster.min_workers=4", "cluster.max_workers=8", "cluster.heartbeat_ms=250",
        "cluster.failure_timeout_ms=1000", "cluster.data_timeout_ms=20000",
        "cluster.backend=cuda", "status.addr=0.0.0.0:9090", "status.token=s3cret",
    };
    assert_int_equal(sy_config_defaults(c), SY_OK);
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++) set_ok(c, sets[i]);
}

/* ---------------------------------------------------------------------------------------- */

/* sy_cpulist_parse and sy_cpulist_str agree with Linux's CPU list form both ways. */
static void test_cpulist(void **state) {
    (void)state;
    static const struct {
        const char *in, *out;
        int count;
    } ok[] = {{"", "", 0},          {"1", "1", 1},           {"0,1", "0-1", 2},       {"2-3", "2-3", 2},
              {"0,4-7", "0,4-7", 5}, {"7,5,6", "5-7", 3},     {"3-3", "3", 1},         {"1023", "1023", 1},
              {"0-1023", "0-1023", 1024}};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        cpu_set_t s;
        char why[300] = "";
        assert_true(sy_cpulist_parse(ok[i].in, &s, why, sizeof why));
        assert_int_equal(CPU_COUNT(&s), ok[i].count);
        assert_string_equal(sy_cpulist_str(&s).s, ok[i].out);
    }
    static const char *bad[] = {"-", "1-", "-1", "3-1", ",1", "1,,2", "1024", "99999999999", "x", "1 ", "0-1024"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cpu_set_t s;
        char why[300] = "";
        assert_false(sy_cpulist_parse(bad[i], &s, why, sizeof why));
        assert_non_null(strstr(why, "not a CPU list"));
    }
    /* every other CPU: too long to print whole, and says so */
    cpu_set_t s;
    CPU_ZERO(&s);
    for (int c = 0; c < CPU_SETSIZE; c += 2) CPU_SET(c, &s);
    const sy_cpulist_buf b = sy_cpulist_str(&s);
    assert_true(strlen(b.s) < sizeof b.s);
    assert_string_equal(b.s + strlen(b.s) - 4, ",...");
}

static void test_defaults(void **state) {
    (void)state;
    sy_config_t c;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    expect_tiny_values(&c);
    if (sy_config_validate(&c) != SY_OK) fail_msg("defaults do not validate: %s", sy_err_msg());
    sy_config_free(&c);
}

static void test_load_tiny_yaml(void **state) {
    (void)state;
    const char *src = getenv("SY_SRC");
    assert_non_null(src);
    char path[1024];
    snprintf(path, sizeof path, "%s/configs/tiny.yaml", src);

    /* Over the defaults. */
    sy_config_t c;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    if (sy_config_load(&c, path) != SY_OK) fail_msg("%s", sy_err_msg());
    expect_tiny_values(&c);
    sy_config_free(&c);

    /* Over an empty struct: every value must then come from the file itself. */
    memset(&c, 0, sizeof c);
    if (sy_config_load(&c, path) != SY_OK) fail_msg("%s", sy_err_msg());
    expect_tiny_values(&c);
    assert_int_equal(sy_config_validate(&c), SY_OK);
    sy_config_free(&c);
}

static void test_load_tiny_dense_yaml(void **state) {
    (void)state;
    char path[1024];
    snprintf(path, sizeof path, "%s/configs/tiny-dense.yaml", getenv("SY_SRC"));
    sy_config_t c;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    if (sy_config_load(&c, path) != SY_OK) fail_msg("%s", sy_err_msg());
    assert_string_equal(c.run.name, "tiny-dense");
    assert_string_equal(c.run.state_dir, "runs/tiny-dense");
    assert_int_equal(c.model.switch_every, 0);
    assert_int_equal(c.model.n_experts, 1);
    /* Same FLOPs per token as tiny: same widths and depth. */
    assert_int_equal(c.model.d_ff, 512);
    assert_int_equal(c.model.d_model, 128);
    assert_int_equal(c.model.n_layers, 4);
    assert_int_equal(c.model.seq_len, 128);
    assert_int_equal(sy_config_validate(&c), SY_OK);
    sy_config_free(&c);
}

static void test_load_partial_keeps_defaults(void **state) {
    (void)state;
    sy_config_t c, d;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    assert_int_equal(sy_config_defaults(&d), SY_OK);
    const char *p = write_yaml("partial.yaml",
                               "model:\n  d_model: 64\n  capacity_factor: 1.5\n"
                               "train:\n  precision: bf16\n"
                               "checkpoint:\n  async: false\n"
                               "data:\n  val: []\n  train: [a.bin, \"b c.bin\"]\n"
                               "run:\n  seed: 99\n  name: \"x-1\"\n"
                               "status:\n");
    if (sy_config_load(&c, p) != SY_OK) fail_msg("%s", sy_err_msg());
    assert_int_equal(c.model.d_model, 64);
    assert_true(c.model.capacity_factor == 1.5);
    assert_int_equal(c.train.precision, SY_PREC_BF16);
    assert_false(c.checkpoint.async);
    assert_int_equal(c.data.val.n, 0);
    assert_int_equal(c.data.train.n, 2);
    assert_string_equal(c.data.train.items[0], "a.bin");
    assert_string_equal(c.data.train.items[1], "b c.bin");
    assert_int_equal(c.run.seed, 99);
    assert_string_equal(c.run.name, "x-1");
    /* Everything else unchanged. */
    assert_int_equal(c.model.n_heads, d.model.n_heads);
    assert_int_equal(c.model.n_layers, 4);
    assert_true(c.train.lr == 3e-3);
    assert_string_equal(c.status.addr, "127.0.0.1:8080");
    assert_string_equal(c.run.state_dir, "runs/tiny");

    /* An empty file and a comment-only file change nothing. */
    sy_config_free(&c);
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    assert_int_equal(sy_config_load(&c, write_yaml("empty.yaml", "")), SY_OK);
    assert_int_equal(sy_config_load(&c, write_yaml("comment.yaml", "# nothing\n")), SY_OK);
    assert_cfg_equal(&c, &d, true);
    sy_config_free(&c);
    sy_config_free(&d);
}

/* A load that must fail with SY_EINVAL, leave cfg unchanged, and name each needle. */
static void expect_load_fails(const char *name, const char *yaml, const char *n1, const char *n2) {
    sy_config_t c, d;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    assert_int_equal(sy_config_defaults(&d), SY_OK);
    const char *p = write_yaml(name, yaml);
    sy_status st = sy_config_load(&c, p);
    if (st != SY_EINVAL) fail_msg("%s: expected SY_EINVAL, got %d (%s)", name, st, sy_err_msg());
    assert_msg_has(name);
    assert_msg_has(n1);
    if (n2) assert_msg_has(n2);
    assert_cfg_equal(&c, &d, true);
    sy_config_free(&c);
    sy_config_free(&d);
}

static void test_load_unknown(void **state) {
    (void)state;
    expect_load_fails("unk_field.yaml", "model:\n  d_model: 64\n  d_modle: 3\n", "d_modle", "model");
    expect_load_fails("unk_section.yaml", "run:\n  steps: 5\nmodle:\n  d_model: 3\n", "modle", NULL);
    expect_load_fails("unk_data.yaml", "data:\n  test: [a]\n", "data.test", NULL);
}

static void test_load_bad_types(void **state) {
    (void)state;
    expect_load_fails("bad_int.yaml", "model:\n  d_model: abc\n", "model.d_model", "abc");
    expect_load_fails("bad_int_frac.yaml", "model:\n  n_heads: 4.5\n", "model.n_heads", "4.5");
    expect_load_fails("bad_int_range.yaml", "model:\n  d_ff: 99999999999\n", "model.d_ff",
                      "99999999999");
    expect_load_fails("bad_int64.yaml", "run:\n  steps: 1e3\n", "run.steps", "1e3");
    expect_load_fails("bad_seed.yaml", "run:\n  seed: -5\n", "run.seed", "-5");
    expect_load_fails("bad_double.yaml", "train:\n  lr: fast\n", "train.lr", "fast");
    expect_load_fails("bad_bool.yaml", "checkpoint:\n  async: maybe\n", "checkpoint.async",
                      "maybe");
    expect_load_fails("bad_enum.yaml", "train:\n  precision: fp16\n", "train.precision", "fp16");
    expect_load_fails("bad_list.yaml", "data:\n  train: x.bin\n", "data.train", NULL);
    expect_load_fails("bad_scalar.yaml", "model:\n  d_model: [1, 2]\n", "model.d_model", NULL);
    expect_load_fails("bad_section.yaml", "model: 5\n", "model", NULL);
    expect_load_fails("bad_syntax.yaml", "model:\n  d_model: [1\n", "model", NULL);
    /* The last bad field wins nothing: an error after good fields leaves cfg unchanged. */
    expect_load_fails("bad_late.yaml", "run:\n  steps: 5\nmodel:\n  d_model: x\n", "model.d_model",
                      NULL);
}

static void test_load_missing_file(void **state) {
    (void)state;
    sy_config_t c;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    char path[512];
    snprintf(path, sizeof path, "%s/no-such.yaml", tmpdir);
    assert_int_equal(sy_config_load(&c, path), SY_ENOTFOUND);
    assert_msg_has("no-such.yaml");
    expect_tiny_values(&c);
    sy_config_free(&c);
}

static void test_set_types(void **state) {
    (void)state;
    sy_config_t c;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    set_ok(&c, "model.d_model=256");
    assert_int_equal(c.model.d_model, 256);
    set_ok(&c, "model.d_model=-3");
    assert_int_equal(c.model.d_model, -3);
    set_ok(&c, "run.steps=5000000000");
    assert_int_equal(c.run.steps, 5000000000LL);
    set_ok(&c, "run.seed=18446744073709551615");
    assert_true(c.run.seed == UINT64_MAX);
    set_ok(&c, "train.lr=2.5e-4");
    assert_true(c.train.lr == 2.5e-4);
    set_ok(&c, "train.lr=1");
    assert_true(c.train.lr == 1.0);
    static const struct {
        const char *text;
        bool value;
    } bools[] = {{"false", false}, {"true", true}, {"0", false}, {"1", true},
                 {"no", false},    {"yes", true},  {"off", false}, {"TRUE", true}};
    for (size_t i = 0; i < sizeof bools / sizeof bools[0]; i++) {
        char a[64];
        snprintf(a, sizeof a, "checkpoint.async=%s", bools[i].text);
        set_ok(&c, a);
        assert_int_equal(c.checkpoint.async, bools[i].value);
    }
    set_ok(&c, "run.name=abc");
    assert_string_equal(c.run.name, "abc");
    set_ok(&c, "status.token=a=b");  /* only the first '=' splits */
    assert_string_equal(c.status.token, "a=b");
    set_ok(&c, "status.token=");
    assert_string_equal(c.status.token, "");
    set_ok(&c, "train.precision=bf16");
    assert_int_equal(c.train.precision, SY_PREC_BF16);
    set_ok(&c, "checkpoint.on_busy=skip");
    assert_int_equal(c.checkpoint.on_busy, SY_ONBUSY_SKIP);
    set_ok(&c, "data.train=a.bin,b/*.bin,s3://x/y");
    assert_int_equal(c.data.train.n, 3);
    assert_string_equal(c.data.train.items[0], "a.bin");
    assert_string_equal(c.data.train.items[1], "b/*.bin");
    assert_string_equal(c.data.train.items[2], "s3://x/y");
    set_ok(&c, "data.val=only.bin");
    assert_int_equal(c.data.val.n, 1);
    assert_string_equal(c.data.val.items[0], "only.bin");
    set_ok(&c, "data.val=");
    assert_int_equal(c.data.val.n, 0);
    sy_config_free(&c);
}

static void expect_set_fails(sy_config_t *c, const char *assignment, const char *needle) {
    sy_config_t before;
    assert_int_equal(sy_config_copy(&before, c), SY_OK);
    sy_status st = sy_config_set(c, assignment);
    if (st != SY_EINVAL) fail_msg("--set %s: expected SY_EINVAL, got %d", assignment, st);
    assert_msg_has(needle);
    assert_cfg_equal(c, &before, true);
    sy_config_free(&before);
}

static void test_set_bad(void **state) {
    (void)state;
    sy_config_t c;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    assert_int_equal(sy_config_set(&c, "model.d_model=abc"), SY_EINVAL);
    assert_string_equal(sy_err_msg(), "--set model.d_model=abc: expected an integer");
    expect_set_fails(&c, "model.d_model=", "model.d_model");
    expect_set_fails(&c, "model.d_model=12x", "model.d_model");
    expect_set_fails(&c, "model.d_model= 12", "model.d_model");
    expect_set_fails(&c, "model.d_model=3000000000", "out of range");
    expect_set_fails(&c, "run.steps=99999999999999999999", "run.steps");
    expect_set_fails(&c, "run.seed=-1", "run.seed");
    expect_set_fails(&c, "run.seed=18446744073709551616", "run.seed");
    expect_set_fails(&c, "train.lr=abc", "train.lr");
    expect_set_fails(&c, "train.lr=", "train.lr");
    expect_set_fails(&c, "train.lr=nan", "finite");
    expect_set_fails(&c, "train.lr=inf", "train.lr");
    expect_set_fails(&c, "train.lr=1e999", "train.lr");
    expect_set_fails(&c, "checkpoint.async=maybe", "checkpoint.async");
    expect_set_fails(&c, "checkpoint.async=", "checkpoint.async");
    expect_set_fails(&c, "train.precision=fp16", "bf16");
    expect_set_fails(&c, "checkpoint.on_busy=WAIT", "checkpoint.on_busy");
    expect_set_fails(&c, "model.d_modle=3", "d_modle");
    expect_set_fails(&c, "modle.d_model=3", "modle");
    expect_set_fails(&c, "d_model=3", "section.field=value");
    expect_set_fails(&c, "model.d_model", "section.field=value");
    expect_set_fails(&c, "", "section.field=value");
    assert_int_equal(sy_config_set(&c, NULL), SY_EINVAL);
    sy_config_free(&c);
}

/* Applies the assignments to the defaults; validation must fail naming field (and rule). */
static void expect_invalid(const char *const *sets, const char *field, const char *rule) {
    sy_config_t c;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    for (int i = 0; sets[i]; i++) set_ok(&c, sets[i]);
    sy_status st = sy_config_validate(&c);
    if (st != SY_EINVAL)
        fail_msg("validate after --set %s...: expected SY_EINVAL, got %d", sets[0], st);
    assert_msg_has(field);
    if (rule) assert_msg_has(rule);
    /* the whole message is text: a check that wrote no reason once printed a stack buffer */
    for (const unsigned char *p = (const unsigned char *)sy_err_msg(); *p; p++)
        if (*p < 0x20 || *p == 0x7f) fail_msg("message has byte 0x%02x: %s", *p, sy_err_msg());
    sy_config_free(&c);
}

static void expect_valid(const char *const *sets) {
    sy_config_t c;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    for (int i = 0; sets[i]; i++) set_ok(&c, sets[i]);
    if (sy_config_validate(&c) != SY_OK)
        fail_msg("validate after --set %s...: %s", sets[0], sy_err_msg());
    sy_config_free(&c);
}

#define INVALID(field, rule, ...) expect_invalid((const char *const[]){__VA_ARGS__, NULL}, field, rule)
#define VALID(...) expect_valid((const char *const[]){__VA_ARGS__, NULL})

static void test_validate_rules(void **state) {
    (void)state;
    /* The message format of the brief, exactly. */
    {
        sy_config_t c;
        assert_int_equal(sy_config_defaults(&c), SY_OK);
        set_ok(&c, "model.d_model=130");
        assert_int_equal(sy_config_validate(&c), SY_EINVAL);
        assert_string_equal(sy_err_msg(), "model.d_model = 130: must be divisible by model.n_heads (4)");
        sy_config_free(&c);
    }
    /* Sizes >= 1. */
    INVALID("model.vocab_size", "0", "model.vocab_size=0");
    INVALID("model.seq_len", ">= 1", "model.seq_len=0");
    INVALID("model.d_model", NULL, "model.d_model=0");
    INVALID("model.d_model", NULL, "model.d_model=-128");
    INVALID("model.n_layers", NULL, "model.n_layers=0");
    INVALID("model.n_heads", NULL, "model.n_heads=0"); /* checked before d_model % n_heads */
    INVALID("model.n_heads", NULL, "model.n_heads=-4");
    INVALID("model.d_ff", NULL, "model.d_ff=0");
    INVALID("model.n_experts", NULL, "model.n_experts=0");
    INVALID("model.switch_every", NULL, "model.switch_every=-1");
    INVALID("train.global_batch_seqs", NULL, "train.global_batch_seqs=0");
    INVALID("train.micro_batch_seqs", NULL, "train.micro_batch_seqs=0");
    /* uint16 tokens. */
    INVALID("model.vocab_size", "65536", "model.vocab_size=65537");
    INVALID("model.vocab_size", NULL, "model.vocab_size=100000");
    /* Divisibility. */
    INVALID("model.d_model", "model.n_heads", "model.n_heads=3");
    INVALID("model.d_model", "divisible", "model.d_model=100", "model.n_heads=8");
    INVALID("train.global_batch_seqs", "train.micro_batch_seqs", "train.global_batch_seqs=12");
    INVALID("train.global_batch_seqs", "divisible", "train.micro_batch_seqs=5");
    /* Factors and coefficients. */
    INVALID("model.capacity_factor", "> 0", "model.capacity_factor=0");
    INVALID("model.capacity_factor", NULL, "model.capacity_factor=-1.25");
    INVALID("model.eval_capacity_factor", NULL, "model.eval_capacity_factor=0");
    INVALID("model.aux_loss_coef", ">= 0", "model.aux_loss_coef=-0.01");
    INVALID("model.z_loss_coef", NULL, "model.z_loss_coef=-1e-9");
    INVALID("model.router_jitter", "[0, 1)", "model.router_jitter=1");
    INVALID("model.router_jitter", NULL, "model.router_jitter=-0.1");
    INVALID("model.expert_dropout", NULL, "model.expert_dropout=1.0");
    INVALID("model.expert_dropout", NULL, "model.expert_dropout=-0.5");
    INVALID("model.init_scale", NULL, "model.init_scale=0");
    INVALID("model.init_scale", NULL, "model.init_scale=-0.1");
    /* Optimizer. */
    INVALID("train.lr", "> 0", "train.lr=0", "train.lr_min=0");
    INVALID("train.lr", NULL, "train.lr=-1e-3");
    INVALID("train.lr_min", "train.lr", "train.lr_min=0.01");
    INVALID("train.lr_min", NULL, "train.lr_min=-1e-5");
    INVALID("train.beta1", NULL, "train.beta1=1");
    INVALID("train.beta1", NULL, "train.beta1=-0.1");
    INVALID("train.beta2", NULL, "train.beta2=1.5");
    INVALID("train.eps", NULL, "train.eps=0");
    INVALID("train.eps", NULL, "train.eps=-1e-8");
    INVALID("train.grad_clip", NULL, "train.grad_clip=-1");
    /* The router ablation needs bf16 training; the reason is the check's own. */
    INVALID("model.router_precision", "train.precision: bf16", "model.router_precision=bf16");
    /* CPU lists (base/bgsched.h): the message names where the list went wrong */
    INVALID("cluster.replica_cpus", "at \"-\"", "cluster.replica_cpus=1,-");
    INVALID("cluster.replica_cpus", "at \"3-1\"", "cluster.replica_cpus=3-1");
    INVALID("cluster.replica_cpus", "0-1023", "cluster.replica_cpus=1024");
    INVALID("cluster.replica_cpus", NULL, "cluster.replica_cpus=1,");
    INVALID("cluster.replica_cpus", NULL, "cluster.replica_cpus=a");
    INVALID("cluster.replica_cpus", NULL, "cluster.replica_cpus=1 2");
    INVALID("train.weight_decay", NULL, "train.weight_decay=-0.1");
    INVALID("train.warmup_steps", NULL, "train.warmup_steps=-1");
    INVALID("run.steps", NULL, "run.steps=0");
    INVALID("run.steps", NULL, "run.steps=-10");
    INVALID("train.threads", NULL, "train.threads=-1");
    /* Data and checkpoints. */
    INVALID("data.train", NULL, "data.train=");
    INVALID("data.train", NULL, "data.train=a.bin,,b.bin");
    INVALID("checkpoint.every", NULL, "checkpoint.every=-1");
    INVALID("checkpoint.keep_last", NULL, "checkpoint.keep_last=0");
    INVALID("checkpoint.store", NULL, "checkpoint.store=");
    /* Cluster. */
    INVALID("cluster.min_workers", NULL, "cluster.min_workers=0");
    INVALID("cluster.min_workers", "cluster.max_workers", "cluster.min_workers=8",
            "cluster.max_workers=4");
    INVALID("cluster.max_workers", NULL, "cluster.max_workers=0");
    INVALID("cluster.heartbeat_ms", NULL, "cluster.heartbeat_ms=0");
    INVALID("cluster.failure_timeout_ms", "cluster.heartbeat_ms", "cluster.failure_timeout_ms=500");
    INVALID("cluster.failure_timeout_ms", NULL, "cluster.heartbeat_ms=4000");
    INVALID("cluster.data_timeout_ms", NULL, "cluster.data_timeout_ms=0");
    INVALID("cluster.backend", "cuda", "cluster.backend=tpu");
    INVALID("cluster.backend", NULL, "cluster.backend=");
    /* CurveZMQ: the server key and the authorized keys go together; any other curve field
     * without the server key would silently run in plaintext. */
    INVALID("cluster.curve_authorized_keys", "must be set when cluster.curve_server_key is set",
            "cluster.curve_server_key=keys/coord.key");
    INVALID("cluster.curve_server_key", "must be set when cluster.curve_authorized_keys is set",
            "cluster.curve_authorized_keys=keys/authorized");
    INVALID("cluster.curve_server_key", "cluster.curve_worker_key", "cluster.curve_worker_key=keys/w.key");
    INVALID("cluster.curve_server_key", "cluster.curve_server_public", "cluster.curve_server_public=keys/c.pub");
    /* Names. */
    INVALID("run.name", NULL, "run.name=");
    INVALID("run.name", "[A-Za-z0-9._-]+", "run.name=my run");
    INVALID("run.name", NULL, "run.name=a/b");
    INVALID("run.name", NULL, "run.name=..");
    INVALID("run.log_every", NULL, "run.log_every=0");

    /* Boundary values that are allowed. */
    VALID("model.vocab_size=65536", "model.switch_every=0", "model.n_experts=1");
    VALID("model.router_jitter=0.999", "model.expert_dropout=0.4", "model.aux_loss_coef=0",
          "model.z_loss_coef=0");
    VALID("train.lr_min=3e-3", "train.grad_clip=0", "train.weight_decay=0", "train.beta1=0",
          "train.warmup_steps=0", "train.threads=2");
    VALID("train.global_batch_seqs=8", "train.micro_batch_seqs=8");
    VALID("checkpoint.every=0", "checkpoint.keep_last=1", "data.val=");
    VALID("cluster.min_workers=64", "cluster.heartbeat_ms=1", "cluster.failure_timeout_ms=2",
          "cluster.backend=cuda");
    VALID("run.name=Run_1.b-2", "run.steps=1", "status.token=");
    VALID("cluster.curve_server_key=keys/coord.key", "cluster.curve_authorized_keys=keys/authorized");
    VALID("cluster.curve_server_key=c.key", "cluster.curve_authorized_keys=a", "cluster.curve_server_public=c.pub",
          "cluster.curve_worker_key=w.key");
}

static void test_validate_enum_out_of_range(void **state) {
    (void)state;
    sy_config_t c;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    c.train.precision = (sy_precision)7;
    assert_int_equal(sy_config_validate(&c), SY_EINVAL);
    assert_msg_has("train.precision");
    sy_config_free(&c);
}

static void test_json_round_trip(void **state) {
    (void)state;
    sy_config_t a, b;
    make_modified(&a);
    assert_int_equal(sy_config_validate(&a), SY_OK);
    json_t *j = sy_config_to_json(&a);
    assert_non_null(j);

    /* Spot checks of the JSON shape. */
    json_t *model = json_object_get(j, "model");
    assert_true(json_is_integer(json_object_get(model, "d_model")));
    assert_int_equal(json_integer_value(json_object_get(model, "d_model")), 768);
    assert_true(json_is_real(json_object_get(model, "capacity_factor")));
    json_t *train = json_object_get(j, "train");
    assert_string_equal(json_string_value(json_object_get(train, "precision")), "bf16");
    json_t *dtrain = json_object_get(json_object_get(j, "data"), "train");
    assert_true(json_is_array(dtrain));
    assert_int_equal(json_array_size(dtrain), 3);
    assert_string_equal(json_string_value(json_array_get(dtrain, 1)), "/x/y.bin");
    assert_int_equal(json_array_size(json_object_get(json_object_get(j, "data"), "val")), 0);
    assert_true(json_is_false(json_object_get(json_object_get(j, "checkpoint"), "async")));
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "checkpoint"), "on_busy")),
                        "skip");
    /* The token never leaves the process. */
    assert_null(json_object_get(json_object_get(j, "status"), "token"));

    /* Through text and back, onto the defaults. */
    char *text = json_dumps(j, JSON_COMPACT);
    assert_non_null(text);
    json_error_t jerr;
    json_t *j2 = json_loads(text, 0, &jerr);
    assert_non_null(j2);
    assert_int_equal(sy_config_defaults(&b), SY_OK);
    if (sy_config_from_json(&b, j2) != SY_OK) fail_msg("%s", sy_err_msg());
    assert_cfg_equal(&a, &b, false);
    assert_string_equal(b.status.token, "");
    assert_false(sy_config_equal(&a, &b)); /* the token differs */
    set_ok(&b, "status.token=s3cret");
    assert_true(sy_config_equal(&a, &b));

    free(text);
    json_decref(j);
    json_decref(j2);
    sy_config_free(&a);
    sy_config_free(&b);

    /* Defaults round trip too (seed as a small integer). */
    assert_int_equal(sy_config_defaults(&a), SY_OK);
    assert_int_equal(sy_config_defaults(&b), SY_OK);
    set_ok(&b, "model.d_model=64");
    j = sy_config_to_json(&a);
    assert_int_equal(sy_config_from_json(&b, j), SY_OK);
    assert_cfg_equal(&a, &b, true);
    json_decref(j);
    sy_config_free(&a);
    sy_config_free(&b);
}

static void expect_from_json_fails(const char *text, const char *n1, const char *n2) {
    sy_config_t c, d;
    json_error_t jerr;
    json_t *j = json_loads(text, JSON_DECODE_ANY, &jerr);
    if (!j) fail_msg("bad test JSON %s: %s", text, jerr.text);
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    assert_int_equal(sy_config_defaults(&d), SY_OK);
    sy_status st = sy_config_from_json(&c, j);
    if (st != SY_EINVAL) fail_msg("from_json %s: expected SY_EINVAL, got %d", text, st);
    assert_msg_has(n1);
    if (n2) assert_msg_has(n2);
    assert_cfg_equal(&c, &d, true);
    json_decref(j);
    sy_config_free(&c);
    sy_config_free(&d);
}

static void test_from_json_errors(void **state) {
    (void)state;
    expect_from_json_fails("[1]", "object", NULL);
    expect_from_json_fails("{\"modle\": {}}", "modle", NULL);
    expect_from_json_fails("{\"model\": {\"d_modle\": 1}}", "model.d_modle", NULL);
    expect_from_json_fails("{\"model\": 5}", "model", NULL);
    expect_from_json_fails("{\"run\": {\"steps\": 7}, \"model\": {\"d_model\": \"abc\"}}",
                           "model.d_model", "abc");
    expect_from_json_fails("{\"model\": {\"d_model\": 1.5}}", "model.d_model", NULL);
    expect_from_json_fails("{\"model\": {\"d_model\": 3000000000}}", "model.d_model", NULL);
    expect_from_json_fails("{\"train\": {\"lr\": \"0.1\"}}", "train.lr", NULL);
    expect_from_json_fails("{\"checkpoint\": {\"async\": 1}}", "checkpoint.async", NULL);
    expect_from_json_fails("{\"train\": {\"precision\": \"fp16\"}}", "train.precision", NULL);
    expect_from_json_fails("{\"data\": {\"train\": \"a.bin\"}}", "data.train", NULL);
    expect_from_json_fails("{\"data\": {\"train\": [\"a\", 3]}}", "data.train", NULL);
    expect_from_json_fails("{\"run\": {\"seed\": -1}}", "run.seed", NULL);
    expect_from_json_fails("{\"run\": {\"name\": null}}", "run.name", NULL);

    /* Integers are accepted for floats; absent fields keep their values. */
    sy_config_t c;
    assert_int_equal(sy_config_defaults(&c), SY_OK);
    json_t *j = json_loads("{\"train\": {\"lr\": 1}, \"run\": {\"seed\": \"18446744073709551615\"}}",
                           0, NULL);
    assert_int_equal(sy_config_from_json(&c, j), SY_OK);
    assert_true(c.train.lr == 1.0);
    assert_true(c.run.seed == UINT64_MAX);
    assert_true(c.train.lr_min == 3e-4);
    json_decref(j);
    sy_config_free(&c);
}

static void test_copy_free(void **state) {
    (void)state;
    sy_config_t a, b;
    make_modified(&a);
    assert_int_equal(sy_config_copy(&b, &a), SY_OK);
    assert_cfg_equal(&a, &b, true);
    assert_true(sy_config_equal(&a, &b));
    /* Deep: no shared strings. */
    assert_ptr_not_equal(a.run.name, b.run.name);
    assert_ptr_not_equal(a.data.train.items, b.data.train.items);
    assert_ptr_not_equal(a.data.train.items[0], b.data.train.items[0]);
    b.data.train.items[0][0] = 'X';
    assert_string_equal(a.data.train.items[0], "s3://b/p/a_*.bin");
    assert_false(sy_config_equal(&a, &b));
    sy_config_free(&b);
    assert_int_equal(sy_config_copy(&b, &a), SY_OK);
    set_ok(&b, "train.beta2=0.98");
    assert_false(sy_config_equal(&a, &b));
    /* Free: twice is safe; pointers are nulled. */
    sy_config_free(&b);
    assert_null(b.run.name);
    assert_null(b.data.train.items);
    assert_int_equal(b.data.train.n, 0);
    sy_config_free(&b);
    sy_config_free(&a);
    /* A defaults-only struct, and an all-zero one. */
    assert_int_equal(sy_config_defaults(&a), SY_OK);
    sy_config_free(&a);
    sy_config_free(&a);
    memset(&a, 0, sizeof a);
    sy_config_free(&a);
    sy_config_free(NULL);
}

static void test_doc_markdown(void **state) {
    (void)state;
    char *md = sy_config_doc_markdown();
    assert_non_null(md);
    static const char *const must[] = {
        "# switchyard configuration", "--set section.field=value", "## `run`", "## `model`",
        "## `train`", "## `data`", "## `checkpoint`", "## `cluster`", "## `status`",
        "| `model.d_model` | int | `128` |", "| `train.lr` | float | `0.003` |",
        "| `train.precision` | enum | `fp32` |", "| `data.train` | string list |",
        "| `checkpoint.async` | bool | `true` |", "| `run.seed` | uint64 | `1234` |",
        "`status.token`", "`cluster.failure_timeout_ms`",
    };
    for (size_t i = 0; i < sizeof must / sizeof must[0]; i++)
        if (!strstr(md, must[i])) fail_msg("docs lack \"%s\"", must[i]);
    free(md);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cpulist),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_load_tiny_yaml),
        cmocka_unit_test(test_load_tiny_dense_yaml),
        cmocka_unit_test(test_load_partial_keeps_defaults),
        cmocka_unit_test(test_load_unknown),
        cmocka_unit_test(test_load_bad_types),
        cmocka_unit_test(test_load_missing_file),
        cmocka_unit_test(test_set_types),
        cmocka_unit_test(test_set_bad),
        cmocka_unit_test(test_validate_rules),
        cmocka_unit_test(test_validate_enum_out_of_range),
        cmocka_unit_test(test_json_round_trip),
        cmocka_unit_test(test_from_json_errors),
        cmocka_unit_test(test_copy_free),
        cmocka_unit_test(test_doc_markdown),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
