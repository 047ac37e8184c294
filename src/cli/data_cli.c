/* `switchyard data prepare`: text files or llm.c shards in, train_/val_NNNNNN.bin shards out
 * (README "Data"). See data_cli.h. */
#include "cli/data_cli.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "base/config.h"
#include "base/fsutil.h"
#include "data/data.h"

/* `data prepare` defaults. */
#define SY_PREP_VAL_FRACTION 0.05
#define SY_PREP_VAL_FRACTION_MAX 0.5
#define SY_PREP_SHARD_TOKENS 100000000ull
#define SY_PREP_VOCAB_DEFAULT 65536 /* shard inputs: only the uint16 range is checked */
#define SY_PREP_BYTE_VOCAB 256
#define SY_PREP_READ_CHUNK (1u << 20)

/* ------------------------------------------------------------------------------------------ */
/* `switchyard data prepare`                                                                   */

typedef struct {
    char *path;
    uint64_t tokens; /* tokens it contributes, separator included */
    int add_newline; /* text: append '\n' */
} sy_prep_file_t;

typedef struct {
    sy_prep_file_t *v;
    int n, cap;
} sy_prep_list_t;

typedef struct {
    dev_t dev;
    ino_t ino;
} sy_devino_t;

typedef struct {
    sy_devino_t *v;
    int n, cap;
} sy_devino_set_t;

static int sy_devino_seen(sy_devino_set_t *s, const struct stat *sb, int *oom) {
    for (int i = 0; i < s->n; i++)
        if (s->v[i].dev == sb->st_dev && s->v[i].ino == sb->st_ino) return 1;
    if (s->n == s->cap) {
        int nc = s->cap ? s->cap * 2 : 64;
        sy_devino_t *nv = realloc(s->v, (size_t)nc * sizeof *nv);
        if (!nv) {
            *oom = 1;
            return 0;
        }
        s->v = nv;
        s->cap = nc;
    }
    s->v[s->n++] = (sy_devino_t){sb->st_dev, sb->st_ino};
    return 0;
}

static int sy_str_cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

typedef struct {
    char **v;
    int n, cap;
} sy_strvec_t;

static sy_status sy_strvec_push(sy_strvec_t *sv, const char *s) {
    if (sv->n == sv->cap) {
        int nc = sv->cap ? sv->cap * 2 : 64;
        char **nv = realloc(sv->v, (size_t)nc * sizeof *nv);
        if (!nv) return sy_err_set(SY_ENOMEM, "data prepare: out of memory");
        sv->v = nv;
        sv->cap = nc;
    }
    if (!(sv->v[sv->n] = strdup(s))) return sy_err_set(SY_ENOMEM, "data prepare: out of memory");
    sv->n++;
    return SY_OK;
}

static void sy_strvec_free(sy_strvec_t *sv) {
    for (int i = 0; i < sv->n; i++) free(sv->v[i]);
    free(sv->v);
    memset(sv, 0, sizeof *sv);
}

/* Collects the regular files under directory `dir` (recursively; hidden entries skipped; each
 * directory entered once, so symlink loops end). */
