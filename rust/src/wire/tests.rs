//! Unit tests of the frame format: round trips of every kind and dtype, conversion accuracy,
//! the golden bytes of one `Forward` frame, truncations, lying length fields, and limits.

use half::{bf16, f16};

use super::*;
use crate::error::Error;

/// A model id for tests.
pub(super) fn model() -> ModelId {
    ModelId {
        hash: std::array::from_fn(|i| i as u8),
        name: "tiny".to_string(),
    }
}

/// Three entries of 1, 3 and 2 tokens (6 rows).
pub(super) fn entries() -> Vec<Entry> {
    vec![
        Entry {
            session: SessionId(0xdead_beef),
            step: 0,
            start_pos: 0,
            n_tokens: 1,
        },
        Entry {
            session: SessionId(u128::MAX),
            step: 41,
            start_pos: 17,
            n_tokens: 3,
        },
        Entry {
            session: SessionId(7 << 100),
            step: u64::MAX,
            start_pos: u32::MAX - 2,
            n_tokens: 2,
        },
    ]
}

/// Deterministic test values: a mix of signs and magnitudes, with specials at the end.
pub(super) fn values(n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n)
        .map(|i| ((i as f32) * 0.37).sin() * 10f32.powi(i as i32 % 7 - 3))
        .collect();
    if n >= 4 {
        v[n - 1] = f32::INFINITY;
        v[n - 2] = f32::NEG_INFINITY;
        v[n - 3] = -0.0;
    }
    v
}

/// One valid frame of every kind (tensors of every dtype for the two tensor kinds).
pub(crate) fn frames_of_every_kind() -> Vec<Vec<u8>> {
    let x = values(6 * 5);
    let shape = Shape::matrix(6, 5);
    let mut frames = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let hidden = Tensor::from_f32(&x, shape, dtype).unwrap();
        let fwd = Message::Forward(Forward {
            model: model(),
            span: Span {
                first_layer: 3,
                layer_count: 7,
            },
            entries: entries(),
            hidden,
        });
        frames.push(fwd.encode().unwrap());
        let res = Message::ForwardResult(ForwardResult {
            entries: entries(),
            hidden,
        });
        frames.push(res.encode().unwrap());
        for keep in [false, true] {
            let relay = Message::Relay(Relay {
                chain: 0x5eed,
                keep,
                next: if keep { vec![] } else { next_hops() },
                forward: Forward { model: model(), span: Span { first_layer: 0, layer_count: 3 }, entries: entries(), hidden },
            });
            frames.push(relay.encode().unwrap());
        }
    }
    for msg in other_messages() {
        frames.push(msg.encode().unwrap());
    }
    frames
}

/// A message of every kind without a tensor.
fn other_messages() -> Vec<Message<'static>> {
    vec![
        Message::Error(ErrorReply {
            code: ErrorCode::CannotHoldSession,
            session: Some(SessionId(42)),
            message: "KV budget of 2 GiB is full (\u{1F4BE})".to_string(),
        }),
        Message::Error(ErrorReply {
            code: ErrorCode::MalformedFrame,
            session: None,
            message: String::new(),
        }),
        Message::CloseSession(vec![SessionId(1), SessionId(u128::MAX)]),
        Message::CloseSession(vec![]),
        Message::CloseSessionAck(vec![SessionId(1)]),
        Message::Ping(0x0123_4567_89ab_cdef),
        Message::Pong(u64::MAX),
        Message::Info,
        Message::Collect(Collect { chain: u64::MAX, entries: entries(), wait_ms: 120_000 }),
        Message::Relayed,
        Message::Handover(Handover {
            model: model(),
            span: Span { first_layer: 10, layer_count: 5 },
            session: SessionId(u128::MAX - 7),
            step: 41,
            owner: vec![0x00, 0x24, 0x08, 0x01, 0x12, 0x20, 7, 7, 7],
            digest: [0xab; STATE_DIGEST_LEN],
            state: b"\x01\x01 seven bytes and some more",
        }),
        Message::Handover(Handover {
            model: model(),
            span: Span { first_layer: 0, layer_count: 1 },
            session: SessionId(1),
            step: 0,
            owner: vec![1],
            digest: [0; STATE_DIGEST_LEN],
            state: b"",
        }),
        Message::HandoverAck(SessionId(99)),
        Message::ForkSession(ForkSession { source: SessionId(7), target: SessionId(u128::MAX), positions: 1000 }),
        Message::ForkSessionAck(SessionId(u128::MAX)),
        Message::InfoReply("{}".to_string()),
        Message::InfoReply(
            r#"{"mode": "span", "first_layer": 10, "n_layers": 10, "name": "\u00e9t\u00e9 \u2713", "x": [1.5, null]}"#
                .to_string(),
        ),
    ]
}

