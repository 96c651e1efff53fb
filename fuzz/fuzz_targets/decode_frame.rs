//! Decodes arbitrary bytes as a wire frame. The decoder must never panic (nor overflow, nor
//! read out of bounds under the sanitizer); a frame it accepts must re-encode to exactly the
//! input (the encoding is canonical) and agree with the fixed-header reader.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpy_native::wire::{FrameHeader, Limits, Message};

fuzz_target!(|data: &[u8]| {
    let tight = Limits {
        max_frame_bytes: 4096,
        max_header_bytes: 1024,
        max_entries: 4,
        max_hidden: 64,
        max_tokens: 16,
    };
    for limits in [Limits::default(), tight] {
        let header = FrameHeader::parse(data, &limits);
        if let Ok(msg) = Message::decode(data, &limits) {
            let header = header.expect("a frame that decodes has a valid fixed header");
            assert_eq!(header.kind, msg.kind());
            assert_eq!(header.frame_len(), Some(data.len() as u64));
            assert_eq!(msg.encode().expect("a decoded message encodes"), data);
            if let Some(tensor) = msg.tensor() {
                let values = tensor.to_f32();
                assert_eq!(Some(values.len() as u64), tensor.shape().numel());
            }
        }
    }
});
