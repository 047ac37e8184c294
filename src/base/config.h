/* switchyard run configuration: one struct, defaults in one place (config.c), loaded from a
 * YAML file (libcyaml), overridden by `--set section.field=value`, validated with a message
 * naming the field, the value and the rule. docs/configuration.md is generated from the same
 * field table (`switchyard config doc`), and a test checks the two do not drift.
 *
 * Ownership: sy_config_t owns its strings and lists; free with sy_config_free().
 * Thread: any, but not concurrently on the same struct. */
#ifndef SY_CONFIG_H
#define SY_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

typedef enum { SY_PREC_FP32 = 0, SY_PREC_BF16 = 1 } sy_precision;
typedef enum { SY_ONBUSY_WAIT = 0, SY_ONBUSY_SKIP = 1 } sy_ckpt_onbusy;
typedef enum { SY_S3_ADDR_AUTO = 0, SY_S3_ADDR_PATH = 1, SY_S3_ADDR_VIRTUAL = 2 } sy_s3_addressing;
/* data.order (model spec §6): the permutation of each epoch */
typedef enum { SY_ORDER_FEISTEL = 0, SY_ORDER_FISHER_YATES = 1 } sy_data_order;

typedef struct {
    char **items;   /* owned strings */
    int n;
} sy_strlist;

typedef struct {
    struct {
        char *name;          /* run name: the folder under the checkpoint store */
        int64_t steps;       /* optimizer steps in the run */
        uint64_t seed;       /* init, data order, jitter, dropout */
        char *state_dir;     /* metrics.jsonl, events.jsonl */
        int log_every;       /* progress line every N steps */
        sy_strlist resume_allow; /* fields that may change on --resume although they change the math */
    } run;
    struct {
        int vocab_size;
        int seq_len;
        int d_model;
        int n_layers;
        int n_heads;
        int d_ff;
        int n_experts;
        int switch_every;
        double capacity_factor;
        double eval_capacity_factor;
        double aux_loss_coef;
        double z_loss_coef;
        double router_jitter;
        double expert_dropout;
        double init_scale;
        sy_precision router_precision; /* fp32 (spec §4); bf16 only for the ablation */
    } model;
    struct {
        int global_batch_seqs;
        int micro_batch_seqs;
        double lr;
        double lr_min;
        int64_t warmup_steps;
        double weight_decay;
        double beta1;
        double beta2;
        double eps;
        double grad_clip;
        sy_precision precision;
        int64_t eval_every;   /* validation every N steps and at the last; 0 = none */
        int eval_batches;     /* micro-batches of data.val per validation; 0 = all */
        int threads;          /* 0 = all cores */
        double max_memory_gb; /* bound on the estimated memory of a run; 0 = available memory */
    } train;
    struct {
        sy_strlist train;     /* shard paths or globs, in order */
        sy_strlist val;
        bool stream;          /* s3:// shards: ranged reads of the windows used (else whole at start) */
        int prefetch_steps;   /* steps read ahead on the prefetch thread; 0 = none */
        int fetch_threads;    /* range reads in flight at once */
        char *cache_dir;      /* on-disk cache of fetched ranges; "" = none */
        double cache_gb;      /* its bound (GiB) */
        int order;            /* sy_data_order */
    } data;
    struct {
        char *store;          /* file:///abs, relative path, or s3://bucket/prefix */
        int64_t every;        /* steps between checkpoints; 0 = only at the end */
        int keep_last;
        bool async;
        sy_ckpt_onbusy on_busy;
        char *s3_endpoint;    /* "" = AWS_ENDPOINT_URL (else AWS) */
        char *s3_region;      /* "" = AWS_REGION (else us-east-1) */
        sy_s3_addressing s3_addressing;
        int s3_multipart_mb;  /* objects this large (MiB) go multipart */
        int s3_part_mb;
        int s3_parallel;
        int s3_timeout_ms;    /* idle timeout of one request attempt */
        int s3_retries;       /* attempts per request */
    } checkpoint;
    struct {
        char *bind;
        int min_workers;
        int max_workers;
        int heartbeat_ms;
        int failure_timeout_ms;
        int data_timeout_ms;
        int replicas;         /* copies of each worker's expert state kept by other workers (0: off) */
        bool replica_background; /* the overlapped exchange in the idle scheduling class */
        char *replica_cpus;   /* CPU list kept for the replication ("": no pinning; base/bgsched.h) */
        char *backend;        /* "cpu" */
        char *comm;           /* data plane: "tcp" (src/comm/comm.h) */
        /* CurveZMQ on the control plane (src/proto/curve.h); "" = off */
        char *curve_server_key;      /* the coordinator's .key file */
        char *curve_server_public;   /* its .pub file, for the workers `switchyard run` starts */
        char *curve_worker_key;      /* the .key file of those workers */
        char *curve_authorized_keys; /* worker public keys the coordinator accepts */
        bool insecure;               /* allow off-loopback listeners without CURVE (warned) */
    } cluster;
    struct {
        char *addr;           /* host:port of the HTTP status server */
        char *token;          /* bearer token for mutating endpoints; "" = none set */
        char *token_file;     /* file holding the token (mode 0600); "" = none */
        bool auth_get;        /* GET of the run's data needs the token too */
        char *tls_cert;       /* PEM certificate file: HTTPS with tls_key ("" = plain HTTP) */
        char *tls_key;        /* PEM private key file (0600) */
        char *tls_ca;         /* CA file the launcher verifies the server with ("" = tls_cert) */
        int metrics_expert_series; /* /metrics: per-expert series up to this many (layers × experts) */
    } status;
} sy_config_t;

