"""The synthetic captioned glyph set that websd's bundled model learns from.

A digit or capital letter, rendered from one of Debian's fonts (DejaVu and Liberation:
sans, serif, mono, condensed, narrow; regular, bold, italic) at a random size, rotation
and position, in one palette colour on another, with an English caption such as
"a red 7 on a blue background" or "the letter k in green on white".

Everything is drawn from a seeded generator, so a given seed gives the same images.
200 (glyph, foreground, background) triples are held out of training; the evaluation
prompts (`eval_prompts`) use only those.
"""
import glob
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 32
GLYPHS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
COLORS = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (35, 70, 215),
    "yellow": (240, 215, 40),
    "purple": (135, 45, 175),
    "cyan": (40, 200, 215),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOR_NAMES = list(COLORS)
TEMPLATES = [
    "a {fg} {glyph} on a {bg} background",
    "the {kind} {glyph} in {fg} on {bg}",
    "{fg} {glyph} on {bg}",
    "a {fg} {kind} {glyph} on a {bg} background",
    "the {kind} {glyph}, {fg} on a {bg} background",
]
FONTS = sorted(f for f in glob.glob("/usr/share/fonts/truetype/dejavu/*.ttf")
               + glob.glob("/usr/share/fonts/truetype/liberation/*.ttf") if "Math" not in f)
HELD_OUT = 200


def all_triples():
    return [(g, fg, bg) for g in range(len(GLYPHS)) for fg in range(len(COLORS))
            for bg in range(len(COLORS)) if fg != bg]


def split_triples():
    """(train, held-out) triples; the split is fixed by its own seed."""
    triples = all_triples()
    held = set(random.Random(1234).sample(triples, HELD_OUT))
    return [t for t in triples if t not in held], sorted(held)


def caption(triple, template):
    glyph, fg, bg = triple
    ch = GLYPHS[glyph]
    kind = "digit" if ch.isdigit() else "letter"
    return TEMPLATES[template].format(fg=COLOR_NAMES[fg], bg=COLOR_NAMES[bg], glyph=ch, kind=kind)


_font_cache = {}


def _font(path, size):
    key = (path, size)
    if key not in _font_cache:
        _font_cache[key] = ImageFont.truetype(path, size)
    return _font_cache[key]


def render(triple, rng):
    """One SIZE x SIZE uint8 RGB image of `triple`, with random font, size, angle, offset."""
    glyph, fg, bg = triple
    scale = 2  # draw at twice the size, then box-filter down: anti-aliased edges
    canvas = SIZE * scale
    font = _font(FONTS[rng.randrange(len(FONTS))], rng.randrange(34, 50))
    mask = Image.new("L", (canvas, canvas), 0)
    dx, dy = rng.uniform(-7, 7), rng.uniform(-7, 7)
    ImageDraw.Draw(mask).text((canvas / 2 + dx, canvas / 2 + dy), GLYPHS[glyph], fill=255,
                              font=font, anchor="mm")
    mask = mask.rotate(rng.uniform(-20, 20), resample=Image.BICUBIC, center=(canvas / 2, canvas / 2))
    m = np.asarray(mask.resize((SIZE, SIZE), Image.BOX), dtype=np.float32)[..., None] / 255.0
    jitter = lambda c: np.clip(np.array(COLORS[COLOR_NAMES[c]]) + rng.uniform(-12, 12), 0, 255)
    img = jitter(bg) * (1 - m) + jitter(fg) * m
    return np.round(img).astype(np.uint8)


def make_set(triples, count, seed):
    """`count` images drawn from `triples`: (images [N,32,32,3] uint8, labels [N,3], templates [N])."""
    rng = random.Random(seed)
    images = np.empty((count, SIZE, SIZE, 3), np.uint8)
    labels = np.empty((count, 3), np.int64)
    templates = np.empty(count, np.int64)
    for i in range(count):
        t = triples[rng.randrange(len(triples))]
        images[i] = render(t, rng)
        labels[i] = t
        templates[i] = rng.randrange(len(TEMPLATES))
    return images, labels, templates


def eval_prompts():
    """The 200 held-out evaluation prompts: caption, labels and a seed each."""
    _, held = split_triples()
    rng = random.Random(99)
    rng.shuffle(held)  # any prefix is a fair sample (CI runs the first few)
    out = []
    for i, t in enumerate(held):
        out.append({"prompt": caption(t, rng.randrange(len(TEMPLATES))), "glyph": GLYPHS[t[0]],
                    "foreground": COLOR_NAMES[t[1]], "background": COLOR_NAMES[t[2]], "seed": 1000 + i})
    return out


if __name__ == "__main__":
    import sys
    import time
    start = time.time()
    train, held = split_triples()
    images, labels, templates = make_set(train, 64, 0)
    print(f"{len(FONTS)} fonts, {len(train)} train / {len(held)} held-out triples, "
          f"{(time.time() - start) / 64 * 1000:.2f} ms per image")
    grid = images.reshape(8, 8, SIZE, SIZE, 3).transpose(0, 2, 1, 3, 4).reshape(8 * SIZE, 8 * SIZE, 3)
    Image.fromarray(grid).resize((16 * SIZE, 16 * SIZE), Image.NEAREST).save(sys.argv[1] if len(sys.argv) > 1 else "glyphs.png")
    for i in range(4):
        print(caption(tuple(labels[i]), templates[i]))
