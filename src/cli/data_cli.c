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

int sy_data_cli(int argc, char **argv) {
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
    sy_strvec_t inputs = {0}, files = {0};
    sy_prep_list_t list = {0};
    sy_devino_set_t dirs_seen = {0}, files_seen = {0};
    sy_sink_t sink = {0};
    const char *out_dir = NULL;
    double val_fraction = SY_PREP_VAL_FRACTION;
    unsigned long long shard_tokens = SY_PREP_SHARD_TOKENS;
    long vocab_size = SY_PREP_VOCAB_DEFAULT;
    int vocab_given = 0, rc = 1, bad = 0;
    sy_status st = SY_OK;

    /* ---- options */
    for (int i = 1; i < argc && !bad; i++) {
        const char *a = argv[i], *v;
        char *end = NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            sy_prep_usage(stdout);
            rc = 0;
            goto done;
        } else if (sy_opt_is(a, "--input")) {
            if (a[7] == '=') {
                if (sy_strvec_push(&inputs, a + 8) != SY_OK) goto oom;
                continue;
            }
            int got = 0;
            while (i + 1 < argc && strncmp(argv[i + 1], "-", 1) != 0) {
                if (sy_strvec_push(&inputs, argv[++i]) != SY_OK) goto oom;
                got++;
            }
            if (!got) {
                fprintf(stderr, "data prepare: --input needs at least one path\n");
                bad = 1;
            }
        } else if (sy_opt_is(a, "--out")) {
            out_dir = sy_opt_value(argc, argv, &i, "--out", &bad);
        } else if (sy_opt_is(a, "--val-fraction")) {
            if (!(v = sy_opt_value(argc, argv, &i, "--val-fraction", &bad))) break;
            errno = 0;
            val_fraction = strtod(v, &end);
            if (errno || end == v || *end || !(val_fraction >= 0.0) ||
                val_fraction > SY_PREP_VAL_FRACTION_MAX) {
                fprintf(stderr, "data prepare: --val-fraction '%s' is not a number in [0, %.1f]\n",
                        v, SY_PREP_VAL_FRACTION_MAX);
                bad = 1;
            }
        } else if (sy_opt_is(a, "--shard-tokens")) {
            if (!(v = sy_opt_value(argc, argv, &i, "--shard-tokens", &bad))) break;
            errno = 0;
            shard_tokens = strtoull(v, &end, 10);
            if (errno || end == v || *end || v[0] == '-' || shard_tokens < 2 ||
                shard_tokens > INT32_MAX) {
                fprintf(stderr, "data prepare: --shard-tokens '%s' is not an integer in [2, %d]\n",
                        v, INT32_MAX);
                bad = 1;
            }
        } else if (sy_opt_is(a, "--vocab-size")) {
            if (!(v = sy_opt_value(argc, argv, &i, "--vocab-size", &bad))) break;
            errno = 0;
            vocab_size = strtol(v, &end, 10);
            vocab_given = 1;
            if (errno || end == v || *end || vocab_size < 1 || vocab_size > 65536) {
                fprintf(stderr, "data prepare: --vocab-size '%s' is not an integer in [1, 65536]\n",
                        v);
                bad = 1;
            }
        } else {
            fprintf(stderr, "data prepare: unknown option '%s' (see --help)\n", a);
            bad = 1;
        }
    }
    if (!bad && inputs.n == 0) {
        fprintf(stderr, "data prepare: --input is required (see --help)\n");
        bad = 1;
    }
    if (!bad && (!out_dir || !out_dir[0])) {
        fprintf(stderr, "data prepare: --out is required (see --help)\n");
        bad = 1;
    }
    if (bad) {
        rc = 2;
        goto done;
    }

    /* ---- collect input files: given order; each directory's files in sorted path order */
    for (int i = 0; i < inputs.n; i++) {
        struct stat sb;
        if (stat(inputs.v[i], &sb) != 0) {
            st = sy_err_set(SY_ENOTFOUND, "%s: input not found: %s", inputs.v[i],
                            strerror(errno));
            goto fail;
        }
        if (S_ISDIR(sb.st_mode)) {
            sy_strvec_t found = {0};
            int oom = 0;
            sy_devino_seen(&dirs_seen, &sb, &oom);
            st = oom ? sy_err_set(SY_ENOMEM, "data prepare: out of memory")
                     : sy_walk_dir(inputs.v[i], &dirs_seen, &found);
            if (st == SY_OK && found.n > 1) qsort(found.v, (size_t)found.n, sizeof *found.v,
                                                  sy_str_cmp);
            for (int j = 0; st == SY_OK && j < found.n; j++) st = sy_strvec_push(&files, found.v[j]);
            sy_strvec_free(&found);
            if (st != SY_OK) goto fail;
        } else if (S_ISREG(sb.st_mode)) {
            SY_CHECK_GOTO(sy_strvec_push(&files, inputs.v[i]), st, fail);
        } else {
            st = sy_err_set(SY_EINVAL, "%s: input is neither a file nor a directory",
                            inputs.v[i]);
            goto fail;
        }
    }

    /* ---- classify: pass 1 counts tokens so the split point is known before writing */
    int n_text = 0, n_shard = 0, n_skipped = 0;
    const char *a_text = NULL, *a_shard = NULL;
    uint64_t total = 0, text_bytes = 0;
    for (int i = 0; i < files.n; i++) {
        const char *p = files.v[i];
        struct stat sb;
        int oom = 0, kind = 0;
        if (sy_ends_with(p, ".dat")) { /* strfile(1) index of a fortune file */
            n_skipped++;
            continue;
        }
        if (stat(p, &sb) != 0) {
            st = sy_err_set(SY_EIO, "%s: stat: %s", p, strerror(errno));
            goto fail;
        }
        if (sy_devino_seen(&files_seen, &sb, &oom)) { /* e.g. fortune's foo.u8 -> foo */
            n_skipped++;
            continue;
        }
        if (oom) goto oom;
        sy_prep_file_t f = {0};
        SY_CHECK_GOTO(sy_prep_classify(p, (int)vocab_size, &kind, &f), st, fail);
        if (kind == 0) {
            n_skipped++;
            continue;
        }
        if (kind == 1) {
            n_text++;
            if (!a_text) a_text = p;
            text_bytes += f.tokens - (uint64_t)f.add_newline;
        } else {
            n_shard++;
            if (!a_shard) a_shard = p;
        }
        if (n_text && n_shard) {
            st = sy_err_set(SY_EINVAL,
                            "inputs mix text (%s) and llm.c token shards (%s); prepare them "
                            "separately",
                            a_text, a_shard);
            goto fail;
        }
        if (list.n == list.cap) {
            int nc = list.cap ? list.cap * 2 : 64;
            sy_prep_file_t *nv = realloc(list.v, (size_t)nc * sizeof *nv);
            if (!nv) goto oom;
            list.v = nv;
            list.cap = nc;
        }
        if (!(f.path = strdup(p))) goto oom;
        list.v[list.n++] = f;
        total += f.tokens;
    }
    if (list.n == 0) {
        st = sy_err_set(SY_EINVAL, "data prepare: no usable input files (%d skipped)", n_skipped);
        goto fail;
    }
    if (n_text && vocab_given && vocab_size < SY_PREP_BYTE_VOCAB) {
        st = sy_err_set(SY_EINVAL, "data prepare: --vocab-size %ld < 256 cannot hold byte-level "
                        "tokens", vocab_size);
        goto fail;
    }
    uint64_t n_val = (uint64_t)((double)total * val_fraction); /* floor */
    uint64_t n_train = total - n_val;
    if (n_train < 2) {
        st = sy_err_set(SY_EINVAL,
                        "data prepare: only %" PRIu64 " train tokens (of %" PRIu64
                        "); need at least 2",
                        n_train, total);
        goto fail;
    }

    /* ---- pass 2: stream tokens into shards */
    if (sy_mkdir_p(out_dir) != SY_OK) {
        st = sy_err_prefix(SY_EIO, "--out %s", out_dir);
        goto fail;
    }
    sink.out_dir = out_dir;
    sink.shard_tokens = shard_tokens;
    sink.n_train = n_train;
    uint64_t biggest = n_train > n_val ? n_train : n_val;
    if (!(sink.buf = malloc((size_t)(biggest < shard_tokens ? biggest : shard_tokens) *
                            sizeof *sink.buf)))
        goto oom;
    if (biggest < shard_tokens) sink.shard_tokens = biggest; /* same shards, smaller buffer */
    for (int i = 0; i < list.n; i++) {
        if (n_shard)
            SY_CHECK_GOTO(sy_prep_emit_shard(&sink, &list.v[i], (int)vocab_size), st, fail);
        else
            SY_CHECK_GOTO(sy_prep_emit_text(&sink, &list.v[i]), st, fail);
    }
    SY_CHECK_GOTO(sy_sink_flush(&sink), st, fail);
    sy_prep_remove_stale(out_dir, "train", sink.n_train_shards);
    sy_prep_remove_stale(out_dir, "val", sink.n_val_shards);

    printf("data prepare: %d %s file(s) (%d skipped), %" PRIu64 " %s -> %s\n", list.n,
           n_shard ? "llm.c shard" : "text", n_skipped, n_shard ? total : text_bytes,
           n_shard ? "tokens" : "bytes", out_dir);
    printf("data prepare: train %" PRIu64 " tokens in %d shard(s), val %" PRIu64
           " tokens in %d shard(s), vocab %s\n",
           n_train, sink.n_train_shards, n_val, sink.n_val_shards,
           n_shard ? "as the input shards" : "256 (byte-level)");
    rc = 0;
    goto done;
oom:
    st = sy_err_set(SY_ENOMEM, "data prepare: out of memory");
fail:
    fprintf(stderr, "data prepare: error: %s\n", sy_err_msg());
    rc = 1;
done:
    sy_strvec_free(&inputs);
    sy_strvec_free(&files);
    for (int i = 0; i < list.n; i++) free(list.v[i].path);
    free(list.v);
    free(dirs_seen.v);
    free(files_seen.v);
    free(sink.buf);
    return rc;
}
