/* switchyard run configuration.
 *
 * Everything is driven by one table, FIELDS[] below: each row names a field of sy_config_t
 * (section, name, type, offset), its default (as text in the --set syntax), its rule (a
 * numeric range, a list of allowed names, and/or a cross-field check with its text) and a
 * one-line meaning. Defaults, YAML loading, --set, validation, JSON and the Markdown reference
 * all walk that table, so they cannot drift apart.
 *
 * YAML: libcyaml parses the document against a schema generated from the table in which every
 * field is an optional string (or an optional sequence of strings); each present scalar is then
 * parsed by the same per-type parser as --set. That keeps "absent = keep the current value"
 * trivial and gives one set of type errors ("model.d_model = abc: expected an integer"). */
#include "base/config.h"
#include "base/bgsched.h"

#include <cyaml/cyaml.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

/* ---------------------------------------------------------------------------------------- */
/* The field table                                                                          */

typedef enum {
    FT_INT,     /* int */
    FT_INT64,   /* int64_t */
    FT_UINT64,  /* uint64_t */
    FT_DOUBLE,  /* double */
    FT_BOOL,    /* bool */
    FT_STRING,  /* char *, owned */
    FT_ENUM,    /* an enum stored as int; value = index into names */
    FT_STRLIST  /* sy_strlist, owned */
} ftype;

enum {
    R_MIN = 1u,      /* value >= lo (or > lo with R_MIN_EXCL) */
    R_MAX = 2u,      /* value <= hi (or < hi with R_MAX_EXCL) */
    R_MIN_EXCL = 4u,
    R_MAX_EXCL = 8u,
    R_NONEMPTY = 16u, /* string: not ""; list: at least one entry, none "" */
    R_SECRET = 32u,   /* never written to JSON */
    R_RESUME = 64u    /* may differ from the checkpoint's config on resume (no effect on the math) */
};

/* A cross-field or pattern rule: returns false and writes the broken rule ("must be ...") to
 * why when cfg violates it. Runs after every per-field rule has passed. */
typedef bool (*check_fn)(const sy_config_t *cfg, char *why, size_t n);

typedef struct {
    const char *section;
    const char *name;
    ftype type;
    size_t offset;
    size_t size;
    const char *def;            /* default, in the --set syntax */
    unsigned rule;              /* R_* flags */
    double lo, hi;
    const char *const *names;   /* FT_ENUM: value names; FT_STRING: allowed values (or NULL) */
    check_fn check;
    const char *check_rule;     /* the text of check, for the docs */
    const char *meaning;
    const char *legacy;         /* the value of a run whose saved config predates the field (NULL:
                                 * such a run may take any value) */
} field;

static const struct {
    const char *name;
    const char *about;
} SECTIONS[] = {
    {"run", "Identity, length and seed of the run."},
    {"model", "The Switch Transformer language model (see the model spec, sections 1-3)."},
    {"train", "Batch, AdamW optimizer, schedule (linear warm-up, then cosine decay to `lr_min`) "
              "and precision."},
    {"data", "Token shards in llm.c's format (uint16 tokens): local paths, globs or s3:// URLs, "
             "read in the order given."},
    {"checkpoint", "Where and how often checkpoints are written to the object store."},
    {"cluster", "Coordinator address, worker membership, failure detection and the CurveZMQ keys of the control plane."},
    {"status", "The coordinator's HTTP status server."},
};
#define N_SECTIONS ((int)(sizeof SECTIONS / sizeof SECTIONS[0]))

static const char *const PRECISION_NAMES[] = {"fp32", "bf16", NULL};
static const char *const ORDER_NAMES[] = {"feistel", "fisher-yates", NULL};
static const char *const ONBUSY_NAMES[] = {"wait", "skip", NULL};
static const char *const S3_ADDRESSING_NAMES[] = {"auto", "path", "virtual", NULL};
static const char *const BACKEND_NAMES[] = {"cpu", "cuda", NULL};
/* Data planes a worker process can use (comm.h has the implementations; "threads" runs ranks as
 * threads of one process, so it is for tests, not workers). */
static const char *const COMM_NAMES[] = {"auto", "tcp", "nccl", NULL};

/* Largest token id a shard can hold (uint16 tokens). */
#define SY_MAX_VOCAB 65536

static void fmt_double(char *buf, size_t n, double v);
static bool chk_name(const sy_config_t *c, char *why, size_t n);
static bool chk_heads(const sy_config_t *c, char *why, size_t n);
static bool chk_micro(const sy_config_t *c, char *why, size_t n);
static bool chk_lr_min(const sy_config_t *c, char *why, size_t n);
static bool chk_router_precision(const sy_config_t *c, char *why, size_t n);
static bool chk_workers(const sy_config_t *c, char *why, size_t n);
static bool chk_failure(const sy_config_t *c, char *why, size_t n);
static bool chk_curve_on(const sy_config_t *c, char *why, size_t n);
static bool chk_curve_auth(const sy_config_t *c, char *why, size_t n);
static bool chk_token_file(const sy_config_t *c, char *why, size_t n);
static bool chk_resume_allow(const sy_config_t *c, char *why, size_t n);
static bool chk_tls_pair(const sy_config_t *c, char *why, size_t n);
static bool chk_comm(const sy_config_t *c, char *why, size_t n);
static bool chk_cpulist(const sy_config_t *c, char *why, size_t n);

#define FLD(sec, fld, ty, dflt, ...)                                                       \
    {.section = #sec, .name = #fld, .type = (ty), .offset = offsetof(sy_config_t, sec.fld), \
     .size = sizeof(((sy_config_t *)0)->sec.fld), .def = (dflt), __VA_ARGS__}
#define GE(x) .rule = R_MIN, .lo = (x)
#define GT(x) .rule = R_MIN | R_MIN_EXCL, .lo = (x)
#define RANGE_CO(a, b) .rule = R_MIN | R_MAX | R_MAX_EXCL, .lo = (a), .hi = (b)
#define RANGE_CC(a, b) .rule = R_MIN | R_MAX, .lo = (a), .hi = (b)
#define CHECK(fn, text) .check = (fn), .check_rule = (text)
#define MEANS(text) .meaning = (text)
#define RESUME_FREE .rule = R_RESUME

