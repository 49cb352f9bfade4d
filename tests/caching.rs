//! What is stored and what is not: terminal runs are served from memory byte for byte; everything
//! else goes to upstream every time.

mod support;

use http::{Method, StatusCode};
use support::{MockUpstream, Reply, TestGateway, run_body, runs_path};

#[tokio::test]
async fn terminal_runs_are_stored_and_served_byte_identical_without_upstream() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    for (id, status) in [
        ("run_done", "COMPLETED"),
        ("run_failed", "FAILED"),
        ("run_closed", "CLOSED"),
    ] {
        // Odd but valid JSON formatting: the hit must repeat upstream's bytes, not a re-serialization.
        let body =
            format!("{{ \"id\" : \"{id}\",\n \"status\":\"{status}\", \"name\":\"caf\\u00e9 \u{2603}\" }}");
        mock.set(id, Reply::ok(body.clone()));

        let first = gateway.get_run(id).await;
        assert_eq!(first.status, StatusCode::OK);
        assert_eq!(first.x_cache(), Some("MISS"), "{id}");
        assert_eq!(first.body, body.as_bytes());
        let upstream_calls = mock.request_count();

        for _ in 0..3 {
            let again = gateway.get_run(id).await;
            assert_eq!(again.status, StatusCode::OK);
            assert_eq!(again.x_cache(), Some("HIT"), "{id}");
            assert_eq!(again.body, body.as_bytes(), "{id}: hit must be byte-identical");
            assert_eq!(again.header("content-type"), Some("application/json"));
            assert_eq!(
                again.header("cache-control"),
                Some("private, max-age=86400, immutable")
            );
        }
        assert_eq!(mock.count_for(id), 1, "{id}: upstream called once");
        assert_eq!(
            mock.request_count(),
            upstream_calls,
            "{id}: a hit makes no upstream call at all, for this run or any other path"
        );
    }
}

#[tokio::test]
async fn runs_still_going_or_unknown_are_never_stored() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let cases = [
        ("queued", Reply::run("queued", "QUEUED")),
        ("processing", Reply::run("processing", "PROCESSING")),
        ("unknown", Reply::run("unknown", "REJECTED")),
        ("lowercase", Reply::run("lowercase", "completed")),
        ("no_status", Reply::ok(r#"{"id":"no_status"}"#)),
        ("null_status", Reply::ok(r#"{"id":"null_status","status":null}"#)),
        ("number_status", Reply::ok(r#"{"id":"number_status","status":3}"#)),
        ("not_json", Reply::ok("COMPLETED")),
        ("array", Reply::ok(r#"["not_json","COMPLETED"]"#)),
        ("other_id", Reply::run("someone_else", "COMPLETED")),
        ("no_id", Reply::ok(r#"{"status":"COMPLETED"}"#)),
        (
            "dup_status",
            Reply::ok(r#"{"id":"dup_status","status":"PROCESSING","status":"COMPLETED"}"#),
        ),
        (
            "created",
            Reply::status(StatusCode::CREATED, run_body("created", "COMPLETED", 0)),
        ),
    ];
    for (id, reply) in cases {
        mock.set(id, reply);
        for attempt in 1..=3 {
            let response = gateway.get_run(id).await;
            assert_eq!(response.x_cache(), Some("PASS"), "{id} attempt {attempt}");
            assert_eq!(response.header("cache-control"), Some("no-store"), "{id}");
        }
        assert_eq!(mock.count_for(id), 3, "{id}: every request went upstream");
    }
}

#[tokio::test]
async fn a_run_that_ends_is_stored_from_then_on() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    for status in ["QUEUED", "PROCESSING"] {
        mock.set("run_1", Reply::run("run_1", status));
        let response = gateway.get_run("run_1").await;
        assert_eq!(response.x_cache(), Some("PASS"));
        assert_eq!(response.json()["status"], status, "never stale");
    }
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    assert_eq!(gateway.get_run("run_1").await.x_cache(), Some("MISS"));
    // Upstream could now say anything: the ended run is served from memory.
    mock.set("run_1", Reply::run("run_1", "PROCESSING"));
    let hit = gateway.get_run("run_1").await;
    assert_eq!(hit.x_cache(), Some("HIT"));
    assert_eq!(hit.json()["status"], "COMPLETED");
    assert_eq!(mock.count_for("run_1"), 3);
}

#[tokio::test]
async fn query_strings_neither_reach_upstream_nor_split_the_cache() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("run_q", Reply::run("run_q", "COMPLETED"));
    mock.set("run_p", Reply::run("run_p", "PROCESSING"));

    let first = gateway
        .send(Method::GET, &format!("{}?x=1", runs_path("run_q")), &[])
        .await;
    assert_eq!(first.x_cache(), Some("MISS"));
    for bust in ["?x=2", "?x=3&y=4", "?"] {
        let response = gateway
            .send(Method::GET, &format!("{}{bust}", runs_path("run_q")), &[])
            .await;
        assert_eq!(response.x_cache(), Some("HIT"), "{bust}");
    }
    gateway
        .send(Method::GET, &format!("{}?expand=all", runs_path("run_p")), &[])
        .await;
    assert_eq!(mock.count_for("run_q"), 1);
    let targets: Vec<String> = mock
        .requests()
        .into_iter()
        .map(|request| request.target)
        .collect();
    assert_eq!(
        targets,
        [runs_path("run_q"), runs_path("run_p")],
        "no query upstream"
    );
}

#[tokio::test]
async fn percent_encoded_ids_share_the_canonical_entry() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("Abc", Reply::run("Abc", "COMPLETED"));
    assert_eq!(gateway.get_run("Abc").await.x_cache(), Some("MISS"));
    assert_eq!(gateway.get_run("%41bc").await.x_cache(), Some("HIT"));
    assert_eq!(mock.count_for("Abc"), 1);
}

#[tokio::test]
async fn head_answers_like_get_without_a_body() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let body = run_body("run_h", "COMPLETED", 700);
    mock.set("run_h", Reply::ok(body.clone()));

    let head = gateway.send(Method::HEAD, &runs_path("run_h"), &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.x_cache(), Some("MISS"));
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(
        mock.requests()[0].method,
        Method::GET,
        "upstream is always asked with GET"
    );

    let get = gateway.get_run("run_h").await;
    assert_eq!(get.x_cache(), Some("HIT"));
    assert_eq!(get.body, body);
}

#[tokio::test]
async fn the_cache_is_bounded_by_bytes() {
    let mock = MockUpstream::start().await;
    // Room for about eight 1 KiB runs.
    let gateway =
        TestGateway::start(&mock, |config| config.cache.max_size = bytesize::ByteSize::kib(8)).await;
    let ids: Vec<String> = (0..40).map(|index| format!("run_{index}")).collect();
    for id in &ids {
        mock.set(id, Reply::ok(run_body(id, "COMPLETED", 1024)));
        // Stored (MISS), or declined by the full cache's admission policy (PASS).
        let first = gateway.get_run(id).await;
        assert!(
            matches!(first.x_cache(), Some("MISS" | "PASS")),
            "{id}: {:?}",
            first.x_cache()
        );
    }
    let mut hits = 0;
    for id in &ids {
        let response = gateway.get_run(id).await;
        assert_eq!(response.status, StatusCode::OK);
        if response.x_cache() == Some("HIT") {
            hits += 1;
        }
    }
    assert!(
        hits <= 8,
        "{hits} of 40 runs still cached: the size bound does not hold"
    );
    assert!(hits >= 1, "a bounded cache still caches");
    assert_eq!(mock.request_count(), 40 + (40 - hits));
}

#[tokio::test]
async fn entries_expire_after_the_ttl() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.cache.ttl = std::time::Duration::from_millis(300)
    })
    .await;
    mock.set("run_t", Reply::run("run_t", "COMPLETED"));
    let first = gateway.get_run("run_t").await;
    assert_eq!(
        first.header("cache-control"),
        Some("private, max-age=0, immutable")
    );
    assert_eq!(gateway.get_run("run_t").await.x_cache(), Some("HIT"));
    support::eventually("the entry expires", || async {
        gateway.get_run("run_t").await.x_cache() == Some("MISS")
    })
    .await;
}

#[tokio::test]
async fn a_terminal_run_larger_than_the_whole_cache_is_a_pass_not_a_miss() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.cache.max_size = bytesize::ByteSize::kib(1);
    })
    .await;
    mock.set("huge", Reply::ok(run_body("huge", "COMPLETED", 2048)));
    mock.set("small", Reply::run("small", "COMPLETED"));
    for _ in 0..2 {
        let response = gateway.get_run("huge").await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(
            response.x_cache(),
            Some("PASS"),
            "it was not stored, so it is not a MISS"
        );
        assert_eq!(response.header("cache-control"), Some("no-store"));
    }
    assert_eq!(mock.count_for("huge"), 2);
    // One that fits is stored as ever.
    assert_eq!(gateway.get_run("small").await.x_cache(), Some("MISS"));
    assert_eq!(gateway.get_run("small").await.x_cache(), Some("HIT"));
}

