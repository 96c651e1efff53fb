//! Encode + decode time of `Forward` frames: a decode step (1 token x 576 hidden, SmolLM2's
//! width) and a prefill (512 x 576), bf16 on the wire (and f32 for comparison).
//!
//! "round trip" = encode from f32 into a reused buffer + decode (header checks, zero-copy
//! view) + convert the view back to f32 into a reused buffer: what an End node and a worker
//! spend on the codec per hop and direction, without the network.
//! Run: `cargo bench --bench wire_roundtrip`.

use std::hint::black_box;
use std::time::Instant;

use meshpy_native::wire::{
    DType, Entry, Forward, Limits, Message, ModelId, SessionId, Shape, Span, Tensor,
};

/// Median nanoseconds per call of `f`, over `rounds` rounds of `iters` calls.
fn median_ns(rounds: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters {
        f(); // warm up caches and the allocator
    }
    let mut per_call: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    per_call[rounds / 2]
}

fn bench(tokens: u32, hidden: u32, dtype: DType) {
    let x: Vec<f32> = (0..tokens * hidden)
        .map(|i| ((i as f32) * 0.013).sin() * 3.0)
        .collect();
    let msg = Message::Forward(Forward {
        model: ModelId {
            hash: [7; 32],
            name: "SmolLM2-135M-Instruct-Q4_1".to_string(),
        },
        span: Span {
            first_layer: 0,
            layer_count: 10,
        },
        entries: vec![Entry {
            session: SessionId(0x1234_5678_9abc_def0_1122_3344_5566_7788),
            step: 3,
            start_pos: 100,
            n_tokens: tokens,
        }],
        hidden: Tensor::from_f32(&x, Shape::matrix(tokens, hidden), dtype).expect("shape"),
    });
    let limits = Limits::default();
    let mut frame = Vec::new();
    let mut out = vec![0f32; x.len()];
    let iters = if tokens == 1 { 20_000 } else { 100 };

    let encode = median_ns(15, iters, || {
        frame.clear();
        msg.encode_into(&mut frame).expect("encode");
        black_box(&frame);
    });
    let decode = median_ns(15, iters, || {
        let m = Message::decode(black_box(&frame), &limits).expect("decode");
        black_box(&m);
    });
    let round_trip = median_ns(15, iters, || {
        frame.clear();
        msg.encode_into(&mut frame).expect("encode");
        let m = Message::decode(black_box(&frame), &limits).expect("decode");
        let view = m.tensor().and_then(|t| t.as_view()).expect("a tensor");
        view.to_f32_into(&mut out).expect("convert");
        black_box(&out);
    });
    let fresh = median_ns(15, iters, || {
        let f = msg.encode().expect("encode");
        let m = Message::decode(black_box(&f), &limits).expect("decode");
        black_box(
            m.tensor()
                .and_then(|t| t.as_view())
                .expect("a tensor")
                .to_f32(),
        );
    });
    let mb = frame.len() as f64 / 1e6;
    println!(
        "{:>4} x {:<4} {:<4} frame {:>9} B | encode {:>10.0} ns | decode {:>7.0} ns | \
         round trip {:>10.0} ns ({:>5.2} GB/s of frame) | with fresh buffers {:>10.0} ns",
        tokens,
        hidden,
        dtype.name(),
        frame.len(),
        encode,
        decode,
        round_trip,
        mb / round_trip * 1e9 / 1e3,
        fresh,
    );
}

fn main() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("wire_roundtrip: {cpu}, 1 thread, commit {commit}");
    for dtype in [DType::BF16, DType::F32, DType::F16] {
        bench(1, 576, dtype);
        bench(512, 576, dtype);
    }
}
