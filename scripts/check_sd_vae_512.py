"""Runs a VAE decoder shaped like SD 1.5's (random weights, seeded) at 512x512 through websd
and compares it with onnxruntime: the decoder's last blocks hold 256 MiB tensors, past the
128 MiB storage binding limit of lavapipe and of many browsers, so websd must run them in
parts. Too slow for CI on a software GPU (about 2.5 TFLOP); run it by hand or on a GPU:

    python scripts/check_sd_vae_512.py WORK [--websd target/release/websd] [--latent 64]

Writes WORK/vae_decoder/model.onnx (+ weights), the input and onnxruntime's output, runs
`websd run`, prints the largest difference, and exits non-zero past 1e-3.
"""
import argparse
import os
import subprocess
import time

import numpy as np
import onnxruntime as ort
import torch
from diffusers import AutoencoderKL


class Decoder(torch.nn.Module):
    """vae.decode as optimum exports it: latent_sample -> sample."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample).sample


def main():
    args = argparse.ArgumentParser()
    args.add_argument("work")
    args.add_argument("--websd", default="target/release/websd")
    args.add_argument("--latent", type=int, default=64)
    opts = args.parse_args()
    folder = os.path.join(opts.work, "vae_decoder")
    os.makedirs(folder, exist_ok=True)
    model = os.path.join(folder, "model.onnx")
    torch.manual_seed(0)
    # diffusers' defaults for SD 1.x's autoencoder.
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512).eval()
    latents = torch.randn(1, 4, opts.latent, opts.latent)
    if not os.path.exists(model):
        torch.onnx.export(Decoder(vae), (latents,), model, input_names=["latent_sample"], output_names=["sample"],
                          dynamic_axes={"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"}},
                          opset_version=14, dynamo=False, external_data=True)
    np.save(os.path.join(opts.work, "latent_sample.npy"), latents.numpy())
    start = time.time()
    expected = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(
        None, {"latent_sample": latents.numpy()})[0]
    print(f"onnxruntime: {time.time() - start:.1f} s, output {expected.shape}", flush=True)
    out = os.path.join(opts.work, "websd-out")
    start = time.time()
    subprocess.run([opts.websd, "run", model, "--input", f"latent_sample={os.path.join(opts.work, 'latent_sample.npy')}",
                    "--output-dir", out], check=True)
    actual = np.load(os.path.join(out, "sample.npy"))
    diff = float(np.abs(actual - expected).max())
    print(f"websd: {time.time() - start:.1f} s; max abs difference {diff:.2e}")
    raise SystemExit(0 if diff <= 1e-3 else 1)


if __name__ == "__main__":
    main()