static sy_status sy_walk_dir(const char *dir, sy_devino_set_t *dirs_seen, sy_strvec_t *out) {
    sy_status st = SY_OK;
    DIR *dh = opendir(dir);
    if (!dh) return sy_err_set(SY_EIO, "%s: cannot read directory: %s", dir, strerror(errno));
    struct dirent *de;
    char *sub = NULL;
    while ((de = readdir(dh)) != NULL) {
        if (de->d_name[0] == '.') continue; /* hidden, "." and ".." */
        free(sub);
        size_t len = strlen(dir) + strlen(de->d_name) + 2;
        if (!(sub = malloc(len))) {
            st = sy_err_set(SY_ENOMEM, "data prepare: out of memory");
            break;
        }
        snprintf(sub, len, "%s%s%s", dir, dir[strlen(dir) - 1] == '/' ? "" : "/", de->d_name);
        struct stat sb;
        if (stat(sub, &sb) != 0) {
            fprintf(stderr, "data prepare: warning: skipping %s: %s\n", sub, strerror(errno));
            continue;
        }
        if (S_ISDIR(sb.st_mode)) {
            int oom = 0;
            if (sy_devino_seen(dirs_seen, &sb, &oom)) {
                fprintf(stderr, "data prepare: warning: skipping %s: directory already visited "
                                "(symlink loop?)\n", sub);
                continue;
            }
            if (oom) {
                st = sy_err_set(SY_ENOMEM, "data prepare: out of memory");
                break;
            }
            SY_CHECK_GOTO(sy_walk_dir(sub, dirs_seen, out), st, done);
        } else if (S_ISREG(sb.st_mode)) {
            SY_CHECK_GOTO(sy_strvec_push(out, sub), st, done);
        }
    }
done:
    free(sub);
    closedir(dh);
    return st;
}

static int sy_ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* The token sink: buffers up to one shard and writes train_NNNNNN.bin / val_NNNNNN.bin. */
typedef struct {
    const char *out_dir;
    uint64_t shard_tokens, n_train, pos; /* pos: tokens pushed so far */
    uint16_t *buf;
    uint64_t fill;
    int n_train_shards, n_val_shards;
} sy_sink_t;

static sy_status sy_sink_flush(sy_sink_t *k) {
    if (k->fill == 0) return SY_OK;
    int is_val = k->pos > k->n_train; /* the buffer's last token is past the split */
    char path[PATH_MAX];
    int idx = is_val ? k->n_val_shards : k->n_train_shards;
    snprintf(path, sizeof path, "%s/%s_%06d.bin", k->out_dir, is_val ? "val" : "train", idx);
    SY_CHECK(sy_data_write_shard(path, k->buf, k->fill));
    if (is_val)
        k->n_val_shards++;
    else
        k->n_train_shards++;
    k->fill = 0;
    return SY_OK;
}

static sy_status sy_sink_push(sy_sink_t *k, const uint16_t *t, uint64_t n) {
    while (n > 0) {
        /* A shard ends at shard_tokens or at the train/val split. */
        uint64_t room = k->shard_tokens - k->fill;
        if (k->pos < k->n_train && k->n_train - k->pos < room) room = k->n_train - k->pos;
        uint64_t take = n < room ? n : room;
        memcpy(k->buf + k->fill, t, (size_t)take * sizeof *t);
        k->fill += take;
        k->pos += take;
        t += take;
        n -= take;
        if (k->fill == k->shard_tokens || k->pos == k->n_train) SY_CHECK(sy_sink_flush(k));
    }
    return SY_OK;
}

/* Classifies a candidate input. *kind: 0 skip, 1 text, 2 llm.c shard. */
static sy_status sy_prep_classify(const char *path, int vocab_size, int *kind,
                                  sy_prep_file_t *f) {
    sy_status st = SY_OK;
    *kind = 0;
    FILE *fp = fopen(path, "rb");
    unsigned char *buf = NULL;
    if (!fp) return sy_err_set(SY_EIO, "%s: cannot open: %s", path, strerror(errno));
    if (!(buf = malloc(SY_PREP_READ_CHUNK))) {
        st = sy_err_set(SY_ENOMEM, "data prepare: out of memory");
        goto done;
    }
    uint64_t total = 0;
    int has_nul = 0, first = 1;
    unsigned char last = '\n';
    size_t k;
    while ((k = fread(buf, 1, SY_PREP_READ_CHUNK, fp)) > 0) {
        if (first && k >= 4) {
            int32_t magic;
            memcpy(&magic, buf, 4);
            if (magic == SY_SHARD_MAGIC) {
                st = sy_data_shard_count(path, vocab_size, &f->tokens);
                if (st != SY_OK) {
                    sy_err_prefix(st, "input looks like an llm.c shard (magic %d) but is invalid",
                                  SY_SHARD_MAGIC);
                    goto done;
                }
                *kind = 2;
                goto done;
            }
        }
        first = 0;
        if (memchr(buf, 0, k)) {
            has_nul = 1;
            break;
        }
        total += k;
        last = buf[k - 1];
    }
    if (ferror(fp)) {
        st = sy_err_set(SY_EIO, "%s: read error", path);
        goto done;
    }
    if (has_nul) {
        fprintf(stderr, "data prepare: warning: skipping %s: binary (contains NUL bytes)\n", path);
        goto done;
    }
    if (total == 0) goto done; /* empty: contributes nothing */
    f->add_newline = last != '\n';
    f->tokens = total + (uint64_t)f->add_newline;
    *kind = 1;
done:
    free(buf);
    fclose(fp);
    return st;
}

