#!/usr/bin/env python3
"""The PyTorch side of `cargo xtask bench --torch PYTHON`: the same work as our benchmarks.

    torch_bench.py BENCH [--repeat N] [--steps N] [--threads N] [--unet-dir DIR] [config flags]
    torch_bench.py check

BENCH is unet, vae, text, blip2, train-step, generate, load or gemm (see xtask/src/bench.rs for what
each measures). Models are built from the configs under xtask/configs with random weights, in
f32 (forward benches, generate and gemm: bfloat16 with `--dtype bf16`), under torch.no_grad() except train-step,
with torch.set_num_threads(cores). Forward benches and train-step time `--repeat` runs after
one warm-up; generate times `--repeat` generations without a warm-up generation (its first
step warms up); load times `--repeat` `from_pretrained` calls, each in a fresh process, after
one warm-up process.

Prints one machine-readable line on stdout, `RESULT name median_s peak_mib` (peak resident
memory of the process, from getrusage), and `INFO name key=value ...` lines with details.
Needs numpy, torch, diffusers and transformers (and peft for a LoRA train-step); a missing
package is a one-line error and exit status 3.
"""

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
CONFIGS = os.path.join(ROOT, "xtask", "configs")
BENCHES = ["unet", "unet-xl", "vae", "text", "blip2", "train-step", "train-step-xl", "generate", "load", "gemm"]
# The same prompt as the bench example's `generate` (crates/personalize-cli/examples/bench.rs).
PROMPT = "a photo of an astronaut riding a horse on mars"


def require(packages):
    missing = []
    for p in packages:
        try:
            importlib.import_module(p)
        except ModuleNotFoundError as e:
            missing.append(p if e.name == p else f"{p} (needs {e.name})")
        except Exception as e:  # a broken install
            missing.append(f"{p} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else '?'})")
    if missing:
        print(f"error: {sys.executable} lacks the Python package(s) {', '.join(missing)} "
              "(it needs numpy, torch, diffusers and transformers)", file=sys.stderr)
        sys.exit(3)