static const field FIELDS[] = {
    FLD(run, name, FT_STRING, "tiny", .rule = R_NONEMPTY,
        CHECK(chk_name, "matches `[A-Za-z0-9._-]+`, not `.` or `..`"),
        MEANS("Run name: the folder of this run under the checkpoint store.")),
    FLD(run, steps, FT_INT64, "300", .rule = R_MIN | R_RESUME, .lo = (1), MEANS("Optimizer steps in the run.")),
    FLD(run, seed, FT_UINT64, "1234",
        MEANS("Seed of initialisation, data order, router jitter and expert dropout.")),
    FLD(run, state_dir, FT_STRING, "runs/tiny", .rule = R_NONEMPTY | R_RESUME,
        MEANS("Local folder for `metrics.jsonl` and `events.jsonl`.")),
    FLD(run, resume_allow, FT_STRLIST, "", .rule = R_RESUME,
        CHECK(chk_resume_allow, "each entry names a field (`section.field`)"),
        MEANS("Fields that may differ from the checkpoint's config on `--resume` although they change "
              "the math (e.g. `train.lr`); any other difference is refused.")),
    FLD(run, log_every, FT_INT, "10", .rule = R_MIN | R_RESUME, .lo = (1), MEANS("Print a progress line every N steps.")),

    FLD(model, vocab_size, FT_INT, "256", RANGE_CC(1, SY_MAX_VOCAB),
        MEANS("Vocabulary size V (256: byte tokenizer; 50257: GPT-2 shards); tokens are uint16.")),
    FLD(model, seq_len, FT_INT, "128", GE(1), MEANS("Context length T in tokens.")),
    FLD(model, d_model, FT_INT, "128", GE(1), CHECK(chk_heads, "divisible by `model.n_heads`"),
        MEANS("Residual width D.")),
    FLD(model, n_layers, FT_INT, "4", GE(1), MEANS("Transformer blocks L.")),
    FLD(model, n_heads, FT_INT, "4", GE(1), MEANS("Attention heads H (head size D/H).")),
    FLD(model, d_ff, FT_INT, "512", GE(1), MEANS("Hidden width F of the dense MLP and of each expert.")),
    FLD(model, n_experts, FT_INT, "8", GE(1), MEANS("Experts E per Switch layer (1: dense).")),
    FLD(model, switch_every, FT_INT, "2", GE(0),
        MEANS("Layer l is a Switch layer when `l % S == S-1` (2: every other FFN; 0: dense).")),
    FLD(model, capacity_factor, FT_DOUBLE, "1.25", GT(0),
        MEANS("Expert capacity factor in training: `C = min(G, max(4, ceil(cf*G/E)))`.")),
    FLD(model, eval_capacity_factor, FT_DOUBLE, "2.0", .rule = R_MIN | R_MIN_EXCL | R_RESUME, .lo = (0),
        MEANS("Expert capacity factor in evaluation.")),
    FLD(model, aux_loss_coef, FT_DOUBLE, "0.01", GE(0),
        MEANS("Weight of the load-balancing loss.")),
    FLD(model, z_loss_coef, FT_DOUBLE, "0.001", GE(0), MEANS("Weight of the router z-loss.")),
    FLD(model, router_jitter, FT_DOUBLE, "0", RANGE_CO(0, 1),
        MEANS("Multiplicative router input jitter eps in training: `u ~ U[1-eps, 1+eps]` (0: off).")),
    FLD(model, expert_dropout, FT_DOUBLE, "0", RANGE_CO(0, 1),
        MEANS("Dropout on the expert hidden activation in training (0: off).")),
    FLD(model, init_scale, FT_DOUBLE, "0.1", GT(0),
        MEANS("Linear weights ~ normal(0, sqrt(init_scale / fan_in)), truncated at 2 sigma.")),
    FLD(model, router_precision, FT_ENUM, "fp32", .names = PRECISION_NAMES,
        CHECK(chk_router_precision, "fp32 unless `train.precision` is bf16"),
        MEANS("The router's precision: fp32 as model spec §4 pins it (selective precision). bf16 is "
              "for the ablation of the paper's Table 2 only: with `train.precision: bf16` the router "
              "reads bf16-rounded weights and writes bf16 logits, probabilities and gates.")),

    FLD(train, global_batch_seqs, FT_INT, "16", GE(1),
        CHECK(chk_micro, "divisible by `train.micro_batch_seqs`"),
        MEANS("Sequences per optimizer step.")),
    FLD(train, micro_batch_seqs, FT_INT, "8", GE(1),
        MEANS("Sequences per micro-batch, which is also the routing group.")),
    FLD(train, lr, FT_DOUBLE, "3e-3", GT(0), MEANS("Peak learning rate, reached after warm-up.")),
    FLD(train, lr_min, FT_DOUBLE, "3e-4", GE(0), CHECK(chk_lr_min, "<= `train.lr`"),
        MEANS("Learning rate at the end of the cosine decay.")),
    FLD(train, warmup_steps, FT_INT64, "200", GE(0),
        MEANS("Steps of linear warm-up (200: the tiny model spiked after a 20-step warm-up; docs/model-quality.md).")),
    FLD(train, weight_decay, FT_DOUBLE, "0.1", GE(0),
        MEANS("AdamW decoupled weight decay (2-D tensors only).")),
    FLD(train, beta1, FT_DOUBLE, "0.9", RANGE_CO(0, 1), MEANS("AdamW beta1.")),
    FLD(train, beta2, FT_DOUBLE, "0.95", RANGE_CO(0, 1), MEANS("AdamW beta2.")),
    FLD(train, eps, FT_DOUBLE, "1e-8", GT(0), MEANS("AdamW epsilon.")),
    FLD(train, grad_clip, FT_DOUBLE, "1.0", GE(0),
        MEANS("Clip the global gradient norm to this (0: no clipping).")),
    FLD(train, precision, FT_ENUM, "fp32", .names = PRECISION_NAMES,
        MEANS("fp32, or bf16 (model spec §4): activations, activation gradients and the GEMM weights' "
              "working copy stored in bf16 (2 bytes an element), fp32 master weights, optimizer state "
              "and router; docs/architecture.md \"bf16 storage\".")),
    FLD(train, max_memory_gb, FT_DOUBLE, "0", .rule = R_MIN | R_RESUME, .lo = 0,
        MEANS("Memory (GiB) a run may need on this machine, estimated at start from the model, batch and "
              "optimizer; a bigger config is refused (0: the machine's available memory).")),
    FLD(train, eval_every, FT_INT64, "100", .rule = R_MIN | R_RESUME, .lo = (0),
        MEANS("Validation loss every N steps and at the last step, over `train.eval_batches` "
              "micro-batches of `data.val` (0 or an empty `data.val`: none); `val_loss` in "
              "metrics.jsonl, /v1/history, /metrics and the dashboard.")),
    FLD(train, eval_batches, FT_INT, "16", .rule = R_MIN | R_RESUME, .lo = (0),
        MEANS("Micro-batches of `data.val` each validation reads, its first windows in order with "
              "the eval capacity factor (0: every full micro-batch).")),
    FLD(train, threads, FT_INT, "0", .rule = R_MIN | R_RESUME, .lo = (0), MEANS("CPU threads per worker (0: all cores).")),

    FLD(data, train, FT_STRLIST, "data/fortunes/train_*.bin", .rule = R_NONEMPTY,
        MEANS("Training shards: paths or globs, local or s3://, in order.")),
    FLD(data, val, FT_STRLIST, "data/fortunes/val_*.bin",
        RESUME_FREE, MEANS("Validation shards (empty: no validation).")),
    FLD(data, stream, FT_BOOL, "true", RESUME_FREE,
        MEANS("s3:// shards: read only the windows each worker trains on, by ranged GETs (start-up "
              "reads each shard's header only); false: every worker reads every shard whole into memory "
              "at start.")),
    FLD(data, prefetch_steps, FT_INT, "2", .rule = R_MIN | R_RESUME, .lo = (0),
        MEANS("Steps whose windows a worker reads ahead on its prefetch thread (0: read in the step).")),
    FLD(data, fetch_threads, FT_INT, "8", .rule = R_MIN | R_MAX | R_RESUME, .lo = (1), .hi = (64),
        MEANS("Range reads a worker keeps in flight at once.")),
    FLD(data, cache_dir, FT_STRING, "", RESUME_FREE,
        MEANS("Local folder caching the ranges read from s3:// shards, keyed by object ETag, shared safely "
              "by the workers of a host (empty: no cache).")),
    FLD(data, cache_gb, FT_DOUBLE, "10", .rule = R_MIN | R_MIN_EXCL | R_RESUME, .lo = (0),
        MEANS("Bound of `data.cache_dir` (GiB); least recently used ranges are evicted past it.")),
    FLD(data, order, FT_ENUM, "feistel", .names = ORDER_NAMES, .legacy = "fisher-yates",
        MEANS("The permutation each epoch visits the windows in (model spec §6): `feistel`, a keyed "
              "permutation computed per sample (no memory); `fisher-yates`, a shuffled table of all "
              "windows (8 bytes per window per worker; the order of runs before this field existed).")),

    FLD(checkpoint, store, FT_STRING, "checkpoints", .rule = R_NONEMPTY,
        MEANS("Checkpoint store: file:///abs/path, a relative path, or s3://bucket/prefix.")),
    FLD(checkpoint, every, FT_INT64, "100", GE(0),
        MEANS("Steps between checkpoints (0: only at the end).")),
    FLD(checkpoint, keep_last, FT_INT, "3", GE(1),
        MEANS("Committed checkpoints kept; older ones are deleted.")),
    FLD(checkpoint, async, FT_BOOL, "true",
        MEANS("Upload checkpoints in the background while training continues.")),
    FLD(checkpoint, on_busy, FT_ENUM, "wait", .names = ONBUSY_NAMES,
        MEANS("A checkpoint falls due while the previous upload runs: wait for it, or skip.")),
    FLD(checkpoint, s3_endpoint, FT_STRING, "",
        MEANS("S3 endpoint URL, e.g. http://127.0.0.1:9000 (empty: `AWS_ENDPOINT_URL`, else AWS).")),
    FLD(checkpoint, s3_region, FT_STRING, "",
        MEANS("S3 signing region (empty: `AWS_REGION`, else us-east-1).")),
    FLD(checkpoint, s3_addressing, FT_ENUM, "auto", .names = S3_ADDRESSING_NAMES,
        MEANS("S3 URLs: path-style or virtual-hosted (auto: path-style iff an endpoint is set).")),
    FLD(checkpoint, s3_multipart_mb, FT_INT, "64", GE(1),
        MEANS("S3 objects of this many MiB or more are written with a multipart upload.")),
    FLD(checkpoint, s3_part_mb, FT_INT, "16", GE(5),
        MEANS("S3 multipart part size in MiB (raised to size/10000 for huge objects).")),
    FLD(checkpoint, s3_parallel, FT_INT, "4", RANGE_CC(1, 64),
        MEANS("S3 multipart parts uploaded at once.")),
    FLD(checkpoint, s3_timeout_ms, FT_INT, "60000", GE(1),
        MEANS("S3 request attempt ends when no byte moves for this long (ms); then it is retried.")),
    FLD(checkpoint, s3_retries, FT_INT, "5", GE(1),
        MEANS("S3 attempts per request (standard-mode retries, full-jitter backoff).")),

    FLD(cluster, bind, FT_STRING, "tcp://127.0.0.1:5555", .rule = R_NONEMPTY,
        MEANS("ZeroMQ endpoint the coordinator binds for the control plane.")),
    FLD(cluster, min_workers, FT_INT, "1", GE(1), CHECK(chk_workers, "<= `cluster.max_workers`"),
        MEANS("Workers needed to start, and to continue after losing one.")),
    FLD(cluster, max_workers, FT_INT, "64", GE(1), MEANS("Largest world admitted.")),
    FLD(cluster, heartbeat_ms, FT_INT, "500", GE(1), MEANS("Heartbeat interval (ms).")),
    FLD(cluster, failure_timeout_ms, FT_INT, "3000", GE(1),
        CHECK(chk_failure, "> `cluster.heartbeat_ms`"),
        MEANS("A worker silent this long is declared lost (ms).")),
    FLD(cluster, data_timeout_ms, FT_INT, "10000", GE(1),
        MEANS("Bound on one data-plane exchange (all-to-all, all-reduce) (ms).")),
    FLD(cluster, replicas, FT_INT, "1", RANGE_CC(0, 16),
        MEANS("Copies of each worker's expert state (fp32 weights, AdamW moments) that other "
              "workers keep in memory, refreshed after every step: rank r's copy k is on rank "
              "(r + k) mod W, never the owner, so a world of W keeps min(replicas, W - 1); a "
              "recovery restores the step that was running from them instead of the last "
              "checkpoint (docs/fault-tolerance.md). 0: off.")),
    FLD(cluster, replica_background, FT_BOOL, "true",
        MEANS("Run each step's replica exchange (its copying, sealing and socket work) in Linux's "
              "idle scheduling class while the next step computes, moving it back to the normal "
              "class whenever training has to wait for it: replication then takes only CPU time "
              "training leaves idle (docs/fault-tolerance.md \"Replication in the background\"). "
              "Needs a process that may leave the idle class again (CAP_SYS_NICE, or "
              "`ulimit -e` of 20 or more); elsewhere the exchange runs in the normal class, as "
              "with `false`.")),
    FLD(cluster, replica_cpus, FT_STRING, "", CHECK(chk_cpulist, "a CPU list: `1`, `2-3`, `0,4-7`, or empty"),
        MEANS("CPUs kept for the replication on each worker's host (Linux's CPU list form, as "
              "`taskset -c`): the replica thread and its data plane's ZeroMQ threads run only "
              "there, and the worker's other threads only on its other CPUs, so the replication "
              "never runs on the cores that compute a step; those CPUs no longer compute it "
              "either (docs/fault-tolerance.md \"A core for the "
              "replication\"). Empty: no pinning. A worker whose host lacks these CPUs, or has "
              "no other CPU left for training, says so in its log and runs unpinned. Only with "
              "`cluster.replicas` > 0.")),
    FLD(cluster, backend, FT_STRING, "cpu", .names = BACKEND_NAMES,
        MEANS("Compute backend of the workers: `cpu`, or `cuda` (one GPU per worker: `switchyard run` "
              "gives worker k device k; `switchyard train` uses `SY_CUDA_DEVICE`, default 0; compiled, "
              "never yet run on a GPU).")),
    FLD(cluster, comm, FT_STRING, "auto", .names = COMM_NAMES,
        MEANS("Data plane between the workers (all-to-all, all-reduce): `tcp`, a ZeroMQ mesh; `nccl`, "
              "NCCL between GPU workers over device memory (bootstrapped over tcp; docs/protocol.md; "
              "compiled, never yet run on a GPU); `auto`: `nccl` when `cluster.backend` is `cuda`, "
              "else `tcp`."),
        CHECK(chk_comm, "`nccl` only with `cluster.backend: cuda`")),
    FLD(cluster, curve_server_key, FT_STRING, "",
        CHECK(chk_curve_on, "set when another `cluster.curve_*` field is set"),
        MEANS("CurveZMQ on the control plane: the coordinator's key pair, a `.key` file of "
              "`switchyard keygen` (mode 0600) (empty: no CURVE, plaintext as before).")),
    FLD(cluster, curve_server_public, FT_STRING, "",
        MEANS("The coordinator's `.pub` file, given to the workers `switchyard run` starts "
              "(required there when `curve_server_key` is set).")),
    FLD(cluster, curve_worker_key, FT_STRING, "",
        MEANS("The `.key` file of the workers `switchyard run` starts (required there when "
              "`curve_server_key` is set; its public key must be authorized).")),
    FLD(cluster, curve_authorized_keys, FT_STRING, "",
        CHECK(chk_curve_auth, "set when `cluster.curve_server_key` is set"),
        MEANS("File of the worker public keys the coordinator accepts, one a line ('#' "
              "comments); any other key is refused (ZAP).")),
    FLD(cluster, insecure, FT_BOOL, "false",
        MEANS("Allow listeners reachable from other machines without CurveZMQ: a coordinator whose "
              "`cluster.bind` is not a loopback address, or a worker whose data plane is not, refuses to "
              "start without CURVE keys unless this is true (then every `generation_opened` log line "
              "carries a warning). `switchyard run` makes per-run keys unless this is true.")),

    FLD(status, addr, FT_STRING, "127.0.0.1:8080", .rule = R_NONEMPTY,
        MEANS("host:port of the HTTP status server.")),
    FLD(status, token, FT_STRING, "", .rule = R_SECRET,
        MEANS("Bearer token for the mutating endpoints (empty: none set); never written to "
              "JSON. Prefer `token_file` or the environment variable `SY_STATUS_TOKEN`: a `--set` "
              "shows it to every local user (ps).")),
    FLD(status, token_file, FT_STRING, "", CHECK(chk_token_file, "not set together with `status.token`"),
        MEANS("File holding the bearer token, one line, mode 0600 (refused when group or others may read "
              "it) (empty: `status.token`, else `SY_STATUS_TOKEN` from the environment).")),
    FLD(status, auth_get, FT_BOOL, "false",
        MEANS("Require the token (`Authorization: Bearer`) for GET of the run's data too "
              "(`/v1/status`, `/v1/history`, `/metrics`); needs `status.token`. The dashboard "
              "page itself stays open and is opened as `/#token=TOKEN`.")),
    FLD(status, tls_cert, FT_STRING, "",
        MEANS("PEM certificate (chain) file: with `tls_key` the status server speaks HTTPS only "
              "(TLS 1.2/1.3) (empty: plain HTTP).")),
    FLD(status, tls_key, FT_STRING, "",
        CHECK(chk_tls_pair, "set exactly when `status.tls_cert` is set"),
        MEANS("PEM private key file of `tls_cert`, unencrypted, accessible by its owner only "
              "(mode 0600 or 0400; refused otherwise).")),
    FLD(status, tls_ca, FT_STRING, "",
        MEANS("CA certificate file that `switchyard run` verifies its coordinator's HTTPS server "
              "with (empty: `tls_cert` itself, a self-signed certificate).")),
    FLD(status, metrics_expert_series, FT_INT, "1024", .rule = R_MIN, .lo = (0),
        MEANS("`/metrics` exports one `switchyard_expert_tokens{layer,expert}` series per Switch layer "
              "and expert when there are at most this many (layers × experts); above it, only the "
              "per-layer summary (`switchyard_layer_tokens_max`, `_min`, `switchyard_layer_imbalance`), "
              "which is always there. `/v1/status` keeps every expert's count either way.")),
};
#define N_FIELDS ((int)(sizeof FIELDS / sizeof FIELDS[0]))

