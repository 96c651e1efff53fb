//! Property tests: decoding never panics, on random bytes or on valid frames mutated (bit
//! flips, byte writes, splices, length fields set to random values); whatever decodes
//! re-encodes to the same bytes; random valid messages round-trip. The `fuzz/` crate runs the
//! same decoder under libFuzzer (`cargo +nightly fuzz run decode_frame`).

use proptest::prelude::*;

use super::tests::frames_of_every_kind;
use super::*;

/// Decodes `bytes` with default and with tight limits; anything accepted must re-encode to
/// exactly the input (the encoding is canonical) and the header helper must agree.
fn check_decode(bytes: &[u8]) {
    let tight = Limits {
        max_frame_bytes: 512,
        max_header_bytes: 256,
        max_entries: 2,
        max_hidden: 8,
        max_tokens: 4,
    };
    for limits in [Limits::default(), tight] {
        if let Ok(msg) = Message::decode(bytes, &limits) {
            assert_eq!(msg.encode().expect("a decoded message encodes"), bytes);
            let h = FrameHeader::parse(bytes, &limits).expect("a decoded frame's header parses");
            assert_eq!(h.frame_len(), Some(bytes.len() as u64));
            assert_eq!(h.kind, msg.kind());
            if let Some(t) = msg.tensor() {
                assert_eq!(t.to_f32().len(), t.shape().numel().unwrap_or(0) as usize);
            }
        }
    }
}

/// One change to a frame.
#[derive(Clone, Debug)]
enum Mutation {
    /// Flip bit `bit` of byte `at` (indices taken modulo the length).
    FlipBit { at: usize, bit: u8 },
    /// Set byte `at` to `value`.
    SetByte { at: usize, value: u8 },
    /// Remove `len` bytes at `at`.
    Remove { at: usize, len: usize },
    /// Insert bytes at `at`.
    Insert { at: usize, bytes: Vec<u8> },
    /// Copy `len` bytes from `from` over `to` (a splice of the frame with itself).
    Copy { from: usize, to: usize, len: usize },
    /// Overwrite a u32 at `at` (a length or count field, when it lands on one).
    SetU32 { at: usize, value: u32 },
    /// Overwrite the u64 payload length, or the u32 header length, in the fixed header.
    SetLength { payload: bool, value: u64 },
    /// Set the payload length so the fixed header agrees with the buffer's length again
    /// (after an insert or removal), which gets the decoder past the length check.
    FixPayloadLength,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting_u32 = prop_oneof![
        Just(0u32),
        Just(1),
        Just(2),
        Just(7),
        Just(8),
        Just(255),
        Just(256),
        Just(u32::MAX),
        Just(u32::MAX - 7),
        any::<u32>()
    ];
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        (any::<usize>(), 1usize..40).prop_map(|(at, len)| Mutation::Remove { at, len }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..40))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), any::<usize>(), 1usize..64).prop_map(|(from, to, len)| Mutation::Copy {
            from,
            to,
            len
        }),
        (any::<usize>(), interesting_u32.clone())
            .prop_map(|(at, value)| Mutation::SetU32 { at, value }),
        (
            any::<bool>(),
            prop_oneof![interesting_u32.prop_map(u64::from), any::<u64>()]
        )
            .prop_map(|(payload, value)| Mutation::SetLength { payload, value }),
        Just(Mutation::FixPayloadLength),
    ]
}

