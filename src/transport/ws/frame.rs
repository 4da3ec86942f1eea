//! Our own RFC 6455 frame layer, for sessions that negotiated permessage-deflate
//! (fastwebsockets rejects RSV1). Reads are buffered (64 KiB at a time); payloads are
//! unmasked in place and handed out without copying where the message is one frame.

use std::io::IoSlice;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::deflate::{CompressionCounters, Compressor, Decompressor, DeflateError, DeflateParams};
use super::{close_reason, Incoming, WsError};

/// Smallest read from the stream.
const READ_CHUNK: usize = 64 << 10;
/// Payloads up to this size are copied next to their header and written in one call:
/// over TLS every write becomes a record of its own.
const COALESCE: usize = 4096;
const MAX_CONTROL: usize = 125;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const RSV23: u8 = 0x30;
const MASK: u8 = 0x80;

fn protocol(msg: &str) -> WsError {
    WsError::Protocol(msg.to_owned())
}

#[derive(Debug, Clone, Copy)]
struct Head {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    /// Bytes of the header itself.
    size: usize,
}

/// Parses a frame header from the start of `buf`; `None` until it is complete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, WsError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & RSV23 != 0 {
        return Err(protocol("RSV2/RSV3 set"));
    }
    let (len, mut size) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let mask = if b1 & MASK != 0 {
        match buf
            .get(size..size + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
        {
            Some(key) => {
                size += 4;
                Some(key)
            }
            None => return Ok(None),
        }
    } else {
        None
    };
    Ok(Some(Head {
        fin: b0 & FIN != 0,
        rsv1: b0 & RSV1 != 0,
        opcode: b0 & 0x0f,
        mask,
        len,
        size,
    }))
}

/// XORs `buf` with the 4-byte key, eight bytes at a time.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        if let Ok(bytes) = <[u8; 8]>::try_from(&*chunk) {
            chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ wide).to_ne_bytes());
        }
    }
    // The remainder starts at a multiple of 8, so the key phase is 0 again.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

fn check_utf8(text: bool, payload: &[u8]) -> Result<(), WsError> {
    if text && std::str::from_utf8(payload).is_err() {
        return Err(WsError::InvalidUtf8);
    }
    Ok(())
}

fn inflate_err(e: DeflateError) -> WsError {
    match e {
        DeflateError::TooLarge { max } => WsError::TooLarge { max },
        DeflateError::Corrupt(msg) => WsError::Protocol(msg),
    }
}

/// A data message whose first frame has arrived but not its last.
struct Partial {
    text: bool,
    compressed: bool,
    /// Payload bytes received on the wire so far (the compressed size).
    wire: usize,
    data: Vec<u8>,
}

pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    /// Servers require masked frames; clients refuse them.
    server: bool,
    max_message: usize,
    inflater: Option<Decompressor>,
    partial: Option<Partial>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, server: bool, max_message: usize, deflate: Option<&DeflateParams>) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            server,
            max_message,
            inflater: deflate.map(Decompressor::new),
            partial: None,
        }
    }

    /// Reads until `buf` holds at least `need` bytes.
    async fn fill(&mut self, need: usize) -> Result<(), WsError> {
        while self.buf.len() < need {
            self.buf.reserve(READ_CHUNK.max(need - self.buf.len()));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(WsError::Closed);
            }
        }
        Ok(())
    }

    fn check(&self, h: &Head) -> Result<(), WsError> {
        match (self.server, h.mask.is_some()) {
            (true, false) => return Err(protocol("unmasked frame from a client")),
            (false, true) => return Err(protocol("masked frame from a server")),
            _ => {}
        }
        match h.opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !h.fin {
                    return Err(protocol("fragmented control frame"));
                }
                if h.len > MAX_CONTROL as u64 {
                    return Err(protocol("control frame longer than 125 bytes"));
                }
                if h.rsv1 {
                    return Err(protocol("RSV1 on a control frame"));
                }
            }
            OP_TEXT | OP_BINARY => {
                if self.partial.is_some() {
                    return Err(protocol("new message inside a fragmented message"));
                }
                if h.rsv1 && self.inflater.is_none() {
                    return Err(protocol("RSV1 set without permessage-deflate"));
                }
            }
            OP_CONTINUATION => {
                if self.partial.is_none() {
                    return Err(protocol("continuation without a message"));
                }
                if h.rsv1 {
                    return Err(protocol("RSV1 on a continuation frame"));
                }
            }
            _ => return Err(protocol("reserved opcode")),
        }
        Ok(())
    }

    /// The next message or control frame. Not cancel-safe: give the reader its own task.
    pub async fn next(&mut self) -> Result<Incoming, WsError> {
        loop {
            let head = loop {
                if let Some(h) = parse_head(&self.buf)? {
                    break h;
                }
                self.fill(self.buf.len() + 1).await?;
            };
            self.check(&head)?;
            // The compressed size is capped here, before the payload is buffered.
            let room = match head.opcode {
                OP_TEXT | OP_BINARY => self.max_message,
                OP_CONTINUATION => {
                    let so_far = self.partial.as_ref().map_or(0, |p| p.wire);
                    self.max_message.saturating_sub(so_far)
                }
                // Checked above; control frames do not count towards a message.
                _ => MAX_CONTROL,
            };
            let len = usize::try_from(head.len)
                .ok()
                .filter(|&len| len <= room)
                .ok_or(WsError::TooLarge {
                    max: self.max_message,
                })?;
            self.fill(head.size + len).await?;
            self.buf.advance(head.size);
            if let Some(key) = head.mask {
                apply_mask(&mut self.buf[..len], key);
            }
            if let Some(incoming) = self.frame(head, len)? {
                return Ok(incoming);
            }
        }
    }

    /// Consumes one frame of `len` bytes (unmasked, at the start of `buf`).
    fn frame(&mut self, head: Head, len: usize) -> Result<Option<Incoming>, WsError> {
        let max = self.max_message;
        match head.opcode {
            OP_PING => return Ok(Some(Incoming::Ping(self.buf.split_to(len).freeze()))),
            OP_PONG => {
                self.buf.advance(len);
                return Ok(Some(Incoming::Pong));
            }
            OP_CLOSE => {
                let p = self.buf.split_to(len);
                return match p.len() {
                    0 => Ok(Some(Incoming::Close {
                        code: None,
                        reason: String::new(),
                    })),
                    1 => Err(protocol("close frame with a 1-byte payload")),
                    _ => Ok(Some(Incoming::Close {
                        code: Some(u16::from_be_bytes([p[0], p[1]])),
                        reason: String::from_utf8_lossy(&p[2..]).into_owned(),
                    })),
                };
            }
            OP_TEXT | OP_BINARY => {
                let text = head.opcode == OP_TEXT;
                let mut partial = Partial {
                    text,
                    compressed: head.rsv1,
                    wire: 0,
                    data: Vec::new(),
                };
                if head.fin {
                    let payload = match (&mut self.inflater, head.rsv1) {
                        (Some(inflater), true) => {
                            let out = inflater.decompress(&self.buf[..len], max);
                            self.buf.advance(len);
                            out.map_err(inflate_err)?
                        }
                        // One uncompressed frame: the payload leaves without a copy.
                        _ => self.buf.split_to(len).freeze(),
                    };
                    check_utf8(text, &payload)?;
                    return Ok(Some(Incoming::Message { text, payload }));
                }
                self.append(&mut partial, len)?;
                self.partial = Some(partial);
            }
            _ => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(protocol("continuation without a message"));
                };
                self.append(&mut partial, len)?;
                if !head.fin {
                    self.partial = Some(partial);
                    return Ok(None);
                }
                if partial.compressed {
                    if let Some(inflater) = &mut self.inflater {
                        inflater
                            .finish(&mut partial.data, max)
                            .map_err(inflate_err)?;
                    }
                }
                check_utf8(partial.text, &partial.data)?;
                return Ok(Some(Incoming::Message {
                    text: partial.text,
                    payload: Bytes::from(partial.data),
                }));
            }
        }
        Ok(None)
    }

    fn append(&mut self, partial: &mut Partial, len: usize) -> Result<(), WsError> {
        partial.wire += len;
        let chunk = &self.buf[..len];
        let result = match (&mut self.inflater, partial.compressed) {
            (Some(inflater), true) => inflater
                .feed(chunk, &mut partial.data, self.max_message)
                .map_err(inflate_err),
            _ => {
                partial.data.extend_from_slice(chunk);
                Ok(())
            }
        };
        self.buf.advance(len);
        result
    }
}

