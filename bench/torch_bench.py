#!/usr/bin/python3
"""PyTorch baseline for bench/sy_bench.c (run by bench/run.sh; not a test).

  torch_bench.py info
  torch_bench.py sgemm  [--iters N]
  torch_bench.py switch --load FILE [--tokens G --d-model D --d-ff F --experts E --cf X]
  torch_bench.py step   --load PREFIX   (PREFIX.json: the config the C side used)

The switch and step modes load the inputs sy_bench wrote with --dump, so both sides run the
same routing load (same router weights, same inputs, same initial model, same tokens).
Each mode prints human-readable lines and one "RESULT name=... key=value ..." line.

The Switch layer is the straightforward index-based PyTorch implementation: fp32 router,
argmax, capacity by a cumulative sum of the one-hot in token order, index_select of each
expert's kept tokens, F.linear + gelu(tanh) + F.linear, index_add back scaled by the gate;
aux and z losses; autograd for the backward.
"""
import argparse
import ctypes
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def blas_info():
    """Which BLAS this torch process runs, as far as it can be told."""
    cfg = torch.__config__.show()
    blas = "unknown"
    for part in cfg.replace("\n", ",").split(","):
        if "BLAS_INFO" in part:
            blas = part.strip()
    core, nthreads, lib = "unknown", -1, "?"
    # torch links libblas.so.3 (Debian alternatives); if that is OpenBLAS, its libopenblas.so.0
    # is already in the process and dlopen returns the same handle.
    maps = open("/proc/self/maps").read()
    libs = sorted({l.split()[-1] for l in maps.splitlines() if "blas" in l.split()[-1]})
    lib = ";".join(libs) if libs else "?"
    try:
        ob = ctypes.CDLL("libopenblas.so.0")
        ob.openblas_get_corename.restype = ctypes.c_char_p
        core = ob.openblas_get_corename().decode()
        nthreads = ob.openblas_get_num_threads()
        ob.openblas_get_config.restype = ctypes.c_char_p
        cfgs = ob.openblas_get_config().decode()
    except OSError:
        cfgs = "?"
    return blas, core, nthreads, lib, cfgs


def timeit(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    t = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return statistics.median(t) * 1e3, min(t) * 1e3


# --------------------------------------------------------------------------------------------
# Switch layer (model spec §2), index-based dispatch.


def switch_forward(h, Wr, W1, W2, capacity_factor):
    """h [G,D]; Wr [E,D]; W1/W2 sequences of E tensors [F,D] / [D,F].
    Returns y [G,D], aux_group, z_group, kept count."""
    G = h.shape[0]
    E = Wr.shape[0]
    C = min(G, max(4, math.ceil(capacity_factor * G / E)))
    logits = F.linear(h, Wr)                                  # [G,E] fp32
    probs = torch.softmax(logits, dim=-1)
    gate, expert = probs.max(dim=-1)                          # ties: first index
    onehot = F.one_hot(expert, E)                             # [G,E] int64
    pos = (torch.cumsum(onehot, dim=0) - onehot).gather(1, expert[:, None]).squeeze(1)
    keep = pos < C
    f = onehot.to(h.dtype).mean(dim=0)                        # no gradient
    P = probs.mean(dim=0)
    aux = E * (f * P).sum()
    lse = torch.logsumexp(logits, dim=-1)
    z = (lse * lse).mean()
    y = torch.zeros_like(h)
    kept = 0
    for e in range(E):
        idx = torch.nonzero((expert == e) & keep, as_tuple=False).squeeze(1)
        if idx.numel() == 0:
            continue
        kept += idx.numel()
        x = h.index_select(0, idx)
        o = F.linear(F.gelu(F.linear(x, W1[e]), approximate="tanh"), W2[e])
        y.index_add_(0, idx, o * gate.index_select(0, idx)[:, None])
    return y, aux, z, kept


def bench_switch(a):
    G, D, Fd, E = a.tokens, a.d_model, a.d_ff, a.experts
    raw = torch.from_file(a.load, shared=False, size=2 * G * D + E * D + 2 * E * Fd * D,
                          dtype=torch.float32)
    o = 0

    def take(n, shape):
        nonlocal o
        t = raw[o:o + n].view(*shape).clone()
        o += n
        return t

    h = take(G * D, (G, D)).requires_grad_()
    Wr = take(E * D, (E, D)).requires_grad_()
    # one leaf tensor per expert, like the model's per-expert nn.Linear weights (slicing one
    # [E,F,D] leaf inside the graph would make autograd zero-fill the whole stack per expert)
    W1 = [take(Fd * D, (Fd, D)).requires_grad_() for _ in range(E)]
    W2 = [take(D * Fd, (D, Fd)).requires_grad_() for _ in range(E)]
    dout = take(G * D, (G, D))
    aux_coef, z_coef = 0.01, 0.001
    one = torch.ones(())
    res = {}

    def step():
        for t in [h, Wr] + W1 + W2:
            t.grad = None
        t0 = time.perf_counter()
        y, aux, z, kept = switch_forward(h, Wr, W1, W2, a.cf)
        t1 = time.perf_counter()
        torch.autograd.backward([y, aux_coef * aux + z_coef * z], [dout, one])
        t2 = time.perf_counter()
        res.update(y=y, aux=aux, z=z, kept=kept)
        res.setdefault("tf", []).append(t1 - t0)
        res.setdefault("tb", []).append(t2 - t1)

    for _ in range(a.warmup):
        step()
    res.clear()
    tt = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        step()
        tt.append(time.perf_counter() - t0)
    ms, min_ms = statistics.median(tt) * 1e3, min(tt) * 1e3
    fwd = statistics.median(res["tf"]) * 1e3
    bwd = statistics.median(res["tb"]) * 1e3
    kept = res["kept"]
    obj = float((res["y"].detach().double() * dout.double()).sum())
    dh_norm = float(h.grad.double().norm())
    flops = 3 * (2.0 * kept * D * Fd * 2) + 3 * (2.0 * G * D * E)
    gflops = flops / (ms * 1e-3) / 1e9
    C = min(G, max(4, math.ceil(a.cf * G / E)))
    print(f"torch switch G={G} D={D} F={Fd} E={E} cf={a.cf}: C={C} kept {kept}/{G}, "
          f"aux {float(res['aux']):.4f} z {float(res['z']):.4f}")
    print(f"  median over {a.iters}: fwd {fwd:.2f} ms, bwd {bwd:.2f} ms, fwd+bwd {ms:.2f} ms, "
          f"{gflops:.1f} GFLOP/s")
    print(f"RESULT name={a.name or 'switch'} ms={ms:.4f} min_ms={min_ms:.4f} fwd_ms={fwd:.4f} bwd_ms={bwd:.4f} gflops={gflops:.3f} "
          f"kept={kept} G={G} capacity={C} aux={float(res['aux']):.6f} z={float(res['z']):.6f} "
          f"obj={obj:.6e} dh_norm={dh_norm:.6e}")


# --------------------------------------------------------------------------------------------
# The model (spec §1): pre-LN blocks, causal attention, Switch layers every S-th block, tied
# head. Parameter names are the spec §7 names, so the C model's dump loads by name.


class LayerNorm(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, None, 1e-5)


class Attn(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.H = H
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D, bias=False)

    def forward(self, x, mask):
        B, T, D = x.shape
        H, hd = self.H, D // self.H
        q, k, v = self.qkv(x).split(D, dim=2)
        q = q.view(B, T, H, hd).transpose(1, 2)
        k = k.view(B, T, H, hd).transpose(1, 2)
        v = v.view(B, T, H, hd).transpose(1, 2)
        # torch 1.13 has no F.scaled_dot_product_attention: the manual (nanoGPT) form
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(mask[:T, :T], float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, D)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, D, Fd):
        super().__init__()
        self.fc = nn.Linear(D, Fd, bias=False)
        self.proj = nn.Linear(Fd, D, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Router(nn.Module):
    def __init__(self, D, E):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(E, D))


