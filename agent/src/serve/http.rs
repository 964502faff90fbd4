//! Small shared pieces of the two HTTP servers.

use std::{io, time::Duration};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, header, Method, Response, StatusCode};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// A client that has not sent its request headers by then is dropped.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A whole body, or one streamed as it is serialised ([`json_snapshot`]).
pub(crate) type Body = UnsyncBoxBody<Bytes, io::Error>;

/// A JSON body up to this size is sent whole, with a length; a larger one (GET /status of a
/// healthy 5,000-peer node: 1.7 MiB; with 5,000 findings open: ~17 MiB) is sent in chunks as
/// it is serialised, so it never exists whole in memory. Measured at 5,000 peers, streaming
/// costs the client no latency against a whole body.
const WHOLE_BODY_MAX: usize = 1024 * 1024;
/// Chunks of a streamed body, and how many may wait for the client (memory at most ~1 MiB
/// beyond the first [`WHOLE_BODY_MAX`]); under malloc's 256 KiB mmap threshold so they reuse
/// heap pages.
const STREAM_CHUNK: usize = 200 * 1024;
const STREAM_CHUNKS_QUEUED: usize = 4;
/// A client that reads nothing of a streamed body for this long gets it cut short.
const STREAM_STALL: Duration = Duration::from_secs(30);

pub(crate) fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let body = Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync();
    with_type(status, content_type, body)
}

fn with_type(status: StatusCode, content_type: &str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// `value` as pretty JSON (the same bytes as [`json`]), serialised on a blocking thread:
/// whole when it fits in [`WHOLE_BODY_MAX`], else streamed in chunks the client takes as it
/// reads. `value` should be a snapshot that shares, not copies, the large lists: the caller
/// holds no lock meanwhile. A client that stops reading a streamed body for
/// [`STREAM_STALL`] gets it aborted.
pub(crate) async fn json_snapshot<T: Serialize + Send + 'static>(
    status: StatusCode,
    value: T,
) -> Response<Body> {
    let (start_tx, start_rx) = oneshot::channel();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut out = ChunkWriter {
            chunk: Vec::new(),
            mode: Mode::Whole(Some(start_tx)),
            runtime,
        };
        let written = serde_json::to_writer_pretty(&mut out, &value)
            .map_err(io::Error::other)
            .and_then(|()| io::Write::write_all(&mut out, b"\n"));
        drop(value);
        match (written, out.mode) {
            (Ok(()), Mode::Whole(Some(start))) => {
                let _ = start.send(Start::Whole(Ok(out.chunk)));
            }
            (Err(e), Mode::Whole(Some(start))) => {
                let _ = start.send(Start::Whole(Err(e)));
            }
            (Ok(()), Mode::Streaming(mut tx)) => {
                let last = std::mem::take(&mut out.chunk);
                if let Err(e) = send_chunk(&out.runtime, &mut tx, last) {
                    tracing::debug!(error = %e, "streamed JSON response not finished");
                }
            }
            (Err(e), Mode::Streaming(tx)) => {
                // The client went away (nothing to tell) or serialising failed: abort.
                if e.kind() != io::ErrorKind::BrokenPipe {
                    tracing::warn!(error = %e, "streamed JSON response cut short");
                    // Never waits: a stalled client's queue is full, and it is cut anyway.
                    let _ = tx.try_send(Err(e));
                }
            }
            (_, Mode::Whole(None)) => {}
        }
    });
    match start_rx.await {
        Ok(Start::Whole(Ok(body))) => respond(status, "application/json", body),
        Ok(Start::Streaming(rx)) => {
            let frames = futures::stream::unfold(rx, |mut rx| async move {
                let item = rx.recv().await?;
                Some((item.map(Frame::data), rx))
            });
            with_type(
                status,
                "application/json",
                StreamBody::new(frames).boxed_unsync(),
            )
        }
        Ok(Start::Whole(Err(e))) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding JSON: {e}"),
        ),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding JSON: the serialising thread failed",
        ),
    }
}

/// How a [`json_snapshot`] response begins: whole, or as a stream of chunks.
enum Start {
    Whole(io::Result<Vec<u8>>),
    Streaming(mpsc::Receiver<io::Result<Bytes>>),
}

enum Mode {
    /// Still within [`WHOLE_BODY_MAX`]; the sender says how the response starts (taken
    /// once it has).
    Whole(Option<oneshot::Sender<Start>>),
    Streaming(mpsc::Sender<io::Result<Bytes>>),
}

/// Collects serialised bytes: the whole body while it is small, then chunks for a stream.
struct ChunkWriter {
    chunk: Vec<u8>,
    mode: Mode,
    runtime: tokio::runtime::Handle,
}

fn send_chunk(
    runtime: &tokio::runtime::Handle,
    tx: &mut mpsc::Sender<io::Result<Bytes>>,
    chunk: Vec<u8>,
) -> io::Result<()> {
    if chunk.is_empty() {
        return Ok(());
    }
    let sent = runtime.block_on(tokio::time::timeout(
        STREAM_STALL,
        tx.send(Ok(Bytes::from(chunk))),
    ));
    match sent {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(io::ErrorKind::BrokenPipe.into()),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("client read nothing for {STREAM_STALL:?}"),
        )),
    }
}

