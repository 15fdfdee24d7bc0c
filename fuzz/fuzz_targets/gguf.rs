//! Arbitrary bytes as a GGUF file: the reader gives a file whose every tensor's data lies
//! inside the bytes, or an error — never a panic, a hang or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = phlora::gguf::parse(data) {
        assert_eq!(file.data_start % phlora::gguf::ALIGNMENT, 0);
        for t in &file.tensors {
            let n = t.nbytes().expect("sized when parsed");
            assert_eq!(file.data(data, t).len() as u64, n);
        }
    }
});