class MoE(nn.Module):
    def __init__(self, D, Fd, E, cf):
        super().__init__()
        self.cf = cf
        self.router = Router(D, E)
        self.experts = nn.ModuleList([MLP(D, Fd) for _ in range(E)])

    def forward(self, x):
        B, T, D = x.shape
        W1 = [ex.fc.weight for ex in self.experts]
        W2 = [ex.proj.weight for ex in self.experts]
        y, aux, z, kept = switch_forward(x.reshape(B * T, D), self.router.weight, W1, W2,
                                         self.cf)
        return y.view(B, T, D), aux, z, B * T - kept


class Block(nn.Module):
    def __init__(self, D, H, Fd, E, cf, switch):
        super().__init__()
        self.ln1 = LayerNorm(D)
        self.attn = Attn(D, H)
        self.ln2 = LayerNorm(D)
        if switch:
            self.moe = MoE(D, Fd, E, cf)
        else:
            self.mlp = MLP(D, Fd)

    def forward(self, x, mask):
        x = x + self.attn(self.ln1(x), mask)
        if hasattr(self, "moe"):
            y, aux, z, dropped = self.moe(self.ln2(x))
            return x + y, aux, z, dropped
        return x + self.mlp(self.ln2(x)), None, None, 0


class SwitchLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        V, T, D, L = c["vocab_size"], c["seq_len"], c["d_model"], c["n_layers"]
        S = c["switch_every"]
        self.wte = nn.Parameter(torch.zeros(V, D))
        self.wpe = nn.Parameter(torch.zeros(T, D))
        self.blocks = nn.ModuleList([
            Block(D, c["n_heads"], c["d_ff"], c["n_experts"], c["capacity_factor"],
                  S > 0 and l % S == S - 1) for l in range(L)])
        self.ln_f = LayerNorm(D)
        self.register_buffer("mask", torch.triu(torch.ones(T, T, dtype=torch.bool), 1),
                             persistent=False)

    def forward(self, idx):
        B, T = idx.shape
        x = self.wte[idx] + self.wpe[:T]
        aux_sum, z_sum, dropped = 0.0, 0.0, 0
        for blk in self.blocks:
            x, aux, z, d = blk(x, self.mask)
            if aux is not None:
                aux_sum = aux_sum + aux
                z_sum = z_sum + z
                dropped += d
        return F.linear(self.ln_f(x), self.wte), aux_sum, z_sum, dropped


