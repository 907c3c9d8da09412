//! The CLIP tokenizer, as transformers 5 runs it: the `tokenizers` library, set up as
//! transformers' `CLIPTokenizer` sets it up.
//!
//! From `vocab.json` + `merges.txt` this builds what `transformers.CLIPTokenizer.__init__`
//! builds: NFC, whitespace runs to one space and lower case; CLIP's regex split, then byte-level
//! mapping; a BPE model with the `</w>` word suffix; BOS/EOS added by a RoBERTa-style
//! post-processor; and the special tokens of the folder's configs as added tokens, matched
//! before normalisation unless their config says `normalized`. A folder with `tokenizer.json`
//! is read as it is, as transformers does. transformers 4's slow tokenizer (a hand-written
//! BPE with BasicTokenizer's clean-up) gave other ids on CJK, Indic and similar text; we match
//! the one transformers runs today.

use std::path::Path;

use model_io::{Error, Result};
use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, NormalizerWrapper, PaddingDirection, PaddingParams, PaddingStrategy, PreTokenizerWrapper,
    SplitDelimiterBehavior, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP's pre-tokenizer pattern (transformers' `CLIPTokenizer`).
const PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The special-token keys of a tokenizer config, in the order transformers adds them (a later
/// key with the same text replaces the earlier one's flags).
const SPECIAL_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A CLIP tokenizer: the `tokenizers` pipeline, the special ids and the context length.
///
/// ```no_run
/// let tok = clip_text::ClipTokenizer::from_dir("sd/tokenizer".as_ref())?;
/// let ids = tok.encode("a photo of a cat")?; // 77 ids: BOS, tokens, EOS, padding
/// assert_eq!(ids[0], 49406);
/// # Ok::<(), model_io::Error>(())
/// ```
pub struct ClipTokenizer {
    /// Without truncation or padding: the ids of the text alone.
    plain: Tokenizer,
    /// `padding="max_length", truncation=True, max_length`: what pipelines feed the encoder.
    fixed: Tokenizer,
    bos: i64,
    eos: i64,
    pad: i64,
    max_length: usize,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.into(), cause: e })?;
    serde_json::from_str(&text).map_err(|e| Error::Json { path: path.into(), cause: e })
}

/// A special token as a config states it: a string (added with `normalized: false`, as
/// transformers 5 does) or an object with `content` and its flags.
fn added_token(v: &Value) -> Option<AddedToken> {
    let (content, o) = match v {
        Value::String(s) => return Some(AddedToken::from(s.clone(), true).normalized(false)),
        Value::Object(o) => (o.get("content")?.as_str()?.to_string(), o),
        _ => return None,
    };
    let flag = |k: &str, default: bool| o.get(k).and_then(Value::as_bool).unwrap_or(default);
    let special = flag("special", true);
    Some(
        AddedToken::from(content, special)
            .single_word(flag("single_word", false))
            .lstrip(flag("lstrip", false))
            .rstrip(flag("rstrip", false))
            .normalized(flag("normalized", !special)),
    )
}

/// The folder's special tokens by key: `tokenizer_config.json`, then `special_tokens_map.json`
/// over it. A plain string that names an entry of `added_tokens_decoder` takes that entry's
/// flags, as transformers maps it.
struct SpecialTokens {
    by_key: Vec<(&'static str, AddedToken)>,
    max_length: usize,
}

impl SpecialTokens {
    fn read(dir: &Path) -> Result<Self> {
        let mut configs = Vec::new();
        for f in ["tokenizer_config.json", "special_tokens_map.json"] {
            let p = dir.join(f);
            if p.is_file() {
                configs.push(read_json(&p)?);
            }
        }
        Self::from_configs(&configs, dir)
    }