#[tokio::test]
async fn a_terminal_body_that_is_not_utf8_is_passed_not_stored() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let mut body = br#"{"id":"bad","status":"COMPLETED","note":""#.to_vec();
    body.extend_from_slice(b"\xc3\x28");
    body.extend_from_slice(br#""}"#);
    mock.set("bad", Reply::ok(body.clone()));
    for _ in 0..2 {
        let response = gateway.get_run("bad").await;
        assert_eq!(response.x_cache(), Some("PASS"));
        assert_eq!(response.body, body, "forwarded as upstream sent it");
    }
    assert_eq!(mock.count_for("bad"), 2, "never served from memory");
}

#[tokio::test]
async fn a_run_the_full_cache_declines_to_admit_is_a_pass_not_a_miss() {
    let mock = MockUpstream::start().await;
    // Room for about two runs of 1 KiB.
    let gateway = TestGateway::start(&mock, |config| {
        config.cache.max_size = bytesize::ByteSize::b(2 * 1024 + 200);
    })
    .await;
    for id in ["popular_1", "popular_2", "newcomer"] {
        mock.set(id, Reply::ok(run_body(id, "COMPLETED", 1024)));
    }
    // Two runs asked for often fill the cache.
    for _ in 0..20 {
        for id in ["popular_1", "popular_2"] {
            assert_eq!(gateway.get_run(id).await.status, StatusCode::OK);
        }
    }
    // A run asked for once is less valuable than either: TinyLFU declines it, so it was not
    // stored and must not say it was.
    let newcomer = gateway.get_run("newcomer").await;
    assert_eq!(newcomer.status, StatusCode::OK);
    assert_eq!(newcomer.x_cache(), Some("PASS"));
    assert_eq!(newcomer.header("cache-control"), Some("no-store"));
    assert_eq!(gateway.get_run("newcomer").await.x_cache(), Some("PASS"));
    assert_eq!(mock.count_for("newcomer"), 2);
    assert_eq!(gateway.get_run("popular_1").await.x_cache(), Some("HIT"));
}