def bench_step(a):
    import json
    j = json.load(open(a.load + ".json"))
    c = {**j["run"], **j["model"], **j["train"]}
    model = SwitchLM(c)
    named = dict(model.named_parameters())
    flat = torch.from_file(a.load + ".params", shared=False,
                           size=sum(p.numel() for p in named.values()), dtype=torch.float32)
    seen = set()
    with torch.no_grad():
        for line in open(a.load + ".index"):
            name, off, n = line.split()
            off, n = int(off), int(n)
            p = named[name]  # KeyError: the C model has a tensor this module lacks
            p.copy_(flat[off:off + n].view_as(p))
            seen.add(name)
    missing = set(named) - seen
    if missing:
        sys.exit(f"torch_bench: parameters not in the dump: {sorted(missing)}")
    B, T, V = c["micro_batch_seqs"], c["seq_len"], c["vocab_size"]
    M = c["global_batch_seqs"] // B
    tokens = torch.from_file(a.load + ".tokens", shared=False, size=M * B * (T + 1),
                             dtype=torch.int32).view(M, B, T + 1).long()
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"],
                            foreach=True)
    params = list(model.parameters())

    def lr_at(s):
        if s < c["warmup_steps"]:
            return c["lr"] * (s + 1) / c["warmup_steps"]
        prog = (s - c["warmup_steps"]) / max(1, c["steps"] - c["warmup_steps"])
        return c["lr_min"] + 0.5 * (c["lr"] - c["lr_min"]) * (1 + math.cos(math.pi * prog))

    state = {"s": 0, "losses": [], "dropped": 0, "routed": 0}
    n_switch = sum(1 for b in model.blocks if hasattr(b, "moe"))

    def step():
        s = state["s"]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for mi in range(M):
            tok = tokens[mi]
            logits, aux, z, dropped = model(tok[:, :T])
            ce = F.cross_entropy(logits.view(-1, V), tok[:, 1:].reshape(-1))
            loss = (ce + c["aux_loss_coef"] * aux + c["z_loss_coef"] * z) / M
            loss.backward()
            total += float(loss)
            state["dropped"] += dropped
            state["routed"] += n_switch * B * T
        torch.nn.utils.clip_grad_norm_(params, c["grad_clip"])
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        opt.step()
        state["losses"].append(total)
        state["s"] = s + 1

    ms, min_ms = timeit(step, a.iters, a.warmup)
    ntok = M * B * T
    tps = ntok / (ms * 1e-3)
    dfrac = state["dropped"] / max(1, state["routed"])
    print(f"torch step: {M} x {B} seqs, {sum(p.numel() for p in params)} params")
    print(f"  median over {a.iters}: {ms:.2f} ms/step, {tps:.0f} tokens/s; loss "
          f"{state['losses'][0]:.4f} -> {state['losses'][-1]:.4f}; dropped {100 * dfrac:.2f}%")
    print(f"RESULT name=step ms={ms:.4f} min_ms={min_ms:.4f} tokens_per_s={tps:.1f} tokens={ntok} "
          f"loss0={state['losses'][0]:.6f} loss_last={state['losses'][-1]:.6f} "
          f"dropped_frac={dfrac:.5f} steps={state['s']}")


def bench_sgemm(a):
    n = 2048
    g = torch.Generator().manual_seed(1)
    A = torch.randn(n, n, generator=g)
    B = torch.randn(n, n, generator=g)
    C = torch.empty(n, n)
    ms, min_ms = timeit(lambda: torch.mm(A, B, out=C), a.iters, 1)
    gflops = 2.0 * n ** 3 / (ms * 1e-3) / 1e9
    print(f"torch sgemm {n}^3: median {ms:.2f} ms, {gflops:.1f} GFLOP/s")
    print(f"RESULT name=sgemm ms={ms:.4f} min_ms={min_ms:.4f} gflops={gflops:.3f} threads={torch.get_num_threads()}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["info", "sgemm", "switch", "step"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--load")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--cf", type=float, default=1.25)
    p.add_argument("--name", help="the RESULT line's name (default: the mode)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.mode == "info":
        blas, core, nt, lib, cfgs = blas_info()
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {blas}; "
              f"BLAS library {lib}; OpenBLAS core {core}, {nt} threads ({cfgs}); "
              f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
        return
    if a.mode == "sgemm":
        a.iters = a.iters or 5
        bench_sgemm(a)
        return
    if not a.load:
        p.error(f"{a.mode} needs --load (written by sy_bench {a.mode} --dump)")
    if a.mode == "switch":
        a.iters, a.warmup = a.iters or 20, 3 if a.warmup is None else a.warmup
        bench_switch(a)
    else:
        a.iters, a.warmup = a.iters or 10, 2 if a.warmup is None else a.warmup
        bench_step(a)


if __name__ == "__main__":
    main()
