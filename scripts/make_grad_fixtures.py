"""Gradient references for websd's training tests, computed by torch autograd (never by websd).

    python scripts/make_grad_fixtures.py WORK

Every case is a small torch function exported to ONNX (opset 14, as optimum exports SD, or 17
for LayerNormalization) with its weights as graph inputs. The loss is the mean squared error
between the function's output and a random target; torch's gradients of that loss with
respect to every float input are the reference. Writes tests/fixtures/grads/<case>/:
model.onnx, in_<input>.npy, target.npy, loss.npy, grad_<input>.npy.

The `tiny_unet` case is the committed tiny SD UNet (tests/fixtures/tiny-sd/unet): the
pipeline is rebuilt in WORK by make_tiny_sd.py (seeded, so the same weights; checked against
the committed onnxruntime output) and differentiated with respect to `sample` and
`encoder_hidden_states`.
"""
import copy
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "grads")
torch.manual_seed(7)


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def save_case(name, fn, inputs, opset=14):
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    names = list(inputs)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y = fn(*leaves.values())
    target = randn(*y.shape)
    loss = F.mse_loss(y, target)
    loss.backward()

    class Wrapped(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    torch.onnx.export(Wrapped(), tuple(inputs.values()), os.path.join(folder, "model.onnx"),
                      input_names=names, output_names=["out"], opset_version=opset, dynamo=False)
    for k, v in inputs.items():
        np.save(os.path.join(folder, f"in_{k}.npy"), v.numpy())
        np.save(os.path.join(folder, f"grad_{k}.npy"), leaves[k].grad.numpy())
    np.save(os.path.join(folder, "target.npy"), target.numpy())
    np.save(os.path.join(folder, "loss.npy"), loss.detach().numpy())


def attention(q, k, v):
    scores = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1)
    return scores @ v


def elementwise(x, a):
    gelu = F.gelu(x)
    silu = x * torch.sigmoid(x)
    rest = torch.exp(-x * x) / (1.0 + a * a) + torch.sqrt(x * x + 1.0) + torch.tanh(x) * a
    return gelu + silu * a - rest + torch.pow(a, 2.0) * torch.sin(x) + torch.relu(x - a)


def geglu(x, w, b):
    hidden, gate = (x @ w + b).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def up_concat(x, skip):
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return torch.cat([up, skip], dim=1) * 1.5


def shapes(x, y):
    # Transpose, reshape, reduce with broadcast, pad and slice.
    t = x.permute(0, 2, 1).reshape(2, 3, 8)
    centred = t - t.mean(dim=-1, keepdim=True)
    padded = F.pad(centred, (1, 2, 0, 1))
    return padded[:, 1:3, 2:9] * y + padded[:, :2, :7].sum(dim=1, keepdim=True)


CASES = {
    "conv3x3": (lambda x, w, b: F.conv2d(x, w, b, padding=1),
                dict(x=randn(2, 3, 6, 5), w=randn(4, 3, 3, 3), b=randn(4))),
    "conv3x3_stride2": (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
                        dict(x=randn(2, 3, 7, 6), w=randn(4, 3, 3, 3), b=randn(4))),
    "conv1x1": (lambda x, w, b: F.conv2d(x, w, b),
                dict(x=randn(1, 4, 5, 5), w=randn(3, 4, 1, 1), b=randn(3))),
    "conv_dilated": (lambda x, w: F.conv2d(x, w, padding=2, dilation=2),
                     dict(x=randn(1, 2, 8, 7), w=randn(3, 2, 3, 3))),
    "conv_stride2_unpadded": (lambda x, w: F.conv2d(x, w, stride=2),
                              dict(x=randn(1, 2, 8, 9), w=randn(3, 2, 3, 3))),
    "linear": (lambda x, w, b: x @ w + b, dict(x=randn(2, 5, 6), w=randn(6, 4), b=randn(4))),
    "gemm": (lambda x, w, b: F.linear(x, w, b), dict(x=randn(3, 6), w=randn(4, 6), b=randn(4))),
    "attention": (attention, dict(q=randn(2, 3, 5, 4), k=randn(2, 3, 6, 4), v=randn(2, 3, 6, 4))),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b, eps=1e-5),
                   dict(x=randn(2, 4, 3, 3), w=randn(4), b=randn(4))),
    "layer_norm_decomposed": (lambda x, w, b: F.layer_norm(x, (6,), w, b),
                              dict(x=randn(2, 5, 6), w=randn(6), b=randn(6))),
    "elementwise": (elementwise, dict(x=randn(3, 7), a=randn(7))),
    "geglu": (geglu, dict(x=randn(2, 3, 4), w=randn(4, 10), b=randn(10))),
    "upsample_concat": (up_concat, dict(x=randn(1, 2, 3, 4), skip=randn(1, 3, 6, 8))),
    "shapes": (shapes, dict(x=randn(2, 8, 3), y=randn(7))),
}


