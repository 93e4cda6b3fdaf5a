"""Train websd's bundled model: a miniature Stable Diffusion on the synthetic glyph set
(scripts/glyph_data.py), a glyph/colour classifier to measure it, and the two few-step
students of the seed papers. CPU only, fixed seeds; every stage checkpoints into WORK.

    python scripts/train_glyph_sd.py WORK all          # every stage in order
    python scripts/train_glyph_sd.py WORK teacher      # or one stage: data vae classifier
                                                       # teacher pd guided eval export
Same diffusers/transformers classes as real SD 1.x: AutoencoderKL (32 px -> 8x8x4 latents),
CLIPTextModel with the real CLIP tokenizer, UNet2DConditionModel with cross-attention,
trained for v-prediction on the scaled-linear schedule.

Students (Salimans & Ho 2022, Meng et al. 2023):
  pd      progressive distillation: the student learns to take two teacher DDIM steps in
          one; it then teaches the next student, halving the steps down to 4. Sampled
          with ordinary classifier-free guidance (two UNet passes per step).
  guided  guidance distillation: a UNet with `time_cond_proj_dim` (the guidance scale w
          as an input, embedded as diffusers' LCM UNets do) learns the guided prediction
          in one pass, then is progressively distilled down to 4 steps the same way.
"""
import copy
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import glyph_data  # noqa: E402

torch.set_num_threads(2)
STEPS_PD = [8, 4]  # student step counts; the first teacher runs twice as many
GUIDANCE = 7.5
GUIDANCE_RANGE = (1.0, 10.0)
TIME_COND_DIM = 32
# Captions are at most 12 tokens with BOS and EOS; a 16-token context (tokenizer and text
# encoder alike) costs the text encoder and every cross-attention a fifth of CLIP's 77.
MAX_TOKENS = 16
# GLYPH_SMOKE=1 runs every stage for two optimiser steps: a quick check that the code runs.
SMOKE = bool(os.environ.get("GLYPH_SMOKE"))


def budget(steps):
    return 2 if SMOKE else steps


# ---------------------------------------------------------------- models

def make_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(16, 32, 64), in_channels=3, out_channels=3, latent_channels=4,
                         norm_num_groups=8, layers_per_block=1, sample_size=glyph_data.SIZE,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel
    # Plain matmul attention: on this CPU it beats SDPA's flash kernel for such small heads.
    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=64,
        num_attention_heads=2, num_hidden_layers=3, vocab_size=49408, max_position_embeddings=MAX_TOKENS,
        projection_dim=32, attn_implementation="eager"))


def make_unet(time_cond_proj_dim=None):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    unet = UNet2DConditionModel(
        block_out_channels=(48, 96), layers_per_block=1, sample_size=glyph_data.SIZE // 4, in_channels=4,
        out_channels=4, norm_num_groups=16, cross_attention_dim=32, attention_head_dim=4,
        time_cond_proj_dim=time_cond_proj_dim,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    unet.set_attn_processor(AttnProcessor())  # as the text encoder: faster here than SDPA
    return unet


def make_scheduler():
    from diffusers import DDIMScheduler
    # Trailing spacing starts every sampler at t=999, and set_alpha_to_one makes the last
    # step land on clean latents: both matter for 4-step students.
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False,
                         set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing")


class Classifier(torch.nn.Module):
    """Reads an image in [0, 1]: logits for the glyph, the foreground and the background colour."""

    def __init__(self):
        super().__init__()
        layers = []
        for cin, cout, stride in [(3, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 2)]:
            layers += [torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1), torch.nn.BatchNorm2d(cout),
                       torch.nn.ReLU()]
        self.features = torch.nn.Sequential(*layers)
        self.glyph = torch.nn.Linear(128 * 16, len(glyph_data.GLYPHS))
        self.foreground = torch.nn.Linear(128 * 16, len(glyph_data.COLORS))
        self.background = torch.nn.Linear(128 * 16, len(glyph_data.COLORS))

    def forward(self, image):
        h = self.features(image).flatten(1)
        return self.glyph(h), self.foreground(h), self.background(h)

    @torch.no_grad()
    def fold_batch_norms(self):
        """Each BatchNorm (eval mode) folded into the Conv before it, so the exported graph is
        plain Conv/Relu/Gemm."""
        kept = []
        for layer in self.features:
            if isinstance(layer, torch.nn.BatchNorm2d):
                conv = kept[-1]
                scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias.copy_((conv.bias - layer.running_mean) * scale + layer.bias)
            else:
                kept.append(layer)
        self.features = torch.nn.Sequential(*kept)
        return self


