"""Imagic in torch: the reference websd's `optimize_edit` is checked against.

The same procedure as `src/pipeline/imagic.rs`, written with torch autograd, diffusers'
UNet2DConditionModel and schedulers, and peft's LoRA layers:
  - the image's latents: VAE encoder (onnxruntime), posterior sampled with the seeded torch
    generator, times the scaling factor;
  - the target text's embedding: CLIP text encoder (onnxruntime);
  - stage A: Adam on the embedding, stage B: Adam on a LoRA of the attention projections
    (or of every linear and convolution layer websd adapts: `layers="all"`, LoCon on convs),
    each step drawing noise (`torch.randn`) then a timestep (`torch.randint`) from the same
    generator and taking the MSE of the UNet's output against the noise or velocity;
  - stage C: classifier-free guided sampling from eta * target + (1 - eta) * optimised,
    from noise or, with a strength below 1, from the image's latents noised as image-to-image
    does (posterior sample, then the noise, from the sampling seed's generator).

The UNet is rebuilt from the ONNX export itself (weights by name; the anonymous MatMul
weights by their node's module path), so the reference runs exactly websd's model.

    python scripts/imagic_reference.py fixture OUT_DIR      # tests/fixtures/imagic
    python scripts/imagic_reference.py bench BENCH OUT ETAS [...]   # the edit benchmark
    python scripts/imagic_reference.py roundtrip BENCH IMAGES OUT   # pictures through the VAE
    python -c 'import imagic_reference as r; ...'           # used by eval_edits.py
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def unet_from_onnx(folder):
    """The folder's UNet as a diffusers module with the export's weights (f32), and the
    layers websd can adapt (MatMuls and ungrouped Convs named by module path) in the
    export's node order (websd's adapter order): (module, A's shape in websd, conv?)."""
    from diffusers import UNet2DConditionModel
    config = json.load(open(os.path.join(folder, "unet", "config.json")))
    unet = UNet2DConditionModel.from_config(config)
    graph = onnx.load(os.path.join(folder, "unet", "model.onnx"))
    values = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in graph.graph.initializer}
    state = {}
    for name, value in values.items():
        key = name[:-len("_fp16")] if name.endswith("_fp16") else name
        if key in unet.state_dict():
            state[key] = torch.from_numpy(value)
    # GroupNorm is exported as InstanceNormalization then Mul / Add by anonymous [C, 1, 1]
    # initializers: the module's weight and bias.
    group_norms = {n.name.rsplit("/", 1)[0] for n in graph.graph.node
                   if n.op_type == "InstanceNormalization"}
    for node in graph.graph.node:
        module, _, op = node.name.rpartition("/")
        last = node.input[-1] if node.input else ""
        value = values.get(last, values.get(last + "_fp16"))
        if module in group_norms and op in ("Mul", "Add") and value is not None:
            key = module[1:].replace("/", ".") + (".weight" if op == "Mul" else ".bias")
            state[key] = torch.from_numpy(value.reshape(-1).copy())
    order = []
    for node in graph.graph.node:
        op = node.op_type
        if op not in ("MatMul", "Conv") or not node.name.endswith("/" + op):
            continue
        weight = node.input[1]
        value = values.get(weight, values.get(weight + "_fp16"))
        if value is None:
            continue
        module = node.name[1:-len("/" + op)].replace("/", ".")
        if op == "MatMul":
            state[module + ".weight"] = torch.from_numpy(value.T.copy())
            order.append((module, (value.shape[0], None), False))
        elif all(a.name != "group" or a.i == 1 for a in node.attribute):
            order.append((module, (None, value.shape[1], value.shape[2], value.shape[3]), True))
    missing = set(unet.state_dict()) - set(state)
    assert not missing, f"weights not found in the export: {sorted(missing)[:5]}"
    unet.load_state_dict(state)
    return unet.eval(), order


class Model:
    """The frozen parts through onnxruntime, the UNet in torch."""

    def __init__(self, folder):
        from diffusers import DDPMScheduler
        from transformers import CLIPTokenizer
        self.folder = folder
        session = lambda part: ort.InferenceSession(os.path.join(folder, part, "model.onnx"))
        self.text_encoder = session("text_encoder")
        self.vae_encoder = session("vae_encoder")
        self.vae_decoder = session("vae_decoder")
        self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
        self.unet, self.layers = unet_from_onnx(folder)
        self.scheduler_config = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
        self.noise = DDPMScheduler.from_config(self.scheduler_config)
        vae = json.load(open(os.path.join(folder, "vae_decoder", "config.json")))
        self.scaling = vae.get("scaling_factor", 0.18215)
        self.vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)

    def embed(self, text):
        ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids.astype(np.int64)
        name = self.text_encoder.get_inputs()[0].name
        outputs = self.text_encoder.run(None, {name: ids})
        names = [o.name for o in self.text_encoder.get_outputs()]
        return torch.from_numpy(outputs[names.index("last_hidden_state")])

    def encode(self, image, generator):
        """RGB uint8 [H, W, 3] -> scaled latents sampled from the posterior."""
        pixels = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 127.5 - 1.0
        name = self.vae_encoder.get_inputs()[0].name
        params = torch.from_numpy(self.vae_encoder.run(None, {name: pixels.numpy()})[0])
        mean, logvar = params.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return (mean + std * torch.randn(mean.shape, generator=generator)) * self.scaling

    def decode(self, latents):
        name = self.vae_decoder.get_inputs()[0].name
        image = self.vae_decoder.run(None, {name: (latents / self.scaling).numpy()})[0][0]
        return np.round(np.clip((image + 1) * 127.5, 0, 255)).transpose(1, 2, 0).astype(np.uint8)

    def draw(self, x0, generator):
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(self.noise.config.num_train_timesteps, (1,), generator=generator)
        noisy = self.noise.add_noise(x0, noise, t)
        if self.noise.config.prediction_type == "v_prediction":
            target = self.noise.get_velocity(x0, noise, t)
        else:
            target = noise
        return noisy, t, target


