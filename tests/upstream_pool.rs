//! Upstream connections: kept alive and reused, replaced when the upstream closes them, never
//! shared by two exchanges at once. Checked against a counting keep-alive upstream on a real socket.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::future::join_all;
use http::StatusCode;
use support::{TestGateway, run_body, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP/1.1 upstream that answers every run as still PROCESSING (so every request goes
/// upstream) and counts the connections it accepts. With `close_after_answer` it closes each
/// connection right after its answer, without announcing it (no `Connection: close`).
struct CountingUpstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
}

impl CountingUpstream {
    async fn start(close_after_answer: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let (accepts, answers) = (Arc::clone(&accepted), Arc::clone(&answered));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepts.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, close_after_answer, Arc::clone(&answers)));
            }
        });
        Self {
            addr,
            accepted,
            answered,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, close_after_answer: bool, answered: Arc<AtomicUsize>) {
    let mut buffer = Vec::new();
    loop {
        let Some(head_end) = find_head_end(&buffer) else {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        buffer.drain(..head_end);
        let id = head
            .split_whitespace()
            .nth(1)
            .and_then(|path| path.rsplit('/').next())
            .unwrap_or("unknown")
            .to_owned();
        let body = run_body(&id, "PROCESSING", 200);
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if stream.write_all(answer.as_bytes()).await.is_err() || stream.write_all(&body).await.is_err() {
            return;
        }
        answered.fetch_add(1, Ordering::SeqCst);
        if close_after_answer {
            return;
        }
    }
}

fn find_head_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|start| start + 4)
}

#[tokio::test]
async fn sequential_calls_share_one_kept_alive_connection() {
    let upstream = CountingUpstream::start(false).await;
    let gateway = TestGateway::start_with(test_config(&upstream.base_url())).await;
    for index in 0..20 {
        let response = gateway.get_run(&format!("run_{index}")).await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.x_cache(), Some("PASS"));
    }
    assert_eq!(upstream.answered(), 20);
    assert_eq!(
        upstream.accepted(),
        1,
        "every call after the first reused the connection"
    );
}

#[tokio::test]
async fn a_connection_the_upstream_closed_is_replaced_without_failing_a_request() {
    let upstream = CountingUpstream::start(true).await;
    let gateway = TestGateway::start_with(test_config(&upstream.base_url())).await;
    for index in 0..10 {
        let response = gateway.get_run(&format!("run_{index}")).await;
        assert_eq!(response.status, StatusCode::OK, "request {index}");
        assert_eq!(response.json()["id"], format!("run_{index}").as_str());
    }
    assert_eq!((upstream.answered(), upstream.accepted()), (10, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_use_a_connection_each_and_keep_them_for_later() {
    let upstream = CountingUpstream::start(false).await;
    let gateway = TestGateway::start_with(test_config(&upstream.base_url())).await;
    for round in 0..3 {
        let ids: Vec<String> = (0..10).map(|index| format!("run_{round}_{index}")).collect();
        let responses = join_all(ids.iter().map(|id| gateway.get_run(id))).await;
        for (index, response) in responses.iter().enumerate() {
            assert_eq!(response.status, StatusCode::OK);
            // Each answer is its own run's: no two exchanges ever shared a connection.
            assert_eq!(response.json()["id"], format!("run_{round}_{index}").as_str());
        }
    }
    assert_eq!(upstream.answered(), 30);
    let accepted = upstream.accepted();
    assert!(
        (1..=10).contains(&accepted),
        "{accepted} connections for 3 rounds of 10"
    );
}