fn apply(frame: &mut Vec<u8>, m: &Mutation) {
    let n = frame.len();
    if n == 0 {
        return;
    }
    match m {
        Mutation::FlipBit { at, bit } => frame[at % n] ^= 1 << bit,
        Mutation::SetByte { at, value } => frame[at % n] = *value,
        Mutation::Remove { at, len } => {
            let at = at % n;
            frame.drain(at..(at + len).min(n));
        }
        Mutation::Insert { at, bytes } => {
            let at = at % (n + 1);
            frame.splice(at..at, bytes.iter().copied());
        }
        Mutation::Copy { from, to, len } => {
            let (from, to) = (from % n, to % n);
            let len = (*len).min(n - from).min(n - to);
            frame.copy_within(from..from + len, to);
        }
        Mutation::SetU32 { at, value } => {
            if n >= 4 {
                let at = at % (n - 3);
                frame[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
        }
        Mutation::SetLength { payload, value } => {
            if n >= FIXED_HEADER_LEN {
                if *payload {
                    frame[16..24].copy_from_slice(&value.to_le_bytes());
                } else {
                    frame[8..12].copy_from_slice(&(*value as u32).to_le_bytes());
                }
            }
        }
        Mutation::FixPayloadLength => {
            if n >= FIXED_HEADER_LEN {
                let header_len = u32::from_le_bytes([frame[8], frame[9], frame[10], frame[11]]);
                let payload =
                    (n as u64).wrapping_sub(FIXED_HEADER_LEN as u64 + u64::from(header_len));
                frame[16..24].copy_from_slice(&payload.to_le_bytes());
            }
        }
    }
}

/// An endless supply of hostile frames for fuzzing a live node, from `seed`: random bytes
/// (10%), a valid fixed header before a random body (10%), and frames of `targets` (frames
/// the node would act on) or of every kind mutated one to four times by the strategies above
/// (80%, mostly targets).
pub(crate) struct FrameFuzzer {
    runner: proptest::test_runner::TestRunner,
    targets: Vec<Vec<u8>>,
    every_kind: Vec<Vec<u8>>,
}

impl FrameFuzzer {
    pub(crate) fn new(targets: Vec<Vec<u8>>, seed: u8) -> Self {
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]);
        FrameFuzzer { runner: TestRunner::new_with_rng(Config::default(), rng), targets, every_kind: frames_of_every_kind() }
    }

    fn draw<T: std::fmt::Debug>(&mut self, strategy: impl Strategy<Value = T>) -> T {
        use proptest::strategy::ValueTree;
        strategy.new_tree(&mut self.runner).expect("the strategies always generate").current()
    }

    /// The next hostile frame.
    pub(crate) fn next_frame(&mut self) -> Vec<u8> {
        let which = self.draw(0u32..10);
        match which {
            0 => self.draw(prop::collection::vec(any::<u8>(), 0..300)),
            1 => {
                let i = self.draw(0..self.every_kind.len());
                let mut frame = self.every_kind[i][..FIXED_HEADER_LEN].to_vec();
                frame.extend(self.draw(prop::collection::vec(any::<u8>(), 0..300)));
                frame
            }
            _ => {
                let targets = which < 8 && !self.targets.is_empty();
                let n = if targets { self.targets.len() } else { self.every_kind.len() };
                let i = self.draw(0..n);
                let mut frame = if targets { self.targets[i].clone() } else { self.every_kind[i].clone() };
                for _ in 0..self.draw(1usize..5) {
                    let m = self.draw(mutation());
                    apply(&mut frame, &m);
                }
                frame
            }
        }
    }
}

/// The ingredients of a random message: kind index, entries (session, step, start, tokens),
/// hidden width, dtype code, a pool of values, a text, a nonce.
type Parts = (
    u8,
    Vec<(u128, u64, u32, u32)>,
    u32,
    u8,
    Vec<f32>,
    String,
    u64,
);

