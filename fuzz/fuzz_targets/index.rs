//! Arbitrary text as `model.safetensors.index.json`: a validated weight_map (no shard outside
//! the model folder) or an error — never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phlora::checkpoint::parse_index;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let path = std::path::Path::new("model.safetensors.index.json");
        if let Ok(map) = parse_index(path, text) {
            assert!(!map.is_empty());
            assert!(map.values().all(|f| !f.contains("..") && !f.starts_with('/')));
        }
    }
});
