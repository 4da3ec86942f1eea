//! permessage-deflate (RFC 7692): the compressor with its adaptive
//! strategy, and the capped decompressor. Negotiation lives in [`extension`].

pub mod extension;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::{DeflateConfig, MAX_WINDOW_BITS, MIN_WINDOW_BITS};
use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// What a sync flush leaves at the end of every compressed message; RFC 7692 §7.2.1
/// strips it on the wire and §7.2.2 appends it again before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What the handshake agreed on, from our point of view, plus the local tuning knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// Window of our compressor; below [`MIN_WINDOW_BITS`] we never compress (zlib
    /// cannot honour such a limit, but uncompressed messages always comply).
    pub compress_window_bits: u8,
    /// We start every message we compress with an empty history.
    pub compress_reset: bool,
    /// The peer starts every message with an empty history, so our inflater may too.
    pub decompress_reset: bool,
    pub level: u32,
    pub min_size: usize,
    pub adaptive: bool,
    /// The adaptive back-off counts a message as compressible only when it shrinks to
    /// at most this share of its size (percent). See [`DeflateParams::for_encoding`].
    pub worth_pct: u8,
}

impl DeflateParams {
    /// The threshold the encoding needs. Binary: any saving. JSON mode's data is
    /// base64, whose 4 characters carry 3 bytes: random bytes (tunnelled TLS, the common
    /// case) deflate to about 76 % of their text by merely undoing the encoding, at the
    /// full CPU cost of deflate. A JSON message must therefore save at least a third to
    /// count; base64 of text and JSON bodies save far more.
    pub fn for_encoding(mut self, encoding: anyproxy_proto::Encoding) -> Self {
        self.worth_pct = match encoding {
            anyproxy_proto::Encoding::Binary => 100,
            anyproxy_proto::Encoding::Json => JSON_WORTH_PCT,
        };
        self
    }
}

/// JSON mode's threshold (see [`DeflateParams::for_encoding`]).
pub const JSON_WORTH_PCT: u8 = 66;

impl DeflateParams {
    fn tuning(config: &DeflateConfig) -> (u32, usize, bool) {
        (
            config.level.clamp(1, 9),
            usize::try_from(config.min_size.0).unwrap_or(usize::MAX),
            config.adaptive,
        )
    }
}

/// Counters of one writer's compressor; relaxed atomics so that a metrics task can
/// read them while the writer task updates them.
#[derive(Debug, Default)]
pub struct CompressionCounters {
    raw_bytes: AtomicU64,
    wire_bytes: AtomicU64,
    compressed: AtomicU64,
    skipped: AtomicU64,
    incompressible: AtomicU64,
}

/// A snapshot of [`CompressionCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompressionStats {
    /// Data-message payload bytes handed to the writer.
    pub raw_bytes: u64,
    /// The same messages' payload bytes as sent (compressed or not).
    pub wire_bytes: u64,
    /// Messages sent compressed (RSV1 set).
    pub compressed: u64,
    /// Messages sent as they were without trying: too small, or backing off.
    pub skipped: u64,
    /// Messages we tried to compress that did not get smaller.
    pub incompressible: u64,
}

impl CompressionCounters {
    pub fn snapshot(&self) -> CompressionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CompressionStats {
            raw_bytes: get(&self.raw_bytes),
            wire_bytes: get(&self.wire_bytes),
            compressed: get(&self.compressed),
            skipped: get(&self.skipped),
            incompressible: get(&self.incompressible),
        }
    }

    fn count(&self, which: &AtomicU64, raw: usize, wire: usize) {
        which.fetch_add(1, Ordering::Relaxed);
        self.raw_bytes.fetch_add(raw as u64, Ordering::Relaxed);
        self.wire_bytes.fetch_add(wire as u64, Ordering::Relaxed);
    }
}

/// Consecutive incompressible messages before the compressor backs off.
const BACKOFF_AFTER: u32 = 4;
/// Bytes sent without trying after the first back-off; doubles on each failed probe.
const BACKOFF_FIRST: u64 = 64 << 10;
const BACKOFF_MAX: u64 = 16 << 20;

