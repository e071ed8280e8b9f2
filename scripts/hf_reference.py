#!/usr/bin/env python3
"""Pure float64 reference of tinylm-code-32k (HF LlamaForCausalLM layout).

Independent of libfreekv and of examples/llama: numpy only, weights read
straight from model.safetensors (no torch here, and a CPU torch wheel is not
needed for a 6-layer model). The forward is HF Llama's: RMSNorm (eps from
config.json), rotate-half RoPE (theta from config.json), GQA attention with
scale 1/sqrt(head_dim), SwiGLU MLP, untied head.

Scoring matches `build/examples/llama eval`: the window is the text's bytes
from OFFSET; prefill bytes [0, N), then step i (0..M-1) feeds byte N+i and
scores byte N+i+1, so the logits at positions N..N+M-1 predict bytes
N+1..N+M and ppl = exp(mean NLL). The reference is full causal attention over
the whole window (what DENSE must equal).

Besides DENSE, `--emulate` runs the decode positions again with libfreekv's
token selection emulated from docs/design.md sections 1-3 (sink, window,
partial page, Quest min/max scores, MEAN_SOFTMAX group aggregation, top-K with
ties to the lower page) using the current query (RESIDENT/SYNC), and with an
oracle that picks, per KV head, the K candidate pages of largest true dense
attention mass (summed over the group's query heads): the upper bound of any
page selection of the same budget. It reports per (layer, query head) where
the dense attention mass goes (sink, window + partial page, selected pages,
missing pages) and the resulting ppl. The prefill is dense in both (as in the
engine); only the decode steps attend sparsely.

Usage:
  scripts/hf_reference.py --model DIR --text FILE [--offset B] --prefill N \
      --steps M [--emulate --budgets 2048,4096 --page 32 \
      --sinkwindow 512/512,128/128] [--json]
"""
import argparse
import json
import math
import os
import struct
import sys
import time

import numpy as np

DT = np.float64


def load_safetensors(path):
    """Returns {name: float64 array}; the format is an 8-byte little-endian
    header length, a JSON header, then raw little-endian tensors."""
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
        data = f.read()
    kinds = {"F16": np.float16, "BF16": None, "F32": np.float32,
             "F64": np.float64}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        raw = data[a:b]
        if meta["dtype"] == "BF16":
            u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = u.view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(kinds[meta["dtype"]])
                                .newbyteorder("<"))
        out[name] = arr.reshape(meta["shape"]).astype(DT)
    return out


class Model:
    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            c = json.load(f)
        self.L = c["num_hidden_layers"]
        self.H = c["num_attention_heads"]
        self.KVH = c["num_key_value_heads"]
        self.D = c.get("head_dim", c["hidden_size"] // self.H)
        self.G = self.H // self.KVH
        self.eps = c["rms_norm_eps"]
        self.theta = c["rope_theta"]
        self.w = load_safetensors(os.path.join(model_dir, "model.safetensors"))
        self.inv_freq = 1.0 / (self.theta ** (np.arange(0, self.D, 2, dtype=DT)
                                              / self.D))

    def W(self, name):
        return self.w[name]

    def rms(self, x, name):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) \
            * self.w[name]

    def rope(self, x, pos):
        # x: [T, heads, D]; rotate-half convention (HF Llama).
        f = pos[:, None].astype(DT) * self.inv_freq[None, :]
        emb = np.concatenate([f, f], axis=-1)
        cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
        h = self.D // 2
        rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
        return x * cos + rot * sin

    def qkv(self, l, h, pos):
        p = "model.layers.%d." % l
        x = self.rms(h, p + "input_layernorm.weight")
        q = (x @ self.W(p + "self_attn.q_proj.weight").T).reshape(-1, self.H, self.D)
        k = (x @ self.W(p + "self_attn.k_proj.weight").T).reshape(-1, self.KVH, self.D)
        v = (x @ self.W(p + "self_attn.v_proj.weight").T).reshape(-1, self.KVH, self.D)
        return self.rope(q, pos), self.rope(k, pos), v

    def post(self, l, h, attn):
        """Residual after attention ([T, H, D] attention output), then MLP."""
        p = "model.layers.%d." % l
        h = h + attn.reshape(attn.shape[0], -1) @ self.W(p + "self_attn.o_proj.weight").T
        x = self.rms(h, p + "post_attention_layernorm.weight")
        g = x @ self.W(p + "mlp.gate_proj.weight").T
        u = x @ self.W(p + "mlp.up_proj.weight").T
        m = (g / (1.0 + np.exp(-g))) * u
        return h + m @ self.W(p + "mlp.down_proj.weight").T

    def logits(self, h):
        return self.rms(h, "model.norm.weight") @ self.W("lm_head.weight").T