def peak_mib():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def median(values):
    # The upper median, as the Rust side (`sorted[len / 2]`).
    return sorted(values)[len(values) // 2]


def result(name, median_s, peak):
    print(f"RESULT {name} {median_s:.4f} {peak:.1f}", flush=True)


def info(name, **kv):
    print(f"INFO {name} " + " ".join(f"{k}={v}" for k, v in kv.items()), flush=True)


def timed(fn, repeat, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def read_config(d, name="config.json"):
    with open(os.path.join(d, name)) as f:
        return json.load(f)


def side_of(sample_size):
    return sample_size[0] if isinstance(sample_size, (list, tuple)) else int(sample_size)


def build_unet(a):
    from diffusers import UNet2DConditionModel
    cfg = UNet2DConditionModel.load_config(a.unet_config)
    return UNet2DConditionModel.from_config(cfg), cfg


def build_vae(a):
    from diffusers import AutoencoderKL
    cfg = AutoencoderKL.load_config(a.vae_config)
    return AutoencoderKL.from_config(cfg), cfg


def build_text(a):
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig.from_pretrained(a.text_config)
    return CLIPTextModel(cfg), cfg


def text_ids(torch, cfg):
    # As xtask's input: [2, 77] ids, BOS (49406) at the start of each row, then 320 + i % 1000.
    length = min(77, cfg.max_position_embeddings)
    flat = [49406 if i % 77 == 0 else 320 + i % 1000 for i in range(2 * 77)]
    rows = [flat[:77][:length], flat[77:][:length]]
    return torch.tensor(rows, dtype=torch.long) % cfg.vocab_size


def bench_forward(torch, a):
    """unet, vae, text, blip2: one forward pass of the stage, as `personalize stage`."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if a.bench in ("unet", "unet-xl"):
        if a.bench == "unet-xl" and a.unet_config == os.path.join(CONFIGS, "sd15-unet"):
            a.unet_config = os.path.join(CONFIGS, "sdxl-unet")
        unet, cfg = build_unet(a)
        s = side_of(cfg.get("sample_size") or 64)
        x = randn(2, cfg["in_channels"], s, s)
        t = torch.tensor([981.0, 981.0])
        ctx = randn(2, 85, cfg["cross_attention_dim"])
        added = None
        if cfg.get("addition_embed_type") == "text_time":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            added = {"text_embeds": randn(2, pooled),
                     "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2).to(dtype)}
        model = unet
        what = f"UNet2DConditionModel, sample [2,{cfg['in_channels']},{s},{s}], t 981, context [2,85,{cfg['cross_attention_dim']}]"

        def fn():
            return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    elif a.bench == "vae":
        vae, cfg = build_vae(a)
        s = a.latent_size or side_of(cfg["sample_size"]) // 2 ** (len(cfg["block_out_channels"]) - 1)
        z = randn(1, cfg["latent_channels"], s, s)
        model = vae
        what = f"AutoencoderKL.decode of [1,{cfg['latent_channels']},{s},{s}]"

        def fn():
            return vae.decode(z).sample
    elif a.bench == "text":
        enc, cfg = build_text(a)
        ids = text_ids(torch, cfg)
        model = enc
        what = f"CLIPTextModel of {list(ids.shape)} ids"

        def fn():
            return enc(input_ids=ids).last_hidden_state
    else:  # blip2: vision transformer + Q-Former + query tokens; the language model is never built
        from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel
        cfg = Blip2Config.from_pretrained(a.blip2_config)
        vision = Blip2VisionModel(cfg.vision_config).eval()
        qformer = Blip2QFormerModel(cfg.qformer_config).eval()
        query_tokens = randn(1, cfg.num_query_tokens, cfg.qformer_config.hidden_size) * 0.02
        s = cfg.vision_config.image_size
        px = randn(1, 3, s, s)
        model = torch.nn.ModuleList([vision, qformer])
        what = f"Blip2VisionModel + Blip2QFormerModel ({cfg.num_query_tokens} queries) of [1,3,{s},{s}]"

        def fn():
            emb = vision(pixel_values=px).last_hidden_state
            mask = torch.ones(emb.shape[:-1], dtype=torch.long)
            q = query_tokens.expand(emb.shape[0], -1, -1)
            return qformer(query_embeds=q, encoder_hidden_states=emb, encoder_attention_mask=mask).last_hidden_state
    model.eval().to(dtype)
    with torch.no_grad():
        times = timed(fn, a.repeat)
    info(a.bench, what=json.dumps(what), dtype=a.dtype, runs=len(times), warmup=1, min_s=f"{min(times):.4f}")
    result(a.bench, median(times), peak_mib())


def bench_train_step(torch, a):
    """One training step as the bench example's `train-step`: the aligner (Linear, GELU, Linear,
    GELU) on the first 8 of 32 random queries joins 77 random text tokens; epsilon MSE loss on
    random latents at t = 500, batch 1; AdamW (lr 1e-4) on the aligner and LoRA rank 4 (alpha 4)
    on to_q, to_k, to_v, to_out.0 through peft, or on the whole UNet if peft is missing. An SDXL
    UNet (train-step-xl) also gets random pooled text embeddings and square time ids."""
    import torch.nn.functional as F
    unet, cfg = build_unet(a)
    unet.requires_grad_(False)
    try:
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        mode = "lora-rank4-peft"
    except ImportError:
        unet.requires_grad_(True)
        mode = "full-unet(peft-missing)"
    d = cfg["cross_attention_dim"]
    aligner = torch.nn.Sequential(torch.nn.Linear(768, d), torch.nn.GELU(), torch.nn.Linear(d, d), torch.nn.GELU())
    params = [p for p in unet.parameters() if p.requires_grad] + list(aligner.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    unet.train()
    if a.checkpointing:
        unet.enable_gradient_checkpointing()
    h = a.size // 8 if a.size else side_of(cfg.get("sample_size") or 64)
    g = torch.Generator().manual_seed(0)

    def step():
        q = torch.randn(1, 32, 768, generator=g)
        text = torch.randn(1, 77, d, generator=g)
        x = torch.randn(1, cfg["in_channels"], h, h, generator=g)
        target = torch.randn(1, cfg["out_channels"], h, h, generator=g)
        t = torch.full((1,), 500.0)
        ctx = torch.cat([text, aligner(q[:, :8])], dim=1)
        added = None
        if cfg.get("addition_embed_type"):
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            r = float(h * 8)
            added = {"text_embeds": torch.randn(1, pooled, generator=g),
                     "time_ids": torch.tensor([[r, r, 0.0, 0.0, r, r]])}
        loss = F.mse_loss(unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = timed(step, a.repeat)
    trainable = sum(p.numel() for p in params)
    info(a.bench, mode=mode, latent=f"{h}x{h}", trainable_params=trainable, runs=len(times), warmup=1)
    result(a.bench, median(times), peak_mib())


def bench_generate(torch, a):
    """Whole generations as the bench example's `generate`: StableDiffusionPipeline with random
    weights, one image, guidance 7.5 (one UNet batch of 2 per step), the config's scheduler,
    `--steps` steps, VAE decode; per-step times from `callback_on_step_end`."""
    import diffusers
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer
    unet, ucfg = build_unet(a)
    vae, vcfg = build_vae(a)
    text, _ = build_text(a)
    scfg = read_config(a.scheduler_config, "scheduler_config.json")
    sched = getattr(diffusers, scfg["_class_name"]).from_config(scfg)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=CLIPTokenizer.from_pretrained(a.tokenizer),
                                   unet=unet.eval(), scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if a.dtype == "bf16":
        pipe.to(torch.bfloat16)
    side = a.size or side_of(ucfg.get("sample_size") or 64) * 2 ** (len(vcfg["block_out_channels"]) - 1)
    marks = []

    def on_step(_pipe, _i, _t, kwargs):
        marks.append(time.perf_counter())
        return kwargs

    totals, firsts, later, decodes = [], [], [], []
    for _ in range(a.repeat):
        marks.clear()
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(PROMPT, height=side, width=side, num_inference_steps=a.steps, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(0), output_type="np", callback_on_step_end=on_step)
        end = time.perf_counter()
        totals.append(end - t0)
        firsts.append(marks[0] - t0 if marks else end - t0)
        decodes.append(end - marks[-1] if marks else 0.0)
        later.extend(b - a_ for a_, b in zip(marks, marks[1:]))
    step = median(later) if later else median(firsts)
    info("generate", size=f"{side}x{side}", dtype=a.dtype, steps=a.steps, scheduler=scfg["_class_name"], runs=len(totals), warmup=0,
         step_median_s=f"{step:.4f}", first_step_s=f"{median(firsts):.4f}", decode_s=f"{median(decodes):.4f}")
    result("generate", median(totals), peak_mib())


def load_once(torch, a):
    from diffusers import UNet2DConditionModel
    base = peak_mib()
    t = time.perf_counter()
    UNet2DConditionModel.from_pretrained(a.unet_dir)
    print(f"LOADONCE {time.perf_counter() - t:.4f} {peak_mib():.1f} {base:.1f}", flush=True)


def bench_gemm(torch, a):
    """gemm: `F.linear(x, w)` (x [M, K], w [N, K]) on each of `--shapes`, as the bench
    example's `gemm`; RESULT is the sum of the shapes' medians."""
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        for shape in a.shapes.split(","):
            m, k, n = (int(d) for d in shape.split("x"))
            x = torch.randn(m, k, generator=g).to(dtype)
            w = torch.randn(n, k, generator=g).to(dtype)
            t = median(timed(lambda: torch.nn.functional.linear(x, w), a.repeat))
            total += t
            info("gemm", shape=shape, dtype=a.dtype, median_s=f"{t:.5f}", gflops=f"{2 * m * k * n / t / 1e9:.1f}")
    result("gemm", total, peak_mib())


def bench_load(a):
    """`UNet2DConditionModel.from_pretrained(--unet-dir)`, each in a fresh process (after a
    warm-up process that also fills the page cache); the peak is the process's, after loading."""
    if not a.unet_dir:
        sys.exit("error: load needs --unet-dir DIR (a diffusers UNet folder)")
    runs = []
    for i in range(a.repeat + 1):
        cmd = [sys.executable, os.path.abspath(__file__), "load-once", "--unet-dir", a.unet_dir, "--threads", str(a.threads)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            sys.exit(f"error: from_pretrained of {a.unet_dir} failed (exit status {out.returncode})")
        line = next(l for l in out.stdout.splitlines() if l.startswith("LOADONCE "))
        if i > 0:
            runs.append([float(v) for v in line.split()[1:]])
    secs, peaks, bases = zip(*runs)
    files = [f for f in os.listdir(a.unet_dir) if f.endswith(".safetensors") or f.endswith(".bin")]
    size = sum(os.path.getsize(os.path.join(a.unet_dir, f)) for f in files) / 2**20
    info("load", runs=len(runs), warmup=1, file_mib=f"{size:.1f}", rss_before_load_mib=f"{median(list(bases)):.1f}",
         peak_over_file=f"{median(list(peaks)) / size:.3f}" if size else "-")
    result("load", median(list(secs)), median(list(peaks)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", choices=BENCHES + ["check", "load-once"])
    p.add_argument("--repeat", type=int, default=3, help="timed runs (default 3)")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                   help="forward benches, generate and gemm: the float type (default f32)")
    p.add_argument("--steps", type=int, default=4, help="generate: denoising steps (default 4)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: the cores)")
    p.add_argument("--unet-config", default=os.path.join(CONFIGS, "sd15-unet"))
    p.add_argument("--vae-config", default=os.path.join(CONFIGS, "sd15-vae"))
    p.add_argument("--text-config", default=os.path.join(CONFIGS, "sd15-text"))
    p.add_argument("--blip2-config", default=os.path.join(CONFIGS, "blip2-vitg"))
    p.add_argument("--scheduler-config", default=os.path.join(CONFIGS, "sd15-scheduler"))
    p.add_argument("--tokenizer", default=os.path.join(ROOT, "crates", "clip-text", "vocab"))
    p.add_argument("--unet-dir", help="load: a diffusers UNet folder")
    p.add_argument("--shapes", help="gemm: comma-separated MxKxN")
    p.add_argument("--checkpointing", action="store_true", help="train-step: the UNet's gradient checkpointing")
    p.add_argument("--size", type=int, help="generate and train-step: image side (default: the UNet's sample size times the VAE factor)")
    p.add_argument("--latent-size", type=int, help="vae: latent side (default: the VAE's sample size / its factor)")
    a = p.parse_args()
    if a.repeat < 1:
        sys.exit("error: --repeat must be at least 1")
    require(["numpy", "torch", "diffusers", "transformers"])
    import torch
    torch.set_num_threads(a.threads)
    torch.set_default_dtype(torch.float32)
    if a.bench == "check":
        import diffusers
        import transformers
        try:
            import peft
            peft_version = peft.__version__
        except ImportError:
            peft_version = "absent"
        info("check", torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
             peft=peft_version, threads=torch.get_num_threads())
    elif a.bench == "load-once":
        load_once(torch, a)
    elif a.bench == "load":
        bench_load(a)
    elif a.bench in ("train-step", "train-step-xl"):
        bench_train_step(torch, a)
    elif a.bench == "generate":
        bench_generate(torch, a)
    elif a.bench == "gemm":
        bench_gemm(torch, a)
    else:
        bench_forward(torch, a)


if __name__ == "__main__":
    main()
