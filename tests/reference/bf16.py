"""Independent bf16 recipe of the PyTorch reference (model spec §4, `precision = bf16`).

Written from the spec, not from the C code. The parameters are those of reference.model.SwitchLM
(spec §7 names, loaded the same way); this module only replaces the forward pass by one that
rounds to bf16 (round-to-nearest-even, torch's bfloat16) at exactly the points of spec §4:

  1. every 2-D parameter except the router's is read through a bf16 copy of the master, taken
     anew at every forward (= refreshed after every optimizer step).
  2. every activation an op writes is rounded: embedding sum, LayerNorm outputs, qkv, attention
     output, projections, residual sums, MLP/expert hidden layer and its GELU, expert outputs,
     combine output; and the gradient of each of them (the backward of R below rounds it).
     A GEMM multiplies its bf16 inputs, accumulates in the model's dtype and rounds once.
     Where a bf16 activation receives gradient from more than one consumer, each consumer's
     contribution is rounded (R on the consumer's input), then their sum is rounded (R on the producer's output):
     "an accumulating GEMM rounds its product, then rounds the sum".
  3. never rounded (the model's dtype): LayerNorm mean/rstd, attention scores and probabilities,
     logits and cross-entropy, the router path (input cast from bf16, logits, softmax, gates,
     aux and z losses and their gradients), weight gradients, masters, moments.

Readings chosen where §4 does not say (each is the literal "round where a bf16 activation or
its gradient is written, read every other tensor as it is"):
  a. wpe is a 2-D parameter, so it is read from its bf16 copy like wte (§4.1 "every 2-D
     parameter except the router's"), although it feeds no GEMM.
  b. The attention output GEMM P·V reads the fp32 probabilities P unrounded (§4.3 keeps them
     fp32); likewise the backward GEMMs that read fp32 gradients (dlogits for d(LN_f out) and
     dwte, dscores for dq/dk) read them unrounded; their bf16 results are rounded once.
  c. The gradient of the logits (and of scores/probabilities) is fp32: it is the gradient of an
     fp32 tensor, not of a bf16 activation.
  d. The router's contribution to the gradient of its bf16 input, dz·W_r, is computed in fp32
     and rounded before it is added to the expert path's (rounded) contribution, and the sum is
     rounded again (the accumulating-GEMM rule; the router path itself stays fp32 up to dz·W_r).
  e. The combine output is y_t = bf16(g_t · Expert(h_t)) with the fp32 gate and the bf16 expert
     output; its gradient is rounded, d Expert(h_t) = bf16(g_t · dy_t), and the gate gradient
     γ_t = <dy_t, Expert(h_t)> is fp32.
  f. LayerNorm weights are 1-D: read in fp32 (only 2-D parameters have bf16 copies).

Arithmetic runs in the dtype of the SwitchLM it is given. The spec's recipe is fp32 (fp32
accumulation in every GEMM, fp32 master weights, weight gradients and AdamW), so build the model
with dtype=torch.float32: an fp64 model accumulates GEMMs exactly, which rounds a different set
of near-ties and measurably shifts the results (step-1 loss by ~1e-6 relative on the test's
configs, 50x what separates switchyard from the fp32 recipe). Weight gradients are summed across
micro-batches in fp64 either way.

    model = SwitchLM(cfg, dtype=torch.float32)      # reference.model
    model.load_state_dict(init)
    recs  = train_steps_bf16(model, tokens, cfg, K)
"""
import math

import torch
import torch.nn.functional as F

from .model import LN_EPS, gelu_tanh, lr_at, make_optimizer


# Classes of rounding points a test may switch off (DISABLED.add(...)) to show that it sees
# each of them: "weights" (§4.1), "activations" and "gradients" (§4.2). Empty = the recipe.
DISABLED = set()


def round_bf16(t):
    """Round-to-nearest-even to bf16 through fp32 (as a fp32 value would be), kept in t's dtype."""
    return t.to(torch.float32).to(torch.bfloat16).to(t.dtype)


def _maybe(cls, t):
    return t if cls in DISABLED else round_bf16(t)


class _RoundActivation(torch.autograd.Function):
    """A bf16 activation: rounds the value, and rounds the gradient that flows back into it."""

    @staticmethod
    def forward(ctx, x):
        return _maybe("activations", x)

    @staticmethod
    def backward(ctx, g):
        return _maybe("gradients", g)


class _RoundWeight(torch.autograd.Function):
    """The bf16 working copy of a master weight; the weight gradient stays unrounded."""

    @staticmethod
    def forward(ctx, w):
        return _maybe("weights", w)

    @staticmethod
    def backward(ctx, g):
        return g


R = _RoundActivation.apply
Wb = _RoundWeight.apply


def linear(x, w):
    """x · wᵀ with bf16 x (its gradient contribution rounded) and bf16 w; output rounded once."""
    return R(R(x) @ Wb(w).t())


def layer_norm(x, w):
    """Statistics unrounded; output rounded; input-gradient contribution rounded; w fp32."""
    return R(F.layer_norm(R(x), (x.shape[-1],), w, None, LN_EPS))


def mlp(h, m):
    """W_2 · gelu(W_1 · h): hidden, GELU and output each rounded."""
    return linear(R(gelu_tanh(linear(h, m.fc.weight))), m.proj.weight)


def attention(h, a, n_heads):
    B, T, D = h.shape
    hd = D // n_heads
    qkv = linear(h, a.qkv.weight)                                           # (B,T,3D) bf16
    q, k, v = (R(t).view(B, T, n_heads, hd).transpose(1, 2) for t in qkv.split(D, dim=-1))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)                         # fp32 scores
    mask = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)             # fp32 probabilities
    y = R(att @ v).transpose(1, 2).reshape(B, T, D)                         # attention output bf16
    return linear(y, a.proj.weight)