TORCH = None  # torch module when --torch-cuda is given (the device run)


def causal_attention(q, k, v, q0, G, chunk=512):
    """q: [Tq, H, D] at positions q0..q0+Tq-1; k, v: [T, KVH, D] from 0.
    Full causal softmax attention, chunked over queries."""
    if TORCH is not None:
        return causal_attention_torch(q, k, v, q0, G)
    Tq, H, D = q.shape
    scale = 1.0 / math.sqrt(D)
    out = np.empty_like(q)
    for a in range(0, Tq, chunk):
        b = min(Tq, a + chunk)
        last = q0 + b  # keys [0, last)
        for g in range(k.shape[1]):
            kg, vg = k[:last, g, :], v[:last, g, :]
            qs = q[a:b, g * G:(g + 1) * G, :].reshape(-1, D)  # [(b-a)*G, D]
            s = (qs @ kg.T) * scale
            pos = (q0 + np.arange(a, b)).repeat(G)
            s[np.arange(last)[None, :] > pos[:, None]] = -np.inf
            s -= s.max(axis=1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=1, keepdims=True)
            out[a:b, g * G:(g + 1) * G, :] = (s @ vg).reshape(b - a, G, D)
    return out


def causal_attention_torch(q, k, v, q0, G, chunk=2048):
    """The same computation in float64 on a CUDA device (32K windows take
    hours in numpy on a few cores); only the O(T^2) part runs there."""
    t = TORCH
    dev = "cuda"
    Tq, H, D = q.shape
    scale = 1.0 / math.sqrt(D)
    qt = t.from_numpy(np.ascontiguousarray(q)).to(dev)
    kt = t.from_numpy(np.ascontiguousarray(k)).to(dev)
    vt = t.from_numpy(np.ascontiguousarray(v)).to(dev)
    out = t.empty_like(qt)
    for a in range(0, Tq, chunk):
        b = min(Tq, a + chunk)
        last = q0 + b
        for g in range(k.shape[1]):
            qs = qt[a:b, g * G:(g + 1) * G, :].reshape(-1, D)
            s = (qs @ kt[:last, g, :].T) * scale
            pos = (q0 + t.arange(a, b, device=dev)).repeat_interleave(G)
            s.masked_fill_(t.arange(last, device=dev)[None, :] > pos[:, None],
                           float("-inf"))
            p = t.softmax(s, dim=1)
            out[a:b, g * G:(g + 1) * G, :] = (p @ vt[:last, g, :]).reshape(
                b - a, G, D)
    return out.cpu().numpy()


def nll_of(logits, targets):
    m = logits.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
    return lse - logits[np.arange(len(targets)), targets]


def dense_forward(model, toks, N, M):
    """Returns (per-step NLL [M], per-layer hidden states [L][T, hidden] at
    the input of each layer, per-layer k, v) for the emulation."""
    T = N + M
    pos = np.arange(T)
    h = model.W("model.embed_tokens.weight")[toks[:T]]
    hs, ks, vs = [], [], []
    for l in range(model.L):
        hs.append(h)
        q, k, v = model.qkv(l, h, pos)
        ks.append(k)
        vs.append(v)
        if l == model.L - 1:
            # Only the scored positions matter after the last layer.
            a = causal_attention(q[N:], k, v, N, model.G)
            h = model.post(l, h[N:], a)
        else:
            a = causal_attention(q, k, v, 0, model.G)
            h = model.post(l, h, a)
    nll = nll_of(model.logits(h), toks[N + 1:T + 1])
    return nll, hs, ks, vs


# --- libfreekv's selection, from docs/design.md sections 1-3 -------------

def attended_sets(n, P, S, W, K):
    """Pages for a cache holding n tokens: (sink, window, partial, cands)."""
    sealed = n // P
    sink = list(range(0, min(S, sealed)))
    window = list(range(max(S, sealed - W), sealed))
    partial = [sealed] if n % P else []
    cands = list(range(S, sealed - W)) if sealed > S + W else []
    return sink, window, partial, cands