/// Two hops for a relay to name: one with two addresses, one with none.
fn next_hops() -> Vec<NextHop> {
    vec![
        NextHop {
            peer: vec![0x00, 0x24, 0x08, 0x01, 0x12, 0x20, 7, 7, 7],
            addrs: vec![b"/ip4/127.0.0.1/tcp/4001".to_vec(), vec![4, 127, 0, 0, 1, 6, 0x0f, 0xa1]],
            span: Span { first_layer: 3, layer_count: 7 },
        },
        NextHop { peer: vec![9; 38], addrs: vec![], span: Span { first_layer: 10, layer_count: 2 } },
    ]
}

#[test]
fn relays_carry_their_hops_and_collects_their_entries() {
    let x = values(6 * 5);
    let hidden = Tensor::from_f32(&x, Shape::matrix(6, 5), DType::BF16).unwrap();
    let forward = Forward { model: model(), span: Span { first_layer: 0, layer_count: 3 }, entries: entries(), hidden };
    let relay = Relay { chain: 77, keep: true, next: next_hops(), forward: forward.clone() };
    let frame = Message::Relay(relay.clone()).encode().unwrap();
    match decode(&frame).unwrap() {
        Message::Relay(got) => {
            assert_eq!((got.chain, got.keep, &got.next), (77, true, &relay.next));
            assert_eq!((&got.forward.model, got.forward.span, &got.forward.entries), (&forward.model, forward.span, &forward.entries));
            // The same tensor bytes: the relay's tail is a Forward's fields.
            assert_eq!(Message::Forward(got.forward).encode().unwrap(), Message::Forward(forward.clone()).encode().unwrap());
        }
        other => panic!("decoded {other:?}"),
    }
    // What an encoder refuses: hops it cannot name, entries a batch cannot have.
    let with = |edit: &dyn Fn(&mut Relay<'_>)| {
        let mut r = relay.clone();
        edit(&mut r);
        Message::Relay(r).encode()
    };
    assert!(with(&|r| r.next[0].peer.clear()).is_err());
    assert!(with(&|r| r.next[0].addrs.push(vec![])).is_err());
    assert!(with(&|r| r.next[1].addrs = vec![vec![1]; MAX_HOP_ADDRS + 1]).is_err());
    assert!(with(&|r| r.next = vec![r.next[1].clone(); MAX_RELAY_HOPS + 1]).is_err());
    assert!(with(&|r| r.next[1].span.layer_count = 0).is_err());
    assert!(Message::Collect(Collect { chain: 1, entries: vec![], wait_ms: 1 }).encode().is_err());
    // What a decoder refuses: the keep flag's byte (after the chain id) not 0 or 1, a hop
    // count past the limit, an empty peer id.
    let mut bad = frame.clone();
    bad[FIXED_HEADER_LEN + 8] = 2;
    assert!(frame_error(&bad).contains("keep flag is 2"));
    let mut bad = frame.clone();
    bad[FIXED_HEADER_LEN + 9] = MAX_RELAY_HOPS as u8 + 1;
    assert!(frame_error(&bad).contains("next hops"));
    let mut bad = frame.clone();
    bad[FIXED_HEADER_LEN + 10] = 0;
    assert!(frame_error(&bad).contains("empty peer id"));
    let collect = Message::Collect(Collect { chain: 3, entries: entries(), wait_ms: 5 }).encode().unwrap();
    assert_eq!(decode(&collect).unwrap(), Message::Collect(Collect { chain: 3, entries: entries(), wait_ms: 5 }));
    // A Collect may not carry a session twice.
    let mut twice = collect.clone();
    let first_session = FIXED_HEADER_LEN + 8 + 4 + 4;
    let second = first_session + ENTRY_LEN;
    let id: Vec<u8> = twice[first_session..first_session + 16].to_vec();
    twice[second..second + 16].copy_from_slice(&id);
    assert!(frame_error(&twice).contains("appears twice"));
}

fn decode(frame: &[u8]) -> crate::Result<Message<'_>> {
    Message::decode(frame, &Limits::default())
}

fn frame_error(frame: &[u8]) -> String {
    match decode(frame) {
        Err(Error::Frame(msg)) => msg,
        other => panic!("expected a frame error, got {other:?}"),
    }
}

fn too_large(frame: &[u8], limits: &Limits) -> &'static str {
    match Message::decode(frame, limits) {
        Err(Error::FrameTooLarge { what, .. }) => what,
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
}

