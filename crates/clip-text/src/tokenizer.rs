//! The CLIP byte-level BPE tokenizer, as transformers' `CLIPTokenizer` runs it.
//!
//! Text goes through the same clean-up as transformers' slow tokenizer when `ftfy` is not
//! installed (its default): control characters dropped, whitespace runs folded, spaces put
//! around CJK ideographs, NFC normalisation, lower case. Then CLIP's regex splits words,
//! bytes are mapped to printable characters and merged by rank.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use model_io::{Error, Result};
use regex::Regex;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP uses the first 49152 - 256 - 2 merges of its list.
const NUM_MERGES: usize = 49152 - 256 - 2;

/// A CLIP tokenizer: vocabulary, merge ranks, special tokens and the context length.
///
/// ```no_run
/// let tok = clip_text::ClipTokenizer::from_dir("sd/tokenizer".as_ref())?;
/// let ids = tok.encode("a photo of a cat"); // 77 ids: BOS, tokens, EOS, padding
/// assert_eq!(ids[0], 49406);
/// # Ok::<(), model_io::Error>(())
/// ```
pub struct ClipTokenizer {
    encoder: HashMap<String, i64>,
    ranks: HashMap<(String, String), usize>,
    byte_encoder: [char; 256],
    pat: Regex,
    control: Regex,
    space_sep: Regex,
    bos: i64,
    eos: i64,
    pad: i64,
    /// Special tokens split off the text before BPE, as transformers' added-token trie does:
    /// BOS, EOS and the pad token (SD 2's `!` is one, so every `!` in a prompt becomes id 0).
    specials: Vec<(String, i64)>,
    max_length: usize,
    cache: Mutex<HashMap<String, Vec<String>>>,
}

/// GPT-2's reversible map from bytes to printable unicode characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut n = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).expect("latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid char")
        };
    }
    table
}