def quest_select(qh, kmax, kmin, cands, K, scale):
    """qh: [G, D] the group's queries; kmax/kmin: [pages, D]. MEAN_SOFTMAX
    aggregation, top-K, ties to the lower page index."""
    if len(cands) <= K:
        return list(cands)
    c = np.asarray(cands)
    s = np.maximum(qh[:, None, :] * kmax[None, c, :],
                   qh[:, None, :] * kmin[None, c, :]).sum(axis=2) * scale
    s -= s.max(axis=1, keepdims=True)
    e = np.exp(s)
    a = (e / e.sum(axis=1, keepdims=True)).mean(axis=0)
    order = np.lexsort((c, -a))  # by score descending, then page ascending
    return sorted(c[order[:K]].tolist())


def rescore_select(qh, kmax, kmin, cands, K, scale, k_g, P, R):
    """Two stages: the R*K best pages by Quest's bound, then the K of them
    holding the most exact attention mass of the group (per-head softmax
    over the candidates' tokens, mean over heads): what a library holding
    the candidates' keys (a compact device copy, or the CPU pool) can do."""
    if len(cands) <= K:
        return list(cands)
    first = quest_select(qh, kmax, kmin, cands, min(len(cands), R * K), scale)
    if len(first) <= K:
        return first
    c = np.asarray(first)
    idx = (c[:, None] * P + np.arange(P)[None, :]).reshape(-1)
    s = (qh @ k_g[idx].T) * scale  # [G, len(c) * P]
    s -= s.max(axis=1, keepdims=True)
    e = np.exp(s)
    e /= e.sum(axis=1, keepdims=True)
    m = e.reshape(qh.shape[0], len(c), P).sum(axis=2).mean(axis=0)
    return sorted(c[np.lexsort((c, -m))[:K]].tolist())


MODES = ("quest", "oracle", "quest-oracle-last")


