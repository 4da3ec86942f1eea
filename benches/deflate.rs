//! permessage-deflate cost per message: compressing and decompressing one message with
//! deflate on, against deflate off (the payload copied as it is, which is what the
//! uncompressed path costs at most).
//!
//! Ids are `<op>/<data>/<mode>/<size>`: data `json` (repeated realistic records) or
//! `random` (like tunnelled TLS); mode `deflate` (level 1, no context takeover, always
//! tried), `adaptive` (the default config: backs off on incompressible data) or `off`.
//! Throughput is counted in uncompressed payload bytes. Random data never goes out
//! compressed, so its receiving side is the `off` case and is not measured twice.
//!
//! `cargo bench --bench deflate -- --warm-up-time 1 --measurement-time 2`

use anyproxy::transport::ws::deflate::{Compressor, Decompressor, DeflateParams};
use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

const SIZES: [(usize, &str); 3] = [(1024, "1KiB"), (16 * 1024, "16KiB"), (64 * 1024, "64KiB")];

fn params(adaptive: bool) -> DeflateParams {
    DeflateParams {
        compress_window_bits: 15,
        compress_reset: true,
        decompress_reset: true,
        level: 1,
        min_size: 0,
        adaptive,
        worth_pct: 100,
    }
}

/// JSON records with varying values, as an API behind the tunnel would send them.
fn json(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 256);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut i = 0u64;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(
            format!(
                r#"{{"id":{i},"name":"user-{}","email":"user{}@example.com","active":{},"roles":["reader","writer"],"created":"2024-05-{:02}T12:{:02}:{:02}Z","score":0.{:04}}},"#,
                x % 100_000,
                x % 100_000,
                x % 2 == 0,
                1 + x % 28,
                x % 60,
                (x >> 8) % 60,
                x % 10_000
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

fn random(len: usize) -> Vec<u8> {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

fn compress(c: &mut Criterion) {
    for (data, make) in [("json", json as fn(usize) -> Vec<u8>), ("random", random)] {
        let mut group = c.benchmark_group(format!("compress/{data}"));
        for (len, label) in SIZES {
            let msg = make(len);
            group.throughput(Throughput::Bytes(len as u64));
            for (mode, adaptive) in [("deflate", false), ("adaptive", true)] {
                let mut comp = Compressor::new(&params(adaptive)).expect("15-bit window");
                if let Some(out) = comp.compress(&msg) {
                    eprintln!("{data} {label}: {len} -> {} bytes", out.len());
                }
                group.bench_function(format!("{mode}/{label}"), |b| {
                    b.iter(|| black_box(comp.compress(black_box(&msg)).map(|o| o.len())))
                });
            }
            let mut out = Vec::with_capacity(len);
            group.bench_function(format!("off/{label}"), |b| {
                b.iter(|| {
                    out.clear();
                    out.extend_from_slice(black_box(&msg));
                    black_box(out.len())
                })
            });
        }
        group.finish();
    }
}

fn decompress(c: &mut Criterion) {
    let mut group = c.benchmark_group("decompress/json");
    for (len, label) in SIZES {
        let msg = json(len);
        let mut comp = Compressor::new(&params(false)).expect("15-bit window");
        let wire = comp.compress(&msg).expect("JSON compresses").to_vec();
        let mut decomp = Decompressor::new(&params(false));
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(format!("deflate/{label}"), |b| {
            b.iter(|| {
                let out = decomp.decompress(black_box(&wire), 1 << 20).expect("valid");
                black_box(out.len())
            })
        });
        group.bench_function(format!("off/{label}"), |b| {
            b.iter(|| black_box(Bytes::copy_from_slice(black_box(&msg)).len()))
        });
    }
    group.finish();
}

criterion_group!(benches, compress, decompress);
criterion_main!(benches);