def tokenizer(work):
    from transformers import CLIPTokenizer
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_tiny_sd import write_clip_tokenizer
    folder = os.path.join(work, "tokenizer")
    if not os.path.exists(os.path.join(folder, "vocab.json")):
        write_clip_tokenizer(folder)
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         pad_token="<|endoftext|>", model_max_length=MAX_TOKENS)


# ---------------------------------------------------------------- helpers

def to_unit(images):
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def save(module, path):
    torch.save(module.state_dict(), path)


def load(module, path):
    module.load_state_dict(torch.load(path))
    return module


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


class Ema:
    def __init__(self, module, decay):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module):
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)


def alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, 0)


ALPHAS = alphas_cumprod()


def alpha_sigma(t):
    """sqrt(alpha_bar), sqrt(1 - alpha_bar) for integer timesteps; t < 0 is the clean end."""
    a = torch.where(t >= 0, ALPHAS[t.clamp(min=0)], torch.ones(()))
    return a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)


def grid(steps):
    """diffusers' trailing timesteps for `steps` steps, then -1 (the clean end)."""
    t = np.round(np.arange(1000, 0, -1000 / steps)).astype(np.int64) - 1
    return torch.from_numpy(np.append(t, -1))


def ddim_step(z, v, t, t_next):
    """One deterministic DDIM step from t to t_next with a v-prediction."""
    a, s = alpha_sigma(t)
    a2, s2 = alpha_sigma(t_next)
    x = a * z - s * v
    eps = s * z + a * v
    return a2 * x + s2 * eps, x


def guidance_embedding(w, dim=TIME_COND_DIM):
    """diffusers' LCM w-embedding of (guidance_scale - 1), as websd computes it."""
    w = (w - 1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


class TextTable:
    """Token ids of every caption the data can produce, plus the empty prompt."""

    def __init__(self, tok):
        triples = glyph_data.all_triples()
        self.index = {t: i for i, t in enumerate(triples)}
        captions = [glyph_data.caption(t, k) for t in triples for k in range(len(glyph_data.TEMPLATES))]
        self.ids = tok(captions + [""], padding="max_length", return_tensors="pt").input_ids
        self.empty = len(captions)

    def rows(self, labels, templates):
        return torch.tensor([self.index[tuple(l)] * len(glyph_data.TEMPLATES) + k
                             for l, k in zip(labels.tolist(), templates.tolist())])


# ---------------------------------------------------------------- stages

def stage_data(work):
    train, _ = glyph_data.split_triples()
    for name, count, seed in [("train", 60000, 0), ("test", 2000, 1)]:
        images, labels, templates = glyph_data.make_set(train, count, seed)
        np.savez(os.path.join(work, f"{name}.npz"), images=images, labels=labels, templates=templates)
        log(name, images.shape)


def dataset(work, name):
    d = np.load(os.path.join(work, f"{name}.npz"))
    return d["images"], d["labels"], d["templates"]


def stage_vae(work, steps=1500, batch=32):
    """Reconstruction (L1 + MSE) weighted 10x on the glyph's pixels (those far from the
    image's median colour, its background): unweighted, the VAE settles for a plain
    background first and takes thousands of steps to find the glyphs. A light KL pull."""
    torch.manual_seed(0)
    images, _, _ = dataset(work, "train")
    vae = make_vae()
    opt, sched = one_cycle(vae.parameters(), 1e-3, steps)
    for step in range(budget(steps)):
        x = to_unit(images[torch.randint(0, len(images), (batch,)).numpy()])
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        background = x.flatten(2).median(dim=2).values[..., None, None]
        weight = 1 + 9 * ((x - background).abs().amax(1, keepdim=True) > 0.15).float()
        kl = post.kl().mean() / post.mean[0].numel()
        loss = (weight * ((recon - x) ** 2 + (recon - x).abs())).mean() + 1e-5 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == budget(steps) - 1:
            log(f"vae {step} mse {F.mse_loss(recon, x).item():.4f} kl {kl.item():.2f}")
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_unit(images[i:i + 500])).latent_dist.mean
                             for i in range(0, 5000, 500)])
    vae.config.scaling_factor = float(1 / latents.std())
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    log("vae scaling factor", vae.config.scaling_factor)
    vae.save_pretrained(os.path.join(work, "vae"))