/* Fills every field with its default. cfg is treated as uninitialised (not freed first). */
sy_status sy_config_defaults(sy_config_t *cfg);
/* Loads a YAML file over the current values (normally the defaults): fields absent from the
 * file keep their value. An unknown section or field, or a value of the wrong type, is
 * SY_EINVAL with a message naming the file and the field; a missing file is SY_ENOTFOUND.
 * All or nothing: on failure cfg is unchanged. Does not validate. */
sy_status sy_config_load(sy_config_t *cfg, const char *path);
/* Applies one "section.field=value" override (the CLI's --set). The value is parsed by the
 * field's type: integers in decimal, floats as strtod, bools true/false/yes/no/on/off/1/0,
 * enums by name, strings verbatim, string lists comma-separated (empty = empty list).
 * Unknown field or bad value: SY_EINVAL, e.g. "--set model.d_model=abc: expected an integer";
 * cfg is then unchanged. Does not validate. */
sy_status sy_config_set(sy_config_t *cfg, const char *assignment);
/* Checks every rule (ranges, divisibility, enums); the first failure is SY_EINVAL with a
 * message naming field, value and rule: "model.d_model = 130: must be divisible by
 * model.n_heads (4)". */
sy_status sy_config_validate(const sy_config_t *cfg);
/* As sy_config_validate, but a failure names where the bad value came from: the `--set`
 * argument that gave the field its value (the last one for that field), else the YAML file
 * `path` (may be NULL): "--set model.d_model=0: model.d_model = 0: must be >= 1". */
sy_status sy_config_validate_from(const sy_config_t *cfg, const char *path, char *const *sets, int n_sets);
/* The workers' data plane: cluster.comm with `auto` resolved (nccl for cluster.backend cuda,
 * else tcp). The returned string lives as long as cfg. */
const char *sy_config_comm(const sy_config_t *cfg);
/* Resume check: every field that changes the math (all but those that may change on resume,
 * see docs/configuration.md, and those listed in run.resume_allow) must equal its value in
 * `saved` (a checkpoint's "config", as written by sy_config_to_json). SY_EINVAL naming the field
 * and both values; `what` names the checkpoint in the message. Fields absent from `saved` (an
 * older checkpoint) are not compared. */
struct json_t;
sy_status sy_config_check_resume(const sy_config_t *cfg, const struct json_t *saved, const char *what);
/* The whole config as a JSON object (every field; enums as their names), for manifests and
 * metrics. Caller owns the returned reference (json_decref). NULL only if out of memory.
 * Secret fields (status.token) are never written: manifests and metrics leave the machine.
 * run.seed is a JSON integer, or a decimal string when it exceeds INT64_MAX. */
struct json_t;
struct json_t *sy_config_to_json(const sy_config_t *cfg);
/* Applies a JSON object of sections ({"model": {"d_model": 256}, ...}, as written by
 * sy_config_to_json) over the current values of cfg, with the same type checks as the YAML
 * loader; fields absent keep their value; an unknown section or field is an error naming it.
 * All or nothing: on failure cfg is unchanged. Does not validate. */
sy_status sy_config_from_json(sy_config_t *cfg, const struct json_t *obj);
/* The Markdown reference of every field (name, type, default, rule, meaning): the text of
 * docs/configuration.md. Caller frees with free(); NULL if out of memory. */
char *sy_config_doc_markdown(void);
/* Deep copy. dst is treated as uninitialised (not freed first); on failure it is left as an
 * empty struct that sy_config_free accepts. */
sy_status sy_config_copy(sy_config_t *dst, const sy_config_t *src);
/* True when every field of a and b is equal (strings and lists by content). */
bool sy_config_equal(const sy_config_t *a, const sy_config_t *b);
/* Frees owned strings and lists and nulls them: safe on a defaults-only struct, on an
 * all-zero struct, and twice. */
void sy_config_free(sy_config_t *cfg);

#endif