/// The adaptive part: tunnelled TLS never compresses, and trying costs a full deflate
/// pass per message, so after a run of failures we skip a growing number of bytes and
/// then probe with one message.
#[derive(Debug)]
struct Backoff {
    failures: u32,
    skip_left: u64,
    next_skip: u64,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            failures: 0,
            skip_left: 0,
            next_skip: BACKOFF_FIRST,
        }
    }

    /// Whether to send this message without trying.
    fn skip(&mut self, len: usize) -> bool {
        if self.skip_left == 0 {
            return false;
        }
        self.skip_left = self.skip_left.saturating_sub(len as u64);
        true
    }

    fn success(&mut self) {
        self.failures = 0;
        self.next_skip = BACKOFF_FIRST;
    }

    fn failure(&mut self) {
        self.failures += 1;
        if self.failures >= BACKOFF_AFTER {
            self.skip_left = self.next_skip;
            self.next_skip = (self.next_skip * 2).min(BACKOFF_MAX);
            // One failed probe after the pause is enough to back off again.
            self.failures = BACKOFF_AFTER - 1;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeflateError {
    #[error("decompressed message larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("invalid compressed data: {0}")]
    Corrupt(String),
}

/// The sending side of RFC 7692 §7.2.1.
pub struct Compressor {
    inner: Compress,
    level: Compression,
    bits: u8,
    reset_each: bool,
    min_size: usize,
    backoff: Option<Backoff>,
    worth_pct: u8,
    /// Output buffer, kept initialised and reused so that compressing never allocates
    /// once it has grown to the largest message.
    out: Vec<u8>,
    counters: Arc<CompressionCounters>,
}

impl Compressor {
    /// `None` when the agreed window is one zlib cannot produce: then we never compress.
    pub fn new(params: &DeflateParams) -> Option<Self> {
        let bits = params.compress_window_bits;
        if !(MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&bits) {
            return None;
        }
        let level = Compression::new(params.level.clamp(1, 9));
        Some(Compressor {
            inner: Compress::new_with_window_bits(level, false, bits),
            level,
            bits,
            reset_each: params.compress_reset,
            min_size: params.min_size,
            backoff: params.adaptive.then(Backoff::new),
            worth_pct: params.worth_pct,
            out: Vec::new(),
            counters: Arc::default(),
        })
    }

    pub fn counters(&self) -> &Arc<CompressionCounters> {
        &self.counters
    }

    /// Compresses one whole message. `Some(bytes)`: send them with RSV1 set (the slice is
    /// ours to mask in place). `None`: send the message as it is, RSV1 clear.
    pub fn compress(&mut self, msg: &[u8]) -> Option<&mut [u8]> {
        let n = msg.len();
        let c = &self.counters;
        if n < self.min_size || self.backoff.as_mut().is_some_and(|b| b.skip(n)) {
            c.count(&c.skipped, n, n);
            return None;
        }
        // A panic inside zlib-rs must not take the session down: the message goes out
        // uncompressed and the compressor starts afresh.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.deflate(msg)))
            .unwrap_or(Outcome::Broken);
        match outcome {
            Outcome::Smaller(len) => {
                if self.reset_each {
                    self.inner.reset();
                }
                // Sent compressed either way (the work is done), but a saving too small
                // for what it cost counts toward backing off.
                if let Some(b) = &mut self.backoff {
                    if len * 100 <= n * usize::from(self.worth_pct) {
                        b.success();
                    } else {
                        b.failure();
                    }
                }
                self.counters.count(&self.counters.compressed, n, len);
                Some(&mut self.out[..len])
            }
            Outcome::NotSmaller | Outcome::Broken => {
                // The peer will not see what the compressor just consumed, so its
                // history must go too, or the next message would refer to bytes the
                // peer never had.
                if outcome == Outcome::Broken {
                    self.inner = Compress::new_with_window_bits(self.level, false, self.bits);
                } else {
                    self.inner.reset();
                }
                if let Some(b) = &mut self.backoff {
                    b.failure();
                }
                self.counters.count(&self.counters.incompressible, n, n);
                None
            }
        }
    }

    /// Deflates `msg` into `self.out` with a sync flush.
    ///
    /// The flush always runs to its end, even once the output is known to be too large:
    /// zlib-rs 0.6.8 at level 1 panics on the next call when a stream is reset with a
    /// flush still pending. The buffer starts at the worst case of level 1 (fixed-Huffman
    /// literals, +12.5%), so one call nearly always does it.
    fn deflate(&mut self, msg: &[u8]) -> Outcome {
        let mut room = msg.len() + msg.len() / 8 + 64;
        let (in0, out0) = (self.inner.total_in(), self.inner.total_out());
        loop {
            if self.out.len() < room {
                self.out.resize(room, 0);
            }
            let consumed = (self.inner.total_in() - in0) as usize;
            let used = (self.inner.total_out() - out0) as usize;
            let status = self.inner.compress(
                &msg[consumed..],
                &mut self.out[used..room],
                FlushCompress::Sync,
            );
            let progress = (self.inner.total_in() - in0) as usize != consumed
                || (self.inner.total_out() - out0) as usize != used;
            let consumed = (self.inner.total_in() - in0) as usize;
            let used = (self.inner.total_out() - out0) as usize;
            // Done once all input is in and the flush left room to spare (zlib's rule
            // for "no output pending").
            if consumed == msg.len() && used < room {
                return match used.checked_sub(TAIL.len()) {
                    Some(len) if self.out[len..used] == TAIL => {
                        if len < msg.len() {
                            Outcome::Smaller(len)
                        } else {
                            Outcome::NotSmaller
                        }
                    }
                    _ => Outcome::Broken,
                };
            }
            match status {
                Ok(Status::Ok) | Ok(Status::BufError) if progress || used == room => {}
                _ => return Outcome::Broken,
            }
            if used == room {
                room *= 2;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Smaller(usize),
    NotSmaller,
    /// zlib failed; its state is unknown.
    Broken,
}

/// The receiving side of RFC 7692 §7.2.2, fed one frame at a time so that fragmented
/// messages are never copied whole before inflating.
pub struct Decompressor {
    inner: Decompress,
    reset_each: bool,
    /// The peer ended its deflate stream (BFINAL) inside this message.
    ended: bool,
}

impl Decompressor {
    pub fn new(params: &DeflateParams) -> Self {
        Decompressor {
            // 15 bits reads any window the peer may use.
            inner: Decompress::new_with_window_bits(false, MAX_WINDOW_BITS),
            reset_each: params.decompress_reset,
            ended: false,
        }
    }

    /// Inflates one whole message (single-frame case).
    pub fn decompress(&mut self, compressed: &[u8], max: usize) -> Result<Bytes, DeflateError> {
        let mut out = Vec::new();
        self.feed(compressed, &mut out, max)?;
        self.finish(&mut out, max)?;
        Ok(Bytes::from(out))
    }

    /// Inflates a piece of the current message, appending to `out`, and fails as soon as
    /// `out` would exceed `max`: a zip bomb is never inflated beyond the cap.
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<(), DeflateError> {
        if self.ended {
            // Anything after a final block (typically the appended tail) is ignored.
            return Ok(());
        }
        let in0 = self.inner.total_in();
        loop {
            if out.len() == out.capacity() {
                if out.len() >= max.saturating_add(1) {
                    return Err(DeflateError::TooLarge { max });
                }
                let want = out.len().max(input.len() * 2).max(4096);
                out.reserve_exact(want.min((max - out.len()).saturating_add(1)));
            }
            let consumed = (self.inner.total_in() - in0) as usize;
            let before = (self.inner.total_in(), out.len());
            // The input is the peer's: a panic in zlib-rs must end in an error, not
            // in a dead task.
            let status = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.inner
                    .decompress_vec(&input[consumed..], out, FlushDecompress::Sync)
            }))
            .map_err(|_| DeflateError::Corrupt("inflate panicked".into()))?
            .map_err(|e| DeflateError::Corrupt(e.to_string()))?;
            if out.len() > max {
                return Err(DeflateError::TooLarge { max });
            }
            if status == Status::StreamEnd {
                self.ended = true;
                return Ok(());
            }
            let consumed = (self.inner.total_in() - in0) as usize;
            if consumed == input.len() && out.len() < out.capacity() {
                return Ok(());
            }
            if before == (self.inner.total_in(), out.len()) && out.len() < out.capacity() {
                return Err(DeflateError::Corrupt("inflate made no progress".into()));
            }
        }
    }

    /// Ends the current message: appends the stripped tail and resets when the history
    /// cannot or need not carry over.
    pub fn finish(&mut self, out: &mut Vec<u8>, max: usize) -> Result<(), DeflateError> {
        let result = self.feed(&TAIL, out, max);
        if self.reset_each || self.ended || result.is_err() {
            self.inner.reset(false);
            self.ended = false;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn params(window: u8, reset: bool) -> DeflateParams {
        DeflateParams {
            compress_window_bits: window,
            compress_reset: reset,
            decompress_reset: reset,
            level: 1,
            min_size: 0,
            adaptive: false,
            worth_pct: 100,
        }
    }

    #[test]
    fn rfc7692_hello() {
        let mut c = Compressor::new(&params(15, true)).unwrap();
        // Seven bytes for five: `compress` would send it as it is.
        assert_eq!(c.deflate(b"Hello"), Outcome::NotSmaller);
        assert_eq!(c.out[..7], [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
        c.inner.reset();
        assert!(c.compress(b"Hello").is_none());
        let mut d = Decompressor::new(&params(15, true));
        let out = d
            .decompress(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 100)
            .unwrap();
        assert_eq!(&out[..], b"Hello");
    }

    #[test]
    fn round_trips_with_and_without_context_takeover() {
        for window in [9, 12, 15] {
            for reset in [false, true] {
                let mut c = Compressor::new(&params(window, reset)).unwrap();
                let mut d = Decompressor::new(&params(window, reset));
                let msg = br#"{"type":"data","id":42,"payload":"aGVsbG8gd29ybGQ="}"#.repeat(20);
                let mut sizes = Vec::new();
                for _ in 0..3 {
                    let wire = c.compress(&msg).expect("compressible").to_vec();
                    sizes.push(wire.len());
                    assert_eq!(&d.decompress(&wire, 1 << 20).unwrap()[..], &msg[..]);
                }
                if !reset && window == 15 {
                    // The shared history makes repeats nearly free.
                    assert!(sizes[1] < sizes[0] / 2, "{window} {sizes:?}");
                }
            }
        }
    }

    #[test]
    fn incompressible_goes_raw_and_resets_history() {
        let mut c = Compressor::new(&params(15, false)).unwrap();
        let mut d = Decompressor::new(&params(15, false));
        let noise: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
        assert!(c.compress(&noise).is_none());
        // Had the compressor kept `noise` in its window, this would refer to it.
        let mut msg = noise[..1024].to_vec();
        msg.extend_from_slice(&[b'a'; 2048]);
        let wire = c.compress(&msg).expect("compressible").to_vec();
        assert_eq!(&d.decompress(&wire, 1 << 20).unwrap()[..], &msg[..]);
        assert_eq!(c.counters().snapshot().incompressible, 1);
    }

    #[test]
    fn small_messages_are_not_tried() {
        let mut p = params(15, true);
        p.min_size = 256;
        let mut c = Compressor::new(&p).unwrap();
        assert!(c.compress(&[b'a'; 255]).is_none());
        assert!(c.compress(&[b'a'; 256]).is_some());
        let s = c.counters().snapshot();
        assert_eq!((s.skipped, s.compressed), (1, 1));
        assert_eq!(s.raw_bytes, 511);
        assert!(s.wire_bytes < 300);
    }

    #[test]
    fn adaptive_backoff_engages_doubles_and_recovers() {
        let mut p = params(15, true);
        p.adaptive = true;
        let mut c = Compressor::new(&p).unwrap();
        let noise: Vec<u8> = (0..16 << 10).map(|_| rand::random::<u8>()).collect();
        for _ in 0..BACKOFF_AFTER {
            assert!(c.compress(&noise).is_none());
        }
        assert_eq!(c.counters().snapshot().incompressible, 4);
        // 64 KiB are skipped: four 16 KiB messages.
        for _ in 0..4 {
            assert!(c.compress(&noise).is_none());
        }
        assert_eq!(c.counters().snapshot().skipped, 4);
        // One failed probe, then twice as long a pause.
        assert!(c.compress(&noise).is_none());
        assert_eq!(c.counters().snapshot().incompressible, 5);
        for _ in 0..8 {
            assert!(c.compress(&noise).is_none());
        }
        assert_eq!(c.counters().snapshot().skipped, 12);
        // A compressible probe ends the back-off.
        assert!(c.compress(&[b'x'; 16 << 10]).is_some());
        assert!(c.compress(&[b'y'; 1024]).is_some());
    }

    /// JSON mode: base64 of random bytes (tunnelled TLS) shrinks by undoing the encoding
    /// alone; it must not keep the compressor busy. Base64 of text still compresses.
    #[test]
    fn json_mode_backs_off_from_base64_noise_and_keeps_compressing_text() {
        use base64::Engine;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        // Each message a different block (with context takeover a repeated one would
        // compress to nothing).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = || {
            let block: Vec<u8> = (0..12 << 10)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            b64(&block)
        };
        let mut p = params(15, false).for_encoding(anyproxy_proto::Encoding::Json);
        p.adaptive = true;
        let mut c = Compressor::new(&p).unwrap();
        for _ in 0..BACKOFF_AFTER {
            // Sent compressed (it did shrink), but counted as not worth it.
            assert!(c.compress(noise().as_bytes()).is_some());
        }
        assert!(c.compress(noise().as_bytes()).is_none(), "did not back off");
        assert_eq!(c.counters().snapshot().skipped, 1);
        // Binary mode's threshold would have kept deflating the same text.
        let mut p = params(15, false).for_encoding(anyproxy_proto::Encoding::Binary);
        p.adaptive = true;
        let mut binary = Compressor::new(&p).unwrap();
        for _ in 0..BACKOFF_AFTER + 1 {
            assert!(binary.compress(noise().as_bytes()).is_some());
        }
        // JSON text in base64 saves well over a third: never backed off.
        let body: Vec<u8> = (0..300)
            .flat_map(|i| {
                format!("{{\"id\":{i},\"name\":\"user{i}\",\"active\":true}},").into_bytes()
            })
            .collect();
        let text = b64(&body);
        let mut p = params(15, false).for_encoding(anyproxy_proto::Encoding::Json);
        p.adaptive = true;
        let mut c = Compressor::new(&p).unwrap();
        for _ in 0..2 * BACKOFF_AFTER {
            let wire = c.compress(text.as_bytes()).expect("compressed").len();
            assert!(wire * 3 <= text.len(), "{wire} of {}", text.len());
        }
        assert_eq!(c.counters().snapshot().skipped, 0);
    }

    #[test]
    fn zip_bomb_stops_at_the_cap() {
        let mut c = Compressor::new(&params(15, true)).unwrap();
        let zeros = vec![0u8; 8 << 20];
        let wire = c.compress(&zeros).unwrap().to_vec();
        let mut d = Decompressor::new(&params(15, true));
        let mut out = Vec::new();
        let err = d.feed(&wire, &mut out, 1 << 20).unwrap_err();
        assert!(matches!(err, DeflateError::TooLarge { .. }), "{err}");
        assert!(out.capacity() <= (1 << 20) + 1, "{}", out.capacity());
    }

    #[test]
    fn garbage_never_panics() {
        let mut d = Decompressor::new(&params(15, false));
        for i in 0..2000 {
            let len = 1 + i % 300;
            let junk: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
            let mut out = Vec::new();
            let r = d
                .feed(&junk[..len / 2], &mut out, 4096)
                .and_then(|()| d.feed(&junk[len / 2..], &mut out, 4096))
                .and_then(|()| d.finish(&mut out, 4096));
            if r.is_err() {
                d = Decompressor::new(&params(15, false));
            }
            assert!(out.len() <= 4096);
        }
    }

    #[test]
    fn corrupt_input_is_an_error() {
        let mut d = Decompressor::new(&params(15, true));
        assert!(d.decompress(&[0xff, 0xff, 0xff, 0xff, 0xff], 100).is_err());
    }

    #[test]
    fn config_defaults_and_validation() {
        let c: DeflateConfig = yaml_serde::from_str("enabled: true").unwrap();
        assert!(c.enabled && c.no_context_takeover && c.adaptive);
        assert_eq!((c.level, c.min_size.0, c.max_window_bits), (1, 256, 15));
        c.validate().unwrap();
        let c: DeflateConfig = yaml_serde::from_str("level: 10").unwrap();
        assert!(c.validate().unwrap_err().contains("deflate.level"));
        let c: DeflateConfig = yaml_serde::from_str("max_window_bits: 8").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .contains("deflate.max_window_bits"));
        assert!(yaml_serde::from_str::<DeflateConfig>("levle: 1").is_err());
        let c: DeflateConfig = yaml_serde::from_str("min_size: 1KiB").unwrap();
        assert_eq!(c.min_size.0, 1024);
    }
}
