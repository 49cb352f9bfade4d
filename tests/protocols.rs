//! The public port speaks HTTP/1.1 and HTTP/2 (prior knowledge, as behind a TLS-terminating proxy).

mod support;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::{MockUpstream, PATIENCE, Reply, TestGateway, runs_path};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn http2_clients_get_the_same_answers() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let request = Request::get(gateway.url(&runs_path("run_1")))
            .body(Empty::new())
            .expect("request");
        let response = client.request(request).await.expect("HTTP/2 response");
        assert_eq!(response.version(), Version::HTTP_2);
        assert_eq!(response.status(), StatusCode::OK);
        outcomes.push(response.headers()["x-cache"].to_str().expect("ascii").to_owned());
        let body = response.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).expect("json")["id"],
            "run_1"
        );
    }
    assert_eq!(outcomes, ["MISS", "HIT"]);
    assert_eq!(mock.count_for("run_1"), 1);
}

#[tokio::test]
async fn head_answers_carry_no_body_over_http2_either() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let body = support::run_body("run_1", "COMPLETED", 2048);
    mock.set("run_1", Reply::ok(body.clone()));
    // A strict HTTP/2 peer: DATA after a HEAD answer is a protocol error, which h2 reports.
    let tcp = TcpStream::connect(gateway.public).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let connection = tokio::spawn(connection);
    for (path, status, length) in [
        (runs_path("run_1"), StatusCode::OK, Some(body.len())),
        (runs_path("run_1"), StatusCode::OK, Some(body.len())),
        ("/elsewhere".to_owned(), StatusCode::NOT_FOUND, None),
    ] {
        let mut client = client.clone().ready().await.expect("ready");
        let request = Request::head(format!("http://g{path}"))
            .body(())
            .expect("request");
        let (response, _) = client.send_request(request, true).expect("send");
        let response = response.await.expect("a clean answer");
        assert_eq!(response.status(), status, "{path}");
        if let Some(length) = length {
            assert_eq!(response.headers()["content-length"], length.to_string().as_str());
        }
        let mut received = response.into_body();
        assert!(received.is_end_stream(), "{path}: the answer ends with its head");
        assert!(received.data().await.is_none(), "{path}: no DATA frame");
    }
    assert!(!connection.is_finished(), "the connection is still up");
    assert_eq!(mock.count_for("run_1"), 1);
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_DATA: u8 = 0x0;
const H2_HEADERS: u8 = 0x1;
const H2_RST_STREAM: u8 = 0x3;
const H2_SETTINGS: u8 = 0x4;
const H2_GOAWAY: u8 = 0x7;
const H2_END_STREAM: u8 = 0x1;
const H2_END_HEADERS: u8 = 0x4;
const H2_ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

/// One HTTP/2 frame as read off the wire.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).expect("a small frame").to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A GET for `path` as a HEADERS frame that ends its stream. HPACK by hand, no Huffman and no
/// dynamic table: `:method: GET` and `:scheme: http` from the static table, `:authority` and
/// `:path` as literals with indexed names.
fn h2_get(stream: u32, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86];
    for (name_index, value) in [(1u8, "g"), (4u8, path)] {
        block.push(name_index);
        block.push(
            u8::try_from(value.len())
                .ok()
                .filter(|length| *length < 0x7f)
                .expect("a short value"),
        );
        block.extend_from_slice(value.as_bytes());
    }
    h2_frame(H2_HEADERS, H2_END_STREAM | H2_END_HEADERS, stream, &block)
}

/// Reads the next frame whole; fails if none comes within `PATIENCE`.
async fn read_h2_frame(tcp: &mut TcpStream) -> Frame {
    let mut head = [0u8; 9];
    tokio::time::timeout(PATIENCE, tcp.read_exact(&mut head))
        .await
        .expect("a frame in time")
        .expect("the connection is still open");
    let length = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; length];
    tcp.read_exact(&mut payload).await.expect("the frame's payload");
    Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }
}

