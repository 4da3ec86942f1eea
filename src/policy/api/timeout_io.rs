//! A stream whose reads and writes fail with `TimedOut` after waiting too long without
//! progress: a client that stops sending or stops reading cannot hold a connection (and
//! its descriptor) forever. An idle keep-alive connection ends after the read timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep, Sleep};

pub struct TimeoutIo<S> {
    inner: S,
    read_timeout: Duration,
    write_timeout: Duration,
    read_deadline: Option<Pin<Box<Sleep>>>,
    write_deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> TimeoutIo<S> {
    pub fn new(inner: S, read_timeout: Duration, write_timeout: Duration) -> Self {
        TimeoutIo {
            inner,
            read_timeout,
            write_timeout,
            read_deadline: None,
            write_deadline: None,
        }
    }
}

/// `Ready` clears the deadline; `Pending` starts it (once) and turns its expiry into an
/// error.
fn guard<T>(
    r: Poll<io::Result<T>>,
    deadline: &mut Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    cx: &mut Context<'_>,
    what: &str,
) -> Poll<io::Result<T>> {
    match r {
        Poll::Ready(v) => {
            *deadline = None;
            Poll::Ready(v)
        }
        Poll::Pending => {
            let d = deadline.get_or_insert_with(|| Box::pin(sleep(timeout)));
            match d.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    *deadline = None;
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no {what} progress for {timeout:?}"),
                    )))
                }
                Poll::Pending => Poll::Pending,
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimeoutIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        guard(r, &mut this.read_deadline, this.read_timeout, cx, "read")
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimeoutIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        guard(r, &mut this.write_deadline, this.write_timeout, cx, "write")
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        guard(r, &mut this.write_deadline, this.write_timeout, cx, "write")
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        guard(r, &mut this.write_deadline, this.write_timeout, cx, "write")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (a, _b) = tokio::io::duplex(64);
        let mut io = TimeoutIo::new(a, Duration::from_millis(50), Duration::from_millis(50));
        let mut buf = [0u8; 8];
        let e = io.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