static sy_status sy_prep_emit_text(sy_sink_t *k, const sy_prep_file_t *f) {
    sy_status st = SY_OK;
    FILE *fp = fopen(f->path, "rb");
    unsigned char *buf = malloc(SY_PREP_READ_CHUNK);
    uint16_t *tok = malloc(SY_PREP_READ_CHUNK * sizeof *tok);
    if (!fp) {
        st = sy_err_set(SY_EIO, "%s: cannot open: %s", f->path, strerror(errno));
        goto done;
    }
    if (!buf || !tok) {
        st = sy_err_set(SY_ENOMEM, "data prepare: out of memory");
        goto done;
    }
    uint64_t got = 0;
    size_t n;
    while ((n = fread(buf, 1, SY_PREP_READ_CHUNK, fp)) > 0) {
        for (size_t i = 0; i < n; i++) tok[i] = buf[i];
        got += n;
        if (got + (uint64_t)f->add_newline > f->tokens) break;
        SY_CHECK_GOTO(sy_sink_push(k, tok, n), st, done);
    }
    if (ferror(fp) || got + (uint64_t)f->add_newline != f->tokens) {
        st = sy_err_set(SY_EIO, "%s: file changed or failed while being read", f->path);
        goto done;
    }
    if (f->add_newline) {
        uint16_t nl = '\n';
        SY_CHECK_GOTO(sy_sink_push(k, &nl, 1), st, done);
    }
done:
    if (fp) fclose(fp);
    free(buf);
    free(tok);
    return st;
}

static sy_status sy_prep_emit_shard(sy_sink_t *k, const sy_prep_file_t *f, int vocab_size) {
    void *mem;
    const uint16_t *tok;
    uint64_t count;
    SY_CHECK(sy_data_read_shard(f->path, vocab_size, &mem, &tok, &count));
    sy_status st = SY_OK;
    if (count != f->tokens)
        st = sy_err_set(SY_EIO, "%s: file changed while being read", f->path);
    else
        st = sy_sink_push(k, tok, count);
    free(mem);
    return st;
}


/* Removes train_/val_NNNNNN.bin left by an earlier, larger run (they would join a glob). */
static void sy_prep_remove_stale(const char *dir, const char *prefix, int keep) {
    char path[PATH_MAX];
    for (int i = keep;; i++) {
        snprintf(path, sizeof path, "%s/%s_%06d.bin", dir, prefix, i);
        if (unlink(path) != 0) break;
        fprintf(stderr, "data prepare: removed stale %s\n", path);
    }
}

static void sy_prep_usage(FILE *fp) {
    fprintf(fp,
            "usage: switchyard data prepare --input FILE_OR_DIR... --out DIR [options]\n"
            "\n"
            "Tokenizes text byte-level (vocab 256) or copies llm.c token shards through, and\n"
            "writes DIR/train_NNNNNN.bin and DIR/val_NNNNNN.bin (llm.c shard format).\n"
            "\n"
            "  --input PATH...      files or directories (walked recursively, sorted; hidden\n"
            "                       files, *.dat and binary files skipped); repeatable\n"
            "  --out DIR            output directory (created if missing)\n"
            "  --val-fraction F     last fraction of the token stream kept for validation,\n"
            "                       in [0, 0.5] (default %.2f)\n"
            "  --shard-tokens N     at most N tokens per shard (default %llu)\n"
            "  --vocab-size V       llm.c shard inputs: every token must be < V (default %d);\n"
            "                       text inputs need V >= 256\n"
            "  -h, --help           this help\n",
            SY_PREP_VAL_FRACTION, (unsigned long long)SY_PREP_SHARD_TOKENS,
            SY_PREP_VOCAB_DEFAULT);
}