/// A random valid message (tensor kinds with random batches, shapes and dtypes).
fn message_parts() -> impl Strategy<Value = Parts> {
    (
        0u8..15,
        prop::collection::vec((any::<u128>(), any::<u64>(), 0u32..1 << 20, 1u32..4), 1..5),
        1u32..6,
        1u8..4,
        prop::collection::vec(any::<f32>(), 0..100),
        ".{0,40}",
        any::<u64>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check_decode(&bytes);
    }

    #[test]
    fn random_bodies_behind_a_valid_fixed_header_never_panic(
        kind in 0u8..17,
        header_len in 0u32..200,
        payload_len in 0u64..200,
        body in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut frame = Vec::with_capacity(FIXED_HEADER_LEN + body.len());
        frame.extend(MAGIC);
        frame.extend(VERSION.to_le_bytes());
        frame.extend([kind, 0]);
        frame.extend(header_len.to_le_bytes());
        frame.extend([0; 4]);
        frame.extend(payload_len.to_le_bytes());
        frame.extend(&body);
        check_decode(&frame);
        // And with the body cut to what the header announces, so the decoder gets past the
        // length check and into the sections.
        let want = FIXED_HEADER_LEN + header_len as usize + payload_len as usize;
        if frame.len() >= want {
            check_decode(&frame[..want]);
        }
    }

    #[test]
    fn mutated_frames_never_panic(
        which in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let frames = frames_of_every_kind();
        let mut frame = frames[which.index(frames.len())].clone();
        for m in &mutations {
            apply(&mut frame, m);
        }
        check_decode(&frame);
    }

    #[test]
    fn random_valid_messages_round_trip(parts in message_parts()) {
        let (kind, raw_entries, hidden, dtype, pool, text, nonce) = parts;
        let entries: Vec<Entry> = raw_entries
            .iter()
            .enumerate()
            // Distinct sessions: the index in the low byte.
            .map(|(i, &(s, step, start_pos, n_tokens))| Entry {
                session: SessionId((s & !0xff) | i as u128), step, start_pos, n_tokens,
            })
            .collect();
        let rows: u32 = entries.iter().map(|e| e.n_tokens).sum();
        let values: Vec<f32> = (0..(rows * hidden) as usize)
            .map(|i| pool.get(i % pool.len().max(1)).copied().unwrap_or(i as f32))
            .collect();
        let dtype = DType::from_code(dtype).unwrap();
        let tensor = Tensor::from_f32(&values, Shape::matrix(rows, hidden), dtype).unwrap();
        let ids: Vec<SessionId> = entries.iter().map(|e| e.session).collect();
        let msg = match kind {
            0 => Message::Forward(Forward {
                model: ModelId { hash: [nonce as u8; 32], name: text.clone() },
                span: Span { first_layer: (nonce >> 40) as u32, layer_count: 1 + (nonce as u32 >> 8) % 64 },
                entries: entries.clone(),
                hidden: tensor,
            }),
            1 => Message::ForwardResult(ForwardResult { entries: entries.clone(), hidden: tensor }),
            2 => Message::Error(ErrorReply {
                code: ErrorCode::ALL[nonce as usize % ErrorCode::ALL.len()],
                session: (nonce % 2 == 0).then_some(ids[0]),
                message: text.clone(),
            }),
            3 => Message::CloseSession(ids),
            4 => Message::CloseSessionAck(ids),
            5 => Message::Ping(nonce),
            6 => Message::Pong(nonce),
            7 => Message::Info,
            9 => Message::Relay(Relay {
                chain: nonce.rotate_left(7),
                keep: nonce % 2 == 1,
                next: (0..(nonce % 4) as usize)
                    .map(|i| NextHop {
                        peer: vec![i as u8 + 1; 1 + (nonce as usize >> 3) % 60],
                        addrs: (0..i).map(|j| text.as_bytes().iter().copied().chain([j as u8]).collect()).collect(),
                        span: Span { first_layer: i as u32 * 4, layer_count: 4 },
                    })
                    .collect(),
                forward: Forward {
                    model: ModelId { hash: [nonce as u8; 32], name: text.clone() },
                    span: Span { first_layer: 0, layer_count: 1 + (nonce as u32 >> 8) % 64 },
                    entries: entries.clone(),
                    hidden: tensor,
                },
            }),
            10 => Message::Collect(Collect { chain: nonce, entries: entries.clone(), wait_ms: nonce as u32 }),
            11 => Message::Relayed,
            12 => Message::Handover(Handover {
                model: ModelId { hash: [nonce as u8; 32], name: text.clone() },
                span: Span { first_layer: (nonce >> 40) as u32, layer_count: 1 + (nonce as u32 >> 8) % 64 },
                session: ids[0],
                step: nonce,
                owner: vec![nonce as u8; 1 + (nonce as usize >> 3) % 60],
                digest: [(nonce >> 8) as u8; STATE_DIGEST_LEN],
                state: text.as_bytes(),
            }),
            13 => Message::HandoverAck(ids[0]),
            14 => Message::ForkSession(ForkSession { source: ids[0], target: SessionId(ids[0].0 ^ 1), positions: nonce as u32 }),
            15 => Message::ForkSessionAck(ids[0]),
            _ => Message::InfoReply(serde_json::json!({ "text": text, "nonce": nonce, "ids": ids.len() }).to_string()),
        };
        let frame = msg.encode().unwrap();
        let h = FrameHeader::parse(&frame, &Limits::default()).unwrap();
        prop_assert_eq!((FIXED_HEADER_LEN + h.header_len as usize) % PAYLOAD_ALIGN, 0);
        let got = Message::decode(&frame, &Limits::default()).unwrap();
        prop_assert_eq!(got.kind(), msg.kind());
        match (&got, &msg) {
            (Message::Forward(a), Message::Forward(b)) => {
                prop_assert_eq!((&a.model, a.span, &a.entries), (&b.model, b.span, &b.entries));
            }
            (Message::ForwardResult(a), Message::ForwardResult(b)) => prop_assert_eq!(&a.entries, &b.entries),
            (Message::Relay(a), Message::Relay(b)) => {
                prop_assert_eq!((a.chain, a.keep, &a.next), (b.chain, b.keep, &b.next));
                prop_assert_eq!((&a.forward.model, a.forward.span, &a.forward.entries), (&b.forward.model, b.forward.span, &b.forward.entries));
            }
            _ => prop_assert_eq!(&got, &msg),
        }
        if let (Some(a), Some(b)) = (got.tensor(), msg.tensor()) {
            // What arrives is the sender's values rounded once to the wire dtype.
            let mut expected = vec![0u8; a.as_view().unwrap().bytes().len()];
            match dtype {
                DType::F32 => f32_to_f32_bytes(&b.to_f32(), &mut expected).unwrap(),
                DType::F16 => f32_to_f16_bytes(&b.to_f32(), &mut expected).unwrap(),
                DType::BF16 => f32_to_bf16_bytes(&b.to_f32(), &mut expected).unwrap(),
            }
            prop_assert_eq!(a.as_view().unwrap().bytes(), &expected[..]);
        }
        check_decode(&frame);
    }
}
