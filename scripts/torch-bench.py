#!/usr/bin/env python3
"""PyTorch baseline for `voxtrald bench`.

A plain, self-contained PyTorch port of the Voxtral TTS model (Mistral backbone with a KV
cache, semantic head, flow-matching acoustic head, codec decoder) that reads a checkpoint in
the official layout (params.json + consolidated.safetensors) and times the same stages as
`voxtrald bench`, with the same JSON key names where they exist, so that the Rust (candle)
numbers can be compared with what a straightforward PyTorch implementation gets on the same
machine, CPU or GPU. `--check-golden` first proves that it computes the same model: it runs
the tiny fixture against the golden reference outputs (mlx-audio oracle) and fails beyond the
tolerances of tests/fixtures/voxtral-tiny/README.md.

    python3 scripts/torch-bench.py --check-golden   # tiny fixture, f32, exit 1 on mismatch
    python3 scripts/torch-bench.py --model DIR [--device cpu|cuda] [--dtype f32|bf16] \
        [--frames 25] [--runs 3] [--positions 161] [--threads N] [--json] [--compile]

Per run: the prefill of a prompt of --positions positions (token embeddings of fixed ids;
the timing does not depend on content), then --frames frames, each a backbone step (one
token, KV cache; frame 0 uses the prefill's last state, as in voxtrald) + semantic head +
flow head (7 Euler steps, CFG alpha 1.2, conditional and unconditional rows batched as 2 x 3
tokens, the last layer on token 0 only) + FSQ. The codec runs inside the loop as voxtrald's
streaming decoder does (chunks of 2, then 8 until 25 frames, then 25), but in the plain way:
each chunk is decoded again with up to --codec-context earlier frames of left context (25, as
vLLM-Omni does), whose samples are dropped; voxtrald instead carries each layer's state and
computes only new frames. `codec_ms_per_frame` is that streaming figure (same meaning as
voxtrald's); `codec_full_ms_per_frame` decodes all the run's frames in one call. The bench
masks [END_AUDIO] in the semantic argmax so that every run has --frames audio frames
(random-weight checkpoints may otherwise stop early); --check-golden uses the real mask.

Other differences from `voxtrald bench`, all small next to the stages timed: the model is
loaded once (`load_s` is that load; voxtrald loads per run) and one untimed warm-up run
precedes the timed runs (--warmup 0 to skip); the prompt is synthetic instead of a voice and a
text; the semantic head runs in the compute dtype (voxtrald keeps it in f32). bf16 mode
computes in bf16 with RMSNorm statistics (and the codec's weight-norm fold) in f32. Medians
over --runs are reported; on CUDA each stage is bracketed by torch.cuda.synchronize() and
`cuda_max_memory_allocated_bytes` is added. Extra keys: device, dtype, torch, threads,
compile, codec_full_ms_per_frame, codec_context_frames.

Needs torch (CPU or CUDA build), numpy, and optionally safetensors (a small reader stands in).
No network. Example setup outside the repo:
    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy safetensors
"""
import argparse, json, math, os, resource, struct, sys, time

import numpy as np
import torch
import torch.nn.functional as F

SPECIAL = 2  # audio codes carry a +2 offset: 0 = [EMPTY_AUDIO], 1 = [END_AUDIO]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "voxtral-tiny")


def read_safetensors(path):
    """Yields (name, CPU tensor) one at a time: the safetensors package, else a small reader."""
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    except ImportError:
        pass
    kinds = {"BF16": (np.int16, torch.bfloat16), "F16": (np.float16, None), "F32": (np.float32, None),
             "F64": (np.float64, None), "I64": (np.int64, None), "I32": (np.int32, None)}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        np_t, view = kinds[info["dtype"]]
        a, b = info["data_offsets"]
        t = torch.from_numpy(np.array(data[a:b]).view(np_t).reshape(info["shape"]))
        yield name, (t.view(view) if view is not None else t)