/// Parses a hex dump: whitespace-separated byte pairs, `//` comments to the end of a line.
fn hex(dump: &str) -> Vec<u8> {
    dump.lines()
        .flat_map(|line| line.split("//").next().unwrap_or("").split_whitespace())
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

#[test]
fn round_trip_of_every_kind_is_exact() {
    for frame in frames_of_every_kind() {
        let msg = decode(&frame).unwrap();
        // Re-encoding a decoded message gives the same bytes: the encoding is canonical.
        assert_eq!(msg.encode().unwrap(), frame, "{:?}", msg.kind());
        assert_eq!(msg.encoded_len().unwrap(), frame.len());
    }
    for msg in other_messages() {
        let frame = msg.encode().unwrap();
        assert_eq!(decode(&frame).unwrap(), msg);
    }
}

#[test]
fn forward_round_trip_keeps_fields_and_values_per_dtype() {
    let x = values(6 * 5);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let fwd = Forward {
            model: model(),
            span: Span {
                first_layer: 3,
                layer_count: 7,
            },
            entries: entries(),
            hidden: Tensor::from_f32(&x, Shape::matrix(6, 5), dtype).unwrap(),
        };
        let frame = Message::Forward(fwd.clone()).encode().unwrap();
        let Message::Forward(got) = decode(&frame).unwrap() else {
            panic!("kind")
        };
        assert_eq!(
            (&got.model, got.span, &got.entries),
            (&fwd.model, fwd.span, &fwd.entries)
        );
        let view = got.hidden.as_view().unwrap();
        assert_eq!((view.dtype(), view.shape().dims()), (dtype, &[6, 5][..]));
        let expected: Vec<f32> = match dtype {
            DType::F32 => x.clone(),
            DType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            DType::BF16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        };
        let got_values = view.to_f32();
        assert_eq!(
            got_values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{dtype:?}"
        );
        let mut into = vec![0f32; 30];
        view.to_f32_into(&mut into).unwrap();
        assert_eq!(
            into.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            got_values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(view.to_f32_into(&mut [0f32; 29]).is_err());
    }
}

#[test]
fn view_tensors_are_sent_unchanged_and_borrow_the_frame() {
    // An echo worker re-sends the bytes it got: no conversion, same bits (NaN payloads too).
    let raw: Vec<u8> = [0x7fc1u16, 0xffff, 0x0001, 0x8000]
        .iter()
        .flat_map(|b| b.to_le_bytes())
        .collect();
    let view = TensorView::new(DType::BF16, Shape::matrix(1, 4), &raw).unwrap();
    let e = vec![Entry {
        session: SessionId(9),
        step: 1,
        start_pos: 4,
        n_tokens: 1,
    }];
    let frame = Message::ForwardResult(ForwardResult {
        entries: e,
        hidden: Tensor::View(view),
    })
    .encode()
    .unwrap();
    assert_eq!(&frame[frame.len() - 8..], &raw[..]);
    let msg = decode(&frame).unwrap();
    let got = msg.tensor().unwrap().as_view().unwrap();
    assert_eq!(got.bytes(), &raw[..]);
    assert!(std::ptr::eq(
        got.bytes().as_ptr(),
        frame[frame.len() - 8..].as_ptr()
    ));
    let back = got.to_f32();
    assert!(back[0].is_nan() && back[1].is_nan() && back[2] > 0.0 && back[3] == 0.0);
    assert!(back[3].is_sign_negative());
}

#[test]
fn as_f32_slice_borrows_only_when_aligned() {
    let x = values(6 * 5);
    let hidden = Tensor::from_f32(&x, Shape::matrix(6, 5), DType::F32).unwrap();
    let frame = Message::ForwardResult(ForwardResult {
        entries: entries(),
        hidden,
    })
    .encode()
    .unwrap();
    let mut buf = vec![0u8; frame.len() + 8];
    let aligned = buf.as_ptr().align_offset(8);
    for (shift, expect_slice) in [(aligned, true), (aligned + 1, false)] {
        buf[shift..shift + frame.len()].copy_from_slice(&frame);
        let msg = decode(&buf[shift..shift + frame.len()]).unwrap();
        let view = *msg.tensor().unwrap().as_view().unwrap();
        match view.as_f32_slice() {
            Some(s) => {
                assert!(expect_slice);
                assert_eq!(s, &x[..]);
            }
            None => assert!(!expect_slice),
        }
        assert_eq!(view.to_f32(), x);
    }
    let bf = Tensor::from_f32(&x, Shape::matrix(6, 5), DType::BF16).unwrap();
    let frame = Message::ForwardResult(ForwardResult {
        entries: entries(),
        hidden: bf,
    })
    .encode()
    .unwrap();
    assert!(decode(&frame)
        .unwrap()
        .tensor()
        .unwrap()
        .as_view()
        .unwrap()
        .as_f32_slice()
        .is_none());
}

#[test]
fn bf16_conversion_of_known_values() {
    let cases: [(f32, u16); 14] = [
        (1.0, 0x3f80),
        (-2.0, 0xc000),
        (0.0, 0x0000),
        (-0.0, 0x8000),
        (std::f32::consts::PI, 0x4049), // 3.140625 is nearer than 3.15625
        (f32::from_bits(0x3f80_8000), 0x3f80), // halfway 0x3f80/0x3f81: ties to even (down)
        (f32::from_bits(0x3f81_8000), 0x3f82), // halfway 0x3f81/0x3f82: ties to even (up)
        (f32::from_bits(0x3f80_8001), 0x3f81), // just above halfway: up
        (f32::INFINITY, 0x7f80),
        (f32::NEG_INFINITY, 0xff80),
        (f32::MAX, 0x7f80), // rounds past the largest bf16: infinity
        (f32::from_bits(0x0000_0001), 0x0000), // smallest subnormal rounds to zero
        (f32::from_bits(0x0001_8000), 0x0002), // subnormal halfway, ties to even
        (f32::from_bits(0x7f80_0001), 0x7fc0), // signalling NaN: quieted, still NaN
    ];
    for (x, bits) in cases {
        assert_eq!(f32_to_bf16(x), bits, "{x:e} ({:#010x})", x.to_bits());
    }
    assert_eq!(f32_to_bf16(f32::from_bits(0xffc1_2345)), 0xffc1); // sign and payload kept
    assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    assert_eq!(bf16_to_f32(0x4049), 3.140625);
}

#[test]
fn bf16_rounding_matches_half_and_ggml_on_a_bit_sweep() {
    // ~65k patterns across every exponent, plus the neighbourhood of each rounding boundary.
    let mut patterns: Vec<u32> = (0..=u32::MAX).step_by(65_521).collect();
    patterns.extend((0..=0xffffu32).map(|h| (h << 16) | 0x8000));
    patterns.extend((0..=0xffffu32).map(|h| (h << 16) | 0x7fff));
    for u in patterns {
        let x = f32::from_bits(u);
        let ours = f32_to_bf16(x);
        assert_eq!(ours, bf16::from_f32(x).to_bits(), "half, {u:#010x}");
        assert_eq!(
            ours,
            crate::quant::blocks::f32_to_bf16(x),
            "ggml, {u:#010x}"
        );
    }
}

#[test]
fn f16_conversion_of_known_values() {
    let cases: [(f32, u16); 9] = [
        (1.0, 0x3c00),
        (-2.0, 0xc000),
        (65504.0, 0x7bff), // largest half
        (65520.0, 0x7c00), // halfway past it: infinity
        (f32::INFINITY, 0x7c00),
        (f32::NEG_INFINITY, 0xfc00),
        (5.960_464_5e-8, 0x0001), // smallest subnormal half
        (1.0e-9, 0x0000),
        (-0.0, 0x8000),
    ];
    let xs: Vec<f32> = cases.iter().map(|c| c.0).collect();
    let mut bytes = vec![0u8; 2 * xs.len()];
    f32_to_f16_bytes(&xs, &mut bytes).unwrap();
    for (i, (x, bits)) in cases.iter().enumerate() {
        assert_eq!(
            u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]),
            *bits,
            "{x:e}"
        );
    }
    let mut nan = [0u8; 2];
    f32_to_f16_bytes(&[f32::NAN], &mut nan).unwrap();
    let mut back = [0f32];
    f16_bytes_to_f32(&nan, &mut back).unwrap();
    assert!(back[0].is_nan());
}