/* Value of option `name` given as "--name=value" or "--name value". */
static const char *sy_opt_value(int argc, char **argv, int *i, const char *name, int *bad) {
    const char *a = argv[*i];
    size_t nl = strlen(name);
    if (a[nl] == '=') return a + nl + 1;
    if (*i + 1 >= argc) {
        fprintf(stderr, "data prepare: option %s needs a value\n", name);
        *bad = 1;
        return NULL;
    }
    return argv[++*i];
}

static int sy_opt_is(const char *a, const char *name) {
    size_t nl = strlen(name);
    return strncmp(a, name, nl) == 0 && (a[nl] == 0 || a[nl] == '=');
}

/* What the command line asks for. */
typedef struct {
    sy_strvec_t inputs;
    const char *out_dir;
    double val_fraction;
    unsigned long long shard_tokens;
    long vocab_size;
    int vocab_given;
} sy_prep_opts_t;

/* Pass 1's result: the usable files in order and what they hold. */
typedef struct {
    sy_prep_list_t list;
    int n_text, n_shard, n_skipped;
    uint64_t total, text_bytes; /* tokens in all; text: bytes read (separators not counted) */
    uint64_t n_train, n_val;
} sy_prep_plan_t;

#define SY_PREP_RUN (-1) /* sy_prep_parse: go on (any other value is the exit code) */

/* --input PATH... (or --input=PATH): one or more paths up to the next option. */
static sy_status sy_prep_parse_inputs(int argc, char **argv, int *i, sy_strvec_t *inputs, int *bad) {
    const char *a = argv[*i];
    if (a[7] == '=') return sy_strvec_push(inputs, a + 8);
    int got = 0;
    while (*i + 1 < argc && strncmp(argv[*i + 1], "-", 1) != 0) {
        SY_CHECK(sy_strvec_push(inputs, argv[++*i]));
        got++;
    }
    if (!got) {
        fprintf(stderr, "data prepare: --input needs at least one path\n");
        *bad = 1;
    }
    return SY_OK;
}

/* Parses argv[1..] into o. SY_PREP_RUN, or the exit code after printing help (0), a usage error
 * (2) or an out-of-memory error (1). */
