"""Whole images from diffusers' torch pipelines (CPU generator), for websd's pipeline tests.

    python scripts/make_pipeline_fixtures.py TINY_DIFFUSERS_DIR

TINY_DIFFUSERS_DIR is the `diffusers` folder make_tiny_sd.py wrote (the weights the
committed tests/fixtures/tiny-sd export came from). Writes tests/fixtures/pipeline/:
cases.json (the parameters of each case), <case>.png (diffusers' image), init.png (the
img2img source) and v_prediction_scheduler_config.json.
"""
import json
import os
import sys

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler,
                       PNDMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "pipeline")
CLASSES = {
    "ddim": (DDIMScheduler, {}), "pndm": (PNDMScheduler, {}), "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}), "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}), "lcm": (LCMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}
PROMPT = "a red 7 on a blue background"


def init_image():
    y, x = np.mgrid[0:16, 0:16]
    rgb = np.stack([x * 16, y * 16, (x + y) * 8], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def run(base, case):
    config = dict(base.scheduler.config)
    if case.get("v_prediction"):
        config["prediction_type"] = "v_prediction"
    cls, extra = CLASSES[case["scheduler"]]
    scheduler = cls.from_config(config, **extra)
    generator = torch.Generator("cpu").manual_seed(case["seed"])
    common = dict(prompt=case["prompt"], negative_prompt=case.get("negative_prompt") or None,
                  num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"], generator=generator)
    pipeline_class = StableDiffusionImg2ImgPipeline if "strength" in case else StableDiffusionPipeline
    pipe = pipeline_class(**base.components)
    # Swapped in after construction, as users do (`pipe.scheduler = X.from_config(...)`): the
    # constructor would otherwise "fix" clip_sample to False for DDIM and DDPM.
    pipe.scheduler = scheduler
    if "strength" in case:
        image = pipe(image=init_image(), strength=case["strength"], **common).images[0]
    else:
        image = pipe(height=case["height"], width=case["width"], **common).images[0]
    image.save(os.path.join(ROOT, case["name"] + ".png"))


def cases():
    out = []
    for kind in CLASSES:
        out.append(dict(name=f"txt2img_{kind}", scheduler=kind, steps=4, guidance_scale=7.5, seed=9000))
    out += [
        dict(name="txt2img_nonsquare_euler-a", scheduler="euler-a", steps=5, guidance_scale=7.5, seed=1, width=24, height=16),
        dict(name="txt2img_negative_dpm++2m", scheduler="dpm++2m", steps=6, guidance_scale=5.0, seed=3,
             negative_prompt="blurry, low quality"),
        dict(name="txt2img_no_guidance_euler", scheduler="euler", steps=4, guidance_scale=1.0, seed=4),
        dict(name="txt2img_vpred_ddim", scheduler="ddim", steps=4, guidance_scale=7.5, seed=5, v_prediction=True),
        dict(name="txt2img_vpred_euler-a", scheduler="euler-a", steps=4, guidance_scale=7.5, seed=6, v_prediction=True),
        dict(name="img2img_ddim", scheduler="ddim", steps=8, guidance_scale=7.5, seed=7, strength=0.75),
        dict(name="img2img_euler-a", scheduler="euler-a", steps=8, guidance_scale=7.5, seed=8, strength=0.5),
        dict(name="img2img_dpm++2m", scheduler="dpm++2m", steps=8, guidance_scale=7.5, seed=9, strength=0.9),
        dict(name="img2img_pndm", scheduler="pndm", steps=8, guidance_scale=7.5, seed=10, strength=0.6),
    ]
    for c in out:
        c.setdefault("prompt", PROMPT)
        c.setdefault("negative_prompt", "")
        c.setdefault("width", 16)
        c.setdefault("height", 16)
    return out


def guidance_distilled(lcm_dir):
    """The guidance-distilled UNet (`timestep_cond`) with LatentConsistencyModelPipeline: one
    UNet pass per step, the guidance scale as an input. Its UNet and scheduler config are
    copied next to the image; the text encoder and VAE are those of tests/fixtures/tiny-sd."""
    import shutil
    from diffusers import LatentConsistencyModelPipeline
    folder = os.path.join(ROOT, "guidance-distilled")
    os.makedirs(folder, exist_ok=True)
    for name in ("model.onnx", "config.json"):
        shutil.copy(os.path.join(lcm_dir, "lcm-onnx", "unet", name), os.path.join(folder, name))
    shutil.copy(os.path.join(lcm_dir, "lcm-onnx", "scheduler", "scheduler_config.json"), folder)
    pipe = LatentConsistencyModelPipeline.from_pretrained(os.path.join(lcm_dir, "lcm-diffusers"), safety_checker=None)
    # The text encoder is identical to tiny-sd's; the VAE is swapped for tiny-sd's.
    pipe.vae = AutoencoderKL.from_pretrained(os.path.join(lcm_dir, "diffusers", "vae"))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, num_inference_steps=4, guidance_scale=8.5, height=16, width=16,
                 generator=torch.Generator("cpu").manual_seed(21)).images[0]
    image.save(os.path.join(folder, "lcm_4_steps_w8.5_seed21.png"))


def draw_with_lora(base, folder, weight_name, scale, prompt=PROMPT, steps=4, size=16, seed=12):
    """The picture `base` draws with a LoRA file loaded as users load one
    (`load_lora_weights`, `cross_attention_kwargs={"scale": ...}`), Euler, guidance 7.5."""
    pipe = StableDiffusionPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(folder, weight_name=weight_name)
    pipe.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                 cross_attention_kwargs={"scale": scale},
                 generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    pipe.unload_lora_weights()
    return image


def add_kohya_layer(tensors, prefix, name, module, rank, scale, alpha):
    """Random kohya factors (`<prefix><name with _>.lora_down/lora_up.weight`, `.alpha`,
    fp16) for one Linear or Conv2d."""
    flat = prefix + name.replace(".", "_")
    if isinstance(module, torch.nn.Conv2d):
        down = torch.randn(rank, module.in_channels, *module.kernel_size)
        up = torch.randn(module.out_channels, rank, 1, 1)
    else:
        down = torch.randn(rank, module.in_features)
        up = torch.randn(module.out_features, rank)
    tensors[flat + ".lora_down.weight"] = (down * scale).half()
    tensors[flat + ".lora_up.weight"] = (up * scale).half()
    tensors[flat + ".alpha"] = torch.tensor(float(alpha)).half()


def with_lora(base):
    """The tiny pipeline with the peft LoRA of tests/fixtures/grads/tiny_unet_lora loaded
    at scale 0.7, as users apply one."""
    lora = os.path.join(ROOT, "..", "grads", "tiny_unet_lora")
    image = draw_with_lora(base, lora, "initial.safetensors", 0.7)
    image.save(os.path.join(ROOT, "lora_euler_scale0.7_seed12.png"))


def with_kohya_lora(base):
    """A LoRA in kohya's layout (`lora_unet_*` / `lora_te_*`, `lora_down`/`lora_up`, a
    per-layer `alpha`, fp16 as community files are) with random factors on the UNet's
    attention projections, feed-forwards, 1x1 `proj_in`/`proj_out` convolutions and one
    3x3 resnet convolution (LoCon), and on the text encoder's attention and MLP; loaded by
    diffusers' `load_lora_weights` (which converts kohya's names itself) at scale 0.8."""
    from safetensors.torch import save_file
    torch.manual_seed(31)
    tensors = {}

    unet_layers = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                   "down_blocks.0.resnets.0.conv1")
    for name, module in base.unet.named_modules():
        if name.endswith(unet_layers):
            add_kohya_layer(tensors, "lora_unet_", name, module, rank=2, scale=0.2, alpha=1.0)
    for name, module in base.text_encoder.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
            add_kohya_layer(tensors, "lora_te_", name, module, rank=2, scale=0.2, alpha=2.0)
    save_file(tensors, os.path.join(ROOT, "kohya_lora.safetensors"))
    image = draw_with_lora(base, ROOT, "kohya_lora.safetensors", 0.8)
    image.save(os.path.join(ROOT, "kohya_lora_euler_scale0.8_seed12.png"))


if __name__ == "__main__":
    os.makedirs(ROOT, exist_ok=True)
    base = StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
    base.set_progress_bar_config(disable=True)
    init_image().save(os.path.join(ROOT, "init.png"))
    config = dict(base.scheduler.config, prediction_type="v_prediction", _class_name="PNDMScheduler")
    with open(os.path.join(ROOT, "v_prediction_scheduler_config.json"), "w") as f:
        json.dump({k: v for k, v in config.items()}, f, indent=1)
    all_cases = cases()
    for case in all_cases:
        run(base, case)
    with open(os.path.join(ROOT, "cases.json"), "w") as f:
        json.dump(all_cases, f, indent=1)
    guidance_distilled(os.path.dirname(os.path.abspath(sys.argv[1])))
    with_lora(base)
    with_kohya_lora(base)
    print(len(all_cases), "cases")