/* Most fields in one section (sizes the YAML scratch structs). */
#define MAX_SECTION_FIELDS 32

#define AT(cfg, f, T) ((T *)(void *)((char *)(cfg) + (f)->offset))
#define CAT(cfg, f, T) ((const T *)(const void *)((const char *)(cfg) + (f)->offset))

/* ---------------------------------------------------------------------------------------- */
/* Cross-field and pattern rules                                                            */

static bool chk_name(const sy_config_t *c, char *why, size_t n) {
    const char *s = c->run.name;
    for (const char *p = s; *p; p++) {
        bool ok = (*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
                  (*p >= '0' && *p <= '9') || *p == '.' || *p == '_' || *p == '-';
        if (!ok) {
            snprintf(why, n, "must match [A-Za-z0-9._-]+ (it becomes an object-store key)");
            return false;
        }
    }
    if (!strcmp(s, ".") || !strcmp(s, "..")) {
        snprintf(why, n, "must not be \".\" or \"..\" (it becomes a folder name)");
        return false;
    }
    return true;
}

static bool chk_heads(const sy_config_t *c, char *why, size_t n) {
    if (c->model.d_model % c->model.n_heads == 0) return true;
    snprintf(why, n, "must be divisible by model.n_heads (%d)", c->model.n_heads);
    return false;
}

static bool chk_micro(const sy_config_t *c, char *why, size_t n) {
    if (c->train.global_batch_seqs % c->train.micro_batch_seqs == 0) return true;
    snprintf(why, n, "must be divisible by train.micro_batch_seqs (%d)", c->train.micro_batch_seqs);
    return false;
}

static bool chk_router_precision(const sy_config_t *c, char *why, size_t n) {
    if (c->model.router_precision == SY_PREC_FP32 || c->train.precision == SY_PREC_BF16) return true;
    snprintf(why, n, "a bf16 router is the ablation of bf16 training: it needs train.precision: bf16 (the router "
                     "is fp32 otherwise, model spec §4)");
    return false;
}

static bool chk_lr_min(const sy_config_t *c, char *why, size_t n) {
    char lr[32];
    if (c->train.lr_min <= c->train.lr) return true;
    fmt_double(lr, sizeof lr, c->train.lr);
    snprintf(why, n, "must be <= train.lr (%s)", lr);
    return false;
}

static bool chk_workers(const sy_config_t *c, char *why, size_t n) {
    if (c->cluster.min_workers <= c->cluster.max_workers) return true;
    snprintf(why, n, "must be <= cluster.max_workers (%d)", c->cluster.max_workers);
    return false;
}

static bool chk_failure(const sy_config_t *c, char *why, size_t n) {
    if (c->cluster.failure_timeout_ms > c->cluster.heartbeat_ms) return true;
    snprintf(why, n, "must be > cluster.heartbeat_ms (%d)", c->cluster.heartbeat_ms);
    return false;
}

/* A partial CURVE setup must not run in plaintext unnoticed. */
static bool has_text(const char *s) { return s && *s; }

static bool chk_comm(const sy_config_t *c, char *why, size_t n) {
    if (strcmp(c->cluster.comm, "nccl") != 0 || strcmp(c->cluster.backend, "cuda") == 0) return true;
    snprintf(why, n, "nccl moves device memory between GPU workers: it needs cluster.backend: cuda (with "
                     "cluster.backend: %s use cluster.comm: tcp or auto)", c->cluster.backend);
    return false;
}

static bool chk_cpulist(const sy_config_t *c, char *why, size_t n) {
    cpu_set_t set;
    return sy_cpulist_parse(c->cluster.replica_cpus, &set, why, n);
}

const char *sy_config_comm(const sy_config_t *cfg) {
    if (strcmp(cfg->cluster.comm, "auto") != 0) return cfg->cluster.comm;
    return strcmp(cfg->cluster.backend, "cuda") == 0 ? "nccl" : "tcp";
}

static bool chk_curve_on(const sy_config_t *c, char *why, size_t n) {
    if (has_text(c->cluster.curve_server_key)) return true;
    const char *other = has_text(c->cluster.curve_authorized_keys) ? "cluster.curve_authorized_keys"
                        : has_text(c->cluster.curve_server_public) ? "cluster.curve_server_public"
                        : has_text(c->cluster.curve_worker_key)    ? "cluster.curve_worker_key"
                                                              : NULL;
    if (!other) return true;
    snprintf(why, n, "must be set when %s is set (CURVE is on only with the coordinator's key)", other);
    return false;
}

static bool chk_tls_pair(const sy_config_t *c, char *why, size_t n) {
    if (has_text(c->status.tls_cert) == has_text(c->status.tls_key)) return true;
    snprintf(why, n, has_text(c->status.tls_cert) ? "must be set when status.tls_cert is set (HTTPS needs both)"
                                                  : "is set but status.tls_cert is not (HTTPS needs both)");
    return false;
}

static bool chk_curve_auth(const sy_config_t *c, char *why, size_t n) {
    if (!has_text(c->cluster.curve_server_key) || has_text(c->cluster.curve_authorized_keys)) return true;
    snprintf(why, n, "must be set when cluster.curve_server_key is set (the worker public keys to accept)");
    return false;
}

/* ---------------------------------------------------------------------------------------- */
/* Small helpers                                                                            */

static const field *find_field(const char *section, size_t section_len, const char *name);

static bool chk_token_file(const sy_config_t *c, char *why, size_t n) {
    if (!has_text(c->status.token_file) || !has_text(c->status.token)) return true;
    snprintf(why, n, "status.token is set too: give the token one way (the file, preferably)");
    return false;
}

static bool chk_resume_allow(const sy_config_t *c, char *why, size_t n) {
    for (int k = 0; k < c->run.resume_allow.n; k++) {
        const char *e = c->run.resume_allow.items[k], *dot = e ? strchr(e, '.') : NULL;
        if (!dot || !find_field(e, (size_t)(dot - e), dot + 1)) {
            snprintf(why, n, "entry '%s' is not a field (section.field)", e ? e : "");
            return false;
        }
    }
    return true;
}

static const field *find_field(const char *section, size_t section_len, const char *name) {
    for (int i = 0; i < N_FIELDS; i++)
        if (strlen(FIELDS[i].section) == section_len &&
            !strncmp(FIELDS[i].section, section, section_len) && !strcmp(FIELDS[i].name, name))
            return &FIELDS[i];
    return NULL;
}

static int find_section(const char *name) {
    for (int s = 0; s < N_SECTIONS; s++)
        if (!strcmp(SECTIONS[s].name, name)) return s;
    return -1;
}

/* "run, model, ..." or the fields of one section, for "unknown ..." messages. */
static void list_names(char *buf, size_t n, const char *section) {
    size_t used = 0;
    buf[0] = 0;
    if (!section) {
        for (int s = 0; s < N_SECTIONS && used < n; s++)
            used += (size_t)snprintf(buf + used, n - used, "%s%s", s ? ", " : "", SECTIONS[s].name);
        return;
    }
    bool first = true;
    for (int i = 0; i < N_FIELDS && used < n; i++) {
        if (strcmp(FIELDS[i].section, section)) continue;
        used += (size_t)snprintf(buf + used, n - used, "%s%s", first ? "" : ", ", FIELDS[i].name);
        first = false;
    }
}

static const char *type_name(const field *f) {
    switch (f->type) {
    case FT_INT: return "int";
    case FT_INT64: return "int64";
    case FT_UINT64: return "uint64";
    case FT_DOUBLE: return "float";
    case FT_BOOL: return "bool";
    case FT_STRING: return "string";
    case FT_ENUM: return "enum";
    case FT_STRLIST: return "string list";
    }
    return "?";
}

static size_t expected_size(ftype t) {
    switch (t) {
    case FT_INT: return sizeof(int);
    case FT_INT64: return sizeof(int64_t);
    case FT_UINT64: return sizeof(uint64_t);
    case FT_DOUBLE: return sizeof(double);
    case FT_BOOL: return sizeof(bool);
    case FT_STRING: return sizeof(char *);
    case FT_ENUM: return sizeof(int);
    case FT_STRLIST: return sizeof(sy_strlist);
    }
    return 0;
}

static int names_count(const char *const *names) {
    int k = 0;
    while (names && names[k]) k++;
    return k;
}

/* Shortest %g that reads back as the same double. */
static void fmt_double(char *buf, size_t n, double v) {
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, n, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) return;
    }
}