def encode_dataset(work, vae):
    """Posterior mean and std of every training image, scaled: latents are drawn per batch."""
    path = os.path.join(work, "latents.pt")
    if os.path.exists(path):
        return torch.load(path)
    images, _, _ = dataset(work, "train")
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 500):
            post = vae.encode(to_unit(images[i:i + 500])).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    out = (torch.cat(means) * vae.config.scaling_factor, torch.cat(stds) * vae.config.scaling_factor)
    torch.save(out, path)
    return out


def load_vae(work):
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_pretrained(os.path.join(work, "vae")).eval()


def stage_classifier(work, steps=3000, batch=128, round_trips=30000):
    """Trained on real renders and on VAE round trips of them (computed once), so it reads
    decoded images as fairly as clean ones. With batch norm (folded away for export) and
    30 000 round trips it reads 99.3% of fresh renders' glyphs and 96.2% after a round trip
    (95% and 87% without them); on renders the misreadings left are O/0, round trips add
    M/N/H."""
    torch.manual_seed(0)
    images, labels, _ = dataset(work, "train")
    vae = load_vae(work)
    with torch.no_grad():
        decoded = torch.cat([vae.decode(vae.encode(to_unit(images[i:i + 500])).latent_dist.sample()).sample
                             for i in range(0, budget(round_trips), 500)]).clamp(-1, 1)
    model = Classifier()
    opt, sched = one_cycle(model.parameters(), 2e-3, steps)
    for step in range(budget(steps)):
        half = batch // 2
        clean = torch.randint(0, len(images), (half,))
        trips = torch.randint(0, len(decoded), (half,))
        x = torch.cat([to_unit(images[clean.numpy()]), decoded[trips]])
        y = torch.from_numpy(np.concatenate([labels[clean.numpy()], labels[trips.numpy()]]))
        outs = model((x + 1) / 2)
        loss = sum(F.cross_entropy(o, y[:, k]) for k, o in enumerate(outs))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == budget(steps) - 1:
            log(f"classifier {step} loss {loss.item():.3f}")
    model.eval()
    images, labels, _ = dataset(work, "test")
    with torch.no_grad():
        x = to_unit(images)
        rec = torch.cat([vae.decode(vae.encode(x[i:i + 500]).latent_dist.mean).sample.clamp(-1, 1)
                         for i in range(0, len(x), 500)])
        for name, inp in [("renders", x), ("vae round trips", rec)]:
            outs = model((inp + 1) / 2)
            acc = [(o.argmax(1).numpy() == labels[:, k]).mean() for k, o in enumerate(outs)]
            log(f"classifier accuracy on test {name}: glyph {acc[0]:.3f} fg {acc[1]:.3f} bg {acc[2]:.3f}")
    save(model, os.path.join(work, "classifier.pt"))



def text_hidden(work, table):
    """The frozen teacher text encoder's hidden states for every caption row."""
    te = load_text_encoder(work)
    with torch.no_grad():
        return torch.cat([te(table.ids[i:i + 1000])[0] for i in range(0, len(table.ids), 1000)])


