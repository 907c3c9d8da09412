//! Attaching LoRA adapters to a UNet and converting them to and from the diffusers/PEFT
//! layout (`unet.<module path>.lora_A.weight` `[r, in]`, `lora_B.weight` `[out, r]`).

use std::collections::BTreeMap;

use burn::tensor::{backend::Backend, Tensor};
use model_io::nn::Linear;
use model_io::tensor_file::HostTensor;
use model_io::{Error, Result};

use crate::lora::Lora;
use crate::UNet2DConditionModel;

/// Attaches fresh adapters of `rank` and `alpha` to every attention projection
/// (`to_q`, `to_k`, `to_v`, `to_out.0`). They are zero at first: the output is unchanged.
pub fn attach<B: Backend>(unet: &mut UNet2DConditionModel<B>, rank: usize, alpha: f64) {
    for a in unet.attentions_mut() {
        for (_, p) in a.projections_mut() {
            p.attach(rank, alpha);
        }
    }
}

/// The adapters as host tensors under diffusers' keys, ready for `unet_lora.safetensors`.
pub fn lora_tensors<B: Backend>(unet: &UNet2DConditionModel<B>) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    for (path, a) in unet.attentions() {
        for (name, p) in a.projections() {
            if let Some(l) = &p.lora {
                let key = format!("unet.{path}.{name}");
                out.insert(format!("{key}.lora_A.weight"), HostTensor::from_tensor(l.down.weight.val().transpose()));
                out.insert(format!("{key}.lora_B.weight"), HostTensor::from_tensor(l.up.weight.val().transpose()));
            }
        }
    }
    out
}

/// Attaches adapters read from `tensors` (as [`lora_tensors`] writes them; a leading
/// `unet.` is optional) with the given `alpha` (the rank when `None`, as diffusers assumes
/// when a file carries no alpha). Every projection named must exist and every key be used.
pub fn load_lora<B: Backend>(unet: &mut UNet2DConditionModel<B>, tensors: &BTreeMap<String, HostTensor>, alpha: Option<f64>) -> Result<()> {
    let paths: Vec<String> = unet.attentions().into_iter().map(|(p, _)| p).collect();
    let mut used = 0;
    let device = unet.attentions().first().map(|(_, a)| a.to_q.base.weight.device());
    let Some(device) = device else { return Ok(()) };
    for (path, a) in paths.iter().zip(unet.attentions_mut()) {
        for (name, p) in a.projections_mut() {
            let key = format!("{path}.{name}");
            let find = |suffix: &str| tensors.get(&format!("unet.{key}.{suffix}")).or_else(|| tensors.get(&format!("{key}.{suffix}")));
            let (Some(la), Some(lb)) = (find("lora_A.weight"), find("lora_B.weight")) else { continue };
            let (d_in, d_out) = p.base.dims();
            let r = la.shape.first().copied().unwrap_or(0);
            if la.shape != [r, d_in] || lb.shape != [d_out, r] || r == 0 {
                return Err(Error::invalid(format!(
                    "LoRA for `{key}`: lora_A {:?} and lora_B {:?} do not fit a [{d_out}, {d_in}] projection",
                    la.shape, lb.shape
                )));
            }
            let down: Tensor<B, 2> = la.to_float(&format!("{key}.lora_A.weight"), &device)?;
            let up: Tensor<B, 2> = lb.to_float(&format!("{key}.lora_B.weight"), &device)?;
            p.lora = Some(Lora {
                down: Linear::new(down.transpose(), None),
                up: Linear::new(up.transpose(), None),
                scale: alpha.unwrap_or(r as f64) / r as f64,
            });
            used += 2;
        }
    }
    if used != tensors.len() {
        let known: std::collections::HashSet<String> = paths.iter().collect::<Vec<_>>().iter().map(|p| p.to_string()).collect();
        let stray = tensors
            .keys()
            .find(|k| !known.iter().any(|p| k.contains(&format!("{p}."))))
            .cloned()
            .unwrap_or_default();
        return Err(Error::invalid(format!(
            "LoRA file has {} tensors that match no UNet attention projection, e.g. `{stray}`",
            tensors.len() - used
        )));
    }
    Ok(())
}