/* The value of f in cfg as text: for messages and the docs' default column. */
static void fmt_value(const sy_config_t *cfg, const field *f, char *buf, size_t n) {
    switch (f->type) {
    case FT_INT: snprintf(buf, n, "%d", *CAT(cfg, f, int)); return;
    case FT_INT64: snprintf(buf, n, "%" PRId64, *CAT(cfg, f, int64_t)); return;
    case FT_UINT64: snprintf(buf, n, "%" PRIu64, *CAT(cfg, f, uint64_t)); return;
    case FT_DOUBLE:
        fmt_double(buf, n, *CAT(cfg, f, double));
        if (!strpbrk(buf, ".eEn") && strlen(buf) + 3 <= n) strcat(buf, ".0"); /* 2 -> 2.0 */
        return;
    case FT_BOOL: snprintf(buf, n, "%s", *CAT(cfg, f, bool) ? "true" : "false"); return;
    case FT_STRING: {
        const char *s = *CAT(cfg, f, char *);
        if (s)
            snprintf(buf, n, "\"%s\"", s);
        else
            snprintf(buf, n, "(unset)");
        return;
    }
    case FT_ENUM: {
        int v = *CAT(cfg, f, int);
        if (v >= 0 && v < names_count(f->names))
            snprintf(buf, n, "%s", f->names[v]);
        else
            snprintf(buf, n, "%d", v);
        return;
    }
    case FT_STRLIST: {
        const sy_strlist *l = CAT(cfg, f, sy_strlist);
        size_t used = (size_t)snprintf(buf, n, "[");
        for (int i = 0; i < l->n && used < n; i++)
            used += (size_t)snprintf(buf + used, n - used, "%s\"%s\"", i ? ", " : "",
                                     l->items[i] ? l->items[i] : "");
        if (used < n) snprintf(buf + used, n - used, "]");
        return;
    }
    }
}

static void strlist_free(sy_strlist *l) {
    for (int i = 0; i < l->n; i++) free(l->items[i]);
    free(l->items);
    l->items = NULL;
    l->n = 0;
}

static sy_status strlist_dup(sy_strlist *dst, char *const *items, int n) {
    dst->items = NULL;
    dst->n = 0;
    if (n == 0) return SY_OK;
    dst->items = calloc((size_t)n, sizeof *dst->items);
    if (!dst->items) return SY_ENOMEM;
    for (int i = 0; i < n; i++) {
        dst->items[i] = strdup(items[i] ? items[i] : "");
        if (!dst->items[i]) {
            dst->n = i;
            strlist_free(dst);
            return SY_ENOMEM;
        }
    }
    dst->n = n;
    return SY_OK;
}

static sy_status set_string(sy_config_t *cfg, const field *f, const char *s) {
    char *dup = strdup(s);
    if (!dup) return SY_ENOMEM;
    free(*AT(cfg, f, char *));
    *AT(cfg, f, char *) = dup;
    return SY_OK;
}

static sy_status set_list(sy_config_t *cfg, const field *f, char *const *items, int n) {
    sy_strlist l;
    sy_status st = strlist_dup(&l, items, n);
    if (st != SY_OK) return st;
    strlist_free(AT(cfg, f, sy_strlist));
    *AT(cfg, f, sy_strlist) = l;
    return SY_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Parsing one value from text (defaults, YAML scalars, --set)                              */

static bool parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out, char *why, size_t n) {
    char *end;
    if (!*s || !(*s == '-' || *s == '+' || (*s >= '0' && *s <= '9'))) {
        snprintf(why, n, "expected an integer");
        return false;
    }
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (*end) {
        snprintf(why, n, "expected an integer");
        return false;
    }
    if (errno == ERANGE || v < lo || v > hi) {
        snprintf(why, n, "integer out of range [%" PRId64 ", %" PRId64 "]", lo, hi);
        return false;
    }
    *out = v;
    return true;
}

/* Parses text into f of cfg. On a bad value writes why and returns SY_EINVAL (cfg unchanged). */
static sy_status apply_text(sy_config_t *cfg, const field *f, const char *s, char *why, size_t n) {
    switch (f->type) {
    case FT_INT: {
        int64_t v;
        if (!parse_i64(s, INT_MIN, INT_MAX, &v, why, n)) return SY_EINVAL;
        *AT(cfg, f, int) = (int)v;
        return SY_OK;
    }
    case FT_INT64: {
        int64_t v;
        if (!parse_i64(s, INT64_MIN, INT64_MAX, &v, why, n)) return SY_EINVAL;
        *AT(cfg, f, int64_t) = v;
        return SY_OK;
    }
    case FT_UINT64: {
        char *end;
        if (!(*s >= '0' && *s <= '9')) {
            snprintf(why, n, "expected a non-negative integer");
            return SY_EINVAL;
        }
        errno = 0;
        unsigned long long v = strtoull(s, &end, 10);
        if (*end) {
            snprintf(why, n, "expected a non-negative integer");
            return SY_EINVAL;
        }
        if (errno == ERANGE) {
            snprintf(why, n, "integer out of range [0, %" PRIu64 "]", UINT64_MAX);
            return SY_EINVAL;
        }
        *AT(cfg, f, uint64_t) = v;
        return SY_OK;
    }
    case FT_DOUBLE: {
        char *end;
        errno = 0;
        double v = strtod(s, &end);
        if (!*s || *end || end == s || *s == ' ' || *s == '\t') {
            snprintf(why, n, "expected a number");
            return SY_EINVAL;
        }
        if (!isfinite(v) || errno == ERANGE) {
            snprintf(why, n, "expected a finite number");
            return SY_EINVAL;
        }
        *AT(cfg, f, double) = v;
        return SY_OK;
    }
    case FT_BOOL: {
        static const char *const yes[] = {"true", "yes", "on", "1"};
        static const char *const no[] = {"false", "no", "off", "0"};
        for (size_t i = 0; i < sizeof yes / sizeof yes[0]; i++) {
            if (!strcasecmp(s, yes[i])) {
                *AT(cfg, f, bool) = true;
                return SY_OK;
            }
            if (!strcasecmp(s, no[i])) {
                *AT(cfg, f, bool) = false;
                return SY_OK;
            }
        }
        snprintf(why, n, "expected a bool (true/false, yes/no, on/off, 1/0)");
        return SY_EINVAL;
    }
    case FT_ENUM: {
        for (int i = 0; f->names[i]; i++)
            if (!strcmp(s, f->names[i])) {
                *AT(cfg, f, int) = i;
                return SY_OK;
            }
        size_t used = (size_t)snprintf(why, n, "expected one of");
        for (int i = 0; f->names[i] && used < n; i++)
            used += (size_t)snprintf(why + used, n - used, "%s %s", i ? "," : "", f->names[i]);
        return SY_EINVAL;
    }
    case FT_STRING:
        if (set_string(cfg, f, s) != SY_OK) {
            snprintf(why, n, "out of memory");
            return SY_ENOMEM;
        }
        return SY_OK;
    case FT_STRLIST: {
        /* Comma-separated; "" is the empty list. */
        char *copy = strdup(s);
        char **items = NULL;
        int count = 0;
        sy_status st = SY_ENOMEM;
        if (!copy) goto out;
        if (*copy) {
            count = 1;
            for (const char *p = copy; *p; p++) count += *p == ',';
            items = calloc((size_t)count, sizeof *items);
            if (!items) goto out;
            int k = 0;
            char *save = copy;
            for (char *p = copy;; p++) {
                if (*p == ',' || *p == 0) {
                    bool last = *p == 0;
                    *p = 0;
                    items[k++] = save;
                    save = p + 1;
                    if (last) break;
                }
            }
        }
        st = set_list(cfg, f, items, count);
    out:
        if (st != SY_OK) snprintf(why, n, "out of memory");
        free(items);
        free(copy);
        return st;
    }
    }
    snprintf(why, n, "internal: unknown field type");
    return SY_EINTERNAL;
}