def emulate(model, toks, N, M, dense, P, S_tok, W_tok, budget, modes=MODES):
    """Decode positions N..N+M-1 attend to the sink, window, partial page and
    K selected pages (Quest with the current query, or the true-mass oracle).
    Returns {mode: {"nll": [M], "mass": [L, H, 4]}} with mass shares (sink,
    window+partial, selected, missing) of the DENSE attention of that mode's
    own queries, averaged over steps."""
    _, hs, ks, vs = dense
    S, W, K = S_tok // P, W_tok // P, (budget - S_tok - W_tok) // P
    scale = 1.0 / math.sqrt(model.D)
    G = model.G
    res = {}
    # "quest-oracle-last": Quest in every layer but the last, the oracle
    # there (how much of the gap the last layer's selection alone makes).
    # "dense-last": Quest everywhere but the last layer, which attends every
    # token (the library's dense_layers option). "rescore:R": two-stage
    # selection (rescore_select) in every layer.
    for mode in modes:
        pos = np.arange(N, N + M)
        h = hs[0][N:N + M].copy()
        mass = np.zeros((model.L, model.H, 4))
        for l in range(model.L):
            q, k_new, v_new = model.qkv(l, h, pos)
            # Prefill keys come from the dense prefill; decode keys are this
            # mode's own (they depend on its earlier sparse layers).
            k = np.concatenate([ks[l][:N], k_new], axis=0)
            v = np.concatenate([vs[l][:N], v_new], axis=0)
            T = N + M
            npg = T // P
            kp = k[:npg * P].reshape(npg, P, model.KVH, model.D)
            kmax, kmin = kp.max(axis=1), kp.min(axis=1)  # [pages, KVH, D]
            out = np.empty_like(q)
            for i in range(M):
                n = N + i + 1  # the step's token is appended, then attends
                sink, window, partial, cands = attended_sets(n, P, S, W, K)
                for g in range(model.KVH):
                    qh = q[i, g * G:(g + 1) * G, :]
                    s = (qh @ k[:n, g, :].T) * scale
                    s -= s.max(axis=1, keepdims=True)
                    pd = np.exp(s)
                    pd /= pd.sum(axis=1, keepdims=True)  # dense probs [G, n]
                    pm = pd[:, :(n // P) * P].reshape(G, -1, P).sum(axis=2)
                    oracle = mode == "oracle" or (
                        mode == "quest-oracle-last" and l == model.L - 1)
                    all_tokens = mode == "dense-last" and l == model.L - 1
                    if all_tokens:
                        sel = list(cands)
                    elif mode.startswith("rescore:"):
                        sel = rescore_select(qh, kmax[:, g, :], kmin[:, g, :],
                                             cands, K, scale, k[:n, g, :], P,
                                             int(mode.split(":")[1]))
                    elif not oracle:
                        sel = quest_select(qh, kmax[:, g, :], kmin[:, g, :],
                                           cands, K, scale)
                    else:
                        if len(cands) <= K:
                            sel = list(cands)
                        else:
                            c = np.asarray(cands)
                            tm = pm[:, c].sum(axis=0)
                            sel = sorted(c[np.lexsort((c, -tm))[:K]].tolist())
                    pages = sink + window + sel
                    idx = np.concatenate(
                        [np.arange(p * P, (p + 1) * P) for p in pages] +
                        [np.arange((n // P) * P, n)])
                    # Shares of the dense mass.
                    ms = pm[:, sink].sum(axis=1)
                    mw = pm[:, window].sum(axis=1) + pd[:, (n // P) * P:n].sum(axis=1)
                    msel = pm[:, sel].sum(axis=1) if sel else 0.0
                    mass[l, g * G:(g + 1) * G, 0] += ms
                    mass[l, g * G:(g + 1) * G, 1] += mw
                    mass[l, g * G:(g + 1) * G, 2] += msel
                    mass[l, g * G:(g + 1) * G, 3] += 1.0 - ms - mw - msel
                    ss = s[:, idx]
                    ps = np.exp(ss - ss.max(axis=1, keepdims=True))
                    ps /= ps.sum(axis=1, keepdims=True)
                    out[i, g * G:(g + 1) * G, :] = ps @ v[idx, g, :]
            h = model.post(l, h, out)
        nll = nll_of(model.logits(h), toks[N + 1:N + M + 1])
        res[mode] = {"nll": nll, "mass": mass / M}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--prefill", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--emulate", action="store_true")
    ap.add_argument("--budgets", default="2048")
    ap.add_argument("--page", type=int, default=32)
    ap.add_argument("--sinkwindow", default="512/512",
                    help="SINK/WINDOW[,SINK/WINDOW...] tokens (default the "
                    "library's 512/512)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="emulated selections: quest, oracle, "
                    "quest-oracle-last, dense-last, rescore:R (default %s)"
                    % ",".join(MODES))
    ap.add_argument("--torch-cuda", action="store_true",
                    help="run the O(T^2) attention in float64 with torch on "
                    "a CUDA device (the same float64 computation)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.torch_cuda:
        global TORCH
        import torch
        TORCH = torch
    with open(a.text, "rb") as f:
        f.seek(a.offset)
        data = f.read(a.prefill + a.steps + 1)
    if len(data) < a.prefill + a.steps + 1:
        sys.exit("text too short: %d bytes from offset %d, need %d"
                 % (len(data), a.offset, a.prefill + a.steps + 1))
    toks = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    model = Model(a.model)
    t0 = time.time()
    dense = dense_forward(model, toks, a.prefill, a.steps)
    base = {"text": a.text, "offset": a.offset, "prefill": a.prefill,
            "steps": a.steps}
    # Per-step NLL too: the ppl of the first M' < M steps is that of a run
    # with --steps M' (causal model, same bytes).
    r = dict(base, policy="reference", ppl=float(np.exp(dense[0].mean())),
             seconds=round(time.time() - t0, 1),
             nll_steps=[round(float(x), 9) for x in dense[0]])
    print(json.dumps(r), flush=True)
    if not a.emulate:
        return
    for sw in a.sinkwindow.split(","):
      sink, window = (int(x) for x in sw.split("/"))
      for b in [int(x) for x in a.budgets.split(",")]:
        if b < sink + window:
            continue
        t0 = time.time()
        em = emulate(model, toks, a.prefill, a.steps, dense, a.page, sink,
                     window, b, a.modes.split(","))
        for mode, v in em.items():
            r = dict(base, policy="emul-" + mode, budget=b, sink=sink,
                     window=window, page=a.page,
                     ppl=float(np.exp(v["nll"].mean())),
                     ratio=float(np.exp(v["nll"].mean() - dense[0].mean())),
                     mass=np.round(v["mass"], 6).tolist(),
                     seconds=round(time.time() - t0, 1))
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
