//! The RFC 6455 frame reader, with and without permessage-deflate, over an in-memory
//! stream split at every place: fragments, control frames, compressed messages and the
//! inflate cap. Never panics; every message it yields respects the cap, a text one is
//! UTF-8, a control frame's payload fits a control frame; and what it yields, written
//! again by our frame writer with the same settings, reads back the same.
//!
//! First byte: bit 0 is the reading side (server: frames must be masked), bit 1
//! permessage-deflate, bit 2 no context takeover, bits 3-4 the window, bits 5-7 the
//! message cap (64 B .. 1 MiB); the second byte is the chunking of the reads.

use anyproxy::transport::ws::frame::{FrameReader, FrameWriter};
use anyproxy::transport::ws::DeflateParams;
use anyproxy::transport::{Incoming, WsError};
use bytes::BytesMut;

use super::mem::{block_on, Mem};

/// Enough messages for fragments, interleaved control frames and context takeover.
const MAX_MESSAGES: usize = 64;

pub fn check(data: &[u8]) {
    let Some((&[mode, chunking], wire)) = data.split_first_chunk::<2>() else {
        return;
    };
    let server = mode & 1 == 1;
    let deflate = (mode & 2 != 0).then(|| DeflateParams {
        compress_window_bits: [15, 12, 9, 8][usize::from((mode >> 3) & 3)],
        compress_reset: mode & 4 != 0,
        decompress_reset: mode & 4 != 0,
        level: 1,
        min_size: 0,
        adaptive: false,
        worth_pct: 100,
    });
    let max = 64usize << (2 * usize::from(mode >> 5));
    block_on(async {
        let read = read_all(Mem::new(wire, chunking % 32), server, max, deflate.as_ref()).await;
        for m in &read {
            match m {
                Incoming::Message { text, payload } => {
                    assert!(
                        payload.len() <= max,
                        "{} bytes over a cap of {max}",
                        payload.len()
                    );
                    assert!(
                        !text || std::str::from_utf8(payload).is_ok(),
                        "text not UTF-8"
                    );
                }
                Incoming::Ping(p) => assert!(p.len() <= 125),
                // Lossy UTF-8: a replacement character is 3 bytes for each bad one.
                Incoming::Close { reason, .. } => assert!(reason.chars().count() <= 123),
                Incoming::Pong => {}
            }
        }
        let rewritten = write_all(&read, !server, deflate.as_ref()).await;
        let again = read_all(Mem::new(&rewritten, 0), server, max, deflate.as_ref()).await;
        let mut expected = describe(&read);
        if matches!(read.last(), Some(Incoming::Close { code: None, .. })) {
            expected.pop();
        }
        assert_eq!(describe(&again), expected, "read, written, read again");
    });
}

/// Everything the reader yields before its first error (or close).
async fn read_all(
    io: Mem,
    server: bool,
    max: usize,
    deflate: Option<&DeflateParams>,
) -> Vec<Incoming> {
    let mut reader = FrameReader::new(io, server, max, deflate);
    let mut out = Vec::new();
    while out.len() < MAX_MESSAGES {
        match reader.next().await {
            Ok(m) => {
                let close = matches!(m, Incoming::Close { .. });
                out.push(m);
                if close {
                    break;
                }
            }
            Err(WsError::TooLarge { max: said }) => {
                assert_eq!(said, max);
                break;
            }
            Err(_) => break,
        }
    }
    out
}

/// `read` as the peer would send it; a close without a code is left out (the writer
/// always sends one), and ends the sequence as it did.
async fn write_all(read: &[Incoming], server: bool, deflate: Option<&DeflateParams>) -> Vec<u8> {
    let mut wire = Vec::new();
    let mut writer = FrameWriter::new(&mut wire, server, deflate);
    for m in read {
        let sent = match m {
            Incoming::Message {
                text: true,
                payload,
            } => writer.send_text(payload.to_vec()).await,
            Incoming::Message {
                text: false,
                payload,
            } => writer.send_binary(BytesMut::from(&payload[..])).await,
            Incoming::Ping(p) => writer.send_ping(p).await,
            Incoming::Pong => writer.send_pong(&[]).await,
            Incoming::Close {
                code: Some(code),
                reason,
            } => writer.send_close(*code, reason).await,
            Incoming::Close { code: None, .. } => break,
        };
        sent.expect("writing to memory");
    }
    writer.flush().await.expect("flush to memory");
    drop(writer);
    wire
}

/// A comparable summary (Incoming is not `PartialEq`); a close reason as the writer
/// sends it, cut to 123 bytes on a character boundary.
fn describe(read: &[Incoming]) -> Vec<String> {
    read.iter()
        .map(|m| match m {
            Incoming::Close { code, reason } => {
                let mut end = reason.len().min(123);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                format!("Close {code:?} {:?}", &reason[..end])
            }
            other => format!("{other:?}"),
        })
        .collect()
}