#[test]
fn slice_conversions_agree_with_scalar_at_every_length() {
    // Lengths around the chunk size exercise the vector body and the remainder.
    for n in (0..70).chain([127, 128, 129, 1000]) {
        let x = values(n);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut bytes = vec![0u8; n * dtype.size()];
            let mut back = vec![0f32; n];
            let expected: Vec<u32> = match dtype {
                DType::F32 => {
                    f32_to_f32_bytes(&x, &mut bytes).unwrap();
                    f32_bytes_to_f32(&bytes, &mut back).unwrap();
                    x.iter().map(|v| v.to_bits()).collect()
                }
                DType::F16 => {
                    f32_to_f16_bytes(&x, &mut bytes).unwrap();
                    f16_bytes_to_f32(&bytes, &mut back).unwrap();
                    x.iter()
                        .map(|&v| f16::from_f32(v).to_f32().to_bits())
                        .collect()
                }
                DType::BF16 => {
                    f32_to_bf16_bytes(&x, &mut bytes).unwrap();
                    bf16_bytes_to_f32(&bytes, &mut back).unwrap();
                    x.iter()
                        .map(|&v| bf16_to_f32(f32_to_bf16(v)).to_bits())
                        .collect()
                }
            };
            assert_eq!(
                back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                expected,
                "{dtype:?} n={n}"
            );
        }
    }
    // The portable bf16 loops agree with the dispatched (AVX2 where available) ones.
    let x = values(1000);
    let (mut a, mut b) = (vec![0u8; 2000], vec![0u8; 2000]);
    f32_to_bf16_bytes(&x, &mut a).unwrap();
    tensor::encode_bf16_body(&x, &mut b);
    assert_eq!(a, b);
    let (mut fa, mut fb) = (vec![0f32; 1000], vec![1f32; 1000]);
    bf16_bytes_to_f32(&a, &mut fa).unwrap();
    tensor::decode_bf16_body(&a, &mut fb);
    assert_eq!(
        fa.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        fb.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    assert!(f32_to_bf16_bytes(&[1.0; 3], &mut [0u8; 5]).is_err());
    assert!(bf16_bytes_to_f32(&[0u8; 5], &mut [0f32; 2]).is_err());
    assert!(f32_to_f16_bytes(&[1.0; 3], &mut [0u8; 8]).is_err());
    assert!(f32_bytes_to_f32(&[0u8; 7], &mut [0f32; 2]).is_err());
}