def load_text_encoder(work):
    return load(make_text_encoder(), os.path.join(work, "text_encoder.pt")).eval()


def load_unet(work, name, time_cond_proj_dim=None):
    return load(make_unet(time_cond_proj_dim), os.path.join(work, name + ".pt")).eval()


class Batches:
    """Random training batches: scaled latents drawn from each image's posterior, caption rows."""

    def __init__(self, work):
        self.mean, self.std = encode_dataset(work, load_vae(work))
        _, labels, templates = dataset(work, "train")
        self.table = TextTable(tokenizer(work))
        self.rows = self.table.rows(labels, templates)

    def draw(self, batch, drop=0.0):
        idx = torch.randint(0, len(self.rows), (batch,))
        x0 = self.mean[idx] + self.std[idx] * torch.randn_like(self.mean[idx])
        rows = torch.where(torch.rand(batch) < drop, torch.full((batch,), self.table.empty), self.rows[idx])
        return x0, rows


def noised(x0, t):
    eps = torch.randn_like(x0)
    a, s = alpha_sigma(t)
    return a * x0 + s * eps, a * eps - s * x0


def one_cycle(params, lr, steps, warmup=0.05):
    opt = torch.optim.AdamW(params, lr, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=budget(steps), pct_start=warmup)


def min_snr_weight(t, gamma):
    """Per-sample loss weight of min-SNR-gamma (Hang et al. 2023) for a v-prediction loss:
    min(SNR, gamma) / (SNR + 1), small on nearly clean and on nearly pure-noise latents."""
    snr = ALPHAS[t] / (1 - ALPHAS[t])
    return snr.clamp(max=gamma) / (snr + 1)


def min_snr_timesteps(batch, gamma, uniform=0.25):
    """Timesteps drawn in proportion to their min-SNR weight (plus `uniform` of plain uniform
    draws, so every noise level is still visited), with the loss weights (weight over
    probability, mean 1) that keep the min-SNR objective. The same expected loss as weighting
    uniform draws, but uniform draws spend compute on timesteps weighted near zero: at
    gamma 5 the batch's effective size goes from 56% of it to 93%."""
    w = min_snr_weight(torch.arange(1000), gamma)
    p = (1 - uniform) * w / w.sum() + uniform / 1000
    t = torch.multinomial(p, batch, replacement=True)
    return t, (w[t] / (p[t] * w.sum())).view(-1, 1, 1, 1)


def encode_rows(te, table, rows):
    """Text encoder hidden states for caption rows, each distinct row encoded once (a tenth
    of every batch is the empty prompt)."""
    distinct, index = rows.unique(return_inverse=True)
    return te(table.ids[distinct])[0][index]


def stage_teacher(work, steps=4500, lr=2e-3, gamma=5.0, batch=128):
    """Text encoder and UNet trained together from scratch (no pretrained CLIP here) on the
    min-SNR objective; 10% empty captions teach the unconditional prediction that
    classifier-free guidance needs. One one-cycle learning-rate schedule, gradients clipped
    to norm 1; the EMA of the weights is kept.

    Measured on the benchmark (teacher at 50 steps, 200 prompts): this recipe reads 85.5% of
    glyphs in 37 min. With peak 1e-3, no clipping and 10% uniform timesteps, 53%; the
    earlier recipe (uniform timesteps, 77-token context, four cycles) needed 11 800 steps
    and 2 h 20 min for 86%."""
    data = Batches(work)
    torch.manual_seed(0)
    te, unet = make_text_encoder(), make_unet()
    params = list(te.parameters()) + list(unet.parameters())
    opt, sched = one_cycle(params, lr, steps)
    ema_te, ema_unet = Ema(te, 0.995), Ema(unet, 0.995)
    for step in range(budget(steps)):
        x0, rows = data.draw(batch, drop=0.1)
        t, weight = min_snr_timesteps(batch, gamma)
        z, v = noised(x0, t)
        pred = unet(z, t, encode_rows(te, data.table, rows)).sample
        loss = (weight * (pred - v) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_te.update(te)
        ema_unet.update(unet)
        if step % 100 == 0 or step == budget(steps) - 1:
            log(f"teacher {step} loss {loss.item():.4f}")
    torch.save(ema_te.shadow, os.path.join(work, "text_encoder.pt"))
    torch.save(ema_unet.shadow, os.path.join(work, "teacher.pt"))


def guided_v(unet, z, t, cond, uncond, w):
    """Classifier-free guidance on the v-prediction: one batch of conditional + unconditional."""
    v = unet(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, uncond])).sample
    vc, vu = v.chunk(2)
    return vu + w.view(-1, 1, 1, 1) * (vc - vu)


