"""Full-size Stable Diffusion checkpoints, as a user brings them: builds SD 1.5- and SD
2.1-architecture pipelines with random weights (diffusers, seeded, no download), exports
them with `optimum-cli export onnx --task text-to-image` in fp32 and fp16, then runs every
graph (text encoder, UNet, VAE decoder and encoder) through `websd run` and onnxruntime at
a small latent size and prints, per graph, the
largest difference relative to the output's scale, both times, websd's peak host memory and
its GPU memory. Too slow for CI (exports take minutes, an SD UNet on lavapipe a minute or
more); run it before changing loading or memory code:

    python scripts/check_sd_checkpoints.py WORK [--websd target/release/websd]
        [--versions 1.5,2.1] [--dtypes fp32,fp16] [--latent 16] [--graphs unet,...]
        [--f16-arithmetic on|off] [--f16-activations on|off] [--page]

`--page` also runs each graph through the built page in headless Chromium
(scripts/page_graph.mjs; `trunk build --release` first) on the same inputs, judged the
same way, with its run time, GPU and WebAssembly memory and Chromium's peak resident
memory. Needs torch, diffusers, transformers, optimum-onnx and onnxruntime. The tokenizer is the
real CLIP vocabulary from tests/fixtures/tiny-sd. Exits non-zero if a graph fails to load
in websd or differs by more than 1e-4 of its scale (fp32), or (fp16, when fp32 runs too)
if websd's fp16 result is further from onnxruntime's fp16 result than onnxruntime's own
fp16 error (its fp16 result against the fp32 export's). PyTorch's fp16 error on the same
module (what diffusers gives on an fp16 GPU) is printed beside it. The default latent size
is 16: at 8 the VAE encoder's output has 512 values, and its largest difference is too
noisy a sample to set against another.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def build_pipeline(version, folder):
    """An SD pipeline of the real architecture with seeded random weights, saved by diffusers."""
    torch.manual_seed(0)
    sd2 = version == "2.1"
    unet = UNet2DConditionModel(
        sample_size=96 if sd2 else 64, cross_attention_dim=1024 if sd2 else 768,
        attention_head_dim=(5, 10, 20, 20) if sd2 else 8, use_linear_projection=sd2,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=1024 if sd2 else 768, intermediate_size=4096 if sd2 else 3072,
        num_hidden_layers=23 if sd2 else 12, num_attention_heads=16 if sd2 else 12,
        max_position_embeddings=77, vocab_size=49408, hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=1024 if sd2 else 768))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=768 if sd2 else 512)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(ROOT, "tests", "fixtures", "tiny-sd", "tokenizer"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if sd2 else "epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def export(folder, out, dtype):
    command = ["optimum-cli", "export", "onnx", "--model", folder, "--task", "text-to-image", out]
    if dtype == "fp16":
        # optimum validates fp16 exports on the device; on CPU that fails after writing them.
        command += ["--dtype", "fp16", "--device", "cpu"]
    subprocess.run(command, check=dtype == "fp32", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def inputs_for(model, graph, latent, hidden):
    """Feeds in the dtypes and ranks the export declares (optimum writes fp16 inputs for
    --dtype fp16, and its timestep's type and rank vary by version)."""
    rng = np.random.default_rng(7)
    declared = {i.name: i for i in ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()}
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}
    values = {
        "sample": rng.standard_normal((2, 4, latent, latent)) if graph == "unet"
        else rng.uniform(-1, 1, (1, 3, 8 * latent, 8 * latent)),
        "encoder_hidden_states": rng.standard_normal((2, 77, hidden)),
        "latent_sample": rng.standard_normal((1, 4, latent, latent)),
    }
    feeds = {}
    for name, info in declared.items():
        kind = types[info.type]
        if name == "input_ids":
            ids = np.full((1, 77), 49407, dtype=kind)
            ids[0, :6] = [49406, 320, 1125, 539, 518, 3937]
            feeds[name] = ids
        elif name == "timestep":
            feeds[name] = np.full([2] * len(info.shape), 981, dtype=kind)
        else:
            feeds[name] = values[name].astype(kind)
    return feeds


def run_websd(websd, model, feeds, work, f16_arithmetic=None, f16_activations=None):
    args = [websd, "run", model, "--output-dir", os.path.join(work, "out")]
    if f16_arithmetic:
        args += ["--f16-arithmetic", f16_arithmetic]
    if f16_activations:
        args += ["--f16-activations", f16_activations]
    for name, value in feeds.items():
        path = os.path.join(work, f"{name}.npy")
        np.save(path, value)
        args += ["--input", f"{name}={path}"]
    start = time.time()
    run = subprocess.run(args, capture_output=True, text=True)
    seconds = time.time() - start
    if run.returncode != 0:
        return None, seconds, run.stderr.strip().splitlines()[-1]
    memory = re.search(r"memory: peak host (\S+ MiB), GPU (\S+ MiB)", run.stderr)
    outputs = {f[:-4]: np.load(os.path.join(work, "out", f)) for f in os.listdir(os.path.join(work, "out"))}
    return outputs, seconds, f"host {memory.group(1)}, GPU {memory.group(2)}" if memory else ""