/// Hand-checked: every field below was written from the byte table in `wire/mod.rs`.
const GOLDEN_FORWARD: &str = "
    4d 53 48 50                         // magic MSHP
    01 00                               // version 1
    01                                  // kind 1 Forward
    00                                  // flags
    60 00 00 00                         // header_len 96 = 91 + 5 padding
    00 00 00 00                         // reserved
    10 00 00 00 00 00 00 00             // payload_len 16 = 2 x 4 x 2 bytes
    00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f   // model hash 0..=31
    10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f
    04 74 69 6e 79                      // name_len 4, \"tiny\"
    02 00 00 00                         // first_layer 2
    03 00 00 00                         // layer_count 3
    01 00 00 00                         // 1 entry:
    02 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00   //   session 0x0102
    07 00 00 00 00 00 00 00             //   step 7
    05 00 00 00                         //   start_pos 5
    02 00 00 00                         //   n_tokens 2
    03 02                               // tensor: bf16, 2 dims
    02 00 00 00 04 00 00 00             //   (2, 4)
    00 00 00 00 00                      // padding: 24 + 96 = 120 = 15 x 8
    80 3f 00 c0 00 3f 00 00             // 1.0 -2.0 0.5 0.0
    40 40 80 be 80 7f 82 3f             // 3.0 -0.25 inf 1.01171875 (tie: even, up)
";

/// The values of the golden frame's tensor, before bf16 rounding.
pub(super) const GOLDEN_VALUES: [f32; 8] = [
    1.0,
    -2.0,
    0.5,
    0.0,
    3.0,
    -0.25,
    f32::INFINITY,
    1.0 + 3.0 / 256.0,
];

#[test]
fn golden_forward_frame() {
    let golden = hex(GOLDEN_FORWARD);
    assert_eq!(golden.len(), 136);
    let e = vec![Entry {
        session: SessionId(0x0102),
        step: 7,
        start_pos: 5,
        n_tokens: 2,
    }];
    let msg = Message::Forward(Forward {
        model: model(),
        span: Span {
            first_layer: 2,
            layer_count: 3,
        },
        entries: e.clone(),
        hidden: Tensor::from_f32(&GOLDEN_VALUES, Shape::matrix(2, 4), DType::BF16).unwrap(),
    });
    assert_eq!(
        msg.encode().unwrap(),
        golden,
        "the frame format changed: update the version"
    );
    let Message::Forward(got) = decode(&golden).unwrap() else {
        panic!("kind")
    };
    assert_eq!(
        (got.model, got.span, got.entries),
        (
            model(),
            Span {
                first_layer: 2,
                layer_count: 3
            },
            e
        )
    );
    let mut expected = GOLDEN_VALUES;
    expected[7] = 1.015625;
    assert_eq!(got.hidden.to_f32(), expected);
    let h = FrameHeader::parse(&golden[..FIXED_HEADER_LEN], &Limits::default()).unwrap();
    assert_eq!(
        (h.kind, h.header_len, h.payload_len, h.frame_len()),
        (Kind::Forward, 96, 16, Some(136))
    );
}

/// Hand-checked like `GOLDEN_FORWARD`: an `Info`, then an `InfoReply` of `{"mode":"echo"}`.
const GOLDEN_INFO: &str = "
    4d 53 48 50 01 00                   // magic, version 1
    08 00                               // kind 8 Info, flags
    00 00 00 00 00 00 00 00             // header_len 0, reserved
    00 00 00 00 00 00 00 00             // payload_len 0
";
const GOLDEN_INFO_REPLY: &str = "
    4d 53 48 50 01 00                   // magic, version 1
    09 00                               // kind 9 InfoReply, flags
    18 00 00 00 00 00 00 00             // header_len 24 = 4 + 15 + 5 padding, reserved
    00 00 00 00 00 00 00 00             // payload_len 0
    0f 00 00 00                         // json_len 15
    7b 22 6d 6f 64 65 22 3a 22 65 63 68 6f 22 7d   // {\"mode\":\"echo\"}
    00 00 00 00 00                      // padding: 24 + 24 = 48 = 6 x 8
";

