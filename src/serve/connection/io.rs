//! The socket side of a [`Connection`]: records when a write has to wait for the client.
//!
//! A client that stops reading fills its receive window and then the socket's send buffer; from
//! then on every write returns `Pending`. [`WatchedIo`] notes when that began and clears it at the
//! next write that goes through, and the connection's watchdog cuts the connection once a write
//! has waited `write_timeout`. Hand-written rather than taken from `tokio-io-timeout`, because the
//! watchdog also needs to know that a write is waiting (a connection flushing its last answer is
//! not idle), and this way all of a connection's deadlines are kept in one place. Reads pass
//! through untouched: how long a client may take to send is the idle rule's business.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Connection;

/// A client socket whose waiting writes are reported to its [`Connection`].
pub struct WatchedIo<T> {
    io: T,
    connection: Arc<Connection>,
}

impl<T> WatchedIo<T> {
    /// Reports `io`'s waiting writes to `connection`.
    pub fn new(io: T, connection: Arc<Connection>) -> Self {
        Self { io, connection }
    }

    fn note<R>(&self, poll: Poll<R>) -> Poll<R> {
        match &poll {
            Poll::Pending => self.connection.write_blocked(),
            Poll::Ready(_) => self.connection.write_unblocked(),
        }
        poll
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.note(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_shutdown(cx);
        self.note(poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::connection::{CloseReason, Limits};
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::sync::Semaphore;

    const LIMITS: Limits = Limits {
        header_read_timeout: Duration::from_secs(3600),
        write_timeout: Duration::from_millis(200),
        max_streams: 1,
    };

    #[tokio::test]
    async fn a_peer_that_stops_reading_is_reported_and_one_that_reads_again_is_not() {
        let slots = Arc::new(Semaphore::new(1));
        let connection = Connection::new(LIMITS, slots.try_acquire_owned().expect("a free slot"));
        // It has answered a request: what waits now is that answer being flushed.
        connection.request_started(false);
        let answer = connection.answer_started();
        connection.answer_finished(answer);
        // A pipe with a small buffer: the "client" end is read or not at will.
        let (server, mut client) = tokio::io::duplex(1024);
        let mut io = WatchedIo::new(server, Arc::clone(&connection));
        io.write_all(&[0u8; 1024]).await.expect("fits the buffer");
        assert!(connection.idle_for_ms().is_some(), "nothing waits yet");

        let writer = tokio::spawn(async move {
            io.write_all(&[1u8; 4096])
                .await
                .expect("written once the client reads");
            io
        });
        // The write waits for the client: the watchdog sees a blocked write and times it out.
        assert_eq!(connection.watch().await, CloseReason::WriteTimeout);
        assert_eq!(
            connection.idle_for_ms(),
            None,
            "a flushing connection is not idle"
        );

        // The client reads everything: the write goes through and the block is cleared.
        let mut sink = vec![0u8; 1024 + 4096];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut sink)
            .await
            .expect("read");
        let _io = writer.await.expect("writer");
        assert!(connection.idle_for_ms().is_some(), "no write waits any more");
    }
}