fn is_cjk(c: char) -> bool {
    let cp = c as u32;
    matches!(cp,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// Reads a special-token entry of tokenizer_config.json / special_tokens_map.json: either a
/// string or `{"content": ...}`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.into(), source: e })?;
    serde_json::from_str(&text).map_err(|e| Error::Json { path: path.into(), source: e })
}

impl ClipTokenizer {
    /// Loads a tokenizer folder as the Stable Diffusion repositories publish it
    /// (`vocab.json` + `merges.txt`, with `tokenizer_config.json` / `special_tokens_map.json`
    /// for the pad token and length), or a folder holding only `tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let tj = dir.join("tokenizer.json");
        let mut pad = None;
        let mut max_length = 77;
        for f in ["tokenizer_config.json", "special_tokens_map.json"] {
            let p = dir.join(f);
            if p.is_file() {
                let v = read_json(&p)?;
                if let Some(t) = v.get("pad_token").and_then(token_content) {
                    pad = Some(t);
                }
                if let Some(m) = v.get("model_max_length").and_then(Value::as_u64) {
                    // Some configs store "no limit" as a huge number; CLIP's position table is 77.
                    if m < 100_000 {
                        max_length = m as usize;
                    }
                }
            }
        }
        let mut tok = if vocab.is_file() && merges.is_file() {
            let enc = read_json(&vocab)?;
            let merges_text =
                std::fs::read_to_string(&merges).map_err(|e| Error::Io { path: merges.clone(), source: e })?;
            let merges: Vec<(String, String)> = merges_text
                .trim()
                .lines()
                .skip(1)
                .take(NUM_MERGES)
                .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
                .collect();
            Self::from_parts(&vocab, &enc, merges, pad.as_deref())?
        } else if tj.is_file() {
            let v = read_json(&tj)?;
            let model = v.get("model").ok_or_else(|| Error::Config { path: tj.clone(), message: "no `model` section".into() })?;
            let enc = model.get("vocab").cloned().unwrap_or(Value::Null);
            let merges = model
                .get("merges")
                .and_then(Value::as_array)
                .ok_or_else(|| Error::Config { path: tj.clone(), message: "no `model.merges` list (not a BPE tokenizer?)".into() })?
                .iter()
                .filter_map(|m| match m {
                    Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                    Value::Array(a) if a.len() == 2 => Some((a[0].as_str()?.to_string(), a[1].as_str()?.to_string())),
                    _ => None,
                })
                .collect();
            // tokenizer.json carries no pad token of its own; its padding section may.
            let pad = pad.or_else(|| v.pointer("/padding/pad_token").and_then(Value::as_str).map(str::to_string));
            Self::from_parts(&tj, &enc, merges, pad.as_deref())?
        } else {
            return Err(Error::NoWeights { dir: dir.into(), expected: "vocab.json + merges.txt, or tokenizer.json".into() });
        };
        tok.max_length = max_length;
        Ok(tok)
    }

    fn from_parts(path: &Path, enc: &Value, merges: Vec<(String, String)>, pad: Option<&str>) -> Result<Self> {
        let enc = enc.as_object().ok_or_else(|| Error::Config { path: path.into(), message: "vocabulary is not a JSON object".into() })?;
        let encoder: HashMap<String, i64> = enc.iter().filter_map(|(k, v)| Some((k.clone(), v.as_i64()?))).collect();
        let special = |t: &str| {
            encoder.get(t).copied().ok_or_else(|| Error::Config {
                path: path.into(),
                message: format!("vocabulary lacks the special token {t}"),
            })
        };
        let bos = special(BOS)?;
        let eos = special(EOS)?;
        let pad_text = pad.unwrap_or(EOS).to_string();
        let pad = special(&pad_text)?;
        let mut specials = vec![(BOS.to_string(), bos), (EOS.to_string(), eos)];
        if pad_text != BOS && pad_text != EOS && !pad_text.is_empty() {
            specials.push((pad_text, pad));
        }
        let ranks = merges.into_iter().enumerate().map(|(i, m)| (m, i)).collect();
        Ok(Self {
            encoder,
            ranks,
            byte_encoder: bytes_to_unicode(),
            pat: Regex::new(r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
                .expect("CLIP pattern compiles"),
            control: Regex::new(r"^\p{C}$").expect("category regex"),
            space_sep: Regex::new(r"^\p{Zs}$").expect("category regex"),
            bos,
            eos,
            pad,
            specials,
            max_length: 77,
            cache: Mutex::default(),
        })
    }

    /// The context length (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Ids of BOS, EOS and the padding token.
    pub fn special_ids(&self) -> (i64, i64, i64) {
        (self.bos, self.eos, self.pad)
    }

    /// BasicTokenizer's clean-up (no ftfy): drop controls, fold whitespace, isolate CJK,
    /// NFC, lower case.
    fn normalize(&self, text: &str) -> String {
        let mut buf = [0u8; 4];
        let mut s = String::with_capacity(text.len());
        for c in text.chars() {
            let is_ws = matches!(c, ' ' | '\t' | '\n' | '\r') || self.space_sep.is_match(c.encode_utf8(&mut buf));
            if is_ws {
                s.push(' ');
                continue;
            }
            if c == '\0' || c == '\u{fffd}' || self.control.is_match(c.encode_utf8(&mut buf)) {
                continue;
            }
            if is_cjk(c) {
                s.push(' ');
                s.push(c);
                s.push(' ');
            } else {
                s.push(c);
            }
        }
        let s: String = s.nfc().collect();
        s.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
    }

    fn bpe(&self, token: &str) -> Vec<String> {
        if let Some(hit) = self.cache.lock().expect("cache lock").get(token) {
            return hit.clone();
        }
        let chars: Vec<char> = token.chars().collect();
        let mut word: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|p| self.ranks.get(&(p[0].clone(), p[1].clone())).map(|&r| (r, p[0].clone(), p[1].clone())))
                .min_by_key(|(r, _, _)| *r);
            let Some((_, first, second)) = best else { break };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
        }
        self.cache.lock().expect("cache lock").insert(token.to_string(), word.clone());
        word
    }

    /// Token ids of `text`, without BOS/EOS or padding.
    pub fn tokenize(&self, text: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        // Literal special tokens are split off first, as transformers' added-token trie does
        // (earliest match first, the longest at the same position).
        let mut rest = text;
        loop {
            let next = self
                .specials
                .iter()
                .filter_map(|(t, id)| rest.find(t.as_str()).map(|i| (i, std::cmp::Reverse(t.len()), *id)))
                .min();
            match next {
                Some((i, std::cmp::Reverse(len), id)) => {
                    self.tokenize_plain(&rest[..i], &mut ids);
                    ids.push(id);
                    rest = &rest[i + len..];
                }
                None => {
                    self.tokenize_plain(rest, &mut ids);
                    break;
                }
            }
        }
        ids
    }

    fn tokenize_plain(&self, text: &str, ids: &mut Vec<i64>) {
        let text = self.normalize(text);
        for m in self.pat.find_iter(&text) {
            let piece = m.as_str();
            if piece.eq_ignore_ascii_case(BOS) || piece.eq_ignore_ascii_case(EOS) {
                ids.push(self.encoder.get(piece).copied().unwrap_or(self.eos));
                continue;
            }
            let mapped: String = piece.bytes().map(|b| self.byte_encoder[b as usize]).collect();
            for t in self.bpe(&mapped) {
                // Every BPE piece of a byte-level vocabulary exists; fall back to unk (EOS) as CLIP does.
                ids.push(self.encoder.get(&t).copied().unwrap_or(self.eos));
            }
        }
    }

    /// `max_length` ids: BOS, the tokens, EOS, then padding; a prompt that is too long is
    /// truncated keeping EOS last (as `padding="max_length", truncation=True`).
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let mut toks = self.tokenize(text);
        let room = self.max_length.saturating_sub(2);
        if toks.len() > room {
            tracing::warn!(
                "prompt is {} tokens; CLIP reads at most {room}, the rest is dropped",
                toks.len()
            );
            toks.truncate(room);
        }
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend(toks);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        ids
    }

    /// How many tokens of `text` do not fit in the context (0 when it fits).
    pub fn overflow(&self, text: &str) -> usize {
        self.tokenize(text).len().saturating_sub(self.max_length.saturating_sub(2))
    }
}