/* ---------------------------------------------------------------------------------------- */
/* Defaults, copy, free, equal                                                              */

void sy_config_free(sy_config_t *cfg) {
    if (!cfg) return;
    for (int i = 0; i < N_FIELDS; i++) {
        const field *f = &FIELDS[i];
        if (f->type == FT_STRING) {
            free(*AT(cfg, f, char *));
            *AT(cfg, f, char *) = NULL;
        } else if (f->type == FT_STRLIST) {
            strlist_free(AT(cfg, f, sy_strlist));
        }
    }
}

sy_status sy_config_defaults(sy_config_t *cfg) {
    char why[256];
    memset(cfg, 0, sizeof *cfg);
    for (int i = 0; i < N_FIELDS; i++) {
        const field *f = &FIELDS[i];
        if (f->size != expected_size(f->type)) {
            sy_config_free(cfg);
            return sy_err_set(SY_EINTERNAL, "config table: %s.%s has size %zu, type %s wants %zu",
                              f->section, f->name, f->size, type_name(f), expected_size(f->type));
        }
        sy_status st = apply_text(cfg, f, f->def, why, sizeof why);
        if (st != SY_OK) {
            sy_config_free(cfg);
            if (st == SY_ENOMEM) return sy_err_set(st, "config defaults: out of memory");
            return sy_err_set(SY_EINTERNAL, "config table: default of %s.%s = %s: %s", f->section,
                              f->name, f->def, why);
        }
    }
    return SY_OK;
}

sy_status sy_config_copy(sy_config_t *dst, const sy_config_t *src) {
    memcpy(dst, src, sizeof *dst);
    for (int i = 0; i < N_FIELDS; i++) {
        const field *f = &FIELDS[i];
        if (f->type == FT_STRING) *AT(dst, f, char *) = NULL;
        if (f->type == FT_STRLIST) *AT(dst, f, sy_strlist) = (sy_strlist){NULL, 0};
    }
    for (int i = 0; i < N_FIELDS; i++) {
        const field *f = &FIELDS[i];
        sy_status st = SY_OK;
        if (f->type == FT_STRING && *CAT(src, f, char *))
            st = set_string(dst, f, *CAT(src, f, char *));
        else if (f->type == FT_STRLIST)
            st = set_list(dst, f, CAT(src, f, sy_strlist)->items, CAT(src, f, sy_strlist)->n);
        if (st != SY_OK) {
            sy_config_free(dst);
            return sy_err_set(st, "config copy: out of memory");
        }
    }
    return SY_OK;
}

static bool str_eq(const char *a, const char *b) {
    if (!a || !b) return a == b;
    return !strcmp(a, b);
}

bool sy_config_equal(const sy_config_t *a, const sy_config_t *b) {
    for (int i = 0; i < N_FIELDS; i++) {
        const field *f = &FIELDS[i];
        switch (f->type) {
        case FT_INT:
        case FT_ENUM:
            if (*CAT(a, f, int) != *CAT(b, f, int)) return false;
            break;
        case FT_INT64:
            if (*CAT(a, f, int64_t) != *CAT(b, f, int64_t)) return false;
            break;
        case FT_UINT64:
            if (*CAT(a, f, uint64_t) != *CAT(b, f, uint64_t)) return false;
            break;
        case FT_DOUBLE:
            if (*CAT(a, f, double) != *CAT(b, f, double)) return false;
            break;
        case FT_BOOL:
            if (*CAT(a, f, bool) != *CAT(b, f, bool)) return false;
            break;
        case FT_STRING:
            if (!str_eq(*CAT(a, f, char *), *CAT(b, f, char *))) return false;
            break;
        case FT_STRLIST: {
            const sy_strlist *la = CAT(a, f, sy_strlist), *lb = CAT(b, f, sy_strlist);
            if (la->n != lb->n) return false;
            for (int k = 0; k < la->n; k++)
                if (!str_eq(la->items[k], lb->items[k])) return false;
            break;
        }
        }
    }
    return true;
}

/* ---------------------------------------------------------------------------------------- */
/* --set                                                                                    */

sy_status sy_config_set(sy_config_t *cfg, const char *assignment) {
    char why[256];
    const char *eq = assignment ? strchr(assignment, '=') : NULL;
    if (!eq)
        return sy_err_set(SY_EINVAL, "--set %s: expected section.field=value",
                          assignment ? assignment : "(null)");
    const char *dot = memchr(assignment, '.', (size_t)(eq - assignment));
    if (!dot)
        return sy_err_set(SY_EINVAL, "--set %s: expected section.field=value", assignment);
    char name[128];
    size_t name_len = (size_t)(eq - dot - 1);
    if (name_len >= sizeof name)
        return sy_err_set(SY_EINVAL, "--set %s: unknown field %.*s", assignment,
                          (int)(eq - assignment), assignment);
    memcpy(name, dot + 1, name_len);
    name[name_len] = 0;
    const field *f = find_field(assignment, (size_t)(dot - assignment), name);
    if (!f) {
        char known[512], section[64];
        snprintf(section, sizeof section, "%.*s", (int)(dot - assignment), assignment);
        if (find_section(section) < 0) {
            list_names(known, sizeof known, NULL);
            return sy_err_set(SY_EINVAL, "--set %s: unknown section %s (sections: %s)", assignment,
                              section, known);
        }
        list_names(known, sizeof known, section);
        return sy_err_set(SY_EINVAL, "--set %s: unknown field %s.%s (fields of %s: %s)",
                          assignment, section, name, section, known);
    }
    sy_status st = apply_text(cfg, f, eq + 1, why, sizeof why);
    if (st != SY_OK) return sy_err_set(st, "--set %s: %s", assignment, why);
    return SY_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Validation                                                                               */

static void range_text(const field *f, char *buf, size_t n) {
    char lo[32], hi[32];
    fmt_double(lo, sizeof lo, f->lo);
    fmt_double(hi, sizeof hi, f->hi);
    buf[0] = 0;
    if ((f->rule & R_MIN) && (f->rule & R_MAX))
        snprintf(buf, n, "in %s%s, %s%s", (f->rule & R_MIN_EXCL) ? "(" : "[", lo, hi,
                 (f->rule & R_MAX_EXCL) ? ")" : "]");
    else if (f->rule & R_MIN)
        snprintf(buf, n, "%s %s", (f->rule & R_MIN_EXCL) ? ">" : ">=", lo);
    else if (f->rule & R_MAX)
        snprintf(buf, n, "%s %s", (f->rule & R_MAX_EXCL) ? "<" : "<=", hi);
}

static double numeric_value(const sy_config_t *cfg, const field *f) {
    switch (f->type) {
    case FT_INT: return *CAT(cfg, f, int);
    case FT_INT64: return (double)*CAT(cfg, f, int64_t);
    case FT_UINT64: return (double)*CAT(cfg, f, uint64_t);
    case FT_DOUBLE: return *CAT(cfg, f, double);
    default: return 0;
    }
}

/* Per-field rules: range, allowed names, non-empty. Writes why on failure. */
static bool check_field(const sy_config_t *cfg, const field *f, char *why, size_t n) {
    if (f->rule & (R_MIN | R_MAX)) {
        double v = numeric_value(cfg, f);
        bool ok = true;
        if (f->rule & R_MIN) ok = ok && ((f->rule & R_MIN_EXCL) ? v > f->lo : v >= f->lo);
        if (f->rule & R_MAX) ok = ok && ((f->rule & R_MAX_EXCL) ? v < f->hi : v <= f->hi);
        if (!ok) {
            char r[96];
            range_text(f, r, sizeof r);
            snprintf(why, n, "must be %s", r);
            return false;
        }
    }
    if (f->type == FT_ENUM) {
        int v = *CAT(cfg, f, int);
        if (v < 0 || v >= names_count(f->names)) {
            snprintf(why, n, "must be one of the names listed in the docs");
            return false;
        }
    }
    if (f->type == FT_STRING) {
        const char *s = *CAT(cfg, f, char *);
        if (!s) {
            snprintf(why, n, "must be set");
            return false;
        }
        if ((f->rule & R_NONEMPTY) && !*s) {
            snprintf(why, n, "must not be empty");
            return false;
        }
        if (f->names) {
            bool found = false;
            for (int i = 0; f->names[i]; i++) found = found || !strcmp(s, f->names[i]);
            if (!found) {
                size_t used = (size_t)snprintf(why, n, "must be one of");
                for (int i = 0; f->names[i] && used < n; i++)
                    used += (size_t)snprintf(why + used, n - used, "%s %s", i ? "," : "",
                                             f->names[i]);
                return false;
            }
        }
    }
    if (f->type == FT_STRLIST && (f->rule & R_NONEMPTY)) {
        const sy_strlist *l = CAT(cfg, f, sy_strlist);
        if (l->n < 1) {
            snprintf(why, n, "must list at least one entry");
            return false;
        }
        for (int k = 0; k < l->n; k++)
            if (!l->items[k] || !*l->items[k]) {
                snprintf(why, n, "entry %d must not be empty", k);
                return false;
            }
    }
    return true;
}

sy_status sy_config_validate(const sy_config_t *cfg) {
    char why[256], val[512];
    /* Pass 1: every per-field rule, so pass 2's cross-field rules never see e.g. n_heads 0. */
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < N_FIELDS; i++) {
            const field *f = &FIELDS[i];
            why[0] = 0;
            bool ok = pass == 0 ? check_field(cfg, f, why, sizeof why)
                                : (!f->check || f->check(cfg, why, sizeof why));
            if (!ok) {
                /* a check that says nothing itself: the rule the documentation gives */
                if (!why[0]) snprintf(why, sizeof why, "must be: %s", f->check_rule ? f->check_rule : "valid");
                fmt_value(cfg, f, val, sizeof val);
                return sy_err_set(SY_EINVAL, "%s.%s = %s: %s", f->section, f->name, val, why);
            }
        }
    }
    return SY_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* YAML                                                                                     */

