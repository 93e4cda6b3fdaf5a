"""An SD-Turbo-style folder, as users bring one: a full-size SD 2.1-architecture optimum export
(from scripts/check_sd_checkpoints.py) with SD-Turbo's scheduler (Euler, "trailing" timestep
spacing), generated in one step without guidance by `websd generate` and by diffusers'
pipeline on onnxruntime (optimum's ORTStableDiffusionPipeline) from the same seed; prints the
largest pixel difference and both times. Too slow for CI (the UNet runs a minute on
lavapipe):

    python scripts/check_turbo_folder.py EXPORT WORK [--websd target/release/websd]

EXPORT is e.g. WORK/sd2.1-fp32 as check_sd_checkpoints.py leaves it. Exits non-zero if the
images differ by more than 3/255.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from optimum.onnxruntime import ORTStableDiffusionPipeline
from PIL import Image

PROMPT = "a photograph of an astronaut riding a horse"
SIZE, SEED = 64, 0


def turbo_folder(export, out):
    """The export with SD-Turbo's scheduler configuration (everything else linked)."""
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "scheduler"))
    for entry in os.listdir(export):
        if entry not in ("scheduler", "model_index.json"):
            os.symlink(os.path.abspath(os.path.join(export, entry)), os.path.join(out, entry))
    with open(os.path.join(export, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    config.update({"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing",
                   "interpolation_type": "linear", "use_karras_sigmas": False})
    for key in ("clip_sample", "clip_sample_range", "set_alpha_to_one", "thresholding",
                "dynamic_thresholding_ratio", "sample_max_value", "rescale_betas_zero_snr"):
        config.pop(key, None)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(export, "model_index.json")) as f:
        index = json.load(f)
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1)


def main():
    args = argparse.ArgumentParser()
    args.add_argument("export")
    args.add_argument("work")
    args.add_argument("--websd", default="target/release/websd")
    opts = args.parse_args()
    folder = os.path.join(opts.work, "turbo")
    turbo_folder(opts.export, folder)

    t0 = time.time()
    pipe = ORTStableDiffusionPipeline.from_pretrained(folder, provider="CPUExecutionProvider")
    image = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, height=SIZE, width=SIZE,
                 generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    reference_s = time.time() - t0
    reference = np.asarray(image.convert("RGB"), dtype=np.int16)

    out = os.path.join(opts.work, "turbo-websd.png")
    t0 = time.time()
    run = subprocess.run([opts.websd, "generate", "--model", folder, "--prompt", PROMPT,
                          "--steps", "1", "--guidance-scale", "0", "--seed", str(SEED),
                          "--width", str(SIZE), "--height", str(SIZE), "--out", out],
                         capture_output=True, text=True)
    websd_s = time.time() - t0
    if run.returncode != 0:
        print(run.stderr)
        sys.exit(1)
    ours = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    diff = int(np.abs(ours - reference).max())
    print(json.dumps({"folder": "SD-Turbo style (SD 2.1 export, Euler trailing, 1 step, no guidance)",
                      "max_pixel_difference": diff, "diffusers_onnxruntime_s": round(reference_s, 1),
                      "websd_s": round(websd_s, 1)}))
    sys.exit(0 if diff <= 3 else 1)


if __name__ == "__main__":
    main()