def rms(x, w, eps):
    """RMSNorm with f32 statistics; `w` is f32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)


def ffn(L, x):
    return F.linear(F.silu(F.linear(x, L["w1"])) * F.linear(x, L["w3"]), L["w2"])


def attend(q, k, v, mask=None):
    """q [B, H, S, d], k/v [B, KV, T, d] (GQA by repeating kv heads) -> [B, S, H*d]."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2).flatten(2)


def rope_interleaved(x, cos, sin):
    """Mistral-native RoPE: rotates adjacent pairs. x [S, H, d], cos/sin [S, d/2] f32."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, None], sin[:, None]
    return torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2).to(x.dtype)


def alibi_slopes(n):
    """Mistral's codec slopes 2^(-8h/n), h = 0..n-1 (starting at 1.0)."""
    pow2 = lambda m: [2.0 ** (-8.0 * h / m) for h in range(m)]
    if n & (n - 1) == 0:
        return pow2(n)
    p = 1 << (n.bit_length() - 1)
    return pow2(p) + pow2(2 * p)[::2][: n - p]


class Voxtral:
    def __init__(self, model_dir, device, dtype):
        self.device, self.dtype = device, dtype
        self.p = p = json.load(open(os.path.join(model_dir, "params.json")))
        am = p["multimodal"]["audio_model_args"]
        self.fa, self.ca = am["acoustic_transformer_args"], p["multimodal"]["audio_tokenizer_args"]
        W = {}
        for name, t in read_safetensors(os.path.join(model_dir, "consolidated.safetensors")):
            f32 = name.endswith("norm.weight") or "parametrizations" in name or "quantizer" in name
            W[name] = t.to(device=device, dtype=torch.float32 if f32 else dtype)  # norms, codec folds in f32
        norm = lambda n: W.pop(n)

        def layer(prefix, extra=()):
            d = {w: W.pop(f"{prefix}attention.{w}.weight") for w in ("wq", "wk", "wv", "wo")}
            d.update({w: W.pop(f"{prefix}feed_forward.{w}.weight") for w in ("w1", "w2", "w3")})
            d["an"], d["fn"] = norm(f"{prefix}attention_norm.weight"), norm(f"{prefix}ffn_norm.weight")
            for k, name in extra:
                d[k] = W.pop(prefix + name)
            return d

        # Backbone.
        self.tok = W.pop("mm_audio_embeddings.tok_embeddings.weight")
        self.audio_table = W.pop("mm_audio_embeddings.audio_codebook_embeddings.embeddings.weight")
        self.layers = [layer(f"layers.{i}.") for i in range(p["n_layers"])]
        self.norm = norm("norm.weight")
        self.sem_vocab = am["semantic_codebook_size"] + SPECIAL
        self.levels, self.n_ac = am["acoustic_codebook_size"], am["n_acoustic_codebook"]
        offs = [0] + [self.sem_vocab + k * (self.levels + SPECIAL) for k in range(self.n_ac)]
        self.code_offsets = torch.tensor(offs, device=device)
        # Flow head.
        fp = "acoustic_transformer."
        self.w_in, self.w_llm = W.pop(fp + "input_projection.weight"), W.pop(fp + "llm_projection.weight")
        w_time = W.pop(fp + "time_projection.weight")
        self.flow_layers = [layer(f"{fp}layers.{j}.") for j in range(self.fa["n_layers"])]
        self.flow_norm = norm(fp + "norm.weight")
        self.w_ac = W.pop(fp + "acoustic_codebook_output.weight")
        self.w_sem = W.pop(fp + "semantic_codebook_output.weight")
        self.steps = self.fa.get("n_decoding_steps", 7)
        self.flow_eps = self.fa.get("norm_eps", 1e-5)
        self.sigma = self.fa.get("sigma_max", 1.0)
        d = self.fa["dim"]
        inv = torch.exp(-math.log(10000.0) * torch.arange(d // 2, dtype=torch.float32) / (d // 2))
        t = torch.arange(self.steps, dtype=torch.float32) / self.steps
        temb = torch.cat([torch.cos(t[:, None] * inv), torch.sin(t[:, None] * inv)], 1)  # cos first
        self.step_times = F.linear(temb.to(device, dtype), w_time)  # [K, dim]
        # Codec decoder: weight norm folded in f32, per index of dim 0.
        cp = "audio_tokenizer."
        def fold(prefix):
            g, v = W.pop(prefix + "original0"), W.pop(prefix + "original1")
            return (g * v / v.pow(2).sum((1, 2), keepdim=True).sqrt()).to(dtype)
        q = cp + "quantizer.semantic_codebook."
        self.sem_codebook = W.pop(q + "embedding_sum") / W.pop(q + "cluster_usage").clamp(min=1e-5)[:, None]
        c = self.ca
        ints = lambda k, dflt=None: [int(s) for s in c.get(k, dflt).split(",")]
        lengths, kernels, strides = (ints(f"decoder_{k}_str")
                                     for k in ("transformer_lengths", "convs_kernels", "convs_strides"))
        window = c["attn_sliding_window_size"]
        half = c["half_attn_window_upon_downsampling"]
        if half:
            window >>= sum(s > 1 for s in ints("encoder_convs_strides_str", "2,2,2,1"))
        self.stages = []
        for i, (n, k, s) in enumerate(zip(lengths, kernels, strides)):
            if half and s > 1:
                window *= 2
            conv = fold(f"{cp}decoder_blocks.{2 * i}.conv.parametrizations.weight.")
            extra = (("qn", "attention.q_norm.weight"), ("kn", "attention.k_norm.weight"),
                     ("ascale", "attention_scale"), ("fscale", "ffn_scale"))
            ls = [layer(f"{cp}decoder_blocks.{2 * i + 1}.layers.{l}.", extra) for l in range(n)]
            self.stages.append((conv, s, ls, window))
        self.out_proj = fold(cp + "output_proj.conv.parametrizations.weight.")
        self.slopes = torch.tensor(alibi_slopes(c["n_heads"]), device=device)
        self.spf = int(np.prod(strides)) * c["pretransform_patch_size"]
        self.masks = {}
        if W:
            print(f"warning: {len(W)} unused tensors, e.g. {sorted(W)[:3]}", file=sys.stderr)

    # ---- backbone ----
    def new_cache(self, max_pos):
        p = self.p
        hd, theta = p["head_dim"], p["rope_theta"]
        freq = theta ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
        ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * freq
        self.cos, self.sin = (f(ang).float().to(self.device) for f in (torch.cos, torch.sin))
        shape = (len(self.layers), 2, 1, p["n_kv_heads"], max_pos, hd)
        return {"kv": torch.zeros(shape, device=self.device, dtype=self.dtype), "len": 0}

    def backbone(self, cache, x):
        """x [S, dim] at the next positions of `cache` -> final-normed [S, dim]."""
        p, S, pos = self.p, x.shape[0], cache["len"]
        H, KV, hd = p["n_heads"], p["n_kv_heads"], p["head_dim"]
        cos, sin = self.cos[pos:pos + S], self.sin[pos:pos + S]
        mask = None if S == 1 else torch.ones(S, pos + S, dtype=torch.bool, device=self.device).tril(pos)
        x = x.to(self.dtype)
        for l, L in enumerate(self.layers):
            a = rms(x, L["an"], p["norm_eps"])
            q = rope_interleaved(F.linear(a, L["wq"]).view(S, H, hd), cos, sin)
            k = rope_interleaved(F.linear(a, L["wk"]).view(S, KV, hd), cos, sin)
            kv = cache["kv"][l]
            kv[0, 0, :, pos:pos + S] = k.transpose(0, 1)
            kv[1, 0, :, pos:pos + S] = F.linear(a, L["wv"]).view(S, KV, hd).transpose(0, 1)
            o = attend(q.transpose(0, 1)[None], kv[0, :, :, :pos + S], kv[1, :, :, :pos + S], mask)[0]
            x = x + F.linear(o, L["wo"])
            x = x + ffn(L, rms(x, L["fn"], p["norm_eps"]))
        cache["len"] = pos + S
        return rms(x, self.norm, p["norm_eps"])

    def embed_frame(self, codes):
        """codes [37] (with the +2 offset) -> [1, dim]: sum of the codebooks' rows."""
        return self.audio_table[codes + self.code_offsets].float().sum(0, keepdim=True).to(self.dtype)

    # ---- semantic + flow head ----
    def semantic_logits(self, h):
        return F.linear(h.to(self.w_sem.dtype), self.w_sem).float()

    def semantic_code(self, logits, allow_end=True):
        lo = 1 if allow_end else SPECIAL  # index 0 and padding rows are always masked
        return logits[..., lo:self.sem_vocab].argmax(-1) + lo

    def flow_block(self, L, z, last):
        B, S, _ = z.shape
        fa, eps = self.fa, self.flow_eps
        H, KV, hd = fa["n_heads"], fa["n_kv_heads"], fa["head_dim"]
        a = rms(z, L["an"], eps)
        if last:  # only token 0 is read after the last layer
            z, aq = z[:, :1], a[:, :1]
        else:
            aq = a
        q = F.linear(aq, L["wq"]).view(B, -1, H, hd).transpose(1, 2)
        k = F.linear(a, L["wk"]).view(B, S, KV, hd).transpose(1, 2)
        v = F.linear(a, L["wv"]).view(B, S, KV, hd).transpose(1, 2)
        z = z + F.linear(attend(q, k, v), L["wo"])  # bidirectional, no positions
        return z + ffn(L, rms(z, L["fn"], eps))

    def velocity(self, x, step, c):
        """x [n, A] f32, c [n, dim] projected states -> velocities [n, A] f32."""
        n = x.shape[0]
        z = torch.stack([F.linear(x.to(self.dtype), self.w_in), self.step_times[step].expand(n, -1), c], 1)
        for j, L in enumerate(self.flow_layers):
            z = self.flow_block(L, z, j == len(self.flow_layers) - 1)
        return F.linear(rms(z[:, 0], self.flow_norm, self.flow_eps), self.w_ac).float()

    def integrate(self, h, noise, alpha=1.2, trace=None):
        """h [1, dim], noise [1, A] f32 -> x after the Euler steps (before clamping), [1, A]."""
        c = F.linear(h.to(self.dtype), self.w_llm)
        c = torch.cat([c, torch.zeros_like(c)])  # conditional row, then the unconditional one
        x, dt = noise, 1.0 / self.steps
        for i in range(self.steps):
            v = self.velocity(x.repeat(2, 1), i, c)
            if trace is not None:
                trace.setdefault("x_in", []).append(x[0]); trace.setdefault("v_cond", []).append(v[0])
                trace.setdefault("v_uncond", []).append(v[1])
            x = x + dt * (alpha * v[:1] + (1.0 - alpha) * v[1:])
        return x

    def fsq(self, x):
        return torch.round((x.clamp(-1, 1) + 1) / 2 * (self.levels - 1)).long() + SPECIAL

    def frame(self, h, noise, allow_end=True):
        """h [1, dim] -> codes [37] (semantic argmax ++ FSQ codes), on the device."""
        sem = self.semantic_code(self.semantic_logits(h), allow_end)
        x = self.integrate(h, noise * self.sigma)
        return torch.cat([sem, self.fsq(x[0])])

    # ---- codec decoder ----
    def latent(self, codes):
        """codes [T, 37] (with the offset) -> [1, semantic_dim + A, T]."""
        sem = self.sem_codebook[codes[:, 0] - SPECIAL]
        ac = (codes[:, 1:] - SPECIAL).float() * 2 / (self.levels - 1) - 1
        return torch.cat([sem, ac], 1).t()[None].to(self.dtype)

    def mask(self, S, W):
        """ALiBi bias slope_h * (j - i) where i - W <= j <= i, else -inf: [H, S, S]."""
        if (S, W) not in self.masks:
            i = torch.arange(S, device=self.device)
            dist = (i[:, None] - i[None, :]).float()
            bias = -self.slopes[:, None, None] * dist
            self.masks[(S, W)] = bias.masked_fill((dist < 0) | (dist > W), float("-inf")).to(self.dtype)
        return self.masks[(S, W)]

    def codec_layer(self, L, x, mask):
        c = self.ca
        S, H, hd = x.shape[1], c["n_heads"], c["head_dim"]
        a = rms(x, L["an"], c["norm_eps"])
        q = rms(F.linear(a, L["wq"]), L["qn"], c["qk_norm_eps"]).view(1, S, H, hd).transpose(1, 2)
        k = rms(F.linear(a, L["wk"]), L["kn"], c["qk_norm_eps"]).view(1, S, -1, hd).transpose(1, 2)
        v = F.linear(a, L["wv"]).view(1, S, -1, hd).transpose(1, 2)
        x = x + F.linear(attend(q, k, v, mask[None]), L["wo"]) * L["ascale"]
        return x + ffn(L, rms(x, L["fn"], c["norm_eps"])) * L["fscale"]

    def decode(self, codes, stages=None):
        """codes [T, 37] -> waveform [T * samples_per_frame] f32 (causal: a full decode)."""
        x = self.latent(codes)  # [1, C, T]
        for i, (w, s, layers, window) in enumerate(self.stages):
            if i == 0:  # causal conv, replicate padding
                x = F.conv1d(F.pad(x, (w.shape[2] - 1, 0), mode="replicate"), w)
            else:  # causal transposed conv: the last kernel - stride outputs trimmed
                x = F.conv_transpose1d(x, w, stride=s)[..., :x.shape[2] * s]
            if stages is not None:
                stages.append(x[0].t().float())
            x = x.transpose(1, 2)
            m = self.mask(x.shape[1], window)
            for L in layers:
                x = self.codec_layer(L, x, m)
            if stages is not None:
                stages.append(x[0].float())
            x = x.transpose(1, 2)
        p, n = self.out_proj.shape[2] - 1, x.shape[2]  # reflect padding; short inputs zero-extended
        x = F.pad(F.pad(x, (0, max(0, p + 1 - n))), (p, 0), mode="reflect")[..., :p + n]
        y = F.conv1d(x, self.out_proj)[0].t()  # [L, patch]
        if stages is not None:
            stages.append(y.float())
        return y.reshape(-1).float()


def chunk_len(decoded):
    """voxtrald's streaming schedule: 2 frames first, then 8 until 25 are decoded, then 25."""
    return 2 if decoded == 0 else 8 if decoded < 25 else 25


def decode_chunk(m, codes, done, n, context):
    """Frames done..done+n of `codes`, decoded with up to `context` frames of left context."""
    start = max(0, done - context)
    return m.decode(codes[start:done + n])[(done - start) * m.spf:]


def check_golden(args):
    dev = torch.device(args.device)
    m = Voxtral(args.model, dev, torch.float32)
    z = np.load(os.path.join(args.model, "golden", "oracle.npz"))
    g = {k: torch.from_numpy(z[k]).to(dev) for k in z.files}
    failures, rows = [], []

    def cmp(name, ours, ref, atol, rtol=0.0):
        ours, ref = ours.float().reshape(ref.shape), ref.float()
        d = (ours - ref).abs()
        ok = bool((d <= atol + rtol * ref.abs()).all())
        rows.append((name, float(d.max()), atol, rtol, ok))
        if not ok:
            failures.append(name)

    def cmp_codes(name, ours, ref, x_ref=None):
        """Exact; an acoustic code may be off by one where the reference is within 1e-3 of .5."""
        diff = (ours.long() - ref.long()).abs()
        ok = diff == 0
        if x_ref is not None:
            scaled = (x_ref.clamp(-1, 1) + 1) / 2 * (m.levels - 1)
            near = ((scaled - scaled.floor()) - 0.5).abs() < 1e-3
            ok[1:] |= (diff[1:] == 1) & near[1:]
        good = bool(ok.all())
        rows.append((name, int(diff.max()), 0, 0, good))
        if not good:
            failures.append(name)

    with torch.inference_mode():
        ids = g["prompt_ids"].long()
        emb = m.tok[ids].float()
        voice = torch.load(os.path.join(args.model, "voice_embedding", "casual_male.pt"),
                           map_location=dev, weights_only=True)  # a bare bf16 tensor [rows, dim]
        audio_id = m.p["multimodal"]["audio_model_args"]["audio_token_id"]
        emb[ids == audio_id] = voice.float()
        cmp("backbone_input_embeddings", emb, g["backbone_input_embeddings"], 1e-6)
        cache = m.new_cache(len(ids) + 8)
        hidden = m.backbone(cache, emb)
        cmp("backbone_hidden", hidden, g["backbone_hidden"], 1e-4, 1e-4)
        logits = m.semantic_logits(hidden[-1:])
        cmp("semantic_logits", logits, g["semantic_logits"], 1e-4, 1e-4)
        cmp_codes("semantic_code", m.semantic_code(logits), g["semantic_code"])
        for case in ("last_noise", "last_zero", "rand_noise"):
            k = f"ac_{case}_"
            h = g[k + "hidden"][None]
            tr = {}
            x = m.integrate(h, g[k + "noise"][None], 1.2, tr)
            cmp(k + "t", torch.arange(m.steps, device=dev) / m.steps, g[k + "t"], 1e-4)
            for key in ("x_in", "v_cond", "v_uncond"):
                cmp(k + key, torch.stack(tr[key]), g[k + key], 1e-4, 1e-4)
            cmp(k + "x_final", x, g[k + "x_final"], 1e-4, 1e-4)
            codes = torch.cat([m.semantic_code(m.semantic_logits(h)), m.fsq(x[0])])
            cmp_codes(k + "codes", codes, g[k + "codes"], torch.cat([x.new_zeros(1), g[k + "x_final"]]))
        # Codec from the given codes (frames are columns of codec_codes).
        codes = g["codec_codes"].t().long()
        cmp("codec_latent", m.latent(codes)[0].t(), g["codec_latent"], 1e-3)
        stages = []
        cmp("codec_waveform", m.decode(codes, stages), g["codec_waveform"], 1e-3, 1e-3)
        for i, s in enumerate(stages):
            cmp(f"codec_stage{i}", s, g[f"codec_stage{i}"], 1e-3, 1e-3)
        # Generation loop with the injected noise, teacher-forced on the reference codes.
        gen_codes = g["gen_codes"].long()
        h = hidden[-1:]
        ours_h, ours_codes = [], []
        for f in range(gen_codes.shape[0]):
            if f > 0:
                h = m.backbone(cache, m.embed_frame(gen_codes[f - 1]))
            ours_h.append(h[0])
            ours_codes.append(m.frame(h, g["gen_noise"][f:f + 1]))
        cmp("gen_hidden", torch.stack(ours_h), g["gen_hidden"], 1e-4, 1e-4)
        for f, c in enumerate(ours_codes):
            x_ref = None  # the reference x is not stored per frame: exact match required
            cmp_codes(f"gen_codes[{f}]", c, gen_codes[f], x_ref)
        cmp("gen_waveform", m.decode(gen_codes), g["gen_waveform"], 1e-3, 1e-3)
        done, parts = 0, []
        while done < len(gen_codes):  # the streaming path must give the same samples
            n = min(chunk_len(done), len(gen_codes) - done)
            parts.append(decode_chunk(m, gen_codes, done, n, args.codec_context))
            done += n
        cmp("gen_waveform_streamed", torch.cat(parts), g["gen_waveform"], 1e-3, 1e-3)
    for name, d, atol, rtol, ok in rows:
        print(f"{'ok  ' if ok else 'FAIL'} {name:32s} max|diff| {d:.3g}  (tol {atol:g} + {rtol:g} rel)")
    print(f"golden check: {len(rows) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


def bench(args):
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    with torch.inference_mode():
        m = Voxtral(args.model, dev, DTYPES[args.dtype])
    sync()
    load_s = time.perf_counter() - t0
    if args.compile:
        m.velocity = torch.compile(m.velocity)
        m.backbone = torch.compile(m.backbone, dynamic=True)
    P, N = args.positions, args.frames
    vocab, mm = m.p["vocab_size"], m.p["multimodal"]
    middle = [1000 + (i * 7919) % (vocab - 1000) for i in range(max(0, P - 3))]
    ids = torch.tensor([mm["bos_token_id"], mm["audio_model_args"]["begin_audio_token_id"]] + middle
                       + [mm["audio_model_args"]["begin_audio_token_id"]], device=dev)[:P]
    gen = torch.Generator(device=dev)

    def one_run():
        gen.manual_seed(0)
        r = {"backbone": 0.0, "flow": 0.0, "codec": 0.0, "steps": 0}
        sync()
        start = time.perf_counter()
        cache = m.new_cache(P + N + 1)
        h = m.backbone(cache, m.tok[ids])[-1:]
        sync()
        r["prefill"] = time.perf_counter() - start
        frames, decoded, samples, first = [], 0, 0, None
        for f in range(N):
            if f > 0:
                t = time.perf_counter()
                h = m.backbone(cache, m.embed_frame(frames[-1]))
                sync()
                r["backbone"] += time.perf_counter() - t
                r["steps"] += 1
            t = time.perf_counter()
            noise = torch.randn(1, m.n_ac, device=dev, generator=gen)
            frames.append(m.frame(h, noise, allow_end=False))
            sync()
            r["flow"] += time.perf_counter() - t
            pending = len(frames) - decoded
            if pending >= chunk_len(decoded) or f == N - 1:  # a chunk is due, or the final flush
                t = time.perf_counter()
                wav = decode_chunk(m, torch.stack(frames), decoded, pending, args.codec_context)
                sync()
                r["codec"] += time.perf_counter() - t
                decoded, samples = decoded + pending, samples + wav.numel()
                first = first or time.perf_counter() - start
        total = time.perf_counter() - start
        t = time.perf_counter()
        wav = m.decode(torch.stack(frames))
        sync()
        r["codec_full"] = time.perf_counter() - t
        assert wav.numel() == samples == N * m.spf
        r.update(first=first, rtf=total / (samples / m.ca["sampling_rate"]))
        return r

    with torch.inference_mode():
        for _ in range(args.warmup):
            one_run()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runs = [one_run() for _ in range(args.runs)]
    med = lambda f: float(np.median([f(r) for r in runs]))
    out = {
        "device": str(dev) if not cuda else f"cuda ({torch.cuda.get_device_name(dev)})",
        "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "compile": args.compile, "runs": args.runs, "prompt_positions": P, "frames": N,
        "load_s": load_s, "prefill_s": med(lambda r: r["prefill"]),
        "first_audio_s": med(lambda r: r["first"]),
        "first_audio_frames": chunk_len(0),
        "backbone_ms_per_frame": med(lambda r: r["backbone"] * 1e3 / max(1, r["steps"])),
        "flow_ms_per_frame": med(lambda r: r["flow"] * 1e3 / N),
        "codec_ms_per_frame": med(lambda r: r["codec"] * 1e3 / N),
        "codec_full_ms_per_frame": med(lambda r: r["codec_full"] * 1e3 / N),
        "codec_context_frames": args.codec_context,
        "rtf": med(lambda r: r["rtf"]),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if cuda:
        out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"  {k:32s} {v:.4g}" if isinstance(v, float) else f"  {k:32s} {v}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (official layout)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    ap.add_argument("--positions", type=int, default=161, help="prompt positions to prefill")
    ap.add_argument("--codec-context", type=int, default=25, help="left-context frames per streamed chunk")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ap.add_argument("--threads", type=int, default=cores, help="torch CPU threads (default: all cores)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone and flow velocity")
    ap.add_argument("--check-golden", action="store_true",
                    help="check the tiny fixture (or --model) against its golden/oracle.npz, in f32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.check_golden:
        args.model = args.model or os.path.normpath(TINY)
        sys.exit(check_golden(args))
    if not args.model:
        ap.error("--model is required (or --check-golden)")
    if args.frames < 1 or args.runs < 1 or args.positions < 1:
        ap.error("--frames, --runs and --positions must be >= 1")
    sys.exit(bench(args))


if __name__ == "__main__":
    main()