/* The document libcyaml fills: per section, one optional string or string list per field,
 * indexed by the field's position within its section. NULL = absent. */
typedef struct {
    char *val[MAX_SECTION_FIELDS];
    char **list[MAX_SECTION_FIELDS];
    unsigned count[MAX_SECTION_FIELDS];
} yaml_section;

typedef struct {
    yaml_section *sec[N_SECTIONS];
} yaml_doc;

typedef struct {
    cyaml_schema_value_t str_entry;
    cyaml_schema_field_t fields[N_SECTIONS][MAX_SECTION_FIELDS + 1];
    const field *which[N_SECTIONS][MAX_SECTION_FIELDS];
    cyaml_schema_field_t top_fields[N_SECTIONS + 1];
    cyaml_schema_value_t top;
} yaml_schema;

static sy_status build_schema(yaml_schema *y) {
    memset(y, 0, sizeof *y);
    y->str_entry = (cyaml_schema_value_t){
        CYAML_VALUE_STRING(CYAML_FLAG_POINTER, char, 0, CYAML_UNLIMITED)};
    for (int s = 0; s < N_SECTIONS; s++) {
        int k = 0;
        for (int i = 0; i < N_FIELDS; i++) {
            const field *f = &FIELDS[i];
            if (strcmp(f->section, SECTIONS[s].name)) continue;
            if (k >= MAX_SECTION_FIELDS)
                return sy_err_set(SY_EINTERNAL, "config: section %s has over %d fields",
                                  SECTIONS[s].name, MAX_SECTION_FIELDS);
            cyaml_schema_field_t *sf = &y->fields[s][k];
            y->which[s][k] = f;
            sf->key = f->name;
            if (f->type == FT_STRLIST) {
                sf->data_offset = (uint32_t)offsetof(yaml_section, list[k]);
                sf->count_offset = (uint32_t)offsetof(yaml_section, count[k]);
                sf->count_size = (uint8_t)sizeof(unsigned);
                sf->value.type = CYAML_SEQUENCE;
                sf->value.flags = CYAML_FLAG_POINTER | CYAML_FLAG_OPTIONAL;
                sf->value.data_size = sizeof(char *);
                sf->value.sequence.entry = &y->str_entry;
                sf->value.sequence.min = 0;
                sf->value.sequence.max = CYAML_UNLIMITED;
            } else {
                sf->data_offset = (uint32_t)offsetof(yaml_section, val[k]);
                sf->value = (cyaml_schema_value_t){CYAML_VALUE_STRING(
                    CYAML_FLAG_POINTER | CYAML_FLAG_OPTIONAL, char, 0, CYAML_UNLIMITED)};
            }
            k++;
        }
        cyaml_schema_field_t *tf = &y->top_fields[s];
        tf->key = SECTIONS[s].name;
        tf->data_offset = (uint32_t)offsetof(yaml_doc, sec[s]);
        tf->value.type = CYAML_MAPPING;
        /* POINTER_NULL: an empty section ("run:") is accepted as absent. */
        tf->value.flags = CYAML_FLAG_POINTER_NULL | CYAML_FLAG_OPTIONAL;
        tf->value.data_size = sizeof(yaml_section);
        tf->value.mapping.fields = y->fields[s];
    }
    y->top = (cyaml_schema_value_t){CYAML_VALUE_MAPPING(CYAML_FLAG_POINTER, yaml_doc, y->top_fields)};
    return SY_OK;
}

/* What libcyaml logged about the failure: the first error line, the dotted path of mapping
 * fields from its backtrace, and the innermost location. */
typedef struct {
    char first[256];
    char path[256];
    char where[64];
    bool in_backtrace;
} yaml_log;

static void yaml_log_fn(cyaml_log_t level, void *ctx, const char *fmt, va_list args) {
    yaml_log *lg = ctx;
    char line[512];
    if (level < CYAML_LOG_ERROR) return;
    vsnprintf(line, sizeof line, fmt, args);
    size_t len = strlen(line);
    while (len && (line[len - 1] == '\n' || line[len - 1] == ' ')) line[--len] = 0;
    const char *p = line;
    if (!strncmp(p, "Load: ", 6)) p += 6;
    if (!strcmp(p, "Backtrace:")) {
        lg->in_backtrace = true;
        return;
    }
    if (!lg->in_backtrace) {
        if (!lg->first[0]) snprintf(lg->first, sizeof lg->first, "%.*s", (int)sizeof lg->first - 1, p);
        return;
    }
    const char *loc = strstr(p, "(line:");
    if (loc && !lg->where[0]) snprintf(lg->where, sizeof lg->where, "%.*s", (int)sizeof lg->where - 1, loc);
    const char *key = strstr(p, "in mapping field '");
    if (key) {
        key += strlen("in mapping field '");
        const char *end = strchr(key, '\'');
        if (!end) return;
        /* Backtraces run innermost first: prepend "key." to the path. */
        size_t klen = (size_t)(end - key), plen = strlen(lg->path);
        size_t add = klen + (plen ? 1 : 0);
        if (plen + add + 1 > sizeof lg->path) return;
        memmove(lg->path + add, lg->path, plen + 1);
        memcpy(lg->path, key, klen);
        if (plen) lg->path[klen] = '.';
    }
}

static const char *event_noun(const char *msg) {
    if (strstr(msg, "SEQUENCE_START")) return "a list";
    if (strstr(msg, "MAPPING_START")) return "a mapping";
    if (strstr(msg, "SCALAR")) return "a single value";
    return NULL;
}

/* Turns libcyaml's log into one message naming the file and the field. */
static sy_status yaml_error(const char *path, const yaml_log *lg, cyaml_err_t err) {
    const char *what = lg->first[0] ? lg->first : cyaml_strerror(err);
    const char *where = lg->where[0] ? lg->where : "";
    char known[512];
    const char *key = "Unexpected key: ";
    if (!strncmp(what, key, strlen(key))) {
        const char *name = what + strlen(key);
        if (!lg->path[0]) {
            list_names(known, sizeof known, NULL);
            return sy_err_set(SY_EINVAL, "%s: unknown section '%s' %s (sections: %s)", path, name,
                              where, known);
        }
        list_names(known, sizeof known, lg->path);
        return sy_err_set(SY_EINVAL, "%s: unknown field %s.%s %s (fields of %s: %s)", path,
                          lg->path, name, where, lg->path, known);
    }
    const char *dup = "Mapping field already seen: ";
    if (!strncmp(what, dup, strlen(dup)))
        return sy_err_set(SY_EINVAL, "%s: %s: given twice %s", path, lg->path, where);
    const char *got = event_noun(what);
    if (!strncmp(what, "Expecting ", 10) && got) {
        const char *dot = strchr(lg->path, '.');
        if (!dot && lg->path[0])
            return sy_err_set(SY_EINVAL, "%s: section %s: expected a mapping of fields, got %s %s",
                              path, lg->path, got, where);
        if (dot) {
            const field *f = find_field(lg->path, (size_t)(dot - lg->path), dot + 1);
            if (f)
                return sy_err_set(SY_EINVAL, "%s: %s: expected %s, got %s %s", path, lg->path,
                                  f->type == FT_STRLIST ? "a list of strings"
                                                        : "a single value",
                                  got, where);
        }
        if (!lg->path[0])
            return sy_err_set(SY_EINVAL, "%s: expected a mapping of sections, got %s", path, got);
    }
    return sy_err_set(SY_EINVAL, "%s: %s%s%s %s", path, lg->path, lg->path[0] ? ": " : "", what,
                      where);
}

/* libcyaml loads "val: []" and an absent "val" alike (NULL, count 0), but an explicit empty
 * list must replace the default. libyaml's event stream (libcyaml's own parser) tells them
 * apart: marks empty[s][k] for each "section: {field: []}". Runs only on a document libcyaml
 * has already accepted, so the shape is known: mapping of mappings of scalars or sequences. */
static void find_empty_lists(const char *text, size_t len, const yaml_schema *schema,
                             bool empty[N_SECTIONS][MAX_SECTION_FIELDS]) {
    enum { MAX_DEPTH = 8 };
    yaml_parser_t parser;
    bool is_map[MAX_DEPTH] = {false}, expect_key[MAX_DEPTH] = {false};
    int depth = 0, sec = -1, fld = -1;
    bool pending_seq = false, done = false;
    if (!yaml_parser_initialize(&parser)) return;
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    while (!done) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&parser, &ev)) break;
        if (pending_seq && ev.type == YAML_SEQUENCE_END_EVENT && sec >= 0 && fld >= 0)
            empty[sec][fld] = true;
        pending_seq = false;
        switch (ev.type) {
        case YAML_MAPPING_START_EVENT:
        case YAML_SEQUENCE_START_EVENT:
            if (depth > 0 && is_map[depth]) expect_key[depth] = true; /* this was a value */
            if (ev.type == YAML_SEQUENCE_START_EVENT && depth == 2 && is_map[2]) pending_seq = true;
            if (++depth >= MAX_DEPTH) done = true;
            else {
                is_map[depth] = ev.type == YAML_MAPPING_START_EVENT;
                expect_key[depth] = true;
            }
            break;
        case YAML_MAPPING_END_EVENT:
        case YAML_SEQUENCE_END_EVENT:
            depth--;
            break;
        case YAML_SCALAR_EVENT:
        case YAML_ALIAS_EVENT:
            if (depth < 1 || !is_map[depth]) break;
            if (!expect_key[depth]) {
                expect_key[depth] = true;
                break;
            }
            expect_key[depth] = false;
            if (ev.type != YAML_SCALAR_EVENT) break;
            if (depth == 1) {
                sec = find_section((const char *)ev.data.scalar.value);
                fld = -1;
            } else if (depth == 2 && sec >= 0) {
                fld = -1;
                for (int k = 0; k < MAX_SECTION_FIELDS && schema->which[sec][k]; k++)
                    if (!strcmp(schema->which[sec][k]->name, (const char *)ev.data.scalar.value))
                        fld = k;
            }
            break;
        case YAML_STREAM_END_EVENT:
            done = true;
            break;
        default:
            break;
        }
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&parser);
}

