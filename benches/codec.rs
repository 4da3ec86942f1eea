//! Codec throughput: encode and decode of `data` messages in both encodings.
//!
//! Benchmark ids are `<op>/<encoding>/<size>`, e.g. `encode/json/1KiB`; throughput is
//! counted in payload bytes.
//!
//! `cargo bench --bench codec -- --warm-up-time 1 --measurement-time 3`

use anyproxy_proto::{binary, json, ConnId, Data, Message};
use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

const SIZES: [(usize, &str); 4] = [
    (64, "64B"),
    (1024, "1KiB"),
    (16 * 1024, "16KiB"),
    (64 * 1024, "64KiB"),
];

fn data_message(len: usize) -> Message {
    // Not UTF-8 and not compressible: like tunnelled TLS.
    let payload: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0])
        .collect();
    Message::Data(Data {
        id: ConnId(123_456),
        payload: Bytes::from(payload),
    })
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode/json");
    for (len, label) in SIZES {
        let msg = data_message(len);
        let mut out = Vec::with_capacity(len * 2);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(label, |b| {
            b.iter(|| {
                out.clear();
                json::encode_into(black_box(&msg), &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("encode/binary");
    for (len, label) in SIZES {
        let msg = data_message(len);
        let mut out = BytesMut::with_capacity(len * 2);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(label, |b| {
            b.iter(|| {
                out.clear();
                binary::encode_into(black_box(&msg), &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode/json");
    for (len, label) in SIZES {
        let wire = json::encode(&data_message(len));
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(label, |b| {
            b.iter(|| json::decode(black_box(&wire)).expect("valid"))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode/binary");
    for (len, label) in SIZES {
        let wire = binary::encode(&data_message(len));
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(label, |b| {
            b.iter(|| {
                // Cloning `Bytes` is a reference-count bump, as when a received WebSocket
                // message is handed to the decoder.
                let mut buf = black_box(&wire).clone();
                binary::decode_frame(&mut buf).expect("valid")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, encode, decode);
criterion_main!(benches);