static int sy_prep_parse(int argc, char **argv, sy_prep_opts_t *o) {
    int bad = 0;
    for (int i = 1; i < argc && !bad; i++) {
        const char *a = argv[i], *v;
        char *end = NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            sy_prep_usage(stdout);
            return 0;
        } else if (sy_opt_is(a, "--input")) {
            if (sy_prep_parse_inputs(argc, argv, &i, &o->inputs, &bad) != SY_OK) {
                sy_err_set(SY_ENOMEM, "data prepare: out of memory");
                fprintf(stderr, "data prepare: error: %s\n", sy_err_msg());
                return 1;
            }
        } else if (sy_opt_is(a, "--out")) {
            o->out_dir = sy_opt_value(argc, argv, &i, "--out", &bad);
        } else if (sy_opt_is(a, "--val-fraction")) {
            if (!(v = sy_opt_value(argc, argv, &i, "--val-fraction", &bad))) break;
            errno = 0;
            o->val_fraction = strtod(v, &end);
            if (errno || end == v || *end || !(o->val_fraction >= 0.0) ||
                o->val_fraction > SY_PREP_VAL_FRACTION_MAX) {
                fprintf(stderr, "data prepare: --val-fraction '%s' is not a number in [0, %.1f]\n",
                        v, SY_PREP_VAL_FRACTION_MAX);
                bad = 1;
            }
        } else if (sy_opt_is(a, "--shard-tokens")) {
            if (!(v = sy_opt_value(argc, argv, &i, "--shard-tokens", &bad))) break;
            errno = 0;
            o->shard_tokens = strtoull(v, &end, 10);
            if (errno || end == v || *end || v[0] == '-' || o->shard_tokens < 2 ||
                o->shard_tokens > INT32_MAX) {
                fprintf(stderr, "data prepare: --shard-tokens '%s' is not an integer in [2, %d]\n",
                        v, INT32_MAX);
                bad = 1;
            }
        } else if (sy_opt_is(a, "--vocab-size")) {
            if (!(v = sy_opt_value(argc, argv, &i, "--vocab-size", &bad))) break;
            errno = 0;
            o->vocab_size = strtol(v, &end, 10);
            o->vocab_given = 1;
            if (errno || end == v || *end || o->vocab_size < 1 || o->vocab_size > 65536) {
                fprintf(stderr, "data prepare: --vocab-size '%s' is not an integer in [1, 65536]\n",
                        v);
                bad = 1;
            }
        } else {
            fprintf(stderr, "data prepare: unknown option '%s' (see --help)\n", a);
            bad = 1;
        }
    }
    if (!bad && o->inputs.n == 0) {
        fprintf(stderr, "data prepare: --input is required (see --help)\n");
        bad = 1;
    }
    if (!bad && (!o->out_dir || !o->out_dir[0])) {
        fprintf(stderr, "data prepare: --out is required (see --help)\n");
        bad = 1;
    }
    return bad ? 2 : SY_PREP_RUN;
}

/* The input files: in the order given, each directory's files in sorted path order. */
static sy_status sy_prep_collect(const sy_strvec_t *inputs, sy_strvec_t *files) {
    sy_devino_set_t dirs_seen = {0};
    sy_status st = SY_OK;
    for (int i = 0; i < inputs->n && st == SY_OK; i++) {
        struct stat sb;
        if (stat(inputs->v[i], &sb) != 0) {
            st = sy_err_set(SY_ENOTFOUND, "%s: input not found: %s", inputs->v[i],
                            strerror(errno));
        } else if (S_ISDIR(sb.st_mode)) {
            sy_strvec_t found = {0};
            int oom = 0;
            sy_devino_seen(&dirs_seen, &sb, &oom);
            st = oom ? sy_err_set(SY_ENOMEM, "data prepare: out of memory")
                     : sy_walk_dir(inputs->v[i], &dirs_seen, &found);
            if (st == SY_OK && found.n > 1) qsort(found.v, (size_t)found.n, sizeof *found.v,
                                                  sy_str_cmp);
            for (int j = 0; st == SY_OK && j < found.n; j++) st = sy_strvec_push(files, found.v[j]);
            sy_strvec_free(&found);
        } else if (S_ISREG(sb.st_mode)) {
            st = sy_strvec_push(files, inputs->v[i]);
        } else {
            st = sy_err_set(SY_EINVAL, "%s: input is neither a file nor a directory",
                            inputs->v[i]);
        }
    }
    free(dirs_seen.v);
    return st;
}

