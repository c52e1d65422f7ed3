//! The SSE parsing path on the real samples (`tests/fixtures/opencti/`, copies of
//! `shared/opencti/`) and on the corners of the format; ids, `connected`, URLs.

use super::*;
use futures_util::stream;

const SAMPLE: &str = include_str!("../../../tests/fixtures/opencti/stream-sample.txt");
const RECOVER: &str = include_str!("../../../tests/fixtures/opencti/stream-sample-recover.txt");
const LEGACY: &str = include_str!("../../../tests/fixtures/opencti/stream-sample-legacy-4.x.txt");

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
        .block_on(future)
}

/// Feeds `bytes` in chunks of `chunk` bytes through [`EventStream`] and collects every item.
fn decode(bytes: &[u8], chunk: usize) -> Vec<Result<SseEvent, StreamError>> {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(chunk.max(1)).map(|c| Ok(c.to_vec())).collect();
    let events = EventStream::from_byte_stream(stream::iter(chunks));
    block_on(events.collect::<Vec<_>>())
}

/// The events before the final `Ended`, asserting that the stream ended cleanly.
fn events(bytes: &[u8], chunk: usize) -> Vec<SseEvent> {
    let mut items = decode(bytes, chunk);
    assert_eq!(items.pop(), Some(Err(StreamError::Ended)));
    items
        .into_iter()
        .map(|item| item.expect("an event"))
        .collect()
}

fn summary(events: &[SseEvent]) -> Vec<(Option<&str>, &str)> {
    events
        .iter()
        .map(|e| (e.id.as_deref(), e.event.as_str()))
        .collect()
}

/// Every chunking gives the same events: whole, one byte at a time, odd sizes that split
/// lines, UTF-8 sequences and the `\n\n` between events.
fn events_any_chunking(bytes: &[u8]) -> Vec<SseEvent> {
    let whole = events(bytes, bytes.len());
    for chunk in [1, 2, 3, 7, 64, 1000, 4096] {
        assert_eq!(events(bytes, chunk), whole, "chunks of {chunk} bytes");
    }
    whole
}

#[test]
fn sample_6x_live_stream() {
    let events = events_any_chunking(SAMPLE.as_bytes());
    let hb = |id| [(Some(id), "heartbeat"), (Some(id), "consumer_metrics")];
    let mut expected = vec![(None, "connected")];
    expected.extend(hb("1709287205021-0"));
    expected.extend(hb("1709287210034-0"));
    expected.extend([(Some("1709287215731-0"), "create"); 3]);
    expected.extend(hb("1709287220047-0"));
    expected.push((Some("1709287262480-1"), "update"));
    expected.extend(hb("1709287265061-0"));
    expected.push((Some("1709287330108-0"), "delete"));
    expected.extend(hb("1709287335112-0"));
    assert_eq!(summary(&events), expected);

    // The data is the line as sent, JSON throughout.
    for event in &events {
        assert!(!event.data.contains('\n'));
        serde_json::from_str::<serde_json::Value>(&event.data).expect("JSON data");
    }
    let referers: Vec<_> = events
        .iter()
        .filter(|e| e.event == "create")
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
            v["origin"]["referer"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(referers[..2], ["dependencies", "dependencies"]);
    assert!(referers[2].starts_with("http"));
    assert_eq!(events[1].data, "\"2024-03-01T10:00:05.021Z\"");

    let connected = parse_connected(&events[0].data).unwrap();
    assert_eq!(
        connected,
        Connected {
            last_event_id: Some("1709287187417-0".into()),
            first_event_id: Some("1706781243113-0".into()),
            first_event_date: Some("2024-02-01T09:54:03.113Z".into()),
            last_event_date: Some("2024-03-01T09:59:47.417Z".into()),
            stream_size: Some(1_874_233),
            connection_id: Some("d6f1c0a4-3b8e-4f5a-9c2d-7e8f9a0b1c2d".into()),
        }
    );
}

#[test]
fn sample_recover() {
    let events = events_any_chunking(RECOVER.as_bytes());
    assert_eq!(
        summary(&events),
        [
            (None, "connected"),
            (Some("1706774401234-0"), "create"),
            (Some("1707747669871-0"), "create"),
            (Some("1707747669871-0"), "heartbeat"),
            (Some("1707747669871-0"), "consumer_metrics"),
            (Some("1708447503118-0"), "create"),
            (Some("1709287323544-0"), "heartbeat"),
            (Some("1709287323544-0"), "consumer_metrics"),
        ]
    );
    for event in events.iter().filter(|e| e.event == "create") {
        let v: serde_json::Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(v["origin"]["referer"], "init");
        assert!(v.get("type").is_none() && v.get("event_id").is_none());
    }
}

#[test]
fn sample_legacy_4x_heartbeat_has_no_id() {
    let events = events_any_chunking(LEGACY.as_bytes());
    assert_eq!(
        summary(&events),
        [
            (None, "connected"),
            (Some("1614593215731-0"), "create"),
            // Without an id line: not the previous event's id, as EventSource would say.
            (None, "heartbeat"),
            (Some("1614593262480-0"), "update"),
            (Some("1614593330108-0"), "delete"),
        ]
    );
    let connected = parse_connected(&events[0].data).unwrap();
    assert_eq!(connected.last_event_id.as_deref(), Some("1614593187417-0"));
    assert_eq!(connected.first_event_id, None);
    assert_eq!(connected.stream_size, Some(48211));
}

/// The same events and data as the `eventsource-stream` crate finds (which differs only in
/// carrying the last id over to events without an id line, as a browser does).
#[test]
fn samples_agree_with_eventsource_stream() {
    use eventsource_stream::Eventsource;
    for text in [SAMPLE, RECOVER, LEGACY] {
        let ours = events(text.as_bytes(), 1000);
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = text
            .as_bytes()
            .chunks(1000)
            .map(|c| Ok(c.to_vec()))
            .collect();
        let theirs: Vec<_> = block_on(stream::iter(chunks).eventsource().collect::<Vec<_>>())
            .into_iter()
            .map(|e| e.expect("an event"))
            .collect();
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(a.event, b.event);
            assert_eq!(a.data, b.data);
            if let Some(id) = &a.id {
                assert_eq!(id, &b.id);
            }
        }
    }
}