def extremes(a, b, x):
    # Max/Min with ties impossible (continuous noise), Abs, ReduceMax/Min.
    return (torch.maximum(a, b) - 0.5 * torch.minimum(a, b) + torch.abs(a)
            + x.amax(dim=1, keepdim=True) * x.amin(dim=2, keepdim=True))


def gathers(x, w):
    # Gather on an inner and on the last axis, an index read twice.
    rows = torch.tensor([2, 0, 2])
    return x[:, rows] * 2.0 + w.index_select(2, torch.tensor([1, 3, 3, 0]))


def more_ops():
    """Cases for rules torch's SD exports rarely produce, each with its own seed so that
    adding them changed no other fixture."""
    torch.manual_seed(8)
    cases = {
        "conv_grouped": (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, groups=2),
                         dict(x=randn(2, 4, 7, 6), w=randn(6, 2, 3, 3), b=randn(6))),
        "conv_depthwise": (lambda x, w: F.conv2d(x, w, padding=1, groups=3),
                           dict(x=randn(1, 3, 5, 6), w=randn(3, 1, 3, 3))),
        "resize_bilinear": (lambda x: F.interpolate(x, size=(5, 7), mode="bilinear"),
                            dict(x=randn(1, 2, 3, 4))),
        "resize_bilinear_corners": (
            lambda x: F.interpolate(x, size=(6, 3), mode="bilinear", align_corners=True),
            dict(x=randn(1, 2, 4, 5))),
        "resize_nearest_odd": (lambda x: F.interpolate(x, size=(5, 3), mode="nearest"),
                               dict(x=randn(1, 2, 3, 4))),
        "extremes": (extremes, dict(a=randn(3, 4), b=randn(4), x=randn(2, 3, 4))),
        "gather_axes": (gathers, dict(x=randn(2, 3, 4), w=randn(2, 3, 4))),
    }
    for name, (fn, inputs) in cases.items():
        save_case(name, fn, inputs)


def adam():
    """torch.optim.AdamW with clip_grad_norm_ over three steps of given gradients."""
    folder = os.path.join(OUT, "adam")
    os.makedirs(folder, exist_ok=True)
    params = {"a": randn(3, 5), "b": randn(7)}
    for k, v in params.items():
        np.save(os.path.join(folder, f"param_{k}.npy"), v.numpy())
    leaves = [v.clone().requires_grad_(True) for v in params.values()]
    opt = torch.optim.AdamW(leaves, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    for step in range(3):
        grads = [randn(*v.shape) * (step + 1) for v in leaves]
        for leaf, grad, k in zip(leaves, grads, params):
            leaf.grad = grad.clone()
            np.save(os.path.join(folder, f"step{step}_grad_{k}.npy"), grad.numpy())
        norm = torch.nn.utils.clip_grad_norm_(leaves, max_norm=2.0)
        np.save(os.path.join(folder, f"step{step}_norm.npy"), norm.numpy())
        opt.step()
        for leaf, k in zip(leaves, params):
            np.save(os.path.join(folder, f"step{step}_param_{k}.npy"), leaf.detach().numpy())


def tiny_unet(work):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_tiny_sd
    from diffusers import UNet2DConditionModel

    if not os.path.isdir(os.path.join(work, "diffusers")):
        make_tiny_sd.build(work)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(work, "diffusers", "unet")).eval()
    io = os.path.join(ROOT, "tiny-sd-io", "unet")
    sample = torch.from_numpy(np.load(os.path.join(io, "in_sample.npy")))
    timestep = torch.from_numpy(np.load(os.path.join(io, "in_timestep.npy")))
    states = torch.from_numpy(np.load(os.path.join(io, "in_encoder_hidden_states.npy")))
    expected = np.load(os.path.join(io, "out_out_sample.npy"))
    leaves = {"sample": sample.clone().requires_grad_(True),
              "encoder_hidden_states": states.clone().requires_grad_(True)}
    y = unet(leaves["sample"], timestep, leaves["encoder_hidden_states"]).sample
    drift = np.abs(y.detach().numpy() - expected).max()
    assert drift < 1e-4, f"rebuilt UNet differs from the committed export by {drift}"
    target = randn(*y.shape)
    loss = F.mse_loss(y, target)
    loss.backward()
    folder = os.path.join(OUT, "tiny_unet")
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "in_timestep.npy"), timestep.numpy())
    for k, v in leaves.items():
        np.save(os.path.join(folder, f"in_{k}.npy"), v.detach().numpy())
        np.save(os.path.join(folder, f"grad_{k}.npy"), v.grad.numpy())
    np.save(os.path.join(folder, "target.npy"), target.numpy())
    np.save(os.path.join(folder, "loss.npy"), loss.detach().numpy())
    print(f"tiny_unet: loss {loss.item():.6f}, export drift {drift:.2e}")
    tiny_unet_lora(unet, (sample, timestep, states), target)