/* Adds a classified file to the plan (kind 1 text, 2 shard); refuses a mix of both. */
static sy_status sy_prep_plan_add(sy_prep_plan_t *p, const char *path, int kind, sy_prep_file_t f,
                                  const char **a_text, const char **a_shard) {
    if (kind == 1) {
        p->n_text++;
        if (!*a_text) *a_text = path;
        p->text_bytes += f.tokens - (uint64_t)f.add_newline;
    } else {
        p->n_shard++;
        if (!*a_shard) *a_shard = path;
    }
    if (p->n_text && p->n_shard)
        return sy_err_set(SY_EINVAL,
                          "inputs mix text (%s) and llm.c token shards (%s); prepare them "
                          "separately",
                          *a_text, *a_shard);
    sy_prep_list_t *l = &p->list;
    if (l->n == l->cap) {
        int nc = l->cap ? l->cap * 2 : 64;
        sy_prep_file_t *nv = realloc(l->v, (size_t)nc * sizeof *nv);
        if (!nv) return sy_err_set(SY_ENOMEM, "data prepare: out of memory");
        l->v = nv;
        l->cap = nc;
    }
    if (!(f.path = strdup(path))) return sy_err_set(SY_ENOMEM, "data prepare: out of memory");
    l->v[l->n++] = f;
    p->total += f.tokens;
    return SY_OK;
}

/* Pass 1: classifies every file and counts its tokens, so the split point is known before
 * anything is written. Skips strfile indexes (*.dat), second names of one file, binaries and
 * empty files. */
static sy_status sy_prep_classify_all(const sy_strvec_t *files, int vocab_size, sy_prep_plan_t *p) {
    sy_devino_set_t files_seen = {0};
    const char *a_text = NULL, *a_shard = NULL;
    sy_status st = SY_OK;
    for (int i = 0; i < files->n && st == SY_OK; i++) {
        const char *path = files->v[i];
        struct stat sb;
        int oom = 0, kind = 0;
        if (sy_ends_with(path, ".dat")) { /* strfile(1) index of a fortune file */
            p->n_skipped++;
            continue;
        }
        if (stat(path, &sb) != 0) {
            st = sy_err_set(SY_EIO, "%s: stat: %s", path, strerror(errno));
            break;
        }
        if (sy_devino_seen(&files_seen, &sb, &oom)) { /* e.g. fortune's foo.u8 -> foo */
            p->n_skipped++;
            continue;
        }
        if (oom) {
            st = sy_err_set(SY_ENOMEM, "data prepare: out of memory");
            break;
        }
        sy_prep_file_t f = {0};
        st = sy_prep_classify(path, vocab_size, &kind, &f);
        if (st == SY_OK && kind == 0)
            p->n_skipped++;
        else if (st == SY_OK)
            st = sy_prep_plan_add(p, path, kind, f, &a_text, &a_shard);
    }
    free(files_seen.v);
    return st;
}

/* The train/validation split of the plan's tokens, with the checks that need the totals. */
static sy_status sy_prep_split(sy_prep_plan_t *p, const sy_prep_opts_t *o) {
    if (p->list.n == 0)
        return sy_err_set(SY_EINVAL, "data prepare: no usable input files (%d skipped)", p->n_skipped);
    if (p->n_text && o->vocab_given && o->vocab_size < SY_PREP_BYTE_VOCAB)
        return sy_err_set(SY_EINVAL, "data prepare: --vocab-size %ld < 256 cannot hold byte-level "
                          "tokens", o->vocab_size);
    p->n_val = (uint64_t)((double)p->total * o->val_fraction); /* floor */
    p->n_train = p->total - p->n_val;
    if (p->n_train < 2)
        return sy_err_set(SY_EINVAL,
                          "data prepare: only %" PRIu64 " train tokens (of %" PRIu64
                          "); need at least 2",
                          p->n_train, p->total);
    return SY_OK;
}

