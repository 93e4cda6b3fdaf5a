"""The glyph editing benchmark (onnx/glyph-benchmark/edits.json + edits/*.png).

Real renders from the glyph data generator (scripts/glyph_data.py) of held-out triples,
each with one edit: the glyph's colour, the background's colour, or the glyph itself,
e.g. a render of "a red 7 on a blue background" -> "a green 7 on a blue background". The
palette is written alongside, so fidelity (the glyph's pixel mask kept) can be measured.

    python scripts/make_edit_benchmark.py onnx/glyph-benchmark [PER_KIND]
    python scripts/make_edit_benchmark.py --ideal OUT [PER_KIND]

`--ideal` writes each case's ideal edit as OUT/edits/NN.png instead: the generator's render
of the target with every random draw of the source's render (font, size, offset, angle,
colour jitter), so only the edited attribute differs. Scored by `websd eval-edit --method
images --images OUT`, it is the best any method can do, and through the model's VAE
(`imagic_reference.py roundtrip`) the best a latent-space method can.
"""
import json
import os
import random
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import glyph_data as g  # noqa: E402

KINDS = ("foreground", "background", "glyph")


def edited(triple, kind, rng):
    glyph, fg, bg = triple
    if kind == "glyph":
        return (rng.choice([i for i in range(len(g.GLYPHS)) if i != glyph]), fg, bg)
    others = [c for c in range(len(g.COLORS)) if c not in (fg, bg)]
    return (glyph, rng.choice(others), bg) if kind == "foreground" else (glyph, fg, rng.choice(others))


def labels(triple):
    glyph, fg, bg = triple
    return {"glyph": g.GLYPHS[glyph], "foreground": g.COLOR_NAMES[fg], "background": g.COLOR_NAMES[bg]}


def draws(per_kind):
    """(kind, source, target, rendered source, the random state its render started from)
    per case, in the benchmark's order."""
    _, held = g.split_triples()
    rng = random.Random(2024)
    for kind in KINDS:
        for _ in range(per_kind):
            source = rng.choice(held)
            target = edited(source, kind, rng)
            state = rng.getstate()
            yield kind, source, target, g.render(source, rng), state


def ideal(out, per_kind):
    """Each case's target rendered from the state its source's render started from."""
    os.makedirs(os.path.join(out, "edits"), exist_ok=True)
    for i, (_, _, target, _, state) in enumerate(draws(per_kind)):
        replay = random.Random()
        replay.setstate(state)
        Image.fromarray(g.render(target, replay)).save(os.path.join(out, f"edits/{i:02d}.png"))


def main(out, per_kind):
    os.makedirs(os.path.join(out, "edits"), exist_ok=True)
    cases = []
    for kind, source, target, render, _ in draws(per_kind):
        name = f"edits/{len(cases):02d}.png"
        Image.fromarray(render).save(os.path.join(out, name))
        cases.append({"source": name, "kind": kind, "seed": 500 + len(cases),
                      "prompt": g.caption(target, 0), "source_labels": labels(source),
                      "target_labels": labels(target)})
    data = {"colors": {n: list(c) for n, c in g.COLORS.items()}, "cases": cases}
    with open(os.path.join(out, "edits.json"), "w") as f:
        json.dump(data, f, indent=1)
    print(f"{len(cases)} edits in {out}")


if __name__ == "__main__":
    if sys.argv[1] == "--ideal":
        ideal(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 4)
    else:
        main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4)
