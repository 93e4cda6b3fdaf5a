//! CLIP's tokenizer, as transformers' `CLIPTokenizer` applies it to a Stable Diffusion
//! model folder: text cleanup, lower-casing, CLIP's word split, byte-level BPE with `</w>`
//! word ends, BOS/EOS, truncation and padding to the model's length with its pad token.
//! Built on the `tokenizers` crate, the same engine as transformers' fast tokenizer.

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{
    Lowercase, NFC, NormalizerWrapper, Replace, Sequence as NormalizerSequence,
};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Encoding, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result, bad_file};

/// CLIP's word pattern (the slow tokenizer's, less its special-token alternatives, which
/// are handled as added tokens).
const WORD_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    inner: Tokenizer,
    max_length: usize,
    pad_id: u32,
    eos_id: u32,
}

/// The files of a `tokenizer/` folder.
pub struct TokenizerFiles<'a> {
    pub vocab_json: &'a str,
    pub merges_txt: &'a str,
    /// tokenizer_config.json, for `model_max_length` and the special tokens.
    pub config_json: Option<&'a str>,
}

fn tokenizer_error(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl ClipTokenizer {
    pub fn new(files: &TokenizerFiles) -> Result<ClipTokenizer> {
        let vocab: std::collections::HashMap<String, u32> =
            serde_json::from_str(files.vocab_json).map_err(|e| bad_file("vocab.json", e))?;
        let merges: Vec<(String, String)> = files
            .merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| {
                let mut parts = l.split(' ');
                match (parts.next(), parts.next()) {
                    (Some(a), Some(b)) => Ok((a.to_string(), b.to_string())),
                    _ => Err(bad_file("merges.txt", format!("bad merge line `{l}`"))),
                }
            })
            .collect::<Result<_>>()?;
        let config: Value = match files.config_json {
            Some(text) => {
                serde_json::from_str(text).map_err(|e| bad_file("tokenizer_config.json", e))?
            }
            None => Value::Null,
        };
        let token = |key: &str, default: &str| -> String {
            match &config[key] {
                Value::String(s) => s.clone(),
                Value::Object(o) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or(default)
                    .to_string(),
                _ => default.to_string(),
            }
        };
        let (bos, eos, pad, unk) = (
            token("bos_token", "<|startoftext|>"),
            token("eos_token", "<|endoftext|>"),
            token("pad_token", "<|endoftext|>"),
            token("unk_token", "<|endoftext|>"),
        );
        let id = |t: &str| {
            vocab
                .get(t)
                .copied()
                .ok_or_else(|| Error::Tokenizer(format!("`{t}` is not in vocab.json")))
        };
        let (bos_id, eos_id, pad_id) = (id(&bos)?, id(&eos)?, id(&pad)?);
        let max_length = config["model_max_length"]
            .as_u64()
            .filter(|&n| n <= 1 << 20)
            .unwrap_or(77) as usize;

        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(unk)
            .fuse_unk(false)
            .build()
            .map_err(tokenizer_error)?;
        let mut inner = Tokenizer::new(bpe);
        let normalizers: Vec<NormalizerWrapper> = vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(tokenizer_error)?
            .into(),
            Lowercase.into(),
        ];
        inner
            .with_normalizer(Some(NormalizerSequence::new(normalizers)))
            .map_err(tokenizer_error)?;
        let split = Split::new(
            SplitPattern::Regex(WORD_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tokenizer_error)?;
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        inner.with_post_processor(Some(
            RobertaProcessing::new((eos.clone(), eos_id), (bos.clone(), bos_id))
                .add_prefix_space(false)
                .trim_offsets(false),
        ));
        inner
            .add_special_tokens([AddedToken::from(bos, true), AddedToken::from(eos, true)])
            .map_err(tokenizer_error)?;
        Ok(ClipTokenizer {
            inner,
            max_length,
            pad_id,
            eos_id,
        })
    }

    /// The model's sequence length (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Token ids of `text`: BOS, the tokens (truncated to fit), EOS, then padding, exactly
    /// `max_length` long.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let (_, encoding) = self.split(text)?;
        let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i as i64).collect();
        if ids.len() > self.max_length {
            ids.truncate(self.max_length - 1);
            ids.push(self.eos_id as i64);
        }
        ids.resize(self.max_length, self.pad_id as i64);
        Ok(ids)
    }

    /// The end of `text` (after cleanup) that `encode` drops to fit `max_length`, if any:
    /// the part of an over-long prompt the model never sees.
    pub fn dropped_text(&self, text: &str) -> Result<Option<String>> {
        let (cleaned, encoding) = self.split(text)?;
        if encoding.len() <= self.max_length {
            return Ok(None);
        }
        // After BOS, the token at `max_length - 1` is the first one EOS replaces.
        let (start, _) = encoding.get_offsets()[self.max_length - 1];
        Ok(cleaned.get(start..).map(|rest| rest.trim().to_string()))
    }

    /// The cleaned text and its tokens, with BOS and EOS, before truncation.
    fn split(&self, text: &str) -> Result<(String, Encoding)> {
        let cleaned = clean_text(text);
        let encoding = self
            .inner
            .encode(cleaned.as_str(), true)
            .map_err(tokenizer_error)?;
        Ok((cleaned, encoding))
    }
}

/// The cleanup transformers' slow CLIPTokenizer does with ftfy before splitting: curly
/// quotes straightened, Latin ligatures and full-width forms expanded, control characters
/// dropped, HTML entities unescaped. (ftfy also repairs mojibake, which is not attempted.)
fn clean_text(text: &str) -> String {
    let unescaped = unescape_html(text);
    let mut out = String::with_capacity(unescaped.len());
    for c in unescaped.chars() {
        match c {
            '\u{2018}' | '\u{2019}' | '\u{201a}' | '\u{201b}' | '\u{2032}' => out.push('\''),
            '\u{201c}' | '\u{201d}' | '\u{201e}' | '\u{201f}' | '\u{2033}' => out.push('"'),
            '\u{fb00}' => out.push_str("ff"),
            '\u{fb01}' => out.push_str("fi"),
            '\u{fb02}' => out.push_str("fl"),
            '\u{fb03}' => out.push_str("ffi"),
            '\u{fb04}' => out.push_str("ffl"),
            '\u{fb05}' | '\u{fb06}' => out.push_str("st"),
            '\u{3000}' => out.push(' '),
            '\u{ff01}'..='\u{ff5e}' => out.push(char::from_u32(c as u32 - 0xfee0).unwrap_or(c)),
            '\t' | '\n' | '\r' => out.push(c),
            c if c.is_control() || c == '\u{feff}' => {}
            c => out.push(c),
        }
    }
    out
}

/// Python's `html.unescape` for the entities prompts actually contain.
fn unescape_html(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains('&') {
        return text.into();
    }
    let mut s = text.to_string();
    for (entity, plain) in [
        ("&quot;", "\""),
        ("&#39;", "'"),
        ("&apos;", "'"),
        ("&lt;", "<"),
        ("&gt;", ">"),
        ("&nbsp;", "\u{a0}"),
        ("&amp;", "&"),
    ] {
        s = s.replace(entity, plain);
    }
    s.into()
}