/* Pass 2: streams every file's tokens into the shards of --out, then removes stale shards. */
static sy_status sy_prep_write(const sy_prep_plan_t *p, const sy_prep_opts_t *o, sy_sink_t *sink) {
    if (sy_mkdir_p(o->out_dir) != SY_OK) return sy_err_prefix(SY_EIO, "--out %s", o->out_dir);
    sink->out_dir = o->out_dir;
    sink->shard_tokens = o->shard_tokens;
    sink->n_train = p->n_train;
    uint64_t biggest = p->n_train > p->n_val ? p->n_train : p->n_val;
    if (!(sink->buf = malloc((size_t)(biggest < o->shard_tokens ? biggest : o->shard_tokens) *
                             sizeof *sink->buf)))
        return sy_err_set(SY_ENOMEM, "data prepare: out of memory");
    if (biggest < o->shard_tokens) sink->shard_tokens = biggest; /* same shards, smaller buffer */
    for (int i = 0; i < p->list.n; i++) {
        if (p->n_shard)
            SY_CHECK(sy_prep_emit_shard(sink, &p->list.v[i], (int)o->vocab_size));
        else
            SY_CHECK(sy_prep_emit_text(sink, &p->list.v[i]));
    }
    SY_CHECK(sy_sink_flush(sink));
    sy_prep_remove_stale(o->out_dir, "train", sink->n_train_shards);
    sy_prep_remove_stale(o->out_dir, "val", sink->n_val_shards);
    return SY_OK;
}

static void sy_prep_report(const sy_prep_plan_t *p, const sy_prep_opts_t *o, const sy_sink_t *sink) {
    printf("data prepare: %d %s file(s) (%d skipped), %" PRIu64 " %s -> %s\n", p->list.n,
           p->n_shard ? "llm.c shard" : "text", p->n_skipped, p->n_shard ? p->total : p->text_bytes,
           p->n_shard ? "tokens" : "bytes", o->out_dir);
    printf("data prepare: train %" PRIu64 " tokens in %d shard(s), val %" PRIu64
           " tokens in %d shard(s), vocab %s\n",
           p->n_train, sink->n_train_shards, p->n_val, sink->n_val_shards,
           p->n_shard ? "as the input shards" : "256 (byte-level)");
}

/* ------------------------------------------------------------------------------------------ */
/* `switchyard data check`                                                                     */

static void sy_check_usage(FILE *fp) {
    fprintf(fp,
            "usage: switchyard data check [CONFIG] [--set section.field=value]... [--verbose]\n"
            "\n"
            "Validates every shard of the config's data.train and data.val (local files and\n"
            "s3:// objects, one at a time) as training would read them: the llm.c header, the\n"
            "file size, and every token < model.vocab_size. Training itself checks headers and\n"
            "sizes at start and each window's tokens as it reads them, so a bad token found\n"
            "there stops the run at that batch; this finds it before the run.\n"
            "Prints the shards, tokens and windows of model.seq_len + 1 tokens of each list.\n"
            "Exit status: 0 all valid, 1 a bad or unreadable shard (named), 2 bad usage.\n"
            "\n"
            "  CONFIG               a YAML config (default: the built-in defaults)\n"
            "  --set F=V            override a config field (repeatable)\n"
            "  --verbose            one line per shard\n"
            "  -h, --help           this help\n");
}

typedef struct {
    const char *list;
} sy_check_ctx;

static void sy_check_each(const char *path, uint64_t tokens, void *arg) {
    const sy_check_ctx *c = arg;
    printf("%s: %s: %" PRIu64 " tokens ok\n", c->list, path, tokens);
}