def progressive(work, teacher_fn, student, student_fn, name, draw, train_steps=300, batch=64):
    """Salimans & Ho: for each student step count N, the student (initialised from its teacher)
    learns to land where two teacher DDIM steps on the 2N grid land, then becomes the teacher.
    `draw(batch)` gives clean latents `x0` and the models' other inputs."""
    for n in STEPS_PD:
        torch.manual_seed(n)
        student_grid, teacher_grid = grid(n), grid(2 * n)
        opt, sched = one_cycle(student.parameters(), 2e-4, train_steps)
        student.train()
        for step in range(budget(train_steps)):
            ctx = draw(batch)
            x0 = ctx.pop("x0")
            i = torch.randint(0, n, (batch,))
            t, t_mid, t_next = student_grid[i], teacher_grid[2 * i + 1], student_grid[i + 1]
            z, _ = noised(x0, t)
            with torch.no_grad():
                z1, _ = ddim_step(z, teacher_fn(z, t, **ctx), t, t_mid)
                z2, _ = ddim_step(z1, teacher_fn(z1, t_mid, **ctx), t_mid, t_next)
                a, s = alpha_sigma(t)
                a2, s2 = alpha_sigma(t_next)
                x_target = (z2 - (s2 / s) * z) / (a2 - (s2 / s) * a)
                v_target = (a * z - x_target) / s
            loss = F.mse_loss(student_fn(student, z, t, **ctx), v_target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0 or step == budget(train_steps) - 1:
                log(f"{name} {n} steps: {step} loss {loss.item():.4f}")
        student.eval()
        torch.save(student.state_dict(), os.path.join(work, f"{name}{n}.pt"))
        teacher = copy.deepcopy(student).eval()
        teacher_fn = lambda z, t, _m=teacher, **ctx: student_fn(_m, z, t, **ctx)
    return student


def stage_pd(work):
    """Progressive distillation of the guidance-free teacher; sampled with CFG like the teacher."""
    data = Batches(work)
    hidden = text_hidden(work, data.table)
    teacher = load_unet(work, "teacher")

    def draw(batch):
        x0, rows = data.draw(batch, drop=0.1)
        return {"x0": x0, "cond": hidden[rows]}

    def run(model, z, t, cond):
        return model(z, t, cond).sample

    student = load_unet(work, "teacher")
    progressive(work, lambda z, t, cond: run(teacher, z, t, cond), student, run, "pd", draw)


def stage_guided(work, steps=300, batch=64):
    """Meng et al.: one UNet pass with w as an input replaces the two passes of CFG; then the
    w-conditioned student is progressively distilled to 4 steps."""
    torch.manual_seed(1)
    data = Batches(work)
    hidden = text_hidden(work, data.table)
    empty = hidden[data.table.empty]
    teacher = load_unet(work, "teacher")
    student = make_unet(TIME_COND_DIM)
    missing, _ = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"], missing
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()  # starts as the conditional teacher

    def draw(batch):
        x0, rows = data.draw(batch)
        w = torch.empty(batch).uniform_(*GUIDANCE_RANGE)
        return {"x0": x0, "cond": hidden[rows], "w": w}

    opt, sched = one_cycle(student.parameters(), 5e-4, steps)
    for step in range(budget(steps)):
        ctx = draw(batch)
        t = torch.randint(0, 1000, (batch,))
        z, _ = noised(ctx["x0"], t)
        with torch.no_grad():
            target = guided_v(teacher, z, t, ctx["cond"], empty.expand_as(ctx["cond"]), ctx["w"])
        pred = student(z, t, ctx["cond"], timestep_cond=guidance_embedding(ctx["w"])).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == budget(steps) - 1:
            log(f"guided {step} loss {loss.item():.4f}")
    student.eval()
    torch.save(student.state_dict(), os.path.join(work, "guided.pt"))

    def run(model, z, t, cond, w):
        return model(z, t, cond, timestep_cond=guidance_embedding(w)).sample

    teacher_w = copy.deepcopy(student).eval()
    progressive(work, lambda z, t, **ctx: run(teacher_w, z, t, **ctx), student, run, "guided", draw)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def sample(v_fn, steps, seeds):
    """DDIM (eta 0) from each seed's torch.randn latents, as diffusers draws them."""
    z = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    g = grid(steps)
    for i in range(steps):
        t = g[i].repeat(len(seeds))
        z, _ = ddim_step(z, v_fn(z, t), t, g[i + 1].repeat(len(seeds)))
    return z


@torch.no_grad()
def score(work, latents, prompts, vae, classifier):
    images = vae.decode(latents / vae.config.scaling_factor).sample
    pixels = torch.round(((images / 2 + 0.5).clamp(0, 1)) * 255) / 255  # what a PNG keeps
    outs = classifier(pixels)
    keys = [("glyph", glyph_data.GLYPHS), ("foreground", glyph_data.COLOR_NAMES),
            ("background", glyph_data.COLOR_NAMES)]
    acc = {}
    for (key, names), o in zip(keys, outs):
        truth = torch.tensor([list(names).index(p[key]) for p in prompts])
        acc[key] = (o.argmax(1) == truth).float().mean().item()
    return acc, pixels


def stage_eval(work, which=("teacher@50", "teacher@4", "pd@4", "guided@4")):
    tok = tokenizer(work)
    te, vae = load_text_encoder(work), load_vae(work)
    classifier = load(Classifier(), os.path.join(work, "classifier.pt")).eval()
    prompts = glyph_data.eval_prompts()
    with torch.no_grad():
        cond = te(tok([p["prompt"] for p in prompts], padding="max_length", return_tensors="pt").input_ids)[0]
        uncond = te(tok([""], padding="max_length", return_tensors="pt").input_ids)[0]
    seeds = [p["seed"] for p in prompts]
    w = torch.full((len(prompts),), GUIDANCE)
    results = {}
    for spec in which:
        name, steps = spec.split("@")
        if name == "guided":
            unet = load_unet(work, "guided4", TIME_COND_DIM)
            fn = lambda z, t: unet(z, t, cond, timestep_cond=guidance_embedding(w)).sample
        else:
            unet = load_unet(work, "teacher" if name == "teacher" else "pd4")
            fn = lambda z, t: guided_v(unet, z, t, cond, uncond.expand_as(cond), w)
        start = time.time()
        latents = sample(fn, int(steps), seeds)
        acc, pixels = score(work, latents, prompts, vae, classifier)
        results[spec] = acc
        log(f"eval {spec}: {acc} ({time.time() - start:.1f} s)")
        grid_img = (pixels[:64].permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
        from PIL import Image
        Image.fromarray(grid_img.reshape(8, 8, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(256, 256, 3)).save(
            os.path.join(work, f"eval-{name}{steps}.png"))
    with open(os.path.join(work, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)


# ---------------------------------------------------------------- export

MODELS = {  # onnx/ folder -> (checkpoint, time_cond_proj_dim, ships a VAE encoder)
    "glyph-sd": ("teacher", None, True),
    "glyph-sd-pd4": ("pd4", None, False),
    "glyph-sd-guided4": ("guided4", TIME_COND_DIM, False),
}


def round_to_fp16(module):
    """The ONNX files store weights as fp16; rounding the torch weights the same way keeps
    diffusers (fp32 compute) and websd (fp16 weights upcast on upload) on identical models."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def store_fp16(path, min_size=64):
    """Rewrites float32 initializers as float16 followed by a Cast back to float32 (valid ONNX
    for any runtime; websd folds the Cast at load time). Halves the files."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    model = onnx.load(path)
    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= min_size:
            name = init.name
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), name + "_fp16"))
            casts.append(helper.make_node("Cast", [name + "_fp16"], [name], to=TensorProto.FLOAT))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def stage_export(work):
    """optimum's export of each model into the repository's onnx/ (or $GLYPH_ONNX_OUT)."""
    import subprocess
    from diffusers import StableDiffusionPipeline
    out = os.environ.get("GLYPH_ONNX_OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "onnx")
    tok = tokenizer(work)
    te, vae = round_to_fp16(load_text_encoder(work)), round_to_fp16(load_vae(work))
    for folder, (checkpoint, cond_dim, keep_encoder) in MODELS.items():
        unet = round_to_fp16(load_unet(work, checkpoint, cond_dim))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                       scheduler=make_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        torch_dir, onnx_dir = os.path.join(work, "export", folder), os.path.join(out, folder)
        pipe.save_pretrained(torch_dir)
        shutil.rmtree(onnx_dir, ignore_errors=True)
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "optimum-cli"), "export", "onnx", "--task", "text-to-image", "--model", torch_dir,
                        onnx_dir], check=True)
        if not keep_encoder:
            shutil.rmtree(os.path.join(onnx_dir, "vae_encoder"))
            # The students share the teacher's text encoder, tokenizer and VAE: link the files
            # rather than ship three copies (file links: Trunk's copy-dir copies through them).
            for part in ("text_encoder", "tokenizer", "vae_decoder"):
                shutil.rmtree(os.path.join(onnx_dir, part))
                os.makedirs(os.path.join(onnx_dir, part))
                for name in os.listdir(os.path.join(out, "glyph-sd", part)):
                    os.symlink(os.path.join("..", "..", "glyph-sd", part, name), os.path.join(onnx_dir, part, name))
        for part in os.listdir(onnx_dir):
            graph = os.path.join(onnx_dir, part, "model.onnx")
            if os.path.exists(graph) and not os.path.islink(graph):
                store_fp16(graph)
        log("exported", onnx_dir)
    export_benchmark(work, os.path.join(out, "glyph-benchmark"))