/// Writes `head` then `payload`, coalescing small payloads into one write.
async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    scratch: &mut Vec<u8>,
    mask: bool,
    first_byte: u8,
    payload: &mut [u8],
) -> Result<(), WsError> {
    let mut head = [0u8; 14];
    head[0] = first_byte;
    let len = payload.len();
    let mut size = 2;
    if len <= 125 {
        head[1] = len as u8;
    } else if let Ok(short) = u16::try_from(len) {
        head[1] = 126;
        head[2..4].copy_from_slice(&short.to_be_bytes());
        size = 4;
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        size = 10;
    }
    if mask {
        let key: [u8; 4] = rand::random();
        head[1] |= MASK;
        head[size..size + 4].copy_from_slice(&key);
        size += 4;
        apply_mask(payload, key);
    }
    let head = &head[..size];
    if len <= COALESCE {
        scratch.clear();
        scratch.extend_from_slice(head);
        scratch.extend_from_slice(payload);
        io.write_all(scratch).await?;
        return Ok(());
    }
    let mut written = 0;
    while written < size {
        let n = io
            .write_vectored(&[IoSlice::new(&head[written..]), IoSlice::new(payload)])
            .await?;
        if n == 0 {
            return Err(WsError::Io(std::io::ErrorKind::WriteZero.into()));
        }
        written += n;
    }
    io.write_all(&payload[written - size..]).await?;
    Ok(())
}

pub struct FrameWriter<W> {
    io: W,
    /// Clients mask every frame (RFC 6455 §5.3).
    mask: bool,
    deflater: Option<Compressor>,
    scratch: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(io: W, server: bool, deflate: Option<&DeflateParams>) -> Self {
        FrameWriter {
            io,
            mask: !server,
            deflater: deflate.and_then(Compressor::new),
            scratch: Vec::with_capacity(COALESCE + 14),
        }
    }

    pub fn counters(&self) -> Option<Arc<CompressionCounters>> {
        self.deflater.as_ref().map(|d| d.counters().clone())
    }

    /// One data message, in one frame; compressed (RSV1) when that makes it smaller.
    async fn send_data(&mut self, opcode: u8, payload: &mut [u8]) -> Result<(), WsError> {
        let FrameWriter {
            io,
            mask,
            deflater,
            scratch,
        } = self;
        match deflater.as_mut().and_then(|d| d.compress(payload)) {
            Some(compressed) => {
                write_frame(io, scratch, *mask, FIN | RSV1 | opcode, compressed).await
            }
            None => write_frame(io, scratch, *mask, FIN | opcode, payload).await,
        }
    }

    pub async fn send_text(&mut self, mut payload: Vec<u8>) -> Result<(), WsError> {
        self.send_data(OP_TEXT, &mut payload).await
    }

    pub async fn send_binary(&mut self, mut payload: BytesMut) -> Result<(), WsError> {
        self.send_data(OP_BINARY, &mut payload).await
    }

    async fn send_control(&mut self, opcode: u8, parts: &[&[u8]]) -> Result<(), WsError> {
        let mut payload = [0u8; MAX_CONTROL];
        let mut len = 0;
        for part in parts {
            let n = part.len().min(MAX_CONTROL - len);
            payload[len..len + n].copy_from_slice(&part[..n]);
            len += n;
        }
        let first = FIN | opcode;
        write_frame(
            &mut self.io,
            &mut self.scratch,
            self.mask,
            first,
            &mut payload[..len],
        )
        .await
    }