static int sy_data_check_cli(int argc, char **argv) {
    const char *path = NULL;
    int verbose = 0, rc = 0;
    sy_config_t cfg;
    if (sy_config_defaults(&cfg) != SY_OK) {
        fprintf(stderr, "data check: %s\n", sy_err_msg());
        return 1;
    }
    char **sets = calloc((size_t)argc + 1, sizeof *sets);
    int n_sets = 0;
    if (!sets) {
        fprintf(stderr, "data check: out of memory\n");
        sy_config_free(&cfg);
        return 1;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            sy_check_usage(stdout);
            goto out;
        } else if (!strcmp(a, "--verbose")) {
            verbose = 1;
        } else if (!strcmp(a, "--set") && i + 1 < argc) {
            sets[n_sets++] = argv[++i];
        } else if (!strncmp(a, "--set=", 6)) {
            sets[n_sets++] = (char *)a + 6;
        } else if (a[0] != '-' && !path) {
            path = a;
        } else {
            fprintf(stderr, "data check: unexpected argument '%s'\n", a);
            sy_check_usage(stderr);
            rc = 2;
            goto out;
        }
    }
    sy_status st = path ? sy_config_load(&cfg, path) : SY_OK;
    for (int i = 0; st == SY_OK && i < n_sets; i++) st = sy_config_set(&cfg, sets[i]);
    if (st == SY_OK) st = sy_config_validate_from(&cfg, path, sets, n_sets);
    if (st != SY_OK) {
        fprintf(stderr, "data check: %s\n", sy_err_msg());
        rc = 2;
        goto out;
    }
    const struct {
        const char *name;
        const sy_strlist *l;
    } lists[] = {{"data.train", &cfg.data.train}, {"data.val", &cfg.data.val}};
    for (int k = 0; k < 2 && rc == 0; k++) {
        if (lists[k].l->n == 0) {
            printf("%s: empty\n", lists[k].name);
            continue;
        }
        sy_check_ctx ctx = {lists[k].name};
        sy_data_check_counts c;
        st = sy_data_validate((const char *const *)lists[k].l->items, lists[k].l->n, cfg.model.vocab_size,
                              cfg.model.seq_len, verbose ? sy_check_each : NULL, &ctx, &c);
        if (st != SY_OK) {
            fprintf(stderr, "data check: %s: %s\n", lists[k].name, sy_err_msg());
            rc = 1;
            break;
        }
        printf("%s: %" PRIu64 " shards, %" PRIu64 " tokens, %" PRIu64 " windows of %d tokens, every token < %d\n",
               lists[k].name, c.shards, c.tokens, c.windows, cfg.model.seq_len + 1, cfg.model.vocab_size);
        if (k == 0 && c.windows == 0) {
            fprintf(stderr, "data check: data.train holds no window of model.seq_len + 1 = %d tokens\n",
                    cfg.model.seq_len + 1);
            rc = 1;
        }
    }
out:
    free(sets);
    sy_config_free(&cfg);
    return rc;
}

int sy_data_cli(int argc, char **argv) {
    if (argc >= 1 && !strcmp(argv[0], "check")) return sy_data_check_cli(argc, argv);
    if (argc < 1 || strcmp(argv[0], "prepare") != 0) {
        if (argc >= 1 && (!strcmp(argv[0], "-h") || !strcmp(argv[0], "--help"))) {
            sy_prep_usage(stdout);
            return 0;
        }
        fprintf(stderr, "switchyard data: unknown subcommand '%s' (expected 'prepare')\n",
                argc >= 1 ? argv[0] : "");
        sy_prep_usage(stderr);
        return 2;
    }
    sy_prep_opts_t opts = {.val_fraction = SY_PREP_VAL_FRACTION, .shard_tokens = SY_PREP_SHARD_TOKENS,
                           .vocab_size = SY_PREP_VOCAB_DEFAULT};
    sy_strvec_t files = {0};
    sy_prep_plan_t plan = {0};
    sy_sink_t sink = {0};
    int rc = sy_prep_parse(argc, argv, &opts);
    if (rc == SY_PREP_RUN) {
        sy_status st = sy_prep_collect(&opts.inputs, &files);
        if (st == SY_OK) st = sy_prep_classify_all(&files, (int)opts.vocab_size, &plan);
        if (st == SY_OK) st = sy_prep_split(&plan, &opts);
        if (st == SY_OK) st = sy_prep_write(&plan, &opts, &sink);
        if (st == SY_OK) sy_prep_report(&plan, &opts, &sink);
        else fprintf(stderr, "data prepare: error: %s\n", sy_err_msg());
        rc = st == SY_OK ? 0 : 1;
    }
    sy_strvec_free(&opts.inputs);
    sy_strvec_free(&files);
    for (int i = 0; i < plan.list.n; i++) free(plan.list.v[i].path);
    free(plan.list.v);
    free(sink.buf);
    return rc;
}