impl ChunkWriter {
    /// Bytes the current piece may hold before it is handed on.
    fn limit(&self) -> usize {
        match self.mode {
            Mode::Whole(_) => WHOLE_BODY_MAX,
            Mode::Streaming(_) => STREAM_CHUNK,
        }
    }

    /// The current piece is full: start the stream, or send the chunk.
    #[cold]
    #[inline(never)]
    fn hand_on(&mut self) -> io::Result<()> {
        let full = std::mem::replace(&mut self.chunk, Vec::with_capacity(STREAM_CHUNK));
        match &mut self.mode {
            Mode::Whole(start) => {
                // Too large to build whole: what there is becomes the stream's first part.
                let (mut tx, rx) = mpsc::channel(STREAM_CHUNKS_QUEUED);
                let sent = start.take().map(|start| start.send(Start::Streaming(rx)));
                if !matches!(sent, Some(Ok(()))) {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                send_chunk(&self.runtime, &mut tx, full)?;
                self.mode = Mode::Streaming(tx);
                Ok(())
            }
            Mode::Streaming(tx) => send_chunk(&self.runtime, tx, full),
        }
    }
}

impl io::Write for ChunkWriter {
    // serde_json writes punctuation and indentation a few bytes at a time (~1 M writes for
    // GET /status at 5,000 peers): the common case must stay as cheap as a Vec's.
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.chunk.len() + buf.len() > self.limit() {
            self.hand_on()?;
        }
        self.chunk.extend_from_slice(buf);
        Ok(buf.len())
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write(buf).map(|_| ())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            respond(status, "application/json", body)
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding JSON: {e}"),
        ),
    }
}

pub(crate) fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message });
    respond(status, "application/json", format!("{body}\n"))
}

/// The servers are read-only: anything but GET (and HEAD, which hyper answers without a
/// body) is refused before routing.
pub(crate) fn method_not_allowed(method: &Method) -> Option<Response<Body>> {
    if method == Method::GET || method == Method::HEAD {
        return None;
    }
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method {method} not allowed: this API is read-only"),
    );
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialises like a list of `n` numbered items and reports when it is dropped (the
    /// serialising thread is done with it).
    struct Big {
        n: usize,
        dropped: std::sync::mpsc::Sender<()>,
        serialised: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Serialize for Big {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeSeq;
            let mut seq = s.serialize_seq(Some(self.n))?;
            for i in 0..self.n {
                seq.serialize_element(&format!("item {i}"))?;
                self.serialised
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            seq.end()
        }
    }

    impl Drop for Big {
        fn drop(&mut self) {
            let _ = self.dropped.send(());
        }
    }

    fn big(
        n: usize,
    ) -> (
        Big,
        std::sync::mpsc::Receiver<()>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let (dropped, done) = std::sync::mpsc::channel();
        let serialised = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let value = Big {
            n,
            dropped,
            serialised: serialised.clone(),
        };
        (value, done, serialised)
    }

    async fn read_all(response: Response<Body>) -> (Vec<u8>, usize) {
        let mut body = response.into_body();
        let (mut got, mut frames) = (Vec::new(), 0);
        while let Some(frame) = body.frame().await {
            got.extend_from_slice(&frame.unwrap().into_data().unwrap());
            frames += 1;
        }
        (got, frames)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_body_is_sent_whole_with_its_length() {
        let (value, _done, _) = big(1000);
        let mut expected = serde_json::to_vec_pretty(&value).unwrap();
        expected.push(b'\n');
        let response = json_snapshot(StatusCode::OK, value).await;
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let length = hyper::body::Body::size_hint(response.body()).exact();
        assert_eq!(length, Some(expected.len() as u64));
        let (got, frames) = read_all(response).await;
        assert_eq!((got, frames), (expected, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_body_streams_the_same_bytes_in_chunks() {
        let (value, _done, _) = big(1_000_000);
        let mut expected = serde_json::to_vec_pretty(&value).unwrap();
        expected.push(b'\n');
        assert!(
            expected.len() > 2 * WHOLE_BODY_MAX,
            "{} bytes",
            expected.len()
        );
        let response = json_snapshot(StatusCode::OK, value).await;
        assert_eq!(hyper::body::Body::size_hint(response.body()).exact(), None);
        let (got, frames) = read_all(response).await;
        assert!(frames > 10, "{frames} frames");
        assert!(got == expected, "streamed bytes differ from the whole body");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_goes_away_stops_the_serialiser() {
        let n = 3_000_000;
        let (value, done, serialised) = big(n);
        let mut body = json_snapshot(StatusCode::OK, value).await.into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        tokio::task::spawn_blocking(move || done.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("serialiser still running after its client left");
        // Bounded by the queue: it waited for the client, then stopped when it left.
        let items = serialised.load(std::sync::atomic::Ordering::Relaxed);
        assert!(items < n / 2, "{items} of {n} items serialised for nobody");
    }
}
