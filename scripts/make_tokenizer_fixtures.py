"""Token ids from transformers' CLIPTokenizer (the slow tokenizer diffusers pipelines load),
for websd's tokenizer test.

    python scripts/make_tokenizer_fixtures.py

Writes tests/fixtures/tokenizer_ids.json: [{"prompt": ..., "ids": [77 ids]}, ...] for the
tests/fixtures/tiny-sd tokenizer folder (the real CLIP vocabulary).
"""
import json
import os
import random

from transformers import CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

HANDWRITTEN = [
    "", " ", "a", "A photo of an astronaut riding a horse on Mars",
    "a red 7 on a blue background", "the letter K in green on white",
    "  leading and   repeated\tspaces\nand newlines  ", "UPPER case And MiXeD",
    "don't stop, it's what we'll do; they're here, I've seen, I'm sure, he'd go",
    "numbers: 0 1 23 456 7890 3.14159 1,000,000 2nd 10x 1e-5",
    "punctuation!!! ??? ... --- ((nested)) [brackets] {braces} <angles> #tag @user $5 50% a&b *star*",
    "emoji 🐱🚀 😀😃 👍🏽 🇫🇷 ❤️", "café naïve résumé façade São Paulo Zürich", "日本語のテキスト 中文 한국어",
    "Привет мир", "Γειά σου κόσμε", "مرحبا بالعالم", "שלום עולם", "हिन्दी पाठ",
    "“curly quotes” and ‘single’ ones", "ﬁne ﬂowers", "ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ", "tom &amp; jerry &quot;quoted&quot;",
    "masterpiece, best quality, (ultra detailed:1.2), 8k, trending on artstation",
    "a cat, a dog; a bird: a fish. a cow! a pig? a hen", "hello-world_snake_case camelCase kebab-case",
    "http://example.com/path?query=1&x=2", "C++ and C# and F#", "e=mc^2 and a+b=c", "~tilde~ `backtick` |pipe| \\backslash/",
    "<|startoftext|>explicit special<|endoftext|>", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    " ".join(["word"] * 100), " ".join(f"token{i}" for i in range(80)), "supercalifragilisticexpialidocious antidisestablishmentarianism",
]

WORDS = ("a photo of the cat dog astronaut horse riding mars castle forest river mountain sunset portrait oil painting "
         "by greg rutkowski highly detailed digital art cinematic lighting 4k red blue green yellow purple orange "
         "black white seven eight letter glyph font bold italic rotated small large background foreground").split()
EXTRAS = ["!", ",", ".", "?", "'s", "'", "-", "(", ")", ":", "1", "42", "2024", "é", "ß", "😀", "🎨", "“", "”", "  ", "\t"]


def random_prompts(n):
    rng = random.Random(1234)
    prompts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 30)):
            parts.append(rng.choice(WORDS) if rng.random() < 0.8 else rng.choice(EXTRAS))
            if rng.random() < 0.2:
                parts[-1] = parts[-1].capitalize()
        sep = rng.choice([" ", " ", ", ", " "])
        prompts.append(sep.join(parts))
    return prompts


if __name__ == "__main__":
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(ROOT, "..", "..", "onnx", "tiny-sd", "tokenizer"))
    cases = []
    for prompt in HANDWRITTEN + random_prompts(200):
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        cases.append({"prompt": prompt, "ids": ids})
    with open(os.path.join(ROOT, "tokenizer_ids.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False)
    print(len(cases), "prompts")
