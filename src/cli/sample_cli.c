/* `switchyard sample` (sample_cli.h). */
#include "cli/sample_cli.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu_setup.h"
#include "base/config.h"
#include "base/log.h"
#include "base/rng.h"
#include "cli/cli_ckpt.h"
#include "cli/train.h"
#include "model/model.h"
#include "model/model_ckpt.h"
#include "storage/ckpt.h"
#include "storage/store.h"

/* The byte-level tokenizer's vocabulary (`switchyard data prepare`). */
#define SAMPLE_VOCAB 256
/* Defaults and limits of the options. */
#define SAMPLE_DEFAULT_LENGTH 200
#define SAMPLE_MAX_LENGTH 1000000
#define SAMPLE_DEFAULT_TEMPERATURE 0.8
#define SAMPLE_MAX_TEMPERATURE 100.0
#define SAMPLE_DEFAULT_TOP_K 40

static void usage(FILE *f) {
    fprintf(f,
            "usage: switchyard sample --checkpoint DIR --prompt TEXT [options]\n"
            "\n"
            "Generates text from a checkpoint of a byte-level model (vocab 256): the prompt's bytes,\n"
            "then --length bytes drawn one at a time from the model (eval capacity factor, every\n"
            "expert local; the context is the last seq_len bytes). Prints the prompt and the\n"
            "continuation on stdout. The same checkpoint, prompt, options and seed give the same text.\n"
            "\n"
            "options:\n"
            "  --checkpoint DIR    a checkpoint folder STORE/RUN/ckpt/step-NNNNNNNNN, or a run\n"
            "                      folder STORE/RUN (its latest committed checkpoint)\n"
            "  --prompt TEXT       the start of the text (not empty)\n"
            "  --length N          bytes to generate, 1..%d (default %d)\n"
            "  --temperature T     0 (greedy: always the likeliest byte) .. %g (default %g)\n"
            "  --top-k K           draw among the K likeliest bytes, 1..%d; 0: all (default %d)\n"
            "  --seed S            seed of the draws, an integer >= 0 (default 1)\n"
            "  --set S.F=V         override a field of the checkpoint's config (e.g. train.threads,\n"
            "                      model.eval_capacity_factor)\n"
            "  -h, --help          this help\n"
            "\n"
            "Exit status: 0 done, 1 failed (no such checkpoint, not a byte-level model), 2 bad usage.\n",
            SAMPLE_MAX_LENGTH, SAMPLE_DEFAULT_LENGTH, SAMPLE_MAX_TEMPERATURE, SAMPLE_DEFAULT_TEMPERATURE,
            SAMPLE_VOCAB, SAMPLE_DEFAULT_TOP_K);
}

/* Strict integer in [lo, hi]: 1 if ok. */
static int parse_ll(const char *s, long long lo, long long hi, long long *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi) return 0;
    *out = v;
    return 1;
}

/* The next byte after the logits row z [V]: greedy at temperature 0, else a draw from
 * softmax(z / T) over the top_k likeliest (0: all), ties broken by the lower byte. u in [0, 1). */
static int pick(const float *z, int V, double temp, int top_k, double u) {
    int best = 0;
    for (int v = 1; v < V; v++)
        if (z[v] > z[best]) best = v;
    if (temp == 0.0) return best;
    /* the k-th largest logit is the cut: bytes below it are out (all bytes equal to it stay in,
     * so the result does not depend on a sort's order among ties) */
    float cut = -INFINITY;
    if (top_k > 0 && top_k < V) {
        float sorted[SAMPLE_VOCAB];
        memcpy(sorted, z, sizeof(float) * (size_t)V);
        for (int i = 0; i < top_k; i++) { /* partial selection: the top_k largest first */
            int m = i;
            for (int j = i + 1; j < V; j++)
                if (sorted[j] > sorted[m]) m = j;
            float t = sorted[i];
            sorted[i] = sorted[m];
            sorted[m] = t;
        }
        cut = sorted[top_k - 1];
    }
    double p[SAMPLE_VOCAB], sum = 0.0;
    for (int v = 0; v < V; v++) {
        p[v] = z[v] >= cut && isfinite(z[v]) ? exp(((double)z[v] - (double)z[best]) / temp) : 0.0;
        sum += p[v];
    }
    if (!(sum > 0.0)) return best;
    double x = u * sum, acc = 0.0;
    for (int v = 0; v < V; v++) {
        acc += p[v];
        if (p[v] > 0.0 && x < acc) return v;
    }
    return best;
}