/// The `h2` client keeps to the advertised SETTINGS_MAX_CONCURRENT_STREAMS on its side, so it
/// cannot show what the server does; this client writes frames itself and opens one stream more
/// than it was allowed.
#[tokio::test]
async fn http2_streams_beyond_the_limit_are_refused_and_never_reach_upstream() {
    const LIMIT: u32 = 2;
    let mock = MockUpstream::start().await;
    let gate = support::Gate::new();
    for id in ["r1", "r2", "r3"] {
        mock.set(id, Reply::run(id, "PROCESSING").gated(&gate));
    }
    let gateway = TestGateway::start(&mock, |config| {
        config.server.http2_max_concurrent_streams = LIMIT;
    })
    .await;
    let mut tcp = TcpStream::connect(gateway.public).await.expect("connect");
    tcp.write_all(&[H2_PREFACE, &h2_frame(H2_SETTINGS, 0, 0, &[])].concat())
        .await
        .expect("preface");
    // The server's SETTINGS: the limit is advertised before it is enforced.
    let settings = loop {
        let frame = read_h2_frame(&mut tcp).await;
        if frame.kind == H2_SETTINGS && frame.flags & H2_ACK == 0 {
            break frame.payload;
        }
    };
    let advertised = settings.chunks_exact(6).find_map(|setting| {
        (u16::from_be_bytes([setting[0], setting[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS)
            .then(|| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]))
    });
    assert_eq!(advertised, Some(LIMIT));
    tcp.write_all(&h2_frame(H2_SETTINGS, H2_ACK, 0, &[]))
        .await
        .expect("settings ack");

    // As many streams as allowed, held open upstream by the gate.
    tcp.write_all(&[h2_get(1, &runs_path("r1")), h2_get(3, &runs_path("r2"))].concat())
        .await
        .expect("two streams");
    mock.wait_for_requests(2).await;

    // One more, on the same connection: refused with RST_STREAM(REFUSED_STREAM), which tells the
    // client it was not processed at all, and it never reaches upstream.
    tcp.write_all(&h2_get(5, &runs_path("r3")))
        .await
        .expect("the stream beyond the limit");
    let refusal = tokio::select! {
        refusal = async {
            loop {
                let frame = read_h2_frame(&mut tcp).await;
                assert_ne!(frame.kind, H2_GOAWAY, "the connection was closed, not the stream refused");
                if frame.stream == 5 {
                    break frame;
                }
            }
        } => refusal,
        () = mock.wait_for_requests(3) => panic!("the stream beyond the limit reached upstream"),
    };
    assert_eq!(refusal.kind, H2_RST_STREAM, "{refusal:?}");
    assert_eq!(refusal.payload, REFUSED_STREAM.to_be_bytes(), "{refusal:?}");
    assert_eq!(
        mock.request_count(),
        2,
        "no more upstream calls than streams allowed"
    );
    assert_eq!(mock.count_for("r3"), 0);

    // The held streams complete; nothing more is ever said on the refused one.
    gate.open();
    let mut ended = Vec::new();
    while ended.len() < 2 {
        let frame = read_h2_frame(&mut tcp).await;
        assert_ne!(frame.kind, H2_GOAWAY, "{frame:?}");
        assert_ne!(frame.stream, 5, "the refused stream got {frame:?}");
        if [H2_HEADERS, H2_DATA].contains(&frame.kind) && frame.flags & H2_END_STREAM != 0 {
            ended.push(frame.stream);
        }
    }
    ended.sort_unstable();
    assert_eq!(ended, [1, 3]);

    // With a stream free again, the refused request, retried as REFUSED_STREAM allows, is served
    // on the same connection: the refusal was the limit's, not the request's.
    tcp.write_all(&h2_get(7, &runs_path("r3")))
        .await
        .expect("the retry");
    let answer = loop {
        let frame = read_h2_frame(&mut tcp).await;
        assert_ne!(frame.kind, H2_GOAWAY, "{frame:?}");
        if frame.stream == 7 {
            break frame;
        }
    };
    assert_eq!(answer.kind, H2_HEADERS, "{answer:?}");
    assert_eq!(
        answer.payload.first(),
        Some(&0x88),
        "`:status: 200`, static index 8: {answer:?}"
    );
    assert_eq!(mock.count_for("r3"), 1);
}