    /// From the configs' JSON, `tokenizer_config.json` first; `dir` names them in errors.
    fn from_configs(configs: &[Value], dir: &Path) -> Result<Self> {
        let mut values: Vec<(&'static str, Value)> = Vec::new();
        let mut decoder: Vec<AddedToken> = Vec::new();
        let mut max_length = 77;
        for v in configs {
            if let Some(d) = v.get("added_tokens_decoder").and_then(Value::as_object) {
                decoder.extend(d.values().filter_map(added_token));
            }
            if let Some(m) = v.get("model_max_length").and_then(Value::as_u64) {
                // Some configs store "no limit" as a huge number; CLIP's position table is 77.
                if m < 100_000 {
                    max_length = m as usize;
                }
            }
            for key in SPECIAL_KEYS {
                if let Some(t) = v.get(key).filter(|t| !t.is_null()) {
                    values.retain(|(k, _)| *k != key);
                    values.push((key, t.clone()));
                }
            }
        }
        let mut by_key = Vec::new();
        for key in SPECIAL_KEYS {
            let Some((_, v)) = values.iter().find(|(k, _)| *k == key) else { continue };
            let tok = match v {
                Value::String(s) => decoder.iter().find(|t| &t.content == s).cloned().or_else(|| added_token(v)),
                _ => added_token(v),
            };
            let tok = tok.ok_or_else(|| Error::Config {
                path: dir.join("tokenizer_config.json"),
                message: format!("`{key}` is neither a string nor an object with `content`"),
            })?;
            if !tok.content.is_empty() {
                by_key.push((key, tok));
            }
        }
        Ok(Self { by_key, max_length })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.by_key.iter().find(|(k, _)| *k == key).map(|(_, t)| t.content.as_str())
    }
}

/// The merges of `merges.txt` (`text`, read from `path`): one `a b` pair a line after the
/// `#version` header.
fn parse_merges(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let (a, b) = line.split_once(' ').ok_or_else(|| Error::Config {
            path: path.into(),
            message: format!("line {}: expected two tokens separated by a space, found {line:?}", i + 1),
        })?;
        merges.push((a.to_string(), b.to_string()));
    }
    Ok(merges)
}

fn lib_err<'a>(path: &'a Path, what: &str) -> impl Fn(tokenizers::Error) -> Error + 'a {
    let what = what.to_string();
    move |e| Error::Config { path: path.into(), message: format!("{what}: {e}") }
}