def switch(h, moe, capacity):
    """h: (G, D) bf16. Router fp32 (spec §2, §4.3), experts and combine in bf16."""
    G, D = h.shape
    E = len(moe.experts)
    logits = R(h) @ moe.router.weight.t()           # fp32 router on the bf16 input, W_r unrounded
    probs = logits.softmax(dim=-1)
    choice = probs.argmax(dim=-1)
    gate = probs.gather(1, choice[:, None]).squeeze(1)
    onehot = F.one_hot(choice, E)
    pos = (onehot.cumsum(0) - onehot).gather(1, choice[:, None]).squeeze(1)
    keep = pos < capacity
    y = torch.zeros_like(h)
    for e, expert in enumerate(moe.experts):
        idx = torch.nonzero(keep & (choice == e), as_tuple=False).squeeze(1)
        if idx.numel() == 0:
            continue
        out = mlp(h.index_select(0, idx), expert)                          # expert output bf16
        y = y.index_add(0, idx, out * gate.index_select(0, idx)[:, None])
    y = R(y)                                                                # combine output bf16
    f = onehot.sum(0).to(probs.dtype) / G
    aux = E * (f * probs.mean(0)).sum()
    z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    return y, {"aux": aux, "z": z, "dropped": int((~keep).sum()), "routed": G, "counts": onehot.sum(0)}


def forward_micro(model, tokens, eval_mode=False):
    """bf16 twin of SwitchLM.forward_micro: returns ce_sum, [per Switch layer stats]."""
    cfg = model.cfg
    inp, tgt = tokens[:, :-1].long(), tokens[:, 1:].long()
    b, T = inp.shape
    G = b * T
    cap = cfg.capacity(G, cfg.eval_capacity_factor if eval_mode else cfg.capacity_factor)
    wte = Wb(model.wte)
    x = R(wte[inp] + Wb(model.wpe)[:T][None])                              # embedding sum bf16
    stats = []
    for blk in model.blocks:
        x = R(x + attention(layer_norm(x, blk.ln1.weight), blk.attn, cfg.n_heads))
        h = layer_norm(x, blk.ln2.weight)
        if blk.switch:
            y, st = switch(h.reshape(G, -1), blk.moe, cap)
            stats.append(st)
            x = R(x + y.view(b, T, -1))
        else:
            x = R(x + mlp(h, blk.mlp))
    logits = R(layer_norm(x, model.ln_f.weight)) @ wte.t()                 # fp32 logits
    ce_sum = F.cross_entropy(logits.reshape(G, -1), tgt.reshape(G), reduction="sum")
    return ce_sum, stats


def micro_loss(model, tokens, n_micro):
    """This micro-batch's share of the global loss (as SwitchLM.micro_loss)."""
    cfg = model.cfg
    b, T1 = tokens.shape
    ce_sum, stats = forward_micro(model, tokens)
    ce = ce_sum / (n_micro * b * (T1 - 1))
    zero = ce_sum.new_zeros(())
    aux = cfg.aux_loss_coef * sum((s["aux"] for s in stats), zero) / n_micro
    z = cfg.z_loss_coef * sum((s["z"] for s in stats), zero) / n_micro
    return ce + aux + z, {"ce": ce.item(), "aux": aux.item(), "z": z.item(),
                          "dropped": sum(s["dropped"] for s in stats),
                          "routed": sum(s["routed"] for s in stats),
                          "counts": [s["counts"].tolist() for s in stats]}


def train_steps_bf16(model, tokens, cfg, K, opt=None, capture_grads=(1,), start_step=0):
    """As reference.model.train_steps, with the bf16 forward/backward above. The weight gradients
    of the micro-batches are summed unrounded (the spec: fp32 per micro-batch, fp64 across)."""
    tokens = torch.as_tensor(tokens)
    M = cfg.n_micro
    if tokens.dim() != 4 or tokens.shape[0] < K or tokens.shape[1] != M:
        raise ValueError("tokens shape %s, expected [K=%d, M=%d, b, T+1]" % (tuple(tokens.shape), K, M))
    if opt is None:
        opt = make_optimizer(model, cfg)
    params = list(model.parameters())
    records = []
    for k in range(K):
        s = start_step + k
        opt.zero_grad(set_to_none=False)
        rec = {"step": s + 1, "ce": 0.0, "aux": 0.0, "z": 0.0, "dropped": 0, "routed": 0, "counts": []}
        acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]   # fp64 across micro-batches
        for m in range(M):
            loss, info = micro_loss(model, tokens[k, m], M)
            loss.backward()
            for a, p in zip(acc, params):
                a += p.grad
                p.grad.zero_()
            for key in ("ce", "aux", "z", "dropped", "routed"):
                rec[key] += info[key]
            rec["counts"].append(info["counts"])
        for a, p in zip(acc, params):
            p.grad.copy_(a)
        rec["loss"] = rec["ce"] + rec["aux"] + rec["z"]
        if (s + 1) in capture_grads:
            rec["grads"] = {n: a.clone() for (n, _), a in zip(model.named_parameters(), acc)}
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm=cfg.grad_clip)
        else:
            norm = torch.norm(torch.stack([p.grad.detach().norm() for p in params]))
        rec["grad_norm"] = float(norm)
        rec["lr"] = lr = lr_at(cfg, s)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        records.append(rec)
    return records