#[test]
fn line_endings_bom_comments_and_fields() {
    let text = "\u{feff}: a comment\r\nid: 1-0\r\nevent: create\r\ndata: {\"a\":1}\r\n\r\n\
                retry: 5000\rdata:no space\rdata:  two spaces\r\rdata\nid\nevent\n\n\
                id: x\0y\ndata: nul id ignored\n\nunknown: field\ndata: z\n\n";
    let got = events_any_chunking(text.as_bytes());
    let expected = [
        SseEvent {
            id: Some("1-0".into()),
            event: "create".into(),
            data: "{\"a\":1}".into(),
        },
        SseEvent {
            id: None,
            event: "message".into(),
            data: "no space\n two spaces".into(),
        },
        SseEvent {
            id: None,
            event: "message".into(),
            data: String::new(),
        },
        SseEvent {
            id: None,
            event: "message".into(),
            data: "nul id ignored".into(),
        },
        SseEvent {
            id: None,
            event: "message".into(),
            data: "z".into(),
        },
    ];
    assert_eq!(got, expected);
}

#[test]
fn an_event_without_data_is_not_dispatched_and_ids_do_not_leak() {
    let got = events_any_chunking(b"id: 5-0\nevent: ping\n\ndata: after\n\n");
    assert_eq!(
        got,
        [SseEvent {
            id: None,
            event: "message".into(),
            data: "after".into()
        }]
    );
}

#[test]
fn a_partial_event_at_the_end_is_dropped() {
    for tail in ["id: 2-0\nevent: create\ndata: {}\n", "id: 2-0\nevent: cre"] {
        let text = format!("id: 1-0\nevent: create\ndata: {{}}\n\n{tail}");
        let got = events(text.as_bytes(), 5);
        assert_eq!(summary(&got), [(Some("1-0"), "create")]);
    }
}

