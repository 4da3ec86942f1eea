//! An in-memory peer for the parsers that read a stream, and the runtime that drives
//! them: the same current-thread runtime for every input of one thread.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Runs `f` to completion on this thread's runtime.
pub fn block_on<F: Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

/// Computes the input from what was written and the input as given.
pub type Answer = fn(&[u8], &[u8]) -> Vec<u8>;

/// Reads come from `input` in pieces whose sizes `chunking` picks (so that the parser
/// sees a message split at every place), then end of stream; writes are collected in
/// `written`.
pub struct Mem {
    input: Vec<u8>,
    at: usize,
    chunking: u8,
    reads: usize,
    /// Rewrites the input not read yet from what was written, before the first read.
    answer: Option<Answer>,
    pub written: Vec<u8>,
}

impl Mem {
    /// `chunking`: 0 hands out everything a read asks for; otherwise the reads are
    /// 1 ..= `chunking` bytes, in a fixed cycle.
    pub fn new(input: &[u8], chunking: u8) -> Mem {
        Mem {
            input: input.to_vec(),
            at: 0,
            chunking,
            reads: 0,
            answer: None,
            written: Vec::new(),
        }
    }

    /// A chunking byte first, then the input.
    pub fn split(data: &[u8]) -> Option<Mem> {
        let (&chunking, input) = data.split_first()?;
        Some(Mem::new(input, chunking % 32))
    }

    /// Before the first read, the input becomes `answer(written, input)`: a client
    /// check can compute the part of the answer that depends on its request.
    pub fn answering(mut self, answer: Answer) -> Mem {
        self.answer = Some(answer);
        self
    }

    fn next_size(&mut self, room: usize) -> usize {
        let left = self.input.len() - self.at;
        let size = match self.chunking {
            0 => left,
            c => 1 + (self.reads * 7 + 3) % usize::from(c),
        };
        self.reads += 1;
        size.min(left).min(room)
    }
}

impl AsyncRead for Mem {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(answer) = self.answer.take() {
            self.input = answer(&self.written, &self.input);
        }
        let n = self.next_size(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.input[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Mem {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
