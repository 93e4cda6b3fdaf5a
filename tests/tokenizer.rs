//! The CLIP tokenizer against transformers' CLIPTokenizer on 235 prompts (unicode,
//! punctuation, numbers, emoji, odd spacing, over-long prompts), from
//! scripts/make_tokenizer_fixtures.py.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use websd::tokenizer::{ClipTokenizer, TokenizerFiles};

fn tokenizer() -> ClipTokenizer {
    let dir = common::tiny_sd().join("tokenizer");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let (vocab, merges, config) = (
        read("vocab.json"),
        read("merges.txt"),
        read("tokenizer_config.json"),
    );
    ClipTokenizer::new(&TokenizerFiles {
        vocab_json: &vocab,
        merges_txt: &merges,
        config_json: Some(&config),
    })
    .unwrap()
}

#[test]
fn matches_transformers_on_every_prompt() {
    let tokenizer = tokenizer();
    let cases: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("tokenizer_ids.json")).unwrap(),
    )
    .unwrap();
    assert!(cases.len() >= 200);
    let mut failures = Vec::new();
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<i64> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let got = tokenizer.encode(prompt).unwrap();
        if got != want {
            failures.push(format!("{prompt:?}\n  got  {got:?}\n  want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} prompts differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn output_is_always_the_model_length() {
    let tokenizer = tokenizer();
    assert_eq!(tokenizer.max_length(), 77);
    for text in ["", "x", &"long ".repeat(500)] {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], 49406);
    }
}

#[test]
fn names_the_part_of_an_over_long_prompt_that_is_dropped() {
    let tokenizer = tokenizer();
    assert_eq!(tokenizer.dropped_text("a red 7 on blue").unwrap(), None);
    // One token per word: BOS, 75 words and EOS fill the 77; the last 25 words are dropped.
    let words: Vec<&str> = (0..100).map(|i| ["red", "green", "blue"][i % 3]).collect();
    let prompt = format!("{}  ", words.join(" "));
    assert_eq!(
        tokenizer.dropped_text(&prompt).unwrap().as_deref(),
        Some(words[75..].join(" ").as_str())
    );
    assert_eq!(
        tokenizer.encode(&words[..75].join(" ")).unwrap(),
        tokenizer.encode(&prompt).unwrap()
    );
}