/// Feeds `bytes` in chunks of `chunk` bytes with an event limit of `max` and collects
/// every item, asserting that the stream ended cleanly.
fn decode_limited(bytes: &[u8], chunk: usize, max: usize) -> Vec<Result<SseEvent, StreamError>> {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(chunk.max(1)).map(|c| Ok(c.to_vec())).collect();
    let events = EventStream::with_max_event_bytes(stream::iter(chunks), max);
    let mut items = block_on(events.collect::<Vec<_>>());
    assert_eq!(items.pop(), Some(Err(StreamError::Ended)));
    items
}

fn poison(item: &Result<SseEvent, StreamError>) -> &PoisonEvent {
    match item {
        Err(StreamError::Poison(p)) => p,
        other => panic!("expected a poisoned event, got {other:?}"),
    }
}

#[test]
fn invalid_utf8_poisons_one_event_and_the_stream_goes_on() {
    let text = b"id: 1-0\nevent: create\ndata: ok\n\n\
                 id: 2-0\nevent: create\ndata: {\"name\":\"\xff\xfe\"}\n\n\
                 id: 3-0\nevent: update\ndata: after\n\n";
    for chunk in [1, 2, 3, 7, 64, text.len()] {
        let items = decode_limited(text, chunk, DEFAULT_MAX_EVENT_BYTES);
        assert_eq!(items.len(), 3, "chunks of {chunk}");
        assert_eq!(items[0].as_ref().map(|e| e.data.as_str()), Ok("ok"));
        let bad = poison(&items[1]);
        assert_eq!(bad.id.as_deref(), Some("2-0"));
        assert_eq!(bad.event, "create");
        assert_eq!(bad.data, b"{\"name\":\"\xff\xfe\"}");
        assert!(bad.reason.contains("not valid UTF-8"), "{}", bad.reason);
        assert!(bad.reason.contains("byte 9"), "{}", bad.reason);
        let after = items[2].as_ref().expect("the event after the poison");
        assert_eq!(
            (after.id.as_deref(), after.data.as_str()),
            (Some("3-0"), "after")
        );
    }
}

#[test]
fn an_invalid_id_or_name_poisons_the_event_without_an_id() {
    let text = b"id: 1-\xff\nevent: create\ndata: {}\n\nid: 2-0\nevent: cr\xffate\ndata: {}\n\n";
    let items = decode_limited(text, 3, DEFAULT_MAX_EVENT_BYTES);
    assert_eq!(items.len(), 2);
    assert_eq!(poison(&items[0]).id, None);
    assert!(poison(&items[0]).reason.contains("id"));
    assert_eq!(poison(&items[1]).id.as_deref(), Some("2-0"));
    assert_eq!(poison(&items[1]).event, "cr\u{fffd}ate");
}

#[test]
fn an_event_over_the_limit_is_poisoned_with_a_prefix_and_the_next_one_is_read() {
    let max = POISON_PREFIX_BYTES * 2;
    let big = "x".repeat(POISON_PREFIX_BYTES * 5);
    let split = format!("a{}", "y".repeat(POISON_PREFIX_BYTES * 6 / 5));
    // One huge line; an event whose lines only add up to too much; a small one after each.
    let text = format!(
        "id: 1-0\nevent: create\ndata: {big}\n\nid: 2-0\nevent: ok\ndata: small\n\n\
         id: 3-0\nevent: update\ndata: {split}\ndata: {split}\n\nid: 4-0\nevent: ok\ndata: end\n\n"
    );
    for chunk in [1, 7, 999, 65536, text.len()] {
        let items = decode_limited(text.as_bytes(), chunk, max);
        assert_eq!(items.len(), 4, "chunks of {chunk}");
        let first = poison(&items[0]);
        assert_eq!(
            (first.id.as_deref(), first.event.as_str()),
            (Some("1-0"), "create")
        );
        assert_eq!(first.data.len(), POISON_PREFIX_BYTES, "a bounded prefix");
        assert!(first.data.iter().all(|&b| b == b'x'));
        assert_eq!(first.size, "id: 1-0event: createdata: ".len() + big.len());
        assert!(
            first
                .reason
                .contains(&format!("over bridge.max_event_bytes ({max})")),
            "{}",
            first.reason
        );
        assert_eq!(items[1].as_ref().map(|e| e.data.as_str()), Ok("small"));
        let third = poison(&items[2]);
        assert_eq!(third.id.as_deref(), Some("3-0"));
        assert_eq!(third.data.len(), POISON_PREFIX_BYTES);
        assert!(
            split.as_bytes().starts_with(&third.data),
            "its data so far is kept"
        );
        assert_eq!(items[3].as_ref().map(|e| e.data.as_str()), Ok("end"));
    }
}

