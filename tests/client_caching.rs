//! What clients may cache: ETags and 304s on ended runs, no-store on everything else, HEAD, and
//! the optional memory of upstream 404s.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::{MockUpstream, Reply, TestGateway, run_body, runs_path};

#[tokio::test]
async fn ended_runs_carry_a_strong_etag_and_revalidate_to_304() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("done", Reply::ok(run_body("done", "COMPLETED", 900)));

    let first = gateway.get_run("done").await;
    let etag = first.header("etag").expect("an ETag").to_owned();
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && !etag.starts_with("W/"),
        "{etag}"
    );
    assert_eq!(
        first.header("cache-control"),
        Some("private, max-age=86400, immutable")
    );
    // The same URL answers an event stream to `Accept: text/event-stream`: kept copies vary by it.
    assert_eq!(first.header("vary"), Some("accept"));
    assert_eq!(
        gateway.get_run("done").await.header("etag"),
        Some(etag.as_str()),
        "same tag on a hit"
    );

    for if_none_match in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"nope\", {etag}"),
        "*".to_owned(),
    ] {
        let revalidated = gateway
            .send(
                Method::GET,
                &runs_path("done"),
                &[("if-none-match", &if_none_match)],
            )
            .await;
        assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED, "{if_none_match}");
        assert!(revalidated.body.is_empty());
        assert_eq!(revalidated.header("etag"), Some(etag.as_str()));
        assert_eq!(
            revalidated.header("cache-control"),
            Some("private, max-age=86400, immutable")
        );
        assert_eq!(revalidated.x_cache(), Some("HIT"));
    }
    let changed = gateway
        .send(
            Method::GET,
            &runs_path("done"),
            &[("if-none-match", "\"something-else\"")],
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_eq!(changed.body, first.body);

    let head = gateway
        .send(Method::HEAD, &runs_path("done"), &[("if-none-match", &etag)])
        .await;
    assert_eq!(head.status, StatusCode::NOT_MODIFIED);
    assert_eq!(mock.count_for("done"), 1);

    let scrape = gateway.scrape().await;
    assert_eq!(
        scrape.expect(
            "plextera_gateway_requests_total",
            &[("cache", "hit"), ("code", "304")]
        ),
        5.0
    );
}

#[tokio::test]
async fn the_etag_is_the_same_on_every_replica() {
    let mock = MockUpstream::start().await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    let one = TestGateway::start(&mock, |_| {}).await;
    let other = TestGateway::start(&mock, |_| {}).await;
    let etag = one.get_run("done").await.header("etag").expect("etag").to_owned();
    // A browser that got the run from one replica revalidates against another, cold one.
    let revalidated = other
        .send(Method::GET, &runs_path("done"), &[("if-none-match", &etag)])
        .await;
    assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED);
    assert_eq!(revalidated.x_cache(), Some("MISS"));
}

#[tokio::test]
async fn runs_still_going_get_no_store_and_a_weak_version_that_ignores_the_ticking_duration() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let live = |status: &str, duration: u32| {
        Reply::ok(format!(
            r#"{{"id":"live","status":"{status}","computedDurationMs":{duration},"steps":[{{"computedDurationMs":{duration}}}]}}"#
        ))
    };
    mock.set("live", live("PROCESSING", 100));
    let first = gateway
        .send(Method::GET, &runs_path("live"), &[("if-none-match", "*")])
        .await;
    assert_eq!(
        first.status,
        StatusCode::OK,
        "`*` names no version of a run still going"
    );
    assert_eq!(first.header("cache-control"), Some("no-store"));
    let version = first.header("etag").expect("a version").to_owned();
    assert!(version.starts_with("W/\""), "{version}");

    // Only the duration ticked: the same version, a 304 without a body, still fetched upstream.
    mock.set("live", live("PROCESSING", 1100));
    let same = gateway
        .send(Method::GET, &runs_path("live"), &[("if-none-match", &version)])
        .await;
    assert_eq!(same.status, StatusCode::NOT_MODIFIED);
    assert!(same.body.is_empty());
    assert_eq!(same.header("etag"), Some(version.as_str()));
    assert_eq!(same.header("cache-control"), Some("no-store"));
    assert_eq!(same.x_cache(), Some("PASS"));
    assert_eq!(mock.count_for("live"), 2, "never answered from memory");

    // Anything else changed: a new version, answered whole.
    mock.set("live", live("QUEUED", 1200));
    let changed = gateway
        .send(Method::GET, &runs_path("live"), &[("if-none-match", &version)])
        .await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_ne!(changed.header("etag"), Some(version.as_str()));
    assert_eq!(changed.json()["status"], "QUEUED");
}

#[tokio::test]
async fn upstream_404s_are_remembered_only_when_configured() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.cache.not_found_ttl = Duration::from_millis(300);
    })
    .await;
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let response = gateway.get_run("ghost").await;
        outcomes.push((response.status, response.x_cache().map(str::to_owned)));
    }
    let (miss, hit) = (Some("MISS".to_owned()), Some("HIT".to_owned()));
    assert_eq!(
        outcomes,
        [
            (StatusCode::NOT_FOUND, miss),
            (StatusCode::NOT_FOUND, hit.clone()),
            (StatusCode::NOT_FOUND, hit)
        ]
    );
    assert_eq!(mock.count_for("ghost"), 1);
    let remembered = gateway.get_run("ghost").await;
    assert_eq!(mock.count_for("ghost"), 1, "answered from memory");
    assert_eq!(remembered.header("cache-control"), Some("no-store"));
    assert!(remembered.header("etag").is_none());
    assert_eq!(
        remembered.error_code(),
        "NOT_FOUND",
        "upstream's own body is kept"
    );

    // The run appears upstream; once the short memory lapses, it is found.
    mock.set("ghost", Reply::run("ghost", "PROCESSING"));
    support::eventually("the remembered 404 expires", || async {
        gateway.get_run("ghost").await.status == StatusCode::OK
    })
    .await;
    assert_eq!(mock.count_for("ghost"), 2);
}