#define SY_CONFIG_MAX_FILE (16u << 20)

static sy_status read_file(const char *path, char **out, size_t *len) {
    sy_status st = SY_OK;
    char *buf = NULL;
    size_t used = 0, cap = 0;
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return sy_err_set(errno == ENOENT ? SY_ENOTFOUND : SY_EIO, "config file %s: %s", path,
                          strerror(errno));
    for (;;) {
        if (used == cap) {
            if (cap >= SY_CONFIG_MAX_FILE) {
                st = sy_err_set(SY_EINVAL, "config file %s: larger than %u bytes", path,
                                SY_CONFIG_MAX_FILE);
                goto out;
            }
            cap = cap ? cap * 2 : 4096;
            char *nb = realloc(buf, cap);
            if (!nb) {
                st = sy_err_set(SY_ENOMEM, "config file %s: out of memory", path);
                goto out;
            }
            buf = nb;
        }
        size_t got = fread(buf + used, 1, cap - used, fp);
        used += got;
        if (got == 0) {
            if (ferror(fp)) st = sy_err_set(SY_EIO, "config file %s: read error", path);
            break;
        }
    }
out:
    fclose(fp);
    if (st != SY_OK) {
        free(buf);
        return st;
    }
    *out = buf;
    *len = used;
    return SY_OK;
}

sy_status sy_config_load(sy_config_t *cfg, const char *path) {
    sy_status st = SY_OK;
    char *text = NULL;
    size_t len = 0;
    yaml_schema *schema = NULL;
    yaml_doc *doc = NULL;
    yaml_log lg;
    sy_config_t tmp;
    bool have_tmp = false;
    char why[256];
    bool empty_list[N_SECTIONS][MAX_SECTION_FIELDS];
    memset(&lg, 0, sizeof lg);
    cyaml_config_t ycfg = {
        .log_fn = yaml_log_fn,
        .log_ctx = &lg,
        .mem_fn = cyaml_mem,
        .log_level = CYAML_LOG_ERROR,
        .flags = CYAML_CFG_DEFAULT,
    };

    SY_CHECK_GOTO(read_file(path, &text, &len), st, out);
    schema = malloc(sizeof *schema);
    if (!schema) {
        st = sy_err_set(SY_ENOMEM, "config file %s: out of memory", path);
        goto out;
    }
    SY_CHECK_GOTO(build_schema(schema), st, out);
    cyaml_err_t err = cyaml_load_data((const uint8_t *)text, len, &ycfg, &schema->top,
                                      (cyaml_data_t **)&doc, NULL);
    if (err != CYAML_OK) {
        st = err == CYAML_ERR_OOM ? sy_err_set(SY_ENOMEM, "config file %s: out of memory", path)
                                  : yaml_error(path, &lg, err);
        doc = NULL;
        goto out;
    }
    memset(empty_list, 0, sizeof empty_list);
    find_empty_lists(text, len, schema, empty_list);
    SY_CHECK_GOTO(sy_config_copy(&tmp, cfg), st, out);
    have_tmp = true;
    for (int s = 0; doc && s < N_SECTIONS; s++) {
        const yaml_section *ys = doc->sec[s];
        if (!ys) continue;
        for (int k = 0; k < MAX_SECTION_FIELDS && schema->which[s][k]; k++) {
            const field *f = schema->which[s][k];
            if (f->type == FT_STRLIST) {
                if (!ys->list[k] && ys->count[k] == 0 && !empty_list[s][k]) continue;
                st = set_list(&tmp, f, ys->list[k], (int)ys->count[k]);
                if (st != SY_OK) {
                    sy_err_set(st, "config file %s: out of memory", path);
                    goto out;
                }
            } else if (ys->val[k]) {
                st = apply_text(&tmp, f, ys->val[k], why, sizeof why);
                if (st != SY_OK) {
                    sy_err_set(st, "%s: %s.%s = %s: %s", path, f->section, f->name, ys->val[k],
                               why);
                    goto out;
                }
            }
        }
    }
    sy_config_free(cfg);
    *cfg = tmp;
    have_tmp = false;
out:
    if (have_tmp) sy_config_free(&tmp);
    if (doc) cyaml_free(&ycfg, &schema->top, doc, 0);
    free(schema);
    free(text);
    return st;
}

/* ---------------------------------------------------------------------------------------- */
/* JSON                                                                                     */

json_t *sy_config_to_json(const sy_config_t *cfg) {
    json_t *root = json_object();
    if (!root) return NULL;
    for (int s = 0; s < N_SECTIONS; s++) {
        json_t *sec = json_object();
        if (!sec || json_object_set_new(root, SECTIONS[s].name, sec)) goto fail;
        for (int i = 0; i < N_FIELDS; i++) {
            const field *f = &FIELDS[i];
            if (strcmp(f->section, SECTIONS[s].name) || (f->rule & R_SECRET)) continue;
            json_t *v = NULL;
            switch (f->type) {
            case FT_INT: v = json_integer(*CAT(cfg, f, int)); break;
            case FT_INT64: v = json_integer(*CAT(cfg, f, int64_t)); break;
            case FT_UINT64: {
                uint64_t u = *CAT(cfg, f, uint64_t);
                if (u <= (uint64_t)INT64_MAX) {
                    v = json_integer((json_int_t)u);
                } else {
                    char buf[32];
                    snprintf(buf, sizeof buf, "%" PRIu64, u);
                    v = json_string(buf);
                }
                break;
            }
            case FT_DOUBLE: v = json_real(*CAT(cfg, f, double)); break;
            case FT_BOOL: v = json_boolean(*CAT(cfg, f, bool)); break;
            case FT_STRING: {
                const char *str = *CAT(cfg, f, char *);
                v = str ? json_string(str) : json_null();
                break;
            }
            case FT_ENUM: {
                int e = *CAT(cfg, f, int);
                v = (e >= 0 && e < names_count(f->names)) ? json_string(f->names[e])
                                                           : json_integer(e);
                break;
            }
            case FT_STRLIST: {
                const sy_strlist *l = CAT(cfg, f, sy_strlist);
                v = json_array();
                for (int k = 0; v && k < l->n; k++)
                    if (json_array_append_new(v, json_string(l->items[k] ? l->items[k] : ""))) {
                        json_decref(v);
                        v = NULL;
                    }
                break;
            }
            }
            if (!v || json_object_set_new(sec, f->name, v)) goto fail;
        }
    }
    return root;
fail:
    json_decref(root);
    return NULL;
}

/* Applies one JSON value to f of cfg; writes why on a type error. */
static sy_status apply_json(sy_config_t *cfg, const field *f, json_t *v, char *why, size_t n) {
    switch (f->type) {
    case FT_INT:
    case FT_INT64: {
        if (!json_is_integer(v)) break;
        json_int_t x = json_integer_value(v);
        if (f->type == FT_INT && (x < INT_MIN || x > INT_MAX)) {
            snprintf(why, n, "integer out of range [%d, %d]", INT_MIN, INT_MAX);
            return SY_EINVAL;
        }
        if (f->type == FT_INT)
            *AT(cfg, f, int) = (int)x;
        else
            *AT(cfg, f, int64_t) = x;
        return SY_OK;
    }
    case FT_UINT64:
        if (json_is_integer(v) && json_integer_value(v) >= 0) {
            *AT(cfg, f, uint64_t) = (uint64_t)json_integer_value(v);
            return SY_OK;
        }
        if (json_is_string(v)) return apply_text(cfg, f, json_string_value(v), why, n);
        snprintf(why, n, "expected a non-negative integer");
        return SY_EINVAL;
    case FT_DOUBLE:
        if (!json_is_number(v)) {
            snprintf(why, n, "expected a number");
            return SY_EINVAL;
        }
        *AT(cfg, f, double) = json_number_value(v);
        return SY_OK;
    case FT_BOOL:
        if (!json_is_boolean(v)) {
            snprintf(why, n, "expected true or false");
            return SY_EINVAL;
        }
        *AT(cfg, f, bool) = json_is_true(v);
        return SY_OK;
    case FT_STRING:
    case FT_ENUM:
        if (!json_is_string(v)) {
            snprintf(why, n, "expected a string");
            return SY_EINVAL;
        }
        return apply_text(cfg, f, json_string_value(v), why, n);
    case FT_STRLIST: {
        if (!json_is_array(v)) {
            snprintf(why, n, "expected an array of strings");
            return SY_EINVAL;
        }
        size_t count = json_array_size(v);
        if (count > INT_MAX) break;
        char **items = calloc(count ? count : 1, sizeof *items);
        if (!items) {
            snprintf(why, n, "out of memory");
            return SY_ENOMEM;
        }
        for (size_t k = 0; k < count; k++) {
            json_t *e = json_array_get(v, k);
            if (!json_is_string(e)) {
                free(items);
                snprintf(why, n, "expected an array of strings (entry %zu is not a string)", k);
                return SY_EINVAL;
            }
            items[k] = (char *)json_string_value(e);
        }
        sy_status st = set_list(cfg, f, items, (int)count);
        free(items);
        if (st != SY_OK) snprintf(why, n, "out of memory");
        return st;
    }
    }
    snprintf(why, n, "expected an integer");
    return SY_EINVAL;
}

