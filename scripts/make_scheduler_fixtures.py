"""Golden values for websd's schedulers and RNG, computed by diffusers and torch.

    python scripts/make_scheduler_fixtures.py

Writes tests/fixtures/schedulers/<case>/: timesteps.npy, sigma.npy (init_noise_sigma),
sample.npy and outputs.npy (the model outputs fed at each step), scaled.npy (scale_model_input
at each step), result.npy (the sample after every step), noised.npy (add_noise at step 1),
and tests/fixtures/rng/: torch.randn with CPU generators.
Each case builds its scheduler as diffusers users do:
`Class.from_config(<tiny SD scheduler_config.json>, **overrides)`.
"""
import inspect
import json
import os
import shutil

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler,
                       PNDMScheduler)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
CONFIG = json.load(open(os.path.join(ROOT, "..", "..", "onnx", "tiny-sd", "scheduler", "scheduler_config.json")))

KINDS = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}


def case(name, kind, steps, overrides=None):
    cls, kind_overrides = KINDS[kind]
    config = dict(CONFIG, **kind_overrides, **(overrides or {}))
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(steps)
    shape = (1, 4, 3, 5)
    data = torch.Generator().manual_seed(7)
    sample = torch.randn(shape, generator=data) * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    outputs = torch.randn((len(timesteps),) + shape, generator=data)
    noise_generator = torch.Generator().manual_seed(11)
    scaled, results = [], []
    x = sample
    for i, t in enumerate(timesteps):
        scaled.append(scheduler.scale_model_input(x, t))
        # The pipelines pass the generator only to schedulers whose step takes one.
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        extra = {"generator": noise_generator} if takes_generator else {}
        x = scheduler.step(outputs[i], t, x, **extra).prev_sample
        results.append(x)
    fresh = cls.from_config(config)
    fresh.set_timesteps(steps)
    clean = torch.randn(shape, generator=data)
    noise = torch.randn(shape, generator=data)
    index = 1 if len(timesteps) > 1 else 0
    if hasattr(fresh, "set_begin_index"):
        fresh.set_begin_index(index)
    noised = fresh.add_noise(clean, noise, timesteps[index:index + 1])
    folder = os.path.join(ROOT, "schedulers", name)
    os.makedirs(folder, exist_ok=True)
    save = lambda n, v: np.save(os.path.join(folder, n + ".npy"), np.asarray(v, dtype=np.float32))
    save("timesteps", timesteps.numpy().astype(np.float64))
    save("sigma", np.array(float(scheduler.init_noise_sigma)))
    save("sample", sample)
    save("outputs", outputs)
    save("scaled", torch.stack(scaled))
    save("result", torch.stack(results))
    save("clean", clean)
    save("noise", noise)
    save("noised", noised)
    with open(os.path.join(folder, "case.json"), "w") as f:
        json.dump({"kind": kind, "steps": steps, "overrides": overrides or {}, "add_noise_index": index}, f)


def rng_cases():
    folder = os.path.join(ROOT, "rng")
    os.makedirs(folder, exist_ok=True)
    for seed, shape in [(0, (4,)), (9000, (15,)), (9000, (16,)), (42, (37,)), (9000, (1, 4, 8, 8)), (1, (2, 4, 7, 9))]:
        g = torch.Generator("cpu").manual_seed(seed)
        values = torch.randn(shape, generator=g)
        after = torch.randn((20,), generator=g)  # the stream continues where the first draw left it
        name = f"seed{seed}_" + "x".join(map(str, shape))
        np.save(os.path.join(folder, name + ".npy"), values.numpy())
        np.save(os.path.join(folder, name + "_then20.npy"), after.numpy())


if __name__ == "__main__":
    shutil.rmtree(os.path.join(ROOT, "schedulers"), ignore_errors=True)
    shutil.rmtree(os.path.join(ROOT, "rng"), ignore_errors=True)
    for kind in KINDS:
        for steps in (1, 4, 25):
            case(f"{kind}_{steps}", kind, steps)
        case(f"{kind}_v_7", kind, 7, {"prediction_type": "v_prediction"})
    case("ddim_trailing_clip_10", "ddim", 10, {"timestep_spacing": "trailing", "clip_sample": True})
    case("euler_leading_10", "euler", 10, {"timestep_spacing": "leading"})
    case("dpm++2m_20", "dpm++2m", 20, {})
    case("euler-a_trailing_5", "euler-a", 5, {"timestep_spacing": "trailing"})
    rng_cases()
