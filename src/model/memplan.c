/* Memory estimate and bound of a run; see memplan.h. */
#include "model/memplan.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define GIB (1024.0 * 1024.0 * 1024.0)

sy_memplan sy_memplan_estimate(const sy_config_t *cfg) {
    const double V = cfg->model.vocab_size, T = cfg->model.seq_len, D = cfg->model.d_model,
                 F = cfg->model.d_ff, E = cfg->model.n_experts, H = cfg->model.n_heads,
                 B = cfg->train.micro_batch_seqs, N = B * T;
    const int L = cfg->model.n_layers, S = cfg->model.switch_every;
    const bool bf16 = cfg->train.precision == SY_PREC_BF16;
    /* lp: activation buffers (bf16 storage in bf16 mode); fp: plain fp32 ones */
    double P = V * D + T * D + D, lp = 0.0, fp = 0.0, expert = 0.0;
    for (int l = 0; l < L; l++) {
        bool sw = S > 0 && cfg->model.n_experts >= 1 && l % S == S - 1;
        if (sw) expert += 2 * D * F;
        P += 2 * D + 4 * D * D + (sw ? E * D + E * 2 * D * F : 2 * D * F);
        /* x_in, ln1, qkv(3), atty, x_mid, ln2 (N·D each), attention B·H·T², the FFN or Switch
         * buffers (dispatch/combine copies of N·D, the expert hidden N·F twice, router N·E) */
        lp += N * D * 8 + (sw ? N * D * 4 + N * F * 2 : N * F * 2);
        fp += B * H * T * T + 4 * N + (sw ? N * E * 3 : 0);
    }
    lp += N * D * 10 + N * F * 2; /* head and backward scratch */
    fp += N * V;                  /* logits */
    double act = lp * 4.0 + fp * 4.0;
    if (bf16) {
        /* bf16 storage, plus the fp32 scratch an op widens its bf16 operands into
         * (backend_bf16.c): at most about its largest op's, the expert GEMMs or the LM head */
        const double wmax = V * D > E * D * F ? V * D : E * D * F;
        act = lp * 2.0 + fp * 4.0 + 4.0 * (3 * N * F + 3 * N * D + wmax);
    }
    sy_memplan m;
    m.params = P;
    m.expert_params = expert;
    m.replica_bytes = 0.0;
    /* params 4 + grads 4 + fp64 accumulator 8 + AdamW m, v 8 (+ bf16 work copy 2, + async
     * snapshot of params and moments 12) bytes per parameter */
    double per = 24.0 + (bf16 ? 2.0 : 0.0) + (cfg->checkpoint.async ? 12.0 : 0.0);
    m.state_bytes = P * per;
    m.act_bytes = act;
    m.total_bytes = m.state_bytes + m.act_bytes;
    return m;
}

uint64_t sy_memplan_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    unsigned long long avail = 0, total = 0, v;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "MemAvailable: %llu kB", &v) == 1) avail = v;
        else if (sscanf(line, "MemTotal: %llu kB", &v) == 1) total = v;
    }
    fclose(f);
    return (uint64_t)(avail ? avail : total) * 1024u;
}

sy_memplan sy_memplan_estimate_world(const sy_config_t *cfg, int world) {
    sy_memplan m = sy_memplan_estimate(cfg);
    int K = cfg->cluster.replicas < world - 1 ? cfg->cluster.replicas : world - 1;
    if (world < 2 || K < 1) return m;
    /* replica.h: two stages of [dense | its experts] and two slots of its K buddies' experts,
     * each fp32 weights + 2 moments (12 bytes a parameter), and the gradients of a delta
     * exchange, its experts' sent and its buddies' received (4 bytes a parameter); a rank owns
     * at most ceil(E/W) */
    const double E = cfg->model.n_experts, own = ceil(E / world);
    const double dense = m.params - E * m.expert_params;
    m.replica_bytes = 12.0 * (2.0 * (dense + own * m.expert_params) + 2.0 * K * own * m.expert_params) +
                      4.0 * (own + K * own) * m.expert_params;
    m.total_bytes += m.replica_bytes;
    return m;
}

sy_status sy_memplan_check(const sy_config_t *cfg, int copies) { return sy_memplan_check_world(cfg, copies, 1); }

sy_status sy_memplan_check_world(const sy_config_t *cfg, int copies, int world) {
    sy_memplan m = sy_memplan_estimate_world(cfg, world);
    double need = m.total_bytes * (copies > 0 ? copies : 1);
    double bound = cfg->train.max_memory_gb * GIB;
    const char *source = "train.max_memory_gb";
    if (bound <= 0) {
        bound = (double)sy_memplan_available();
        source = "the memory available on this machine (MemAvailable)";
        if (bound <= 0) return SY_OK; /* unknown: no bound to check against */
    }
    if (need <= bound) return SY_OK;
    char n[64] = "", rep[96] = "";
    if (copies > 1) snprintf(n, sizeof n, " x %d workers", copies);
    if (m.replica_bytes > 0)
        snprintf(rep, sizeof rep, ", %.2f GiB of peer replicas (cluster.replicas)", m.replica_bytes / GIB);
    return sy_err_set(SY_EINVAL, "the model needs about %.2f GiB%s (%.3g parameters: %.2f GiB of weights, gradients "
                      "and optimizer state, %.2f GiB of activations per process%s), more than %s (%.2f GiB); make "
                      "the model or micro-batch smaller, or raise the bound with --set train.max_memory_gb=N",
                      need / GIB, n, m.params, m.state_bytes / GIB, m.act_bytes / GIB, rep, source, bound / GIB);
}