    pub async fn send_ping(&mut self, payload: &[u8]) -> Result<(), WsError> {
        self.send_control(OP_PING, &[payload]).await
    }

    pub async fn send_pong(&mut self, payload: &[u8]) -> Result<(), WsError> {
        self.send_control(OP_PONG, &[payload]).await
    }

    /// Sends a close frame and flushes.
    pub async fn send_close(&mut self, code: u16, reason: &str) -> Result<(), WsError> {
        self.send_control(OP_CLOSE, &[&code.to_be_bytes(), close_reason(reason)])
            .await?;
        self.flush().await
    }

    pub async fn flush(&mut self) -> Result<(), WsError> {
        self.io.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::ws::close_code;

    fn params(reset: bool) -> DeflateParams {
        DeflateParams {
            compress_window_bits: 15,
            compress_reset: reset,
            decompress_reset: reset,
            level: 1,
            min_size: 0,
            adaptive: false,
            worth_pct: 100,
        }
    }

    /// A reader over fixed bytes: `server` reads client frames.
    fn reader(bytes: &[u8], server: bool, deflate: bool) -> FrameReader<&[u8]> {
        FrameReader::new(
            bytes,
            server,
            1 << 20,
            deflate.then(|| params(false)).as_ref(),
        )
    }

    async fn message(r: &mut FrameReader<&[u8]>) -> Result<Bytes, WsError> {
        match r.next().await? {
            Incoming::Message { payload, .. } => Ok(payload),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    async fn error(bytes: &[u8], server: bool, deflate: bool) -> WsError {
        let mut r = reader(bytes, server, deflate);
        loop {
            match r.next().await {
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    }

    #[tokio::test]
    async fn rfc7692_examples_decode_to_hello() {
        let examples: &[&[u8]] = &[
            // §7.2.3.1: one compressed frame.
            &[0xc1, 0x07, 0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
            // Fragmented: RSV1 on the first frame only.
            &[
                0x41, 0x03, 0xf2, 0x48, 0xcd, 0x80, 0x04, 0xc9, 0xc9, 0x07, 0x00,
            ],
            // §7.2.3.3: a no-compression block.
            &[
                0xc1, 0x0b, 0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
            ],
            // §7.2.3.4: a block with BFINAL set.
            &[0xc1, 0x08, 0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00],
            // RFC 6455 §5.7: uncompressed, on a deflate session.
            &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f],
        ];
        for bytes in examples {
            let mut r = reader(bytes, false, true);
            assert_eq!(
                &message(&mut r).await.unwrap()[..],
                b"Hello",
                "{bytes:02x?}"
            );
        }
        // §7.2.3.2: the second message refers to the first one's history.
        let mut r = reader(
            &[
                0xc1, 0x07, 0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0xc1, 0x05, 0xf2, 0x00, 0x11,
                0x00, 0x00,
            ],
            false,
            true,
        );
        assert_eq!(&message(&mut r).await.unwrap()[..], b"Hello");
        assert_eq!(&message(&mut r).await.unwrap()[..], b"Hello");
        // RFC 6455 §5.7: masked, read by a server.
        let masked = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let mut r = reader(&masked, true, true);
        assert_eq!(&message(&mut r).await.unwrap()[..], b"Hello");
    }

    #[tokio::test]
    async fn control_frames_between_fragments() {
        let bytes = [
            0x01, 0x03, b'H', b'e', b'l', 0x89, 0x02, b'h', b'i', 0x8a, 0x00, 0x80, 0x02, b'l',
            b'o', 0x88, 0x02, 0x03, 0xe8,
        ];
        let mut r = reader(&bytes, false, false);
        assert!(matches!(r.next().await.unwrap(), Incoming::Ping(p) if &p[..] == b"hi"));
        assert!(matches!(r.next().await.unwrap(), Incoming::Pong));
        assert_eq!(&message(&mut r).await.unwrap()[..], b"Hello");
        assert!(matches!(
            r.next().await.unwrap(),
            Incoming::Close {
                code: Some(1000),
                ..
            }
        ));
        assert!(matches!(r.next().await, Err(WsError::Closed)));
    }

    #[tokio::test]
    async fn protocol_violations() {
        let long_ping: Vec<u8> = [0x89, 0x7e, 0x00, 0x7e]
            .into_iter()
            .chain([0; 126])
            .collect();
        let cases: &[(&str, &[u8], bool, bool)] = &[
            ("RSV1 on a control frame", &[0xc9, 0x00], false, true),
            ("RSV1 without deflate", &[0xc1, 0x01, 0x00], false, false),
            (
                "RSV1 on a continuation",
                &[0x01, 0x01, b'a', 0xc0, 0x01, b'b'],
                false,
                true,
            ),
            ("RSV2", &[0xa1, 0x00], false, true),
            ("RSV3", &[0x91, 0x00], false, true),
            ("reserved opcode", &[0x83, 0x00], false, true),
            ("reserved control opcode", &[0x8b, 0x00], false, true),
            ("unmasked client frame", &[0x81, 0x01, b'a'], true, true),
            (
                "masked server frame",
                &[0x81, 0x81, 1, 2, 3, 4, b'a'],
                false,
                true,
            ),
            ("too long control frame", &long_ping, false, true),
            ("fragmented control frame", &[0x09, 0x00], false, true),
            ("continuation first", &[0x80, 0x01, b'a'], false, true),
            (
                "message inside a message",
                &[0x01, 0x01, b'a', 0x81, 0x01, b'b'],
                false,
                true,
            ),
            ("1-byte close", &[0x88, 0x01, 0x03], false, true),
            ("corrupt deflate", &[0xc2, 0x02, 0xff, 0xff], false, true),
        ];
        for (what, bytes, server, deflate) in cases {
            let e = error(bytes, *server, *deflate).await;
            assert!(matches!(e, WsError::Protocol(_)), "{what}: {e}");
            assert_eq!(e.close_code(), close_code::PROTOCOL_ERROR, "{what}");
        }
    }

    #[tokio::test]
    async fn invalid_utf8_text_is_1007() {
        for bytes in [
            &[0x81, 0x02, 0xc3, 0x28][..],
            &[0x01, 0x01, 0xc3, 0x80, 0x01, 0x28][..],
        ] {
            let e = error(bytes, false, false).await;
            assert!(matches!(e, WsError::InvalidUtf8), "{e}");
            assert_eq!(e.close_code(), close_code::INVALID_DATA);
        }
        // The check applies after decompression: valid as binary, not as text.
        let mut c = Compressor::new(&params(true)).unwrap();
        let wire = c.compress(&[0xc3, 0x28].repeat(50)).unwrap().to_vec();
        let mut frame = vec![0xc1, wire.len() as u8];
        frame.extend_from_slice(&wire);
        assert!(matches!(
            error(&frame, false, true).await,
            WsError::InvalidUtf8
        ));
    }

    #[tokio::test]
    async fn oversized_messages_are_too_large() {
        let mut r = FrameReader::new(&[0x82, 0x7e, 0x01, 0x00][..], false, 255, None);
        let e = r.next().await.unwrap_err();
        assert!(matches!(e, WsError::TooLarge { max: 255 }), "{e}");
        // Fragments add up.
        let mut bytes = vec![0x02, 0x7e, 0x00, 0x80];
        bytes.extend([0; 128]);
        bytes.extend([0x80, 0x7e, 0x00, 0x80]);
        bytes.extend([0; 128]);
        let mut r = FrameReader::new(&bytes[..], false, 255, None);
        assert!(matches!(r.next().await, Err(WsError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn zip_bomb_is_refused_without_inflating_it() {
        // 64 MiB of zeros, compressed in 1 MiB steps (the history carries over).
        let mut p = params(false);
        p.compress_reset = false;
        let mut c = Compressor::new(&p).unwrap();
        let chunk = vec![0u8; 1 << 20];
        let mut wire = Vec::new();
        for i in 0..64 {
            if i > 0 {
                // The tail each message's sync flush left and the wire format strips.
                wire.extend([0, 0, 0xff, 0xff]);
            }
            wire.extend_from_slice(c.compress(&chunk).unwrap());
        }
        assert!(wire.len() < 1 << 20, "{}", wire.len());
        for fragmented in [false, true] {
            let mut bytes = Vec::new();
            let pieces: Vec<&[u8]> = if fragmented {
                wire.chunks(wire.len() / 4 + 1).collect()
            } else {
                vec![&wire[..]]
            };
            for (i, piece) in pieces.iter().enumerate() {
                let fin = if i + 1 == pieces.len() { FIN } else { 0 };
                let op = if i == 0 {
                    RSV1 | OP_BINARY
                } else {
                    OP_CONTINUATION
                };
                bytes.extend([fin | op, 127]);
                bytes.extend((piece.len() as u64).to_be_bytes());
                bytes.extend_from_slice(piece);
            }
            let mut r = FrameReader::new(&bytes[..], false, 1 << 20, Some(&params(false)));
            let e = r.next().await.unwrap_err();
            assert!(
                matches!(e, WsError::TooLarge { max } if max == 1 << 20),
                "{e}"
            );
            assert_eq!(e.close_code(), close_code::TOO_BIG);
        }
    }

    async fn written(server: bool, deflate: Option<DeflateParams>, msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out, server, deflate.as_ref());
        w.send_binary(BytesMut::from(msg)).await.unwrap();
        w.flush().await.unwrap();
        out
    }

    #[tokio::test]
    async fn writer_frames() {
        // Compressed text from a server: RSV1, unmasked, and it reads back.
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out, true, Some(&params(true)));
        w.send_text(b"Hello Hello Hello Hello".to_vec())
            .await
            .unwrap();
        w.send_pong(b"x").await.unwrap();
        w.send_close(1000, "bye").await.unwrap();
        assert_eq!(out[0], 0xc1);
        let len = usize::from(out[1]);
        assert!(len < 23, "{len}");
        assert_eq!(
            out[2 + len..],
            [0x8a, 0x01, b'x', 0x88, 0x05, 0x03, 0xe8, b'b', b'y', b'e']
        );
        let mut r = FrameReader::new(&out[..], false, 1 << 20, Some(&params(true)));
        assert_eq!(&message_any(&mut r).await[..], b"Hello Hello Hello Hello");
        // Incompressible data leaves with RSV1 clear.
        let noise: Vec<u8> = (0..300).map(|_| rand::random::<u8>()).collect();
        let out = written(true, Some(params(true)), &noise).await;
        assert_eq!(&out[..4], &[0x82, 0x7e, 0x01, 0x2c]);
        assert_eq!(&out[4..], &noise[..]);
        // Clients mask, every length encoding reads back.
        for len in [0, 125, 126, 65535, 65536, 200_000] {
            let msg: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for deflate in [None, Some(params(true))] {
                let out = written(false, deflate, &msg).await;
                assert_ne!(out[1] & MASK, 0);
                let mut r = FrameReader::new(&out[..], true, 1 << 20, deflate.as_ref());
                assert_eq!(&message_any(&mut r).await[..], &msg[..], "{len}");
            }
        }
    }

    async fn message_any<R: AsyncRead + Unpin>(r: &mut FrameReader<R>) -> Bytes {
        match r.next().await.unwrap() {
            Incoming::Message { payload, .. } => payload,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[test]
    fn mask_matches_bytewise_xor() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0..40 {
            let mut a: Vec<u8> = (0..len as u8).collect();
            let expect: Vec<u8> = a.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
            apply_mask(&mut a, key);
            assert_eq!(a, expect);
        }
    }
}