impl ClipTokenizer {
    /// Loads a tokenizer folder as the Stable Diffusion repositories publish it
    /// (`vocab.json` + `merges.txt`, with `tokenizer_config.json` / `special_tokens_map.json`
    /// for the special tokens and length), or as transformers 5 saves it (`tokenizer.json`,
    /// read directly when present).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let tj = dir.join("tokenizer.json");
        let specials = SpecialTokens::read(dir)?;
        let (tok, source) = if tj.is_file() {
            (Tokenizer::from_file(&tj).map_err(lib_err(&tj, "not a tokenizers file"))?, tj)
        } else if vocab.is_file() && merges.is_file() {
            let text = std::fs::read_to_string(&merges).map_err(|e| Error::Io { path: merges.clone(), cause: e })?;
            (Self::build(&read_json(&vocab)?, &vocab, &parse_merges(&text, &merges)?, &merges, &specials)?, vocab)
        } else {
            return Err(Error::NoWeights {
                dir: dir.into(),
                expected: "vocab.json + merges.txt, or tokenizer.json".into(),
            });
        };
        Self::finish(tok, &specials, &source, dir)
    }

    /// OpenAI's CLIP vocabulary, built into this crate (`vocab/`, as open-clip-torch ships
    /// it): the tokenizer of every Stable Diffusion 1.x model, for checkpoints that come
    /// without a tokenizer folder (single files). `pad_token` replaces its padding token
    /// (SD 2.x's OpenCLIP tokenizer pads with `!`).
    ///
    /// ```
    /// let tok = clip_text::ClipTokenizer::bundled(None)?;
    /// assert_eq!(tok.special_ids(), (49406, 49407, 49407));
    /// let sd2 = clip_text::ClipTokenizer::bundled(Some("!"))?;
    /// assert_eq!(sd2.special_ids().2, 0);
    /// # Ok::<(), model_io::Error>(())
    /// ```
    /// The bundled vocabulary as a `tokenizer/` folder's files (`vocab.json`, `merges.txt`,
    /// `tokenizer_config.json`, `special_tokens_map.json`), padding with `pad_token` when given:
    /// what an exported diffusers folder holds for [`ClipTokenizer::bundled`].
    ///
    /// ```
    /// let files = clip_text::ClipTokenizer::bundled_files(Some("!"));
    /// assert!(files.iter().any(|(n, t)| *n == "tokenizer_config.json" && t.contains(r#""pad_token":"!""#)));
    /// ```
    pub fn bundled_files(pad_token: Option<&str>) -> Vec<(&'static str, String)> {
        let with_pad = |text: &str| -> String {
            match (pad_token, serde_json::from_str::<Value>(text)) {
                (Some(pad), Ok(Value::Object(mut o))) => {
                    o.insert("pad_token".into(), Value::String(pad.to_string()));
                    Value::Object(o).to_string()
                }
                _ => text.to_string(),
            }
        };
        vec![
            ("vocab.json", include_str!("../vocab/vocab.json").to_string()),
            ("merges.txt", include_str!("../vocab/merges.txt").to_string()),
            ("tokenizer_config.json", with_pad(include_str!("../vocab/tokenizer_config.json"))),
            ("special_tokens_map.json", with_pad(include_str!("../vocab/special_tokens_map.json"))),
        ]
    }

    pub fn bundled(pad_token: Option<&str>) -> Result<Self> {
        let dir = Path::new("(bundled CLIP vocabulary)");
        let json = |name: &str, text: &str| -> Result<Value> {
            serde_json::from_str(text).map_err(|e| Error::Json { path: dir.join(name), cause: e })
        };
        let mut special_map = json("special_tokens_map.json", include_str!("../vocab/special_tokens_map.json"))?;
        if let (Some(pad), Some(o)) = (pad_token, special_map.as_object_mut()) {
            o.insert("pad_token".into(), Value::String(pad.to_string()));
        }
        let mut config = json("tokenizer_config.json", include_str!("../vocab/tokenizer_config.json"))?;
        if let (Some(pad), Some(o)) = (pad_token, config.as_object_mut()) {
            o.insert("pad_token".into(), Value::String(pad.to_string()));
        }
        let specials = SpecialTokens::from_configs(&[config, special_map], dir)?;
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let merges_list = parse_merges(include_str!("../vocab/merges.txt"), &merges)?;
        let tok = Self::build(
            &json("vocab.json", include_str!("../vocab/vocab.json"))?,
            &vocab,
            &merges_list,
            &merges,
            &specials,
        )?;
        Self::finish(tok, &specials, &vocab, dir)
    }

    /// The special tokens, truncation and padding on a built `tokenizers` pipeline.
    fn finish(mut tok: Tokenizer, specials: &SpecialTokens, source: &Path, dir: &Path) -> Result<Self> {
        // transformers adds the configs' special tokens to whatever the backend holds; when
        // two keys name the same text (eos, unk and pad are all `<|endoftext|>` in SD 1.x), the
        // last one's flags hold there, while this crate's `add_special_tokens` keeps the first.
        let mut added: Vec<AddedToken> = Vec::new();
        for (_, t) in &specials.by_key {
            added.retain(|a| a.content != t.content);
            added.push(t.clone());
        }
        tok.add_special_tokens(&added);
        let id = |t: &str| {
            tok.token_to_id(t).map(i64::from).ok_or_else(|| Error::Config {
                path: source.to_path_buf(),
                message: format!("vocabulary lacks the special token {t}"),
            })
        };
        let bos = id(specials.get("bos_token").unwrap_or(BOS))?;
        let eos = id(specials.get("eos_token").unwrap_or(EOS))?;
        let pad_text = specials.get("pad_token").unwrap_or(EOS).to_string();
        let pad = id(&pad_text)?;
        let max_length = specials.max_length;
        if max_length < 2 {
            return Err(Error::Config {
                path: dir.join("tokenizer_config.json"),
                message: "model_max_length must be at least 2".into(),
            });
        }
        let plain = tok.clone();
        let mut fixed = tok;
        fixed
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(lib_err(source, "truncation"))?
            .with_padding(Some(PaddingParams {
                strategy: PaddingStrategy::Fixed(max_length),
                direction: PaddingDirection::Right,
                pad_to_multiple_of: None,
                pad_id: pad as u32,
                pad_type_id: 0,
                pad_token: pad_text,
            }));
        Ok(Self { plain, fixed, bos, eos, pad, max_length })
    }

    /// The pipeline transformers' `CLIPTokenizer.__init__` builds from a vocabulary and merges.
    fn build(
        v: &Value,
        vocab_path: &Path,
        merges: &[(String, String)],
        merges_path: &Path,
        specials: &SpecialTokens,
    ) -> Result<Tokenizer> {
        let obj = v.as_object().ok_or_else(|| Error::Config {
            path: vocab_path.into(),
            message: "vocabulary is not a JSON object".into(),
        })?;
        let mut vocab = ahash_map(obj.len());
        for (k, id) in obj {
            let id = id.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| Error::Config {
                path: vocab_path.into(),
                message: format!("token {k:?} has id {id}, expected a non-negative integer"),
            })?;
            vocab.insert(k.clone(), id);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges.to_vec())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .fuse_unk(false)
            .unk_token(specials.get("unk_token").unwrap_or(EOS).to_string())
            .build()
            .map_err(lib_err(merges_path, "BPE model"))?;
        let mut tok = Tokenizer::new(bpe);
        let ws = Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(lib_err(vocab_path, "normalizer"))?;
        tok.with_normalizer(Some(NormalizerWrapper::Sequence(NormSeq::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(ws),
            NormalizerWrapper::Lowercase(Lowercase),
        ]))));
        let split = Split::new(SplitPattern::Regex(PATTERN.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(lib_err(vocab_path, "pre-tokenizer"))?;
        tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSeq::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]))));
        tok.with_decoder(Some(ByteLevel::new(true, true, true)));
        let bos = specials.get("bos_token").unwrap_or(BOS);
        let eos = specials.get("eos_token").unwrap_or(EOS);
        let id = |t: &str| tok.token_to_id(t);
        // The ids come from the vocabulary; a missing one is reported by `from_dir`.
        if let (Some(b), Some(e)) = (id(bos), id(eos)) {
            let post = RobertaProcessing::new((eos.to_string(), e), (bos.to_string(), b))
                .trim_offsets(false)
                .add_prefix_space(false);
            tok.with_post_processor(Some(post));
        }
        Ok(tok)
    }

    /// The context length (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Ids of BOS, EOS and the padding token.
    pub fn special_ids(&self) -> (i64, i64, i64) {
        (self.bos, self.eos, self.pad)
    }

    /// Token ids of `text`, without BOS/EOS or padding.
    pub fn tokenize(&self, text: &str) -> Result<Vec<i64>> {
        let e = self.plain.encode(text, false).map_err(|e| Error::invalid(format!("tokenizing {text:?}: {e}")))?;
        Ok(e.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// `max_length` ids: BOS, the tokens, EOS, then padding; a prompt that is too long is
    /// truncated keeping EOS last (as `padding="max_length", truncation=True`).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let e = self.fixed.encode(text, true).map_err(|e| Error::invalid(format!("tokenizing {text:?}: {e}")))?;
        // Only a truncated prompt is tokenized a second time, to say by how much.
        if !e.get_overflowing().is_empty() {
            tracing::warn!(
                "prompt is {} tokens too long; CLIP reads at most {}, the rest is dropped",
                self.overflow(text)?,
                self.max_length - 2
            );
        }
        Ok(e.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// How many tokens of `text` do not fit in the context (0 when it fits).
    pub fn overflow(&self, text: &str) -> Result<usize> {
        Ok(self.tokenize(text)?.len().saturating_sub(self.max_length.saturating_sub(2)))
    }
}

fn ahash_map(n: usize) -> tokenizers::models::bpe::Vocab {
    tokenizers::models::bpe::Vocab::with_capacity_and_hasher(n, Default::default())
}