def tiny_text_encoder(work):
    """The committed tiny CLIP text encoder differentiated by its token and position
    embedding tables (loss on last_hidden_state)."""
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(os.path.join(work, "diffusers", "text_encoder")).eval()
    io = os.path.join(ROOT, "tiny-sd-io", "text_encoder")
    ids = torch.from_numpy(np.load(os.path.join(io, "in_input_ids.npy")))
    y = model(ids).last_hidden_state
    expected = np.load(os.path.join(io, "out_last_hidden_state.npy"))
    drift = np.abs(y.detach().numpy() - expected).max()
    assert drift < 1e-4, f"rebuilt text encoder differs from the committed export by {drift}"
    target = randn(*y.shape)
    F.mse_loss(y, target).backward()
    folder = os.path.join(OUT, "tiny_text_encoder")
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "in_input_ids.npy"), ids.numpy())
    np.save(os.path.join(folder, "target.npy"), target.numpy())
    np.save(os.path.join(folder, "loss.npy"), F.mse_loss(y, target).detach().numpy())
    params = dict(model.named_parameters())
    # (Its zero-initialised biases and unit norm scales are one initializer in the export,
    # shared by every layer, so their gradients there are sums over the layers.)
    for name in ["text_model.embeddings.token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight"]:
        np.save(os.path.join(folder, f"grad_{name}.npy"), params[name].grad.numpy())
    print(f"tiny_text_encoder: export drift {drift:.2e}")


LORA_STEPS = 3


def train_lora(unet, inputs, target, folder):
    """LORA_STEPS AdamW steps (lr 1e-2, clipped to norm 1); with a folder, the first
    step's gradients are saved in it. Returns the losses."""
    from safetensors.torch import save_file

    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    opt = torch.optim.AdamW(lora, lr=1e-2, weight_decay=1e-2)
    losses = []
    for _ in range(LORA_STEPS):
        opt.zero_grad()
        loss = F.mse_loss(unet(*inputs).sample, target)
        loss.backward()
        if folder and not losses:
            save_file({n: p.grad.clone() for n, p in unet.named_parameters() if "lora_" in n},
                      os.path.join(folder, "first_grads.safetensors"))
        torch.nn.utils.clip_grad_norm_(lora, max_norm=1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def tiny_unet_lora(unet, inputs, target):
    """A rank-2 peft LoRA on the tiny UNet's attention projections, trained three AdamW
    steps (clipped to norm 1) on the MSE against `target`; diffusers saves it before and
    after. B starts random rather than zero so that every factor moves from the first step."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(randn(*p.shape) * 0.3)
    folder = os.path.join(OUT, "tiny_unet_lora")
    os.makedirs(folder, exist_ok=True)
    # target_modules is a set: sorted, so that reruns write the same bytes.
    metadata = dict(unet.peft_config["default"].to_dict())
    metadata["target_modules"] = sorted(metadata["target_modules"])
    save = lambda file: StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), weight_name=file,
        unet_lora_adapter_metadata=metadata)
    save("initial.safetensors")
    initial = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}
    # The first step's gradients in float64 too: the reference websd's float32 ones are
    # held to, with torch's own float32 error beside it.
    double = copy.deepcopy(unet).double()
    F.mse_loss(double(*(t.double() for t in inputs)).sample, target.double()).backward()
    from safetensors.torch import save_file
    save_file({n: p.grad.float() for n, p in double.named_parameters() if "lora_" in n},
              os.path.join(folder, "first_grads_f64.safetensors"))
    losses = train_lora(unet, inputs, target, folder)
    save("trained.safetensors")
    # The same training in float64: how far float32 training (torch's or websd's) lands
    # from exact arithmetic.
    double = copy.deepcopy(unet)
    for n, p in double.named_parameters():
        if "lora_" in n:
            p.data.copy_(initial[n])
    double = double.double()
    train_lora(double, tuple(t.double() for t in inputs), target.double(), None)
    unet_float = double.float()
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet_float),
        weight_name="trained_f64.safetensors", unet_lora_adapter_metadata=metadata)
    np.save(os.path.join(folder, "losses.npy"), np.array(losses, dtype=np.float32))
    print("tiny_unet_lora: losses", losses)


if __name__ == "__main__":
    shutil.rmtree(OUT, ignore_errors=True)
    for name, (fn, inputs) in CASES.items():
        save_case(name, fn, inputs)
    save_case("layer_norm", lambda x, w, b: F.layer_norm(x, (6,), w, b),
              dict(x=randn(2, 5, 6), w=randn(6), b=randn(6)), opset=17)
    adam()
    more_ops()
    tiny_unet(sys.argv[1])
    tiny_text_encoder(sys.argv[1])
