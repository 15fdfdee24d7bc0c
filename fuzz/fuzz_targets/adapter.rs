//! Arbitrary bytes as an adapter folder (adapter_config.json + adapter_model.safetensors, split
//! where the first two bytes say): opening it must give modules whose factors pair up, or an
//! error — never a panic, a hang or an unbounded allocation. This is what verify and merge read;
//! `phlora check` reads the same folder its own way, and must give a report or an error too;
//! so must the GGUF conversion (a file, or an error and no file).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use phlora::adapter::read::Adapter;

fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("phlora-fuzz-adapter-{}", std::process::id()));
        std::fs::create_dir_all(d.join("base")).unwrap();
        std::fs::write(
            d.join("base/config.json"),
            r#"{"architectures": ["LlamaForCausalLM"], "num_attention_heads": 1}"#,
        )
        .unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (config, weights) = data[2..].split_at(split);
    let dir = folder();
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
    if let Ok(adapter) = Adapter::open(dir) {
        for m in &adapter.modules {
            assert!(m.rank > 0);
            assert_eq!(m.a.shape.first().copied(), Some(m.rank * m.experts.max(1)));
            let bytes = adapter.file.bytes(&m.a);
            assert_eq!(bytes.len(), m.a.nbytes());
        }
    }
    let gguf = dir.join("out.gguf");
    let _ = std::fs::remove_file(&gguf);
    if phlora::adapter::gguf::convert(dir, &dir.join("base"), &gguf, None).is_err() {
        assert!(!gguf.exists());
    }
    if let Ok(report) = phlora::check::check(dir, None, &phlora::check::Engine::ALL) {
        assert_eq!(report.verdicts.len(), phlora::check::Engine::ALL.len());
        let _ = report.render();
    }
});
