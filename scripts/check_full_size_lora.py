"""A community-style LoRA on a full-size SD 1.5 pipeline, as a user would load one: writes a
kohya-layout LoRA (rank 8, fp16, per-layer alpha) with random factors on every layer kohya's
sd-scripts adapts (UNet attention projections, feed-forwards, proj_in/proj_out; text
encoder attention and MLP), draws diffusers' picture with it (`load_lora_weights`), then
`websd generate` with and without it, and prints both pictures' largest difference from
diffusers' and websd's times and memory. Too slow for CI (an SD UNet on lavapipe takes a
minute or more); run it before changing LoRA loading:

    python scripts/check_full_size_lora.py DIFFUSERS_DIR ONNX_DIR WORK [--websd target/release/websd]

DIFFUSERS_DIR and ONNX_DIR are the SD 1.5 pipeline and its optimum export that
scripts/check_sd_checkpoints.py builds (WORK/sd1.5-diffusers, WORK/sd1.5-fp32).
"""
import argparse
import os
import subprocess

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

from make_pipeline_fixtures import add_kohya_layer, draw_with_lora

PROMPT = "a photo of a red fox in the snow"
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def kohya_lora(pipe, path, rank=8):
    torch.manual_seed(5)
    tensors = {}
    for prefix, model, names in (("lora_unet_", pipe.unet, UNET_LAYERS), ("lora_te_", pipe.text_encoder, TEXT_LAYERS)):
        for name, module in model.named_modules():
            if name.endswith(names):
                # Small enough that the random pipeline stays finite, large enough to show.
                add_kohya_layer(tensors, prefix, name, module, rank=rank, scale=0.05, alpha=rank)
    save_file(tensors, path)
    return len(tensors) // 3


def websd(binary, model, out, lora, size):
    command = [binary, "generate", "--model", model, "--prompt", PROMPT, "--steps", "2",
               "--scheduler", "euler", "--seed", "3", "--width", str(size), "--height", str(size),
               "--out", out]
    if lora:
        command += ["--lora", lora + ":0.8"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr)
    return result.stderr


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("diffusers_dir")
    parser.add_argument("onnx_dir")
    parser.add_argument("work")
    parser.add_argument("--websd", default="target/release/websd")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(args.diffusers_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    lora = os.path.join(args.work, "kohya_sd15.safetensors")
    layers = kohya_lora(pipe, lora)
    print(f"{layers} layers, {os.path.getsize(lora) >> 20} MiB")
    expected = draw_with_lora(pipe, args.work, "kohya_sd15.safetensors", 0.8, prompt=PROMPT, steps=2,
                              size=args.size, seed=3)
    expected.save(os.path.join(args.work, "diffusers.png"))
    expected = np.asarray(expected, dtype=np.int16)
    for lora_file in (None, lora):
        out = os.path.join(args.work, "websd_lora.png" if lora_file else "websd_plain.png")
        log = websd(args.websd, args.onnx_dir, out, lora_file, args.size)
        ours = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
        lines = [l for l in log.splitlines() if "LoRA" in l or "ms" in l or "memory" in l]
        print("with LoRA" if lora_file else "plain", "max |diff| from diffusers with the LoRA:",
              np.abs(ours - expected).max(), "/ 255")
        for line in lines:
            print("   ", line)


if __name__ == "__main__":
    main()