def run_page(model, feeds, work):
    """The graph through the page (after run_websd saved the feeds in `work`)."""
    out = os.path.join(work, "page")
    args = ["node", os.path.join(ROOT, "scripts", "page_graph.mjs"), model, out]
    for name in feeds:
        args += ["--input", f"{name}={os.path.join(work, name + '.npy')}"]
    run = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        return None, (run.stderr.strip().splitlines() or ["no output"])[-1]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    return {name: np.load(os.path.join(out, f"{name}.npy")) for name in report.pop("outputs")}, report


def torch_fp16(folder, graph, feeds):
    """The graph's module from the diffusers folder in PyTorch fp16 (weights rounded as the
    fp16 export rounds them), on the same feeds: the fp16 yardstick."""
    tensor = lambda name, dtype=torch.float16: torch.from_numpy(np.asarray(feeds[name])).to(dtype)
    with torch.no_grad():
        if graph == "text_encoder":
            model = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).half()
            return model(tensor("input_ids", torch.int64)).last_hidden_state.float().numpy()
        if graph == "unet":
            model = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).half()
            timestep = tensor("timestep", torch.float32).reshape(-1)
            return model(tensor("sample"), timestep, tensor("encoder_hidden_states")).sample.float().numpy()
        if graph == "vae_decoder":
            model = AutoencoderKL.from_pretrained(os.path.join(folder, "vae")).half()
            return model.decode(tensor("latent_sample")).sample.float().numpy()
        if graph == "vae_encoder":
            # What optimum exports: the posterior's moments, before sampling.
            model = AutoencoderKL.from_pretrained(os.path.join(folder, "vae")).half()
            return model.quant_conv(model.encoder(tensor("sample"))).float().numpy()
    return None


def onnxruntime(model, feeds):
    start = time.time()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds))), time.time() - start


def main():
    args = argparse.ArgumentParser()
    args.add_argument("work")
    args.add_argument("--websd", default="target/release/websd")
    args.add_argument("--versions", default="1.5,2.1")
    args.add_argument("--dtypes", default="fp32,fp16")
    args.add_argument("--latent", type=int, default=16)
    args.add_argument("--graphs", default="text_encoder,unet,vae_decoder,vae_encoder")
    args.add_argument("--f16-arithmetic", choices=["on", "off"],
                      help="how websd computes products with fp16 weights (default: the device's choice)")
    args.add_argument("--f16-activations", choices=["on", "off"],
                      help="whether websd keeps an fp16 model's activations as halves (default: on)")
    args.add_argument("--page", action="store_true", help="also run each graph through the page in headless Chromium")
    opts = args.parse_args()
    results, failed = [], False
    for version in opts.versions.split(","):
        folder = os.path.join(opts.work, f"sd{version}")
        if not os.path.exists(os.path.join(folder, "model_index.json")):
            build_pipeline(version, folder)
        hidden = 1024 if version == "2.1" else 768
        reference = {}
        for dtype in opts.dtypes.split(","):
            out = os.path.join(opts.work, f"sd{version}-{dtype}")
            if not os.path.exists(os.path.join(out, "unet", "model.onnx")):
                export(folder, out, dtype)
            for graph in opts.graphs.split(","):
                model = os.path.join(out, graph, "model.onnx")
                feeds = inputs_for(model, graph, opts.latent, hidden)
                expected, ort_seconds = onnxruntime(model, feeds)
                work = os.path.join(opts.work, "run", f"sd{version}-{dtype}-{graph}")
                shutil.rmtree(work, ignore_errors=True)
                os.makedirs(work)
                actual, websd_seconds, memory = run_websd(opts.websd, model, feeds, work, opts.f16_arithmetic,
                                                            opts.f16_activations)
                name = next(iter(expected))
                row = {"model": f"SD {version} {dtype}", "graph": graph, "onnxruntime_s": round(ort_seconds, 2),
                       "websd_s": round(websd_seconds, 2), "memory": memory}
                if actual is None:
                    row["error"] = memory
                    failed = True
                else:
                    scale = max(float(np.abs(expected[name].astype(np.float32)).max()), 1e-12)
                    # Largest difference between two results, over the output's scale.
                    off = lambda result, other: float(np.abs(result.astype(np.float32)
                                                             - other.astype(np.float32)).max()) / scale
                    row["max_diff_over_scale"] = off(actual[name], expected[name])
                    # fp32: 1e-4 of the scale; fp16: onnxruntime's own fp16 error, if fp32 ran.
                    limit = 1e-4 if dtype == "fp32" else np.inf
                    if dtype == "fp32":
                        reference[graph] = expected[name]
                    elif graph in reference:
                        row["onnxruntime_fp16_vs_fp32"] = off(expected[name], reference[graph])
                        row["websd_fp16_vs_fp32"] = off(actual[name], reference[graph])
                        limit = row["onnxruntime_fp16_vs_fp32"]
                        pytorch = torch_fp16(folder, graph, feeds)
                        if pytorch is not None:
                            row["pytorch_fp16_vs_fp32"] = off(pytorch, reference[graph])
                    failed |= row["max_diff_over_scale"] > limit
                if opts.page and actual is not None:
                    page, report = run_page(model, feeds, work)
                    if page is None:
                        row["page_error"] = report
                        failed = True
                    else:
                        row["page_max_diff_over_scale"] = off(page[name], expected[name])
                        row["page"] = report
                        failed |= row["page_max_diff_over_scale"] > limit
                print(json.dumps(row), flush=True)
                results.append(row)
    with open(os.path.join(opts.work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