#[test]
fn golden_info_frames() {
    let info = hex(GOLDEN_INFO);
    assert_eq!(info.len(), 24);
    assert_eq!(Message::Info.encode().unwrap(), info);
    assert_eq!(decode(&info).unwrap(), Message::Info);
    let reply = hex(GOLDEN_INFO_REPLY);
    assert_eq!(reply.len(), 48);
    let msg = Message::InfoReply(r#"{"mode":"echo"}"#.to_string());
    assert_eq!(msg.encode().unwrap(), reply);
    assert_eq!(decode(&reply).unwrap(), msg);
}

#[test]
fn info_replies_must_hold_one_json_object() {
    for (json, why) in [
        ("[1, 2]", "got an array"),
        ("\"mode\"", "got a string"),
        ("3", "got a number"),
        ("null", "got null"),
        ("{\"a\": 1", "not valid JSON"),
        ("{} {}", "not valid JSON"),
        ("", "not valid JSON"),
    ] {
        // The encoder refuses it ...
        match Message::InfoReply(json.to_string()).encode() {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(why), "{json}: {m}"),
            other => panic!("{json}: {other:?}"),
        }
        // ... and so does the decoder, from a frame written by hand.
        let padded = (4 + json.len()).next_multiple_of(8);
        let mut frame = hex(GOLDEN_INFO_REPLY)[..FIXED_HEADER_LEN].to_vec();
        put_u32(&mut frame, 8, padded as u32);
        frame.extend((json.len() as u32).to_le_bytes());
        frame.extend(json.as_bytes());
        frame.resize(FIXED_HEADER_LEN + padded, 0);
        let message = frame_error(&frame);
        assert!(
            message.contains("info at byte 28") && message.contains(why),
            "{json}: {message}"
        );
    }
    // Lengths that lie, bytes that are not UTF-8, fields on an Info.
    let reply = hex(GOLDEN_INFO_REPLY);
    let with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut f = reply.clone();
        edit(&mut f);
        f
    };
    assert!(frame_error(&with(&|f| put_u32(f, 24, 21))).contains("truncated"));
    assert!(frame_error(&with(&|f| put_u32(f, 24, 20))).contains("not valid JSON"));
    assert!(frame_error(&with(&|f| put_u32(f, 24, 14))).contains("not valid JSON"));
    assert!(frame_error(&with(&|f| put_u32(f, 24, 16))).contains("not valid JSON"));
    assert!(frame_error(&with(&|f| f[30] = 0xff)).contains("not UTF-8"));
    let mut info = hex(GOLDEN_INFO);
    put_u32(&mut info, 8, 8);
    info.extend([0u8; 8]);
    assert!(decode(&info).is_err());
    assert!(Message::decode(
        &reply,
        &Limits {
            max_header_bytes: 23,
            ..Limits::default()
        }
    )
    .is_err());
}

#[test]
fn every_truncation_is_an_error() {
    for frame in frames_of_every_kind() {
        for n in 0..frame.len() {
            assert!(
                decode(&frame[..n]).is_err(),
                "{} of {} bytes decoded",
                n,
                frame.len()
            );
        }
        let mut longer = frame.clone();
        longer.push(0);
        assert!(frame_error(&longer).contains("the buffer holds"));
    }
    for n in 0..FIXED_HEADER_LEN {
        assert!(FrameHeader::parse(&hex(GOLDEN_FORWARD)[..n], &Limits::default()).is_err());
    }
}

