//! The public port speaks HTTP/1.1 and HTTP/2 (prior knowledge, as behind a TLS-terminating proxy).

mod support;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::{MockUpstream, Reply, TestGateway, runs_path};

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
    let tcp = tokio::net::TcpStream::connect(gateway.public)
        .await
        .expect("connect");
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