#[test]
fn memory_stays_bounded_while_an_oversized_line_streams_in() {
    let max = 4096;
    let mut parser = Parser::new(max);
    parser.push(b"id: 7-0\nevent: create\ndata: ");
    let chunk = vec![b'z'; 1000];
    for _ in 0..10_000 {
        parser.push(&chunk);
        assert!(parser.next_event().is_none());
        assert!(
            parser.buf.len() <= max + chunk.len() + 64,
            "{}",
            parser.buf.len()
        );
        assert!(parser.current.data.len() <= POISON_PREFIX_BYTES);
    }
    parser.push(b"\n\n");
    let event = parser
        .next_event()
        .expect("dispatched")
        .expect_err("poisoned");
    assert_eq!(event.id.as_deref(), Some("7-0"));
    assert_eq!(
        event.size,
        "id: 7-0event: createdata: ".len() + 10_000 * 1000
    );
}

#[test]
fn a_huge_comment_is_skipped_not_poison() {
    let text = format!(": {}\nid: 1-0\ndata: fine\n\n", "c".repeat(5000));
    for chunk in [3, 1000, text.len()] {
        let items = decode_limited(text.as_bytes(), chunk, 100);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].as_ref().map(|e| e.data.as_str()), Ok("fine"));
    }
}

#[test]
fn a_transport_error_ends_the_stream_after_the_complete_events() {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(b"id: 1-0\nevent: create\ndata: {}\n\nid: 2-0\ndata: {".to_vec()),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset by peer",
        )),
        Ok(b"}\n\n".to_vec()),
    ];
    let items: Vec<_> =
        block_on(EventStream::from_byte_stream(stream::iter(chunks)).collect::<Vec<_>>());
    assert_eq!(items.len(), 2);
    assert!(items[0].is_ok());
    match &items[1] {
        Err(StreamError::Transport { message }) => assert!(message.contains("reset by peer")),
        other => panic!("expected a transport error, got {other:?}"),
    }
}

#[test]
fn line_end_search_finds_the_first_cr_or_lf() {
    for len in 0..40 {
        for at in 0..len {
            for terminator in [b'\n', b'\r'] {
                let mut bytes = vec![b'a'; len];
                bytes[at] = terminator;
                if at + 1 < len {
                    bytes[at + 1] = b'\n';
                }
                assert_eq!(find_line_end(&bytes), Some(at), "len {len} at {at}");
            }
        }
        assert_eq!(find_line_end(&vec![0xff; len]), None);
    }
    assert_eq!(find_line_end("ééééé\n".as_bytes()), Some(10));
}

#[test]
fn event_ids_compare_numerically() {
    use Ordering::*;
    assert_eq!(compare_event_ids("0-0", "0-1"), Some(Less));
    assert_eq!(compare_event_ids("0-0", "1-0"), Some(Less));
    assert_eq!(compare_event_ids("0-0", "0-0"), Some(Equal));
    assert_eq!(
        compare_event_ids("1709287262480-1", "1709287262480-0"),
        Some(Greater)
    );
    assert_eq!(
        compare_event_ids("999999999999-0", "1000000000000-0"),
        Some(Less)
    );
    assert_eq!(compare_event_ids("5-10", "5-9"), Some(Greater));
    assert_eq!(
        compare_event_ids("18446744073709551615-0", "1-18446744073709551615"),
        Some(Greater)
    );
    for garbage in [
        "",
        "-",
        "1",
        "1-",
        "-1",
        "a-0",
        "1-0-0",
        " 1-0",
        "1-+0",
        "18446744073709551616-0",
        "1709287262480",
    ] {
        assert_eq!(compare_event_ids(garbage, "0-0"), None, "{garbage:?}");
        assert_eq!(compare_event_ids("0-0", garbage), None, "{garbage:?}");
    }
    let id: EventId = "1709287262480-1".parse().unwrap();
    assert_eq!(
        id,
        EventId {
            millis: 1_709_287_262_480,
            seq: 1
        }
    );
    assert_eq!(id.to_string(), "1709287262480-1");
    assert!(EventId::ZERO < id);
}

