//! A raw TCP upstream for faults an HTTP library will not produce on purpose: bodies cut short,
//! connections reset mid-body, bytes dripped slower than any timeout, bodies that never end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the raw upstream does for a run id.
#[derive(Debug, Clone)]
pub enum Script {
    /// A well-formed 200 with this body.
    Ok(String),
    /// Declares `declared` body bytes, sends `sent` of them, then closes (FIN).
    Truncated { declared: usize, sent: usize },
    /// Declares `declared` body bytes, sends `sent`, then resets the connection (RST).
    ResetMidBody { declared: usize, sent: usize },
    /// Sends the head, then one body byte every `every`, for ever.
    Drip { every: Duration },
    /// Declares a huge body and streams it for as long as anyone reads.
    Endless,
}

#[derive(Default)]
struct State {
    scripts: Mutex<HashMap<String, Script>>,
    requests: Mutex<Vec<String>>,
}

/// See the module documentation. Every answer closes its connection.
pub struct RawUpstream {
    pub addr: std::net::SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind raw upstream");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let serving = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(answer(stream, Arc::clone(&serving)));
            }
        });
        Self { addr, state, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, id: &str, script: Script) {
        self.state
            .scripts
            .lock()
            .expect("lock")
            .insert(id.to_owned(), script);
    }

    /// Requests received for one run id.
    pub fn count_for(&self, id: &str) -> usize {
        let path = super::runs_path(id);
        self.state
            .requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|target| **target == path)
            .count()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(mut stream: TcpStream, state: Arc<State>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head.split(' ').nth(1).unwrap_or_default().to_owned();
    let id = target.rsplit('/').next().unwrap_or_default().to_owned();
    state.requests.lock().expect("lock").push(target);
    let script = state.scripts.lock().expect("lock").get(&id).cloned();
    let response_head = |length: usize| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {length}\r\nconnection: close\r\n\r\n"
        )
    };
    match script {
        None => {
            let _ = stream
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                .await;
        }
        Some(Script::Ok(body)) => {
            let _ = stream
                .write_all(format!("{}{body}", response_head(body.len())).as_bytes())
                .await;
        }
        Some(Script::Truncated { declared, sent }) => {
            let _ = stream.write_all(response_head(declared).as_bytes()).await;
            let _ = stream.write_all(&vec![b'{'; sent]).await;
            let _ = stream.shutdown().await;
        }
        Some(Script::ResetMidBody { declared, sent }) => {
            let _ = stream.write_all(response_head(declared).as_bytes()).await;
            let _ = stream.write_all(&vec![b'{'; sent]).await;
            let _ = stream.flush().await;
            // SO_LINGER 0: the close is a reset. (socket2 would avoid tokio's deprecation, but
            // a zero linger never blocks.)
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
            drop(stream);
        }
        Some(Script::Drip { every }) => {
            let _ = stream.write_all(response_head(1 << 20).as_bytes()).await;
            let mut ticker = tokio::time::interval(every);
            loop {
                ticker.tick().await;
                if stream.write_all(b" ").await.is_err() {
                    return;
                }
            }
        }
        Some(Script::Endless) => {
            let _ = stream.write_all(response_head(1 << 40).as_bytes()).await;
            let chunk = vec![b' '; 64 * 1024];
            while stream.write_all(&chunk).await.is_ok() {}
        }
    }
}
