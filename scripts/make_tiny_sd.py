"""Build tiny random-weight Stable Diffusion pipelines with diffusers and export them with
optimum, in the layout websd reads for real SD (`optimum-cli export onnx --task text-to-image`).

    python scripts/make_tiny_sd.py OUT_DIR

Writes OUT_DIR/diffusers (the torch pipeline) and OUT_DIR/onnx (the optimum export), and
OUT_DIR/lcm-diffusers + OUT_DIR/lcm-onnx: the same pipeline with a guidance-distilled UNet
(`time_cond_proj_dim`, the guidance scale as an input) and the LCM scheduler. The
tokenizer is the real CLIP BPE vocabulary, rebuilt from the copy in the open_clip wheel.
Everything is seeded, so reruns give the same weights.
"""
import gzip
import json
import os
import subprocess
import sys

import open_clip
import torch
from diffusers import (AutoencoderKL, LCMScheduler, PNDMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def bytes_to_unicode():
    # GPT-2/CLIP's reversible byte -> printable character table.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, [chr(c) for c in chars]))


def write_clip_tokenizer(folder):
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                        pad_token="<|endoftext|>", model_max_length=77)
    return tok


def build(out, prediction_type="epsilon", sample_size=8, time_cond_proj_dim=None, lcm=False, prefix=""):
    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(os.path.join(out, "tok_src"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=16,
        intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        vocab_size=49408, max_position_embeddings=77, projection_dim=16))
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=sample_size,
        in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=4, time_cond_proj_dim=time_cond_proj_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        norm_num_groups=8, layers_per_block=1, sample_size=sample_size * 2,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    # Random init leaves tiny weights in places; widen them so every op matters numerically.
    with torch.no_grad():
        for model in (unet, vae):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    if lcm:
        scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 num_train_timesteps=1000, set_alpha_to_one=True, prediction_type=prediction_type)
    else:
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                                  steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(out, prefix + "diffusers"))
    subprocess.run(["optimum-cli", "export", "onnx", "--task", "text-to-image", "--model",
                    os.path.join(out, prefix + "diffusers"), os.path.join(out, prefix + "onnx")], check=True)


if __name__ == "__main__":
    build(sys.argv[1])
    build(sys.argv[1], time_cond_proj_dim=8, lcm=True, prefix="lcm-")