sy_status sy_config_from_json(sy_config_t *cfg, const json_t *obj) {
    sy_config_t tmp;
    sy_status st = SY_OK;
    char why[256];
    const char *sname, *fname;
    json_t *sec, *v;
    if (!json_is_object(obj))
        return sy_err_set(SY_EINVAL, "config JSON: expected an object of sections");
    SY_CHECK(sy_config_copy(&tmp, cfg));
    json_object_foreach((json_t *)obj, sname, sec) {
        if (find_section(sname) < 0) {
            char known[256];
            list_names(known, sizeof known, NULL);
            st = sy_err_set(SY_EINVAL, "config JSON: unknown section '%s' (sections: %s)", sname,
                            known);
            goto out;
        }
        if (!json_is_object(sec)) {
            st = sy_err_set(SY_EINVAL, "config JSON: section %s: expected an object", sname);
            goto out;
        }
        json_object_foreach(sec, fname, v) {
            const field *f = find_field(sname, strlen(sname), fname);
            if (!f) {
                char known[512];
                list_names(known, sizeof known, sname);
                st = sy_err_set(SY_EINVAL, "config JSON: unknown field %s.%s (fields of %s: %s)",
                                sname, fname, sname, known);
                goto out;
            }
            st = apply_json(&tmp, f, v, why, sizeof why);
            if (st != SY_OK) {
                char *text = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
                sy_err_set(st, "config JSON: %s.%s = %s: %s", sname, fname, text ? text : "?",
                           why);
                free(text);
                goto out;
            }
        }
    }
    sy_config_free(cfg);
    *cfg = tmp;
    return SY_OK;
out:
    sy_config_free(&tmp);
    return st;
}

/* ---------------------------------------------------------------------------------------- */
/* Markdown reference                                                                       */

/* Fields that may differ from a checkpoint's config on resume: marked R_RESUME, or in a section
 * that only says where and how the run is done (checkpoint, cluster, status). */
static bool resume_free(const field *f) {
    return (f->rule & R_RESUME) || !strcmp(f->section, "checkpoint") || !strcmp(f->section, "cluster") ||
           !strcmp(f->section, "status");
}

sy_status sy_config_check_resume(const sy_config_t *cfg, const json_t *saved, const char *what) {
    if (!json_is_object(saved)) return sy_err_set(SY_ECORRUPT, "%s: no config recorded", what);
    json_t *now = sy_config_to_json(cfg);
    if (!now) return sy_err_set(SY_ENOMEM, "out of memory");
    sy_status st = SY_OK;
    for (int i = 0; i < N_FIELDS && st == SY_OK; i++) {
        const field *f = &FIELDS[i];
        if (resume_free(f) || (f->rule & R_SECRET)) continue;
        char full[160];
        snprintf(full, sizeof full, "%s.%s", f->section, f->name);
        bool allowed = false;
        for (int k = 0; k < cfg->run.resume_allow.n; k++) allowed |= !strcmp(cfg->run.resume_allow.items[k], full);
        if (allowed) continue;
        const json_t *a = json_object_get(json_object_get(now, f->section), f->name),
                     *b = json_object_get(json_object_get(saved, f->section), f->name);
        json_t *legacy = NULL;
        if (!b) { /* a field newer than the checkpoint: the value such runs had, if it matters */
            if (!f->legacy) continue;
            b = legacy = json_string(f->legacy);
            if (!legacy) {
                st = sy_err_set(SY_ENOMEM, "out of memory");
                break;
            }
        }
        if (a && json_equal((json_t *)a, (json_t *)b)) {
            json_decref(legacy);
            continue;
        }
        char *av = a ? json_dumps(a, JSON_ENCODE_ANY | JSON_COMPACT) : NULL,
             *bv = json_dumps(b, JSON_ENCODE_ANY | JSON_COMPACT);
        st = sy_err_set(SY_EINVAL, "resume: %s is %.200s here but %.200s in %s; it changes the model or the data "
                        "order, so the run would not continue the same training%s. Use the checkpoint's value "
                        "(--set %s=%s), or allow the change with --set run.resume_allow=%s", full, av ? av : "(unset)",
                        bv ? bv : "?", what, legacy ? " (the checkpoint predates the field: its runs had that value)" : "",
                        full, legacy ? f->legacy : (bv ? bv : "?"), full);
        json_decref(legacy);
        free(av);
        free(bv);
    }
    json_decref(now);
    return st;
}

sy_status sy_config_validate_from(const sy_config_t *cfg, const char *path, char *const *sets, int n_sets) {
    sy_status st = sy_config_validate(cfg);
    if (st == SY_OK) return SY_OK;
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", sy_err_msg());
    /* the message starts with "section.field = ": name the --set that gave the value, if any */
    const char *sp = strstr(msg, " = ");
    size_t flen = sp ? (size_t)(sp - msg) : 0;
    for (int i = n_sets - 1; i >= 0 && flen; i--)
        if (sets[i] && !strncmp(sets[i], msg, flen) && sets[i][flen] == '=')
            return sy_err_set(st, "--set %s: %s", sets[i], msg);
    /* a cross-field rule names the other field later in the message ("... model.n_heads (7)") */
    for (int i = n_sets - 1; i >= 0; i--) {
        const char *eq = sets[i] ? strchr(sets[i], '=') : NULL;
        if (!eq || eq == sets[i]) continue;
        size_t fl = (size_t)(eq - sets[i]);
        for (const char *q = strstr(msg, " "); q; q = strstr(q + 1, " "))
            if (!strncmp(q + 1, sets[i], fl) && !(isalnum((unsigned char)q[1 + fl]) || q[1 + fl] == '_'))
                return sy_err_set(st, "--set %s: %s", sets[i], msg);
    }
    if (path) return sy_err_set(st, "%s: %s", path, msg);
    return sy_err_set(st, "%s", msg);
}

static void rule_text(const field *f, char *buf, size_t n) {
    size_t used = 0;
    buf[0] = 0;
#define ADD(...)                                                                    \
    do {                                                                            \
        if (used < n) used += (size_t)snprintf(buf + used, n - used, __VA_ARGS__); \
    } while (0)
    if (f->rule & (R_MIN | R_MAX)) {
        char r[96];
        range_text(f, r, sizeof r);
        ADD("%s", r);
    }
    if (f->names) {
        ADD("%sone of ", used ? "; " : "");
        for (int i = 0; f->names[i]; i++) ADD("%s`%s`", i ? ", " : "", f->names[i]);
    }
    if (f->rule & R_NONEMPTY)
        ADD("%s%s", used ? "; " : "", f->type == FT_STRLIST ? "at least one entry" : "not empty");
    if (f->check_rule) ADD("%s%s", used ? "; " : "", f->check_rule);
    if (!used) ADD("any");
    if (resume_free(f)) ADD("; may change on `--resume`");
    if (f->legacy) ADD("; a checkpoint written before the field existed counts as `%s`", f->legacy);
#undef ADD
}

static const char DOC_INTRO[] =
    "# switchyard configuration\n"
    "\n"
    "<!-- Generated from the field table in src/base/config.c by `switchyard config doc`\n"
    "     (or `build/tests/sy_configdoc > docs/configuration.md`). Do not edit by hand:\n"
    "     tests/py/test_config_doc.py fails when this page and the table differ. -->\n"
    "\n"
    "A run is described by one YAML file with up to seven sections: `run`, `model`, `train`,\n"
    "`data`, `checkpoint`, `cluster` and `status`. Every field is optional and keeps the\n"
    "default listed below; the defaults describe a tiny model that trains on 2 CPU cores in a\n"
    "few minutes (`configs/tiny.yaml` writes them all out). An unknown section or field, or a\n"
    "value of the wrong type, is an error that names the file and the field.\n"
    "\n"
    "```yaml\n"
    "run:\n"
    "  name: my-run\n"
    "  steps: 2000\n"
    "model:\n"
    "  d_model: 256\n"
    "  n_heads: 8\n"
    "data:\n"
    "  train: [\"data/fortunes/train_*.bin\"]\n"
    "```\n"
    "\n"
    "Values are applied in this order, the later winning:\n"
    "\n"
    "1. the defaults below;\n"
    "2. the YAML file;\n"
    "3. each `--set section.field=value` on the command line, in order, for example\n"
    "   `--set model.n_experts=16 --set train.precision=bf16 --set data.val=`.\n"
    "\n"
    "`--set` values are read by the field's type: `int`, `int64` and `uint64` in decimal;\n"
    "`float` as a decimal or with an exponent (`3e-4`); `bool` as `true`/`false`, `yes`/`no`,\n"
    "`on`/`off` or `1`/`0`; `enum` by name; `string` verbatim (it may be empty); `string list`\n"
    "comma-separated (an empty value is the empty list). In YAML a string list is a sequence.\n"
    "\n"
    "The complete config is then checked against the rules below; a config that breaks one is\n"
    "refused at start with a message naming the field, the value and the rule, such as\n"
    "`model.d_model = 130: must be divisible by model.n_heads (4)`. The config of a run is\n"
    "stored, as JSON, in its checkpoint manifests (`status.token` excepted).\n"
    "\n"
    "On `--resume` every field that changes the model or the data order is compared with the\n"
    "config in the checkpoint's manifest, and a difference is refused with a message naming the\n"
    "field and both values. Fields marked \"may change on `--resume`\" below (run length,\n"
    "logging, threads, memory bound, validation data, and the whole `checkpoint`, `cluster` and\n"
    "`status` sections) may differ; so may any field listed in `run.resume_allow`, the explicit\n"
    "override (for example `--set run.resume_allow=train.lr`).\n";

char *sy_config_doc_markdown(void) {
    sy_config_t def;
    char *out = NULL;
    size_t out_len = 0;
    char dv[512], rule[512];
    if (sy_config_defaults(&def) != SY_OK) return NULL;
    FILE *fp = open_memstream(&out, &out_len);
    if (!fp) {
        sy_config_free(&def);
        return NULL;
    }
    fputs(DOC_INTRO, fp);
    for (int s = 0; s < N_SECTIONS; s++) {
        fprintf(fp, "\n## `%s`\n\n%s\n\n", SECTIONS[s].name, SECTIONS[s].about);
        fputs("| Field | Type | Default | Rule | Meaning |\n", fp);
        fputs("|---|---|---|---|---|\n", fp);
        for (int i = 0; i < N_FIELDS; i++) {
            const field *f = &FIELDS[i];
            if (strcmp(f->section, SECTIONS[s].name)) continue;
            fmt_value(&def, f, dv, sizeof dv);
            rule_text(f, rule, sizeof rule);
            fprintf(fp, "| `%s.%s` | %s | `%s` | %s | %s |\n", f->section, f->name, type_name(f),
                    dv, rule, f->meaning);
        }
    }
    sy_config_free(&def);
    if (fclose(fp) != 0) {
        free(out);
        return NULL;
    }
    return out;
}
