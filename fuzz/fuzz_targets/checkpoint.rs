//! Arbitrary bytes as one safetensors shard: parsing must return entries whose byte ranges
//! lie in the input, or an error — never a panic, a hang or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phlora::checkpoint::dtype::decode_into;
use phlora::checkpoint::parse_shard;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.safetensors");
    if let Ok(entries) = parse_shard(path, data, 0) {
        for t in &entries {
            assert!(t.start <= t.end && t.end <= data.len());
            if let Some(d) = t.float_dtype() {
                let bytes = &data[t.start..t.end];
                let mut out = vec![0f32; bytes.len() / d.size()];
                decode_into(d, &bytes[..out.len() * d.size()], &mut out);
            }
        }
    }
});
