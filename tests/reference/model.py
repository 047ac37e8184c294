"""Independent PyTorch reference of switchyard's model (docs: /work/shared/spec/model.md §1-2, §5, §7).

Written from the spec, not from the C code. Float64 by default, so that a comparison measures
switchyard's (fp32) error rather than the reference's.

    cfg   = RefConfig.from_dict(json.load(open("config.json")))   # sections run/model/train/...
    model = SwitchLM(cfg)                                         # spec §7 parameter names
    model.load_state_dict(tensors)                                # e.g. init.safetensors
    recs  = train_steps(model, tokens, cfg, K)                    # tokens: int [K, M, b, T+1]

Every loss value reported follows sy_refdump's convention: "aux" and "z" already include their
coefficients, and "loss" = ce + aux + z.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LN_EPS = 1e-5


@dataclass
class RefConfig:
    vocab_size: int
    seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    n_experts: int
    switch_every: int
    capacity_factor: float
    eval_capacity_factor: float
    aux_loss_coef: float
    z_loss_coef: float
    router_jitter: float
    expert_dropout: float
    micro_batch_seqs: int
    global_batch_seqs: int
    lr: float
    lr_min: float
    warmup_steps: int
    steps: int
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float

    @classmethod
    def from_dict(cls, d):
        """From the sectioned config dict (config.json of sy_refdump / sy_config_to_json)."""
        m, t, r = d["model"], d["train"], d["run"]
        return cls(
            vocab_size=int(m["vocab_size"]), seq_len=int(m["seq_len"]), d_model=int(m["d_model"]),
            n_layers=int(m["n_layers"]), n_heads=int(m["n_heads"]), d_ff=int(m["d_ff"]),
            n_experts=int(m["n_experts"]), switch_every=int(m["switch_every"]),
            capacity_factor=float(m["capacity_factor"]), eval_capacity_factor=float(m["eval_capacity_factor"]),
            aux_loss_coef=float(m["aux_loss_coef"]), z_loss_coef=float(m["z_loss_coef"]),
            router_jitter=float(m["router_jitter"]), expert_dropout=float(m["expert_dropout"]),
            micro_batch_seqs=int(t["micro_batch_seqs"]), global_batch_seqs=int(t["global_batch_seqs"]),
            lr=float(t["lr"]), lr_min=float(t["lr_min"]), warmup_steps=int(t["warmup_steps"]),
            steps=int(r["steps"]), weight_decay=float(t["weight_decay"]), beta1=float(t["beta1"]),
            beta2=float(t["beta2"]), eps=float(t["eps"]), grad_clip=float(t["grad_clip"]),
        )

    @property
    def n_micro(self):
        return self.global_batch_seqs // self.micro_batch_seqs

    def is_switch(self, layer):
        S = self.switch_every
        return S > 0 and layer % S == S - 1

    def capacity(self, G, factor):
        """Spec §2.3: C = min(G, max(4, ceil(capacity_factor * G / E)))."""
        return min(G, max(4, math.ceil(factor * G / self.n_experts)))


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, eps 1e-5 (spec §1)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, None, LN_EPS)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class MLP(nn.Module):
    """W_2 · gelu(W_1 · h), no biases (spec §1); also every expert."""

    def __init__(self, d, f):
        super().__init__()
        self.fc = nn.Linear(d, f, bias=False)
        self.proj = nn.Linear(f, d, bias=False)

    def forward(self, h):
        return self.proj(gelu_tanh(self.fc(h)))


class Attention(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)   # rows: q, then k, then v
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, h):
        B, T, D = h.shape
        H = self.n_heads
        hd = D // H
        q, k, v = self.qkv(h).split(D, dim=-1)
        q, k, v = (a.view(B, T, H, hd).transpose(1, 2) for a in (q, k, v))   # (B,H,T,hd)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        mask = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, D)
        return self.proj(y)


class SwitchFFN(nn.Module):
    """Switch layer (spec §2), routing group = the rows of its input (one micro-batch)."""

    def __init__(self, d, f, n_experts):
        super().__init__()
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(d, f) for _ in range(n_experts))

    def forward(self, h, capacity):
        """h: (G, D) in group order. Returns y (G, D) and a stats dict (aux, z unscaled)."""
        G, D = h.shape
        E = len(self.experts)
        # 1. router at >= fp32 precision (the reference runs in fp64, which is more than enough)
        rdtype = torch.promote_types(h.dtype, torch.float32)
        logits = F.linear(h.to(rdtype), self.router.weight.to(rdtype))        # (G, E)
        probs = logits.softmax(dim=-1)
        # 2. top-1; torch.argmax returns the first maximal index, i.e. ties -> lowest index
        choice = probs.argmax(dim=-1)                                          # (G,)
        gate = probs.gather(1, choice[:, None]).squeeze(1)                     # not renormalised
        # 3-4. exclusive prefix count per expert, in group order; earlier tokens win a slot
        onehot = F.one_hot(choice, E)                                          # (G, E) int64
        pos = (onehot.cumsum(0) - onehot).gather(1, choice[:, None]).squeeze(1)
        keep = pos < capacity
        # 5. dispatch by index: gather the kept tokens of each expert, scatter-add the outputs
        y = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            idx = torch.nonzero(keep & (choice == e), as_tuple=False).squeeze(1)
            if idx.numel() == 0:
                continue
            out = expert(h.index_select(0, idx))
            y = y.index_add(0, idx, out * gate.index_select(0, idx).to(out.dtype)[:, None])
        # 6. aux: f counted before capacity, no gradient through f
        f = onehot.sum(0).to(rdtype) / G
        P = probs.mean(0)
        aux = E * (f * P).sum()
        # 7. z-loss
        z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
        counts = onehot.sum(0)
        return y, {"aux": aux, "z": z, "dropped": int((~keep).sum()), "routed": G,
                   "counts": counts, "choice": choice, "keep": keep}


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.ln2 = LayerNorm(cfg.d_model)
        self.switch = cfg.is_switch(layer)
        if self.switch:
            self.moe = SwitchFFN(cfg.d_model, cfg.d_ff, cfg.n_experts)
        else:
            self.mlp = MLP(cfg.d_model, cfg.d_ff)

    def forward(self, x, capacity):
        x = x + self.attn(self.ln1(x))
        h = self.ln2(x)
        if not self.switch:
            return x + self.mlp(h), None
        B, T, D = h.shape
        y, st = self.moe(h.reshape(B * T, D), capacity)   # (B,T,D) -> sequence-major group
        return x + y.view(B, T, D), st


class SwitchLM(nn.Module):
    def __init__(self, cfg, dtype=torch.float64):
        super().__init__()
        if cfg.router_jitter != 0 or cfg.expert_dropout != 0:
            raise ValueError("reference: router_jitter (%g) and expert_dropout (%g) must be 0"
                             % (cfg.router_jitter, cfg.expert_dropout))
        if cfg.d_model % cfg.n_heads:
            raise ValueError("reference: d_model %d not divisible by n_heads %d" % (cfg.d_model, cfg.n_heads))
        self.cfg = cfg
        self.wte = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.d_model))
        self.wpe = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg, l) for l in range(cfg.n_layers))
        self.ln_f = LayerNorm(cfg.d_model)
        self.to(dtype)

    def forward_micro(self, tokens, eval_mode=False):
        """One micro-batch (= one routing group). tokens: int (b, T+1).
        Returns ce_sum (sum of token cross-entropies), [per Switch layer stats]."""
        cfg = self.cfg
        inp, tgt = tokens[:, :-1].long(), tokens[:, 1:].long()
        b, T = inp.shape
        G = b * T
        cap = cfg.capacity(G, cfg.eval_capacity_factor if eval_mode else cfg.capacity_factor)
        x = self.wte[inp] + self.wpe[:T][None]
        stats = []
        for blk in self.blocks:
            x, st = blk(x, cap)
            if st is not None:
                stats.append(st)
        logits = self.ln_f(x) @ self.wte.t()                                  # tied embeddings
        ce_sum = F.cross_entropy(logits.reshape(G, -1), tgt.reshape(G), reduction="sum")
        return ce_sum, stats

    def micro_loss(self, tokens, n_micro, eval_mode=False):
        """This micro-batch's share of the global loss L (spec §2 "Total loss"): summed over the
        n_micro micro-batches of a global batch it gives L, so backward() of each accumulates
        exactly dL/dθ. Returns (loss tensor, dict of floats)."""
        cfg = self.cfg
        b, T1 = tokens.shape
        ce_sum, stats = self.forward_micro(tokens, eval_mode)
        ce = ce_sum / (n_micro * b * (T1 - 1))
        zero = ce_sum.new_zeros(())
        aux = cfg.aux_loss_coef * sum((s["aux"] for s in stats), zero) / n_micro
        z = cfg.z_loss_coef * sum((s["z"] for s in stats), zero) / n_micro
        loss = ce + aux + z
        info = {"ce": ce.item(), "aux": aux.item(), "z": z.item(),
                "dropped": sum(s["dropped"] for s in stats), "routed": sum(s["routed"] for s in stats),
                "aux_raw": [s["aux"].item() for s in stats], "z_raw": [s["z"].item() for s in stats],
                "counts": [s["counts"].tolist() for s in stats]}
        return loss, info


def lr_at(cfg, step0):
    """optim.h schedule, 0-based step: linear warm-up, then cosine to lr_min."""
    if step0 < cfg.warmup_steps:
        return cfg.lr * (step0 + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * (step0 - cfg.warmup_steps) / span))


def make_optimizer(model, cfg):
    """torch AdamW with weight decay on 2-D tensors only (two parameter groups)."""
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() != 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def train_steps(model, tokens, cfg, K, opt=None, capture_grads=(1,), start_step=0):
    """Runs K optimizer steps. tokens: int [K, M, b, T+1] (or a longer leading dim).
    Per step: zero grads; forward+backward of the M micro-batches (each loss is its share of the
    global L); record losses; global grad norm; clip_grad_norm_(grad_clip) when grad_clip > 0;
    lr per the schedule; AdamW step. Returns a list of per-step dicts (1-based "step"); steps in
    capture_grads also carry "grads" (name -> clone of the unclipped gradient)."""
    tokens = torch.as_tensor(tokens)
    M = cfg.n_micro
    if tokens.dim() != 4 or tokens.shape[0] < K or tokens.shape[1] != M:
        raise ValueError("tokens shape %s, expected [K=%d, M=%d, b, T+1]" % (tuple(tokens.shape), K, M))
    if opt is None:
        opt = make_optimizer(model, cfg)
    params = [p for p in model.parameters()]
    records = []
    for k in range(K):
        s = start_step + k
        opt.zero_grad(set_to_none=False)
        rec = {"step": s + 1, "loss": 0.0, "ce": 0.0, "aux": 0.0, "z": 0.0, "dropped": 0, "routed": 0,
               "counts": []}
        for m in range(M):
            loss, info = model.micro_loss(tokens[k, m], M)
            loss.backward()
            for key in ("ce", "aux", "z", "dropped", "routed"):
                rec[key] += info[key]
            rec["counts"].append(info["counts"])
        rec["loss"] = rec["ce"] + rec["aux"] + rec["z"]
        if (s + 1) in capture_grads:
            rec["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm=cfg.grad_clip)
        else:
            norm = torch.norm(torch.stack([p.grad.detach().norm() for p in params]))
        rec["grad_norm"] = float(norm)
        lr = lr_at(cfg, s)
        for g in opt.param_groups:
            g["lr"] = lr
        rec["lr"] = lr
        opt.step()
        records.append(rec)
    return records
