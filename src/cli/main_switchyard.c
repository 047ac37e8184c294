/* switchyard: the user's command line. Each subcommand lives in its module; this file only
 * dispatches. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/ckpt_cli.h"
#include "base/config.h"
#include "backend/cpu_setup.h"
#include "cli/data_cli.h"
#include "cli/keygen_cli.h"
#include "cli/launcher.h"
#include "cli/sample_cli.h"
#include "base/log.h"
#include "cli/status_cli.h"
#include "cli/train.h"

#define SY_VERSION "0.1.0"

static void usage(FILE *f) {
    fprintf(f,
            "switchyard %s: fault-tolerant cluster training for Switch Transformer LMs\n"
            "\n"
            "usage: switchyard COMMAND [options]     (switchyard COMMAND --help for each)\n"
            "\n"
            "commands:\n"
            "  run CONFIG --workers N [--set k=v]    a local cluster: coordinator + N workers\n"
            "  train CONFIG [--set k=v] [--resume]   train in this process, all experts local\n"
            "  eval --checkpoint DIR --data SHARDS   mean cross-entropy of a checkpoint\n"
            "  sample --checkpoint DIR --prompt TEXT text from a checkpoint (temperature, top-k, seed)\n"
            "  data prepare --input F... --out DIR   tokenize text (bytes) into llm.c shards\n"
            "  data check [CONFIG]                   validate every shard of data.train and data.val\n"
            "  ckpt ls|show|export STORE/RUN[@STEP] list, verify, export checkpoints\n"
            "  status [--url URL] [--json]           a running cluster's status (coordinator HTTP)\n"
            "  config doc                            print the configuration reference (Markdown)\n"
            "  config show [CONFIG] [--set k=v]      print the effective config as JSON\n"
            "  keygen PATH                           a CurveZMQ key pair: PATH.key, PATH.pub\n"
            "  version                               print the version\n"
            "\n"
            "environment: SY_LOG=debug|info|warn|error (default info); OPENBLAS_CORETYPE to force\n"
            "OpenBLAS kernels (switchyard picks SkylakeX itself on AVX-512 CPUs).\n",
            SY_VERSION);
}

static int config_cli(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        printf("usage: switchyard config doc\n"
               "       switchyard config show [CONFIG] [--set SECTION.FIELD=VALUE ...]\n"
               "\n"
               "doc   prints the reference of every config field (docs/configuration.md)\n"
               "show  loads CONFIG (or the defaults), applies --set, validates, prints JSON\n");
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "doc")) {
        char *doc = sy_config_doc_markdown();
        if (!doc) return 1;
        fputs(doc, stdout);
        free(doc);
        return 0;
    }
    if (!strcmp(argv[1], "show")) {
        sy_config_t cfg;
        memset(&cfg, 0, sizeof cfg);
        int rc = 1;
        if (sy_config_defaults(&cfg) != SY_OK) goto fail;
        for (int i = 2; i < argc; i++) {
            if (!strcmp(argv[i], "--set") && i + 1 < argc) {
                if (sy_config_set(&cfg, argv[++i]) != SY_OK) goto fail;
            } else if (!strncmp(argv[i], "--set=", 6)) {
                if (sy_config_set(&cfg, argv[i] + 6) != SY_OK) goto fail;
            } else if (argv[i][0] == '-') {
                sy_err_set(SY_EINVAL, "unknown option %s", argv[i]);
                rc = 2;
                goto fail;
            } else if (sy_config_load(&cfg, argv[i]) != SY_OK) {
                goto fail;
            }
        }
        if (sy_config_validate(&cfg) != SY_OK) goto fail;
        json_t *j = sy_config_to_json(&cfg);
        char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        puts(s);
        free(s);
        json_decref(j);
        sy_config_free(&cfg);
        return 0;
    fail:
        fprintf(stderr, "switchyard config: %s\n", sy_err_msg());
        sy_config_free(&cfg);
        return rc;
    }
    fprintf(stderr, "switchyard config: unknown subcommand '%s' (doc, show)\n", argv[1]);
    return 2;
}

int main(int argc, char **argv) {
    sy_cpu_setup(argc, argv);
    sy_log_init_from_env();
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "train")) return sy_train_cli(argc - 1, argv + 1);
    if (!strcmp(cmd, "run")) return sy_run_cli(argc - 1, argv + 1);
    if (!strcmp(cmd, "eval")) return sy_eval_cli(argc - 1, argv + 1);
    if (!strcmp(cmd, "sample")) return sy_sample_cli(argc - 1, argv + 1);
    if (!strcmp(cmd, "config")) return config_cli(argc - 1, argv + 1);
    if (!strcmp(cmd, "ckpt")) return sy_ckpt_cli(argc - 1, argv + 1);
    if (!strcmp(cmd, "status")) return sy_status_cli(argc - 1, argv + 1);
    if (!strcmp(cmd, "keygen")) return sy_keygen_cli(argc - 1, argv + 1);
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("switchyard %s\n", SY_VERSION);
        return 0;
    }
    if (!strcmp(cmd, "data")) {
        if (argc < 3 || !strcmp(argv[2], "-h") || !strcmp(argv[2], "--help")) {
            printf("usage: switchyard data prepare --input FILE_OR_DIR... --out DIR [options]\n"
                   "       switchyard data check [CONFIG] [--set section.field=value]...\n"
                   "       (switchyard data prepare --help, switchyard data check --help)\n");
            return argc < 3 ? 2 : 0;
        }
        if (strcmp(argv[2], "prepare") && strcmp(argv[2], "check")) {
            fprintf(stderr, "switchyard data: unknown subcommand '%s' (prepare, check)\n", argv[2]);
            return 2;
        }
        return sy_data_cli(argc - 2, argv + 2);
    }
    fprintf(stderr, "switchyard: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 2;
}
