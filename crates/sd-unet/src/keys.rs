//! The one map between this crate's module paths and diffusers' keys. The loader reads each
//! tensor by its diffusers key, built from these names; the export ([`crate::export`]) walks the
//! modules and maps their paths back through the same table. Burn's paths follow the keys except
//! for the wrappers listed in [`RENAMES`], `LoraLinear.base`, and the variant of the `Proj`
//! enum.

use burn::module::{Module, ModuleVisitor};
use burn::tensor::backend::Backend;

/// An attention block's output projection (diffusers' `to_out` is a `ModuleList` of
/// `[Linear, Dropout]`).
pub(crate) const TO_OUT: &str = "to_out.0";
/// The GEGLU feed-forward's input projection (`ff.net = [GEGLU, Dropout, Linear]`).
pub(crate) const FF_PROJ: &str = "ff.net.0.proj";
/// The feed-forward's output layer.
pub(crate) const FF_OUT: &str = "ff.net.2";
/// A down block's single downsampler (a one-element `ModuleList`).
pub(crate) const DOWNSAMPLER: &str = "downsamplers.0";
/// An up block's single upsampler.
pub(crate) const UPSAMPLER: &str = "upsamplers.0";

/// Module path → diffusers key, for the paths that differ: `(parent, field, key segment)`,
/// `parent` `None` for any parent. Each key is one of the constants the loader reads.
pub(crate) const RENAMES: &[(Option<&str>, &str, &str)] = &[
    (None, "to_out", TO_OUT),
    (Some("ff"), "proj", "net.0.proj"),
    (Some("ff"), "out", "net.2"),
    (None, "downsampler", DOWNSAMPLER),
    (None, "upsampler", UPSAMPLER),
];

/// The diffusers key of the parameter at module path `names` (with each field's container
/// type in `types`, as Burn's visitors report them); `None` for LoRA adapters, which are not
/// part of the UNet's file.
pub(crate) fn diffusers_key(names: &[String], types: &[String]) -> Option<String> {
    if names.iter().any(|n| n == "lora") {
        return None;
    }
    let mut key: Vec<String> = Vec::with_capacity(names.len() + 1);
    for (i, n) in names.iter().enumerate() {
        let ty = types.get(i).map(String::as_str).unwrap_or("");
        if (n == "base" && ty == "Struct:LoraLinear") || ty.starts_with("Enum:") {
            continue;
        }
        let parent = key.last().map(String::as_str);
        match RENAMES.iter().find(|(p, field, _)| field == n && p.is_none_or(|p| Some(p) == parent)) {
            Some((_, _, to)) => key.push(to.to_string()),
            None => key.push(n.clone()),
        }
    }
    Some(key.join("."))
}

/// The diffusers path of every [`crate::attention::Attention`] in `m`
/// (`down_blocks.0.attentions.0.transformer_blocks.0.attn1`), in the order Burn visits the
/// module: the prefix of the first parameter found inside each one, mapped by
/// [`diffusers_key`]. LoRA naming takes its paths from here, so they are the loader's keys.
pub(crate) fn attention_paths<B: Backend, M: Module<B>>(m: &M) -> Vec<String> {
    struct V {
        names: Vec<String>,
        types: Vec<String>,
        paths: Vec<String>,
        /// The stack depth of the attention being visited, while inside one.
        inside: Option<usize>,
    }
    impl<B: Backend> ModuleVisitor<B> for V {
        fn enter_module(&mut self, name: &str, ty: &str) {
            // `ty` is the container's type: the first field of an `Attention` opens it.
            if ty == "Struct:Attention" && self.inside.is_none() {
                self.inside = Some(self.names.len());
                if let Some(key) = diffusers_key(&self.names, &self.types) {
                    self.paths.push(key);
                }
            }
            self.names.push(name.to_string());
            self.types.push(ty.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.names.pop();
            self.types.pop();
            if self.inside.is_some_and(|d| self.names.len() < d) {
                self.inside = None;
            }
        }
    }
    let mut v = V { names: Vec::new(), types: Vec::new(), paths: Vec::new(), inside: None };
    m.visit(&mut v);
    v.paths
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(path: &str, types: &[&str]) -> Option<String> {
        let names: Vec<String> = path.split('.').map(String::from).collect();
        let types: Vec<String> = types.iter().map(|s| s.to_string()).collect();
        diffusers_key(&names, &types)
    }

    #[test]
    fn the_renames_give_the_keys_the_loader_reads() {
        let attn = "down_blocks.0.attentions.0.transformer_blocks.0";
        assert_eq!(
            key(&format!("{attn}.attn1.to_out.base.weight"), &["", "", "", "", "", "", "", "", "Struct:LoraLinear"])
                .unwrap(),
            format!("{attn}.attn1.{TO_OUT}.weight")
        );
        assert_eq!(key(&format!("{attn}.ff.proj.bias"), &[]).unwrap(), format!("{attn}.{FF_PROJ}.bias"));
        assert_eq!(key(&format!("{attn}.ff.out.weight"), &[]).unwrap(), format!("{attn}.{FF_OUT}.weight"));
        assert_eq!(
            key("down_blocks.0.downsampler.conv.weight", &[]).unwrap(),
            format!("down_blocks.0.{DOWNSAMPLER}.conv.weight")
        );
        assert_eq!(key("up_blocks.1.upsampler.conv.bias", &[]).unwrap(), format!("up_blocks.1.{UPSAMPLER}.conv.bias"));
        // `out` elsewhere is not renamed; adapters are not in the file.
        assert_eq!(key("x.out.weight", &[]).unwrap(), "x.out.weight");
        assert_eq!(key(&format!("{attn}.attn1.to_q.lora.a"), &[]), None);
    }
}