def adapted_layers(model, layers):
    """websd's stage B layers: the attention projections, or every adaptable layer."""
    if layers == "all":
        return model.layers
    return [l for l in model.layers if l[0].endswith(tuple("." + p for p in PROJECTIONS))]


def fresh_lora(model, rank, seed, layers):
    """peft LoRA layers, initialised as websd's `fresh_adapters` draws them: A from
    N(0, 1/rank^2) in the export's layer order (websd's [in, rank] for linear layers, the
    filter layout for convolutions), B zero."""
    from peft import LoraConfig
    chosen = adapted_layers(model, layers)
    model.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                      target_modules=[name for name, _, _ in chosen]))
    modules = dict(model.unet.named_modules())
    generator = torch.Generator().manual_seed(seed)
    params = []
    for name, shape, conv in chosen:
        layer = modules[name]
        shape = (shape[0], rank) if not conv else (rank,) + shape[1:]
        a = torch.randn(int(np.prod(shape)), generator=generator).reshape(shape) / rank
        layer.lora_A["default"].weight.data = a.contiguous() if conv else a.T.contiguous()
        layer.lora_B["default"].weight.data.zero_()
        params += [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return params


def optimize(model, image, prompt, seed, embed_steps, embed_lr, tune_steps, tune_lr, rank,
             layers="attention", log=print):
    """Stages A and B; returns (target, optimised embedding, lora state, losses)."""
    generator = torch.Generator().manual_seed(seed)
    x0 = model.encode(image, generator)
    target = model.embed(prompt)
    embedding = target.clone().requires_grad_(True)
    for p in model.unet.parameters():
        p.requires_grad_(False)
    losses = []
    adam = torch.optim.Adam([embedding], lr=embed_lr)
    for step in range(embed_steps):
        noisy, t, goal = model.draw(x0, generator)
        loss = torch.nn.functional.mse_loss(model.unet(noisy, t, embedding).sample, goal)
        adam.zero_grad()
        loss.backward()
        adam.step()
        losses.append(loss.item())
    optimized = embedding.detach()
    lora = {}
    if tune_steps:
        params = fresh_lora(model, rank, seed, layers)
        adam = torch.optim.Adam(params, lr=tune_lr)
        for step in range(tune_steps):
            noisy, t, goal = model.draw(x0, generator)
            loss = torch.nn.functional.mse_loss(model.unet(noisy, t, optimized).sample, goal)
            adam.zero_grad()
            loss.backward()
            adam.step()
            losses.append(loss.item())
        modules = dict(model.unet.named_modules())
        for name, _, _ in adapted_layers(model, layers):
            layer = modules[name]
            lora[f"unet.{name}.lora_A.weight"] = layer.lora_A["default"].weight.detach().clone()
            lora[f"unet.{name}.lora_B.weight"] = layer.lora_B["default"].weight.detach().clone()
    log(f"losses {losses[0]:.4f} -> {losses[-1]:.4f}")
    return target, optimized, lora, losses


@torch.no_grad()
def sample(model, embedding, seed, steps, guidance, size, image=None, strength=1.0):
    """Classifier-free guided sampling (diffusers' pipeline loop) with the folder's scheduler;
    with `image` and a strength below 1, image-to-image's start (diffusers' img2img)."""
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    side = size // model.vae_factor
    timesteps = scheduler.timesteps
    if image is None or strength >= 1.0:
        latents = torch.randn((1, model.unet.config.in_channels, side, side), generator=generator)
        latents = latents * scheduler.init_noise_sigma
    else:
        clean = model.encode(image, generator)
        start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[start:]
        noise = torch.randn(clean.shape, generator=generator)
        latents = scheduler.add_noise(clean, noise, timesteps[:1])
    context = torch.cat([model.embed(""), embedding])
    for t in timesteps:
        batch = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        uncond, cond = model.unet(batch, t, context).sample.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return model.decode(latents)


def write_edit(path, settings, target, optimized, lora):
    """websd's edit file: the embeddings, the LoRA in diffusers' layout, the settings."""
    from safetensors.torch import save_file
    tensors = {"imagic.target_embedding": target, "imagic.optimized_embedding": optimized, **lora}
    rank = settings["lora_rank"]
    metadata = {"format": "pt", "imagic": json.dumps(settings)}
    if lora:
        metadata["lora_adapter_metadata"] = json.dumps({"unet.r": rank, "unet.lora_alpha": rank})
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def fixture(out):
    """A short edit of a held-out render (tests/fixtures/imagic)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import random
    import glyph_data
    from PIL import Image
    os.makedirs(out, exist_ok=True)
    image = glyph_data.render((7, 0, 2), random.Random(5))  # a red 7 on blue
    Image.fromarray(image).save(os.path.join(out, "source.png"))
    settings = dict(prompt="a green 7 on a blue background", seed=3, embed_steps=4, embed_lr=1e-2,
                    tune_steps=3, tune_lr=1e-3, lora_rank=2, width=None, height=None)
    # Stage B on the attention projections (edit.safetensors), then on every layer
    # (edit_all.safetensors), each from a fresh UNet.
    for layers, suffix in (("attention", ""), ("all", "_all")):
        model = Model(os.path.join(ROOT, "onnx", "glyph-sd"))
        target, optimized, lora, losses = optimize(
            model, image, settings["prompt"], settings["seed"], settings["embed_steps"],
            settings["embed_lr"], settings["tune_steps"], settings["tune_lr"], settings["lora_rank"],
            layers)
        write_edit(os.path.join(out, f"edit{suffix}.safetensors"), dict(settings, tune_layers=layers),
                   target, optimized, lora)
        np.save(os.path.join(out, f"losses{suffix}.npy"), np.array(losses, np.float32))
        if layers == "attention":
            # Stage C from the picture noised to strength 0.5, eta 0.7, 4 DDIM steps.
            embedding = 0.7 * target + 0.3 * optimized
            picture = sample(model, embedding, settings["seed"], 4, 7.5, image.shape[0], image, 0.5)
            Image.fromarray(picture).save(os.path.join(out, "start.png"))


def bench(benchmark, out, etas, steps=20, guidance=7.5, embed_steps=60, embed_lr=1e-2,
          tune_steps=40, tune_lr=2e-3, rank=4, layers="attention", strengths=(1.0,)):
    """The edit benchmark's cases (edits.json) edited by this reference, written as
    OUT/eta_<eta>/<source name> for `websd eval-edit --method images`."""
    from PIL import Image
    import time
    cases = json.load(open(os.path.join(benchmark, "edits.json")))["cases"]
    folder = os.path.join(ROOT, "onnx", "glyph-sd")
    for case in cases:
        started = time.time()
        model = Model(folder)  # a fresh UNet: stage B changed the last one
        image = np.asarray(Image.open(os.path.join(benchmark, case["source"])).convert("RGB"))
        target, optimized, _, _ = optimize(model, image, case["prompt"], case["seed"], embed_steps,
                                           embed_lr, tune_steps, tune_lr, rank, layers)
        for eta in etas:
            for strength in strengths:
                embedding = eta * target + (1 - eta) * optimized
                picture = sample(model, embedding, case["seed"], steps, guidance, image.shape[0],
                                 image, strength)
                name = f"eta_{eta}" if strength >= 1.0 else f"eta_{eta}_strength_{strength}"
                path = os.path.join(out, name, os.path.basename(case["source"]))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(picture).save(path)
        print(f"{case['prompt']}: {time.time() - started:.1f} s")


def roundtrip(benchmark, images, out):
    """Each case's picture in `images` encoded by Glyph SD's VAE (the posterior sampled
    with the case's seed) and decoded, as OUT/<source name>: what a latent-space method
    keeps of a picture before any denoising."""
    from PIL import Image
    model = Model(os.path.join(ROOT, "onnx", "glyph-sd"))
    os.makedirs(os.path.join(out, "edits"), exist_ok=True)
    for case in json.load(open(os.path.join(benchmark, "edits.json")))["cases"]:
        image = np.asarray(Image.open(os.path.join(images, case["source"])).convert("RGB"))
        latents = model.encode(image, torch.Generator().manual_seed(case["seed"]))
        Image.fromarray(model.decode(latents)).save(os.path.join(out, case["source"]))


if __name__ == "__main__":
    torch.manual_seed(0)
    if sys.argv[1] == "roundtrip":
        # roundtrip BENCH IMAGES OUT
        roundtrip(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "fixture":
        fixture(sys.argv[2])
    elif sys.argv[1] == "bench":
        # bench BENCH OUT ETAS [TUNE_STEPS TUNE_LR RANK LAYERS [STRENGTHS]]
        tuning = {}
        if len(sys.argv) > 5:
            steps, lr, rank, layers = sys.argv[5:9]
            tuning = dict(tune_steps=int(steps), tune_lr=float(lr), rank=int(rank), layers=layers)
        if len(sys.argv) > 9:
            tuning["strengths"] = [float(s) for s in sys.argv[9].split(",")]
        bench(sys.argv[2], sys.argv[3], [float(e) for e in sys.argv[4].split(",")], **tuning)