def export_benchmark(work, folder):
    classifier = load(Classifier(), os.path.join(work, "classifier.pt")).eval().fold_batch_norms()
    os.makedirs(os.path.join(folder, "classifier"), exist_ok=True)
    names = ["glyph", "foreground", "background"]
    torch.onnx.export(classifier, (torch.zeros(1, 3, glyph_data.SIZE, glyph_data.SIZE),),
                      os.path.join(folder, "classifier", "model.onnx"), input_names=["image"],
                      output_names=names, dynamic_axes={n: {0: "batch"} for n in ["image"] + names},
                      opset_version=17, dynamo=False)
    with open(os.path.join(folder, "labels.json"), "w") as f:
        json.dump({"glyph": list(glyph_data.GLYPHS), "foreground": glyph_data.COLOR_NAMES,
                   "background": glyph_data.COLOR_NAMES}, f, indent=1)
    with open(os.path.join(folder, "prompts.json"), "w") as f:
        json.dump(glyph_data.eval_prompts(), f, indent=1)
    log("exported", folder)

if __name__ == "__main__":
    work = sys.argv[1]
    os.makedirs(work, exist_ok=True)
    stages = ["data", "vae", "classifier", "teacher", "pd", "guided", "eval", "export"]
    chosen = stages if sys.argv[2] == "all" else sys.argv[2:]
    begin = time.time()
    for stage in chosen:
        log("stage", stage)
        start = time.time()
        globals()["stage_" + stage](work)
        log(f"stage {stage} took {(time.time() - start) / 60:.1f} min")
    log(f"all stages took {(time.time() - begin) / 60:.1f} min")