int sy_sample_cli(int argc, char **argv) {
    static const struct option longopts[] = {{"checkpoint", required_argument, 0, 'c'},
                                             {"prompt", required_argument, 0, 'p'},
                                             {"length", required_argument, 0, 'n'},
                                             {"temperature", required_argument, 0, 't'},
                                             {"top-k", required_argument, 0, 'k'},
                                             {"seed", required_argument, 0, 'S'},
                                             {"set", required_argument, 0, 's'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    const char *ckdir = NULL, *prompt = NULL;
    long long length = SAMPLE_DEFAULT_LENGTH, top_k = SAMPLE_DEFAULT_TOP_K;
    double temp = SAMPLE_DEFAULT_TEMPERATURE;
    unsigned long long seed = 1;
    char **sets = calloc((size_t)argc + 1, sizeof(char *));
    int n_sets = 0, c, rc = 2;
    sy_cli_ckpt ck = {0};
    int32_t *tokens = NULL;
    float *logits = NULL;
    unsigned char *text = NULL;
    if (!sets) {
        fprintf(stderr, "switchyard sample: out of memory\n");
        return 1;
    }
    optind = 1;
    opterr = 0; /* our own messages */
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'c': ckdir = optarg; break;
        case 'p': prompt = optarg; break;
        case 'n':
            if (!parse_ll(optarg, 1, SAMPLE_MAX_LENGTH, &length)) {
                fprintf(stderr, "switchyard sample: --length %s: expected an integer in [1, %d]\n", optarg,
                        SAMPLE_MAX_LENGTH);
                goto out;
            }
            break;
        case 't': {
            char *end;
            errno = 0;
            temp = strtod(optarg, &end);
            if (!*optarg || *end || errno || !isfinite(temp) || temp < 0 || temp > SAMPLE_MAX_TEMPERATURE) {
                fprintf(stderr, "switchyard sample: --temperature %s: expected a number in [0, %g] (0: greedy)\n",
                        optarg, SAMPLE_MAX_TEMPERATURE);
                goto out;
            }
            break;
        }
        case 'k':
            if (!parse_ll(optarg, 0, SAMPLE_VOCAB, &top_k)) {
                fprintf(stderr, "switchyard sample: --top-k %s: expected an integer in [0, %d] (0: all bytes)\n",
                        optarg, SAMPLE_VOCAB);
                goto out;
            }
            break;
        case 'S': {
            char *end;
            errno = 0;
            seed = strtoull(optarg, &end, 10);
            if (!*optarg || *end || errno || optarg[0] == '-' || optarg[0] == '+') {
                fprintf(stderr, "switchyard sample: --seed %s: expected an integer in [0, 2^64)\n", optarg);
                goto out;
            }
            break;
        }
        case 's': sets[n_sets++] = optarg; break;
        case 'h': usage(stdout); rc = 0; goto out;
        default:
            if (optopt) fprintf(stderr, "switchyard sample: option needs a value or is unknown: %s\n", argv[optind - 1]);
            else fprintf(stderr, "switchyard sample: unknown option %s\n", argv[optind - 1]);
            usage(stderr);
            goto out;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "switchyard sample: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        goto out;
    }
    if (!ckdir || !prompt) {
        fprintf(stderr, "switchyard sample: --checkpoint and --prompt are required\n");
        usage(stderr);
        goto out;
    }
    if (!prompt[0]) {
        fprintf(stderr, "switchyard sample: --prompt: must not be empty (the model needs a first byte)\n");
        goto out;
    }
    sy_log_set_role("sample");
    rc = 1;
    bool bad_set;
    if (sy_cli_ckpt_open(&ck, ckdir, sets, n_sets, &bad_set) != SY_OK) {
        if (bad_set) rc = 2; /* a bad --set is bad usage */
        goto fail;
    }
    if (ck.cfg.model.vocab_size != SAMPLE_VOCAB) {
        sy_err_set(SY_EINVAL, "%s: model.vocab_size is %d; sample needs a byte-level model (vocab %d, the "
                              "tokenizer of `switchyard data prepare`)", ckdir, ck.cfg.model.vocab_size, SAMPLE_VOCAB);
        goto fail;
    }
    if (sy_cli_ckpt_load_model(&ck) != SY_OK) goto fail;
    const int B = ck.dims.B, T = ck.dims.T, V = ck.dims.V;
    const size_t np = strlen(prompt), total = np + (size_t)length;
    tokens = calloc((size_t)B * (size_t)(T + 1), sizeof(int32_t));
    logits = malloc(sizeof(float) * (size_t)V);
    text = malloc(total);
    if (!tokens || !logits || !text) {
        sy_err_set(SY_ENOMEM, "out of memory");
        goto fail;
    }
    memcpy(text, prompt, np);
    sy_rng_t rng = sy_rng_key((uint64_t)seed, "sample", 0, 0, 0);
    fwrite(text, 1, np, stdout);
    for (size_t n = np; n < total; n++) {
        /* the context: the last T bytes, in sequence 0 of the micro-batch (its other sequences
         * repeat it; attention is causal, so what follows the last position does not matter;
         * earlier tokens of a group win the expert slots, so sequence 0 loses none unless the
         * capacity is below T) */
        size_t ctx = n < (size_t)T ? n : (size_t)T;
        const unsigned char *src = text + n - ctx;
        for (int b = 0; b < B; b++) {
            int32_t *row = tokens + (size_t)b * (size_t)(T + 1);
            for (size_t i = 0; i < (size_t)T + 1; i++) row[i] = i < ctx ? src[i] : 0;
        }
        sy_losses l;
        if (sy_model_forward_eval(ck.model, tokens, 1, &l) != SY_OK) goto fail;
        if (sy_model_logits(ck.model, (int)ctx - 1, 1, logits) != SY_OK) goto fail;
        double u = (double)(sy_rng_next(&rng) >> 11) * 0x1p-53;
        text[n] = (unsigned char)pick(logits, V, temp, (int)top_k, u);
        fputc(text[n], stdout);
        fflush(stdout);
    }
    fputc('\n', stdout);
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "switchyard sample: %s\n", sy_err_msg());
out:
    free(text);
    free(logits);
    free(tokens);
    sy_cli_ckpt_close(&ck);
    free(sets);
    return rc;
}