#[test]
fn connected_tolerates_missing_and_unknown_keys_but_not_wrong_types() {
    let c = parse_connected(r#"{"lastEventId":"1-0","clients":3}"#).unwrap();
    assert_eq!(c.last_event_id.as_deref(), Some("1-0"));
    assert_eq!(c.first_event_id, None);
    assert!(matches!(
        parse_connected(r#"{"firstEventId":5}"#),
        Err(StreamError::Protocol(_))
    ));
    assert!(matches!(
        parse_connected("\"2024-01-01\""),
        Err(StreamError::Protocol(_))
    ));
    assert!(matches!(
        parse_connected("{"),
        Err(StreamError::Protocol(_))
    ));
}

#[test]
fn stream_urls() {
    let url = |base: &str, id: Option<&str>| stream_url(base, id).map(|u| u.to_string());
    assert_eq!(
        url("https://cti.example.org", None).unwrap(),
        "https://cti.example.org/stream"
    );
    assert_eq!(
        url("https://cti.example.org/", Some("live")).unwrap(),
        "https://cti.example.org/stream/live"
    );
    assert_eq!(
        url("http://host:8080/opencti/", Some("a b/c")).unwrap(),
        "http://host:8080/opencti/stream/a%20b%2Fc"
    );
    assert_eq!(
        url("http://host/?x=1#frag", None).unwrap(),
        "http://host/stream"
    );
    for bad in ["", "not a url", "ftp://host", "mailto:x@y"] {
        assert!(
            matches!(stream_url(bad, None), Err(StreamError::Setup { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn config_maps_to_stream_config_and_nothing_shows_the_token() {
    let env = |name: &str| -> Option<String> {
        match name {
            "OPENCTI_URL" => Some("https://cti.example.org".into()),
            "OPENCTI_TOKEN" => Some("b5e2c9e0-token-value".into()),
            "CONNECTOR_ID" => Some("5d4bb5f7-2b1d-4a53-9d2b-63e0b1c1c0aa".into()),
            "CONNECTOR_TYPE" => Some("STREAM".into()),
            "CONNECTOR_NAME" => Some("Threat Bus".into()),
            "CONNECTOR_SCOPE" => Some("threatbus".into()),
            "CONNECTOR_CONFIDENCE_LEVEL" => Some("50".into()),
            "CONNECTOR_LOG_LEVEL" => Some("info".into()),
            "CONNECTOR_ENTITY_NAME" => Some("Threat Bus".into()),
            "CONNECTOR_ENTITY_DESCRIPTION" => Some("bridge".into()),
            "CONNECTOR_LIVE_STREAM_ID" => Some("live".into()),
            "CONNECTOR_LIVE_STREAM_WITH_INFERENCES" => Some("true".into()),
            "THREATBUS_ZMQ_HOST" => Some("127.0.0.1".into()),
            "THREATBUS_ZMQ_PORT" => Some("13370".into()),
            "OPENCTI_SSL_VERIFY" => Some("false".into()),
            _ => None,
        }
    };
    let config = Config::from_sources(None, &env).expect("valid configuration");
    let cfg = StreamConfig::from_config(&config);
    assert_eq!(cfg.base_url, "https://cti.example.org");
    assert_eq!(cfg.live_stream_id.as_deref(), Some("live"));
    assert!(cfg.listen_delete && cfg.no_dependencies && cfg.with_inferences);
    assert!(!cfg.ssl_verify);
    assert_eq!(cfg.token.expose(), "b5e2c9e0-token-value");
    let client = StreamClient::new(&cfg).unwrap();
    assert_eq!(client.url(), "https://cti.example.org/stream/live");
    for text in [format!("{cfg:?}"), format!("{client:?}")] {
        assert!(!text.contains("token-value"), "{text}");
    }
    let bad = StreamConfig {
        token: Secret::new("abc\ndef-token-value"),
        ..cfg
    };
    let error = StreamClient::new(&bad).unwrap_err();
    assert!(matches!(error, StreamError::Setup { .. }));
    assert!(!format!("{error} {error:?}").contains("token-value"));
}
