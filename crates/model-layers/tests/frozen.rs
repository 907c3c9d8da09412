//! Frozen linear layers: packed for the CPU GEMM at load, with the checkpoint's mapped pages
//! of their weights released.

use std::path::Path;

use burn::tensor::{Distribution, Tensor};
use burn_flex::{Flex, FlexDevice};
use model_io::{Checkpoint, Weights};
use model_layers::nn::Linear;

/// Resident kibibytes of this process's mapping of `file` (from /proc/self/smaps).
#[cfg(target_os = "linux")]
fn mapped_rss_kib(file: &Path) -> usize {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let name = file.to_str().unwrap();
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        let is_header = line
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-') && f.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
        if is_header {
            inside = line.ends_with(name);
        } else if inside && line.starts_with("Rss:") {
            total += line.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap();
        }
    }
    total
}

/// Writes a linear layer `l` (`[520, 1030]` weight, 2 MiB, and bias) and returns its file.
fn write_layer(dir: &Path) -> std::path::PathBuf {
    let dev = FlexDevice;
    let w = Tensor::<Flex, 2>::random([D_OUT, D_IN], Distribution::Default, &dev);
    let b = Tensor::<Flex, 1>::random([D_OUT], Distribution::Default, &dev);
    let mut tensors = std::collections::BTreeMap::new();
    for (name, t) in [("l.weight", w.into_data()), ("l.bias", b.into_data())] {
        let host = model_io::tensor_file::HostTensor::f32(t.shape.to_vec(), t.to_vec::<f32>().unwrap());
        tensors.insert(name.to_string(), host);
    }
    let file = dir.join("model.safetensors");
    model_io::tensor_file::write_tensors(&file, &tensors, &Default::default()).unwrap();
    file
}

const D_IN: usize = 1030;
const D_OUT: usize = 520;

/// The largest difference between `got` and `want`, relative to `want`'s largest entry.
fn rel_diff(got: Tensor<Flex, 3>, want: Tensor<Flex, 3>) -> f32 {
    let scale: f32 = want.clone().abs().max().into_scalar();
    let e: f32 = (got - want).abs().max().into_scalar();
    e / scale
}

#[test]
fn frozen_linear_matches_and_releases_its_weight_pages() {
    let dev = FlexDevice;
    let dir = tempfile::tempdir().unwrap();
    let file = write_layer(dir.path());
    let ckpt = Checkpoint::open_dir(dir.path(), &["model"]).unwrap();
    let weights = Weights::<Flex>::new(&ckpt, &dev);
    let x = Tensor::<Flex, 3>::random([2, 3, D_IN], Distribution::Default, &dev);

    let plain = Linear::load(&weights.pp("l"), D_IN, D_OUT, true).unwrap();
    let want = plain.forward(x.clone());
    drop(plain);
    let mut frozen = Linear::load(&weights.frozen().pp("l"), D_IN, D_OUT, true).unwrap();
    // The plain forward read the whole mapped weight; the frozen load dropped its pages.
    #[cfg(target_os = "linux")]
    {
        let rss = mapped_rss_kib(&file);
        assert!(rss < 100, "{rss} KiB of the mapping still resident after packing");
    }
    let _ = &file;
    assert_eq!(frozen.dims(), (D_IN, D_OUT));
    assert_eq!(frozen.weight.dims(), [D_IN, 0], "the weight moved into the packed layout");
    assert!(frozen.pack(), "packing twice is a no-op");
    let got = frozen.forward(x);
    assert_eq!(got.dims(), [2, 3, D_OUT]);
    let e = rel_diff(got, want);
    assert!(e < 2e-6, "max relative diff {e}");
}

/// Through the mapping, the bias that each forward reads faults back a page-cache folio that
/// may hold released weight pages too; copied out, nothing of the mapping stays resident.
#[test]
fn copied_weights_keep_nothing_of_the_mapping_resident() {
    let dev = FlexDevice;
    let dir = tempfile::tempdir().unwrap();
    let file = write_layer(dir.path());
    let x = Tensor::<Flex, 3>::random([2, 3, D_IN], Distribution::Default, &dev);
    let want = {
        let ckpt = Checkpoint::open_dir(dir.path(), &["model"]).unwrap();
        Linear::load(&Weights::<Flex>::new(&ckpt, &dev).pp("l"), D_IN, D_OUT, true).unwrap().forward(x.clone())
    };
    let ckpt = Checkpoint::open_dir(dir.path(), &["model"]).unwrap();
    // A frozen view copies the small tensors.
    let weights = Weights::<Flex>::new(&ckpt, &dev).frozen();
    let frozen = Linear::load(&weights.pp("l"), D_IN, D_OUT, true).unwrap();
    let got = frozen.forward(x);
    #[cfg(target_os = "linux")]
    {
        let rss = mapped_rss_kib(&file);
        assert!(rss == 0, "{rss} KiB of the mapping resident after a forward");
    }
    let _ = &file;
    let e = rel_diff(got, want);
    assert!(e < 2e-6, "max relative diff {e}");
    weights.finish(&[]).unwrap();
}
