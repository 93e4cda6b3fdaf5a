"""Whole images from diffusers' StableDiffusionPipeline for the committed glyph models
(onnx/glyph-sd*), so websd's test can check it draws the same pictures.

    python scripts/make_glyph_fixtures.py WORK

WORK is train_glyph_sd.py's work folder; its export/<model> holds the torch pipelines the
committed ONNX folders were exported from (weights already rounded to fp16). Writes
tests/fixtures/glyph/cases.json and one PNG per case. The guidance-distilled UNet takes the
guidance scale through `timestep_cond`, which StableDiffusionPipeline feeds itself.
"""
import json
import os
import sys

import torch
from diffusers import StableDiffusionPipeline

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "glyph")
CASES = [
    {"model": "glyph-sd", "prompt": "a yellow 7 on a blue background", "steps": 50, "seed": 7},
    {"model": "glyph-sd", "prompt": "the letter k in green on white", "steps": 10, "seed": 3,
     "negative_prompt": "black"},
    {"model": "glyph-sd-pd4", "prompt": "a red 2 on a black background", "steps": 4, "seed": 11},
    {"model": "glyph-sd-guided4", "prompt": "the digit 5 in purple on cyan", "steps": 4, "seed": 5},
]

if __name__ == "__main__":
    work = sys.argv[1]
    os.makedirs(ROOT, exist_ok=True)
    for i, case in enumerate(CASES):
        case.setdefault("negative_prompt", "")
        case["guidance_scale"] = 7.5
        case["name"] = f"{i}-{case['model']}"
        pipe = StableDiffusionPipeline.from_pretrained(os.path.join(work, "export", case["model"]))
        image = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"] or None,
                     num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"],
                     generator=torch.Generator("cpu").manual_seed(case["seed"])).images[0]
        image.save(os.path.join(ROOT, case["name"] + ".png"))
    with open(os.path.join(ROOT, "cases.json"), "w") as f:
        json.dump(CASES, f, indent=1)