fn put_u32(frame: &mut [u8], at: usize, v: u32) {
    frame[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(frame: &mut [u8], at: usize, v: u64) {
    frame[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The golden frame with `edit` applied.
fn golden_with(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = hex(GOLDEN_FORWARD);
    edit(&mut f);
    f
}

#[test]
fn fixed_header_lies_are_errors() {
    // Offsets in the golden frame (see GOLDEN_FORWARD).
    assert!(frame_error(&golden_with(|f| f[0] = b'X')).contains("bad magic"));
    assert!(frame_error(&golden_with(|f| f[4] = 2)).contains("unsupported version 2"));
    assert!(frame_error(&golden_with(|f| f[6] = 0)).contains("unknown message kind 0"));
    assert!(frame_error(&golden_with(|f| f[6] = 17))
        .contains("unknown message kind 17 at byte 6 (known: 1..=16)"));
    assert!(frame_error(&golden_with(|f| f[7] = 1)).contains("flags"));
    assert!(frame_error(&golden_with(|f| f[13] = 1)).contains("reserved"));
    // header_len: not padding the payload to 8, or pointing past / short of the fields.
    assert!(frame_error(&golden_with(|f| put_u32(f, 8, 97))).contains("does not pad"));
    assert!(decode(&golden_with(|f| put_u32(f, 8, 104))).is_err());
    assert!(decode(&golden_with(|f| put_u32(f, 8, 88))).is_err());
    assert!(decode(&golden_with(|f| put_u32(f, 8, u32::MAX - 7))).is_err());
    // payload_len: any other value disagrees with the buffer or the shape.
    for lie in [0, 8, 15, 17, 24, u64::MAX, u64::MAX - 119] {
        assert!(
            decode(&golden_with(|f| put_u64(f, 16, lie))).is_err(),
            "payload_len {lie}"
        );
    }
    // A frame whose body matches a lying payload_len still disagrees with the shape.
    let mut f = golden_with(|f| put_u64(f, 16, 24));
    f.extend([0u8; 8]);
    assert!(frame_error(&f).contains("payload is 24 bytes"));
}

#[test]
fn header_section_lies_are_errors() {
    // name_len 4 -> 5 and 255: fields shift or run out.
    assert!(decode(&golden_with(|f| f[56] = 5)).is_err());
    assert!(frame_error(&golden_with(|f| f[56] = 255)).contains("truncated"));
    assert!(frame_error(&golden_with(|f| f[57] = 0xff)).contains("not UTF-8"));
    assert!(frame_error(&golden_with(|f| put_u32(f, 65, 0))).contains("no layers"));
    assert!(frame_error(&golden_with(|f| put_u32(f, 61, u32::MAX))).contains("ends past"));
    // Entry count: 0, more than the section holds, and past the limit.
    assert!(decode(&golden_with(|f| put_u32(f, 69, 0))).is_err());
    assert!(frame_error(&golden_with(|f| put_u32(f, 69, 2))).contains("needs 64 bytes"));
    assert_eq!(
        too_large(
            &golden_with(|f| put_u32(f, 69, u32::MAX)),
            &Limits::default()
        ),
        "entry count"
    );
    // Entry fields: no tokens, positions past u32, tokens that disagree with the rows.
    assert!(frame_error(&golden_with(|f| put_u32(f, 101, 0))).contains("no tokens"));
    assert!(frame_error(&golden_with(|f| put_u32(f, 97, u32::MAX))).contains("overflows"));
    assert!(
        frame_error(&golden_with(|f| put_u32(f, 101, 3))).contains("2 rows, the entries 3 tokens")
    );
    // Tensor descriptor: dtype, rank, shape.
    assert!(frame_error(&golden_with(|f| f[105] = 0)).contains("byte 105: unknown tensor dtype 0"));
    assert!(frame_error(&golden_with(|f| f[105] = 4)).contains("unknown tensor dtype 4"));
    assert!(frame_error(&golden_with(|f| f[105] = 1)).contains("payload is 16 bytes")); // f32: 32
    assert!(frame_error(&golden_with(|f| f[106] = 0)).contains("rank 0"));
    assert!(frame_error(&golden_with(|f| f[106] = 5)).contains("rank 5"));
    assert!(decode(&golden_with(|f| f[106] = 1)).is_err());
    assert!(decode(&golden_with(|f| f[106] = 3)).is_err());
    assert!(frame_error(&golden_with(|f| put_u32(f, 111, 8))).contains("payload is 16 bytes"));
    assert!(
        frame_error(&golden_with(|f| put_u32(f, 111, 0))).contains("must be (tokens, hidden >= 1)")
    );
    assert!(frame_error(&golden_with(|f| put_u32(f, 107, 3))).contains("3 rows"));
    // Padding must be zero.
    assert!(frame_error(&golden_with(|f| f[117] = 1)).contains("unexplained"));
}

#[test]
fn other_kinds_reject_lies() {
    let err = Message::Error(ErrorReply {
        code: ErrorCode::WrongSpan,
        session: None,
        message: "no".into(),
    });
    let frame = err.encode().unwrap();
    // code at 24, has_session at 26, session 27..43, message_len at 43.
    let with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut f = frame.clone();
        edit(&mut f);
        f
    };
    assert!(frame_error(&with(&|f| f[24] = 0)).contains("byte 24: unknown error code 0"));
    assert!(frame_error(&with(&|f| f[24] = 15)).contains("unknown error code 15"));
    assert!(frame_error(&with(&|f| f[26] = 2)).contains("has-session flag is 2"));
    assert!(frame_error(&with(&|f| f[30] = 1)).contains("nonzero session id"));
    assert!(frame_error(&with(&|f| put_u32(f, 43, 11))).contains("truncated"));
    assert!(frame_error(&with(&|f| put_u32(f, 43, 100))).contains("truncated"));
    assert!(frame_error(&with(&|f| f[47] = 0xc3)).contains("not UTF-8"));
    // A payload on a kind without tensors.
    let mut f = Message::Ping(1).encode().unwrap();
    put_u64(&mut f, 16, 8);
    f.extend([0u8; 8]);
    assert!(frame_error(&f).contains("has no payload"));
    // CloseSession: a count past the ids present.
    let mut f = Message::CloseSession(vec![SessionId(5)]).encode().unwrap();
    put_u32(&mut f, 24, 2);
    assert!(frame_error(&f).contains("needs 32 bytes"));
}

#[test]
fn limits_are_checked_before_the_body() {
    let golden = hex(GOLDEN_FORWARD);
    let limits = |edit: fn(&mut Limits)| {
        let mut l = Limits::default();
        edit(&mut l);
        l
    };
    // The fixed header alone is enough to refuse an oversized frame.
    let small = limits(|l| l.max_frame_bytes = 135);
    match FrameHeader::parse(&golden[..FIXED_HEADER_LEN], &small) {
        Err(Error::FrameTooLarge {
            what: "frame",
            value: 136,
            limit: 135,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(too_large(&golden, &small), "frame");
    assert_eq!(
        too_large(&golden, &limits(|l| l.max_header_bytes = 88)),
        "header section"
    );
    assert_eq!(
        too_large(&golden, &limits(|l| l.max_tokens = 1)),
        "token count"
    );
    assert_eq!(
        too_large(&golden, &limits(|l| l.max_hidden = 3)),
        "hidden width"
    );
    assert_eq!(
        too_large(&golden, &limits(|l| l.max_entries = 0)),
        "entry count"
    );
    let close = Message::CloseSession(vec![SessionId(1), SessionId(2)])
        .encode()
        .unwrap();
    assert_eq!(
        too_large(&close, &limits(|l| l.max_entries = 1)),
        "entry count"
    );
    // At the limits, it decodes.
    let exact = Limits {
        max_frame_bytes: 136,
        max_header_bytes: 96,
        max_entries: 1,
        max_hidden: 4,
        max_tokens: 2,
    };
    assert!(Message::decode(&golden, &exact).is_ok());
    // A header claiming a huge payload is refused from 24 bytes, whatever follows.
    let mut huge = golden[..FIXED_HEADER_LEN].to_vec();
    put_u64(&mut huge, 16, 1 << 40);
    assert!(matches!(
        FrameHeader::parse(&huge, &Limits::default()),
        Err(Error::FrameTooLarge { .. })
    ));
    assert!(FrameHeader::parse(&huge, &Limits::unlimited()).is_ok());
}

#[test]
fn encoder_rejects_what_the_decoder_would() {
    let x = values(8);
    let t = |rows, cols| {
        Tensor::from_f32(
            &x[..rows as usize * cols as usize],
            Shape::matrix(rows, cols),
            DType::BF16,
        )
        .unwrap()
    };
    let fwd = |entries: Vec<Entry>, hidden, span, name: &str| {
        Message::Forward(Forward {
            model: ModelId {
                hash: [1; 32],
                name: name.into(),
            },
            span,
            entries,
            hidden,
        })
    };
    let span = Span {
        first_layer: 0,
        layer_count: 1,
    };
    let e = |s, n| Entry {
        session: SessionId(s),
        step: 0,
        start_pos: 0,
        n_tokens: n,
    };
    let invalid = |m: Message<'_>| matches!(m.encode(), Err(Error::InvalidArgument(_)));
    assert!(fwd(vec![e(1, 2), e(2, 2)], t(4, 2), span, "ok")
        .encode()
        .is_ok());
    assert!(invalid(fwd(vec![e(1, 2), e(1, 2)], t(4, 2), span, "dup")));
    assert!(invalid(fwd(vec![e(1, 3)], t(4, 2), span, "rows")));
    assert!(invalid(fwd(vec![], t(4, 2), span, "empty")));
    assert!(invalid(fwd(
        vec![e(1, 4)],
        t(4, 2),
        Span {
            first_layer: 0,
            layer_count: 0
        },
        "span"
    )));
    assert!(invalid(fwd(vec![e(1, 4)], t(4, 2), span, &"x".repeat(256))));
    let flat = Tensor::from_f32(&x, Shape::new(&[8]).unwrap(), DType::F32).unwrap();
    assert!(invalid(fwd(vec![e(1, 8)], flat, span, "rank")));
    assert!(matches!(
        Tensor::from_f32(&x, Shape::matrix(3, 3), DType::F32),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        TensorView::new(DType::F16, Shape::matrix(2, 2), &[0u8; 6]),
        Err(Error::Shape(_))
    ));
    assert!(Shape::new(&[]).is_err() && Shape::new(&[1, 2, 3, 4, 5]).is_err());
    assert_eq!(
        Shape::new(&[u32::MAX; 4]).unwrap().byte_len(DType::F32),
        None
    );
}

#[test]
fn encode_into_appends_the_same_bytes() {
    let mut buf = b"prefix".to_vec();
    for frame in frames_of_every_kind() {
        let msg = decode(&frame).unwrap();
        let start = buf.len();
        msg.encode_into(&mut buf).unwrap();
        assert_eq!(&buf[start..], &frame[..]);
    }
    assert_eq!(&buf[..6], b"prefix");
}

#[test]
fn names_and_codes_round_trip() {
    for k in Kind::ALL {
        assert_eq!(Kind::from_code(k as u8).unwrap(), k);
    }
    for c in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_code(c as u16).unwrap(), c);
        assert_eq!(ErrorCode::from_name(c.name()).unwrap(), c);
    }
    assert!(ErrorCode::from_name("nope").is_err());
    for d in [DType::F32, DType::F16, DType::BF16] {
        assert_eq!(DType::from_code(d as u8).unwrap(), d);
        assert_eq!(DType::from_name(&d.name().to_uppercase()).unwrap(), d);
    }
    let overflow = Error::ContextOverflow {
        needed: 10,
        limit: 8,
    };
    let reply = ErrorReply::from_error(&overflow, Some(SessionId(3)));
    assert_eq!(
        (reply.code, reply.session),
        (ErrorCode::ContextOverflow, Some(SessionId(3)))
    );
    assert_eq!(
        ErrorCode::for_error(&Error::Frame("x".into())),
        ErrorCode::MalformedFrame
    );
    assert_eq!(
        ErrorCode::for_error(&Error::FrameTooLarge {
            what: "frame",
            value: 2,
            limit: 1
        }),
        ErrorCode::FrameTooLarge
    );
    assert_eq!(SessionId(0xab).to_string(), format!("{:0>32}", "ab"));
    assert_eq!(model().to_string(), "tiny@000102030405");
}
