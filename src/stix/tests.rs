//! Mapping tests driven by the stream samples in `tests/fixtures/opencti/` (copies of
//! `shared/opencti/`), plus one test per STIX check.

use super::*;
use proptest::prelude::*;
use serde_json::json;

const SAMPLE: &str = include_str!("../../tests/fixtures/opencti/stream-sample.txt");
const RECOVER: &str = include_str!("../../tests/fixtures/opencti/stream-sample-recover.txt");
const LEGACY: &str = include_str!("../../tests/fixtures/opencti/stream-sample-legacy-4.x.txt");
const FIXTURE: &str =
    include_str!("../../tests/fixtures/opencti/stream-event-stix2-indicators.json");

/// One SSE event as the samples write it.
#[derive(Debug, Clone)]
struct Sse {
    id: Option<String>,
    event: String,
    data: String,
}

/// Test-only SSE splitter: blocks separated by blank lines, `field: value` lines, the
/// event type defaulting to `message`, multi-line data joined with `\n`.
fn parse_sse(text: &str) -> Vec<Sse> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut sse = Sse {
                id: None,
                event: "message".to_owned(),
                data: String::new(),
            };
            for line in block.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => sse.id = Some(value.to_owned()),
                    "event" => sse.event = value.to_owned(),
                    "data" if sse.data.is_empty() => sse.data = value.to_owned(),
                    "data" => sse.data = format!("{}\n{value}", sse.data),
                    _ => {}
                }
            }
            sse
        })
        .collect()
}

fn data_events(text: &str) -> Vec<Sse> {
    parse_sse(text)
        .into_iter()
        .filter(|e| EventKind::from_sse(&e.event).is_some())
        .collect()
}

fn stix_of(event: &Sse) -> Value {
    let envelope: Value = serde_json::from_str(&event.data).unwrap();
    envelope["data"].clone()
}

fn with_update(mut obj: Value, update: Option<&str>) -> Value {
    let map = obj.as_object_mut().unwrap();
    match update {
        Some(u) => map.insert(X_THREATBUS_UPDATE.to_owned(), json!(u)),
        None => map.remove(X_THREATBUS_UPDATE),
    };
    obj
}

fn published(action: StreamAction) -> Vec<Value> {
    match action {
        StreamAction::Publish(objects) => objects,
        other => panic!("expected Publish, got {other:?}"),
    }
}

fn updates(objects: &[Value]) -> Vec<Option<&str>> {
    objects
        .iter()
        .map(|o| o.get(X_THREATBUS_UPDATE).and_then(Value::as_str))
        .collect()
}

fn event(kind: &str, envelope: &Value) -> StreamAction {
    map_stream_event(kind, &envelope.to_string(), false)
}

fn fixture_indicators() -> Vec<Value> {
    match serde_json::from_str(FIXTURE).unwrap() {
        Value::Array(items) => items,
        other => panic!("fixture is not a list: {other}"),
    }
}

/// The detection-on indicator from the stream sample's update event.
fn sample_indicator() -> Value {
    stix_of(&data_events(SAMPLE)[3])
}

fn set_detection(obj: &mut Value, on: bool) {
    obj["extensions"][OPENCTI_EXTENSION]["detection"] = json!(on);
}

// ---------------------------------------------------------------------------------------
// stream-sample.txt (6.9)

#[test]
fn sample_has_the_expected_shape() {
    let all = parse_sse(SAMPLE);
    assert_eq!(all.len(), 16);
    assert_eq!(all[0].event, "connected");
    assert_eq!(all[0].id, None);
    let kinds: Vec<String> = data_events(SAMPLE).into_iter().map(|e| e.event).collect();
    assert_eq!(kinds, ["create", "create", "create", "update", "delete"]);
}

#[test]
fn sample_non_data_events_are_skipped() {
    for sse in parse_sse(SAMPLE) {
        if EventKind::from_sse(&sse.event).is_none() {
            assert_eq!(
                map_stream_event(&sse.event, &sse.data, true),
                StreamAction::Skip {
                    reason: SkipReason::NotADataEvent {
                        event_type: sse.event.clone()
                    }
                }
            );
            assert!(!is_dependency_data(&sse.data));
        }
    }
}

#[test]
fn sample_dependency_creates_are_skipped_and_flagged() {
    let events = data_events(SAMPLE);
    let indicator_id = events[2].id.clone();
    for (sse, stix_type) in events[..2].iter().zip(["marking-definition", "identity"]) {
        assert!(is_dependency_data(&sse.data), "{}", sse.data);
        assert_eq!(sse.id, indicator_id, "dependencies share the SSE id");
        for forward_all in [false, true] {
            assert_eq!(
                map_stream_event(&sse.event, &sse.data, forward_all),
                StreamAction::Skip {
                    reason: SkipReason::NotAnIndicator {
                        stix_type: stix_type.to_owned()
                    }
                }
            );
        }
    }
    assert!(!is_dependency_data(&events[2].data));
}

#[test]
fn sample_create_with_detection_off() {
    let create = &data_events(SAMPLE)[2];
    assert_eq!(
        map_stream_event(&create.event, &create.data, false),
        StreamAction::Skip {
            reason: SkipReason::DetectionOff
        }
    );
    let objects = published(map_stream_event(&create.event, &create.data, true));
    // Forwarded as-is: the full object, every field, no x_threatbus_update.
    assert_eq!(objects, vec![stix_of(create)]);
    assert_eq!(updates(&objects), [None]);
}

#[test]
fn sample_update_turning_detection_on_is_an_edit() {
    let update = &data_events(SAMPLE)[3];
    for forward_all in [false, true] {
        let objects = published(map_stream_event(&update.event, &update.data, forward_all));
        assert_eq!(objects, vec![with_update(stix_of(update), Some("EDIT"))]);
    }
}

#[test]
fn sample_delete_is_a_remove() {
    let delete = &data_events(SAMPLE)[4];
    for forward_all in [false, true] {
        let objects = published(map_stream_event(&delete.event, &delete.data, forward_all));
        assert_eq!(objects, vec![with_update(stix_of(delete), Some("REMOVE"))]);
    }
}

/// The sample update, rewritten to turn detection off (true → false).
fn detection_off_update(reverse_patch: Option<Value>) -> Value {
    let update = &data_events(SAMPLE)[3];
    let mut envelope: Value = serde_json::from_str(&update.data).unwrap();
    set_detection(&mut envelope["data"], false);
    match reverse_patch {
        Some(patch) => envelope["context"]["reverse_patch"] = patch,
        None => {
            envelope.as_object_mut().unwrap().remove("context");
        }
    }
    envelope
}

#[test]
fn update_turning_detection_off_is_a_remove() {
    let reverse = json!([
        {"op": "replace", "path": format!("/extensions/{OPENCTI_EXTENSION}/detection"), "value": true}
    ]);
    let envelope = detection_off_update(Some(reverse));
    let objects = published(event("update", &envelope));
    assert_eq!(
        objects,
        vec![with_update(envelope["data"].clone(), Some("REMOVE"))]
    );
    // With forward_all_iocs, detection does not matter: an edit.
    let objects = published(map_stream_event("update", &envelope.to_string(), true));
    assert_eq!(updates(&objects), [Some("EDIT")]);
}

#[test]
fn update_of_an_indicator_never_forwarded_is_skipped() {
    // Only the description changed; detection was and is false.
    let reverse = json!([{"op": "replace", "path": "/description", "value": "old"}]);
    let envelope = detection_off_update(Some(reverse));
    assert_eq!(
        event("update", &envelope),
        StreamAction::Skip {
            reason: SkipReason::DetectionOff
        }
    );
}

#[test]
fn update_with_unknown_previous_state_is_a_remove() {
    // No context at all (as in OpenCTI < 5), or a reverse patch that does not apply.
    for envelope in [
        detection_off_update(None),
        detection_off_update(Some(
            json!([{"op": "replace", "path": "/nope", "value": 1}]),
        )),
        detection_off_update(Some(json!("garbage"))),
    ] {
        let objects = published(event("update", &envelope));
        assert_eq!(updates(&objects), [Some("REMOVE")]);
    }
}

#[test]
fn revoking_update_is_a_remove_even_with_forward_all() {
    let update = &data_events(SAMPLE)[3];
    let mut envelope: Value = serde_json::from_str(&update.data).unwrap();
    envelope["data"]["revoked"] = json!(true);
    envelope["context"]["reverse_patch"] =
        json!([{"op": "replace", "path": "/revoked", "value": false}]);
    for forward_all in [false, true] {
        let objects = published(map_stream_event(
            "update",
            &envelope.to_string(),
            forward_all,
        ));
        assert_eq!(updates(&objects), [Some("REMOVE")]);
    }
    // Already revoked before: nothing to remove.
    envelope["context"]["reverse_patch"] =
        json!([{"op": "replace", "path": "/name", "value": "x"}]);
    assert_eq!(
        event("update", &envelope),
        StreamAction::Skip {
            reason: SkipReason::Revoked
        }
    );
}

#[test]
fn existing_threatbus_update_is_replaced_or_removed() {
    let create = &data_events(SAMPLE)[2];
    let mut envelope: Value = serde_json::from_str(&create.data).unwrap();
    envelope["data"][X_THREATBUS_UPDATE] = json!("REMOVE");
    let objects = published(map_stream_event("create", &envelope.to_string(), true));
    assert_eq!(updates(&objects), [None]);
    let objects = published(map_stream_event("update", &envelope.to_string(), true));
    assert_eq!(updates(&objects), [Some("EDIT")]);
}

// ---------------------------------------------------------------------------------------
// stream-sample-recover.txt

#[test]
fn recover_replay_creates_are_normal_creates() {
    let events = data_events(RECOVER);
    assert_eq!(events.len(), 3);
    for sse in &events {
        let envelope: Value = serde_json::from_str(&sse.data).unwrap();
        assert_eq!(envelope["origin"]["referer"], "init");
        assert!(!is_dependency_data(&sse.data));
    }
    for (sse, stix_type) in events[..2].iter().zip(["marking-definition", "identity"]) {
        assert_eq!(
            map_stream_event(&sse.event, &sse.data, false),
            StreamAction::Skip {
                reason: SkipReason::NotAnIndicator {
                    stix_type: stix_type.to_owned()
                }
            }
        );
    }
    let objects = published(map_stream_event(&events[2].event, &events[2].data, false));
    assert_eq!(objects, vec![stix_of(&events[2])]);
    assert_eq!(updates(&objects), [None]);
}

// ---------------------------------------------------------------------------------------
// stream-sample-legacy-4.x.txt

#[test]
fn legacy_create_uses_top_level_detection() {
    let events = data_events(LEGACY);
    assert_eq!(events.len(), 3);
    let create = &events[0];
    assert_eq!(
        map_stream_event(&create.event, &create.data, false),
        StreamAction::Skip {
            reason: SkipReason::DetectionOff
        }
    );
    let objects = published(map_stream_event(&create.event, &create.data, true));
    assert_eq!(objects, vec![stix_of(create)]);
    assert_eq!(detection(&objects[0]), Some(false));
    assert_eq!(
        opencti_id(&objects[0]),
        Some("2b6f0a3e-8d4c-4f0b-a1e2-93c4d5e6f7a8")
    );
}

#[test]
fn legacy_update_needs_the_full_indicator() {
    let update = &data_events(LEGACY)[1];
    assert_eq!(
        map_stream_event(&update.event, &update.data, false),
        StreamAction::NeedsFullIndicator {
            stix_id: "indicator--bb6c1c9a-3c4a-5f5e-9c8c-5d2f0e8e4a11".to_owned(),
            opencti_id: "2b6f0a3e-8d4c-4f0b-a1e2-93c4d5e6f7a8".to_owned(),
            operation: Operation::Edit,
            patch: json!({"replace": {"x_opencti_detection": {"current": true, "previous": false}}}),
        }
    );
}

#[test]
fn legacy_update_completed_with_the_fetched_indicator() {
    let events = data_events(LEGACY);
    let patch = match map_stream_event(&events[1].event, &events[1].data, false) {
        StreamAction::NeedsFullIndicator { patch, .. } => patch,
        other => panic!("{other:?}"),
    };
    // What the API returns after the update: the delete event's object has detection on.
    let mut fetched = stix_of(&events[2]);
    let objects = published(map_fetched_indicator(fetched.clone(), &patch, false));
    assert_eq!(objects, vec![with_update(fetched.clone(), Some("EDIT"))]);

    // Detection turned off (true → false): REMOVE.
    fetched["x_opencti_detection"] = json!(false);
    let off = json!({"replace": {"x_opencti_detection": {"current": false, "previous": true}}});
    let objects = published(map_fetched_indicator(fetched.clone(), &off, false));
    assert_eq!(updates(&objects), [Some("REMOVE")]);

    // Detection off before and after (only the name changed): skipped.
    let rename = json!({"replace": {"name": {"current": "b", "previous": "a"}}});
    assert_eq!(
        map_fetched_indicator(fetched.clone(), &rename, false),
        StreamAction::Skip {
            reason: SkipReason::DetectionOff
        }
    );
    // A patch of unknown shape: previous state unknown, so REMOVE.
    let objects = published(map_fetched_indicator(fetched.clone(), &json!([1]), false));
    assert_eq!(updates(&objects), [Some("REMOVE")]);
    assert!(matches!(
        map_fetched_indicator(json!({"type": "identity"}), &off, false),
        StreamAction::Invalid { .. }
    ));
}

#[test]
fn legacy_delete_is_a_remove() {
    let delete = &data_events(LEGACY)[2];
    let objects = published(map_stream_event(&delete.event, &delete.data, false));
    assert_eq!(objects, vec![with_update(stix_of(delete), Some("REMOVE"))]);
}

#[test]
fn legacy_update_without_internal_id_is_invalid() {
    let update = &data_events(LEGACY)[1];
    let mut envelope: Value = serde_json::from_str(&update.data).unwrap();
    envelope["data"]
        .as_object_mut()
        .unwrap()
        .remove("x_opencti_id");
    let StreamAction::Invalid { reason } = event("update", &envelope) else {
        panic!("expected Invalid");
    };
    assert!(reason.contains("x_opencti_id"), "{reason}");
}

// ---------------------------------------------------------------------------------------
// stream-event-stix2-indicators.json (two revoked 5.x indicators)

fn envelope_of(stix: &Value) -> Value {
    json!({"version": "4", "type": "create", "origin": {}, "data": stix})
}

#[test]
fn fixture_indicators_are_valid_stix() {
    for indicator in fixture_indicators() {
        assert_eq!(validate_indicator(&indicator), Ok(()), "{indicator}");
    }
}

#[test]
fn fixture_revoked_creates_are_skipped() {
    for indicator in fixture_indicators() {
        for forward_all in [false, true] {
            let envelope = envelope_of(&indicator).to_string();
            assert_eq!(
                map_stream_event("create", &envelope, forward_all),
                StreamAction::Skip {
                    reason: SkipReason::Revoked
                }
            );
        }
    }
}

#[test]
fn fixture_revoked_updates_and_deletes_are_removes() {
    for indicator in fixture_indicators() {
        for kind in ["update", "delete"] {
            let objects = published(event(kind, &envelope_of(&indicator)));
            assert_eq!(
                objects,
                vec![with_update(indicator.clone(), Some("REMOVE"))]
            );
        }
    }
}

#[test]
fn fixture_unrevoked_follow_detection() {
    let indicators = fixture_indicators();
    let mut detected = indicators[0].clone();
    detected["revoked"] = json!(false);
    assert_eq!(detection(&detected), Some(true));
    let objects = published(event("create", &envelope_of(&detected)));
    assert_eq!(objects, vec![detected]);

    let mut not_detected = indicators[1].clone();
    not_detected["revoked"] = json!(false);
    assert_eq!(
        event("create", &envelope_of(&not_detected)),
        StreamAction::Skip {
            reason: SkipReason::DetectionOff
        }
    );
}

// ---------------------------------------------------------------------------------------
// merge

fn merge_envelope(sources: Value) -> Value {
    json!({
        "version": "4", "type": "merge", "scope": "external", "message": "merges",
        "origin": {"referer": "x"},
        "data": sample_indicator(),
        "context": {"patch": [], "reverse_patch": [], "sources": sources}
    })
}

#[test]
fn merge_removes_sources_then_edits_target() {
    let sources = fixture_indicators();
    let envelope = merge_envelope(json!([sources[0], {"type": "identity", "id": "x"}, sources[1]]));
    let objects = published(event("merge", &envelope));
    assert_eq!(
        objects,
        vec![
            with_update(sources[0].clone(), Some("REMOVE")),
            with_update(sources[1].clone(), Some("REMOVE")),
            with_update(sample_indicator(), Some("EDIT")),
        ]
    );
}

#[test]
fn merge_into_an_undetected_target_still_removes_sources() {
    let sources = fixture_indicators();
    let mut envelope = merge_envelope(json!([sources[1]]));
    set_detection(&mut envelope["data"], false);
    let objects = published(event("merge", &envelope));
    // The empty reverse patch says the target was not forwarded before either.
    assert_eq!(
        objects,
        vec![with_update(sources[1].clone(), Some("REMOVE"))]
    );

    let mut no_sources = merge_envelope(json!([]));
    set_detection(&mut no_sources["data"], false);
    assert_eq!(
        event("merge", &no_sources),
        StreamAction::Skip {
            reason: SkipReason::DetectionOff
        }
    );
}

#[test]
fn merge_with_an_invalid_source_is_invalid_whole() {
    let mut bad = fixture_indicators()[0].clone();
    bad.as_object_mut().unwrap().remove("pattern");
    let StreamAction::Invalid { reason } = event("merge", &merge_envelope(json!([bad]))) else {
        panic!("expected Invalid");
    };
    assert!(reason.contains("pattern is missing"), "{reason}");
    for sources in [json!("nope"), json!([1])] {
        assert!(matches!(
            event("merge", &merge_envelope(sources)),
            StreamAction::Invalid { .. }
        ));
    }
}

#[test]
fn legacy_merge_reads_sources_from_the_object_and_strips_metadata() {
    let events = data_events(LEGACY);
    let mut target = stix_of(&events[2]);
    let source = stix_of(&events[0]);
    target["x_opencti_patch"] = json!({"replace": {"name": {"current": "a", "previous": "b"}}});
    target["x_opencti_context"] = json!({"sources": [source], "deletions": [], "shifts": []});
    let envelope =
        json!({"markings": [], "origin": {}, "data": target, "message": "m", "version": "2"});
    let objects = published(event("merge", &envelope));
    let mut expected_target = stix_of(&events[2]);
    expected_target[X_THREATBUS_UPDATE] = json!("EDIT");
    assert_eq!(
        objects,
        vec![with_update(source, Some("REMOVE")), expected_target]
    );
}

// ---------------------------------------------------------------------------------------
// malformed events

#[test]
fn malformed_events_are_invalid_with_a_reason() {
    let cases = [
        ("create", "{not json", "not valid JSON"),
        ("update", "[1, 2]", "not a JSON object"),
        (
            "delete",
            r#"{"origin": {}}"#,
            "data.data (the STIX object) is missing",
        ),
        (
            "merge",
            r#"{"data": "x"}"#,
            "data.data (the STIX object) is not a JSON object",
        ),
        (
            "create",
            r#"{"data": {"id": "x"}}"#,
            "data.data.type is missing",
        ),
        ("create", "", "not valid JSON"),
    ];
    for (kind, data, needle) in cases {
        match map_stream_event(kind, data, true) {
            StreamAction::Invalid { reason } => assert!(reason.contains(needle), "{reason}"),
            other => panic!("{kind} {data}: {other:?}"),
        }
    }
    // Non-data events are skipped even when their data is garbage.
    assert!(matches!(
        map_stream_event("heartbeat", "{not json", false),
        StreamAction::Skip { .. }
    ));
}

#[test]
fn dependency_detection_on_raw_data() {
    assert!(is_dependency_data(
        r#"{"origin": {"referer": "dependencies"}}"#
    ));
    assert!(!is_dependency_data(r#"{"origin": {"referer": "init"}}"#));
    assert!(!is_dependency_data(r#"{"origin": {}}"#));
    assert!(!is_dependency_data("not json"));
}

// ---------------------------------------------------------------------------------------
// one test per STIX check

fn checked(change: impl FnOnce(&mut Object)) -> Result<(), IndicatorError> {
    let mut indicator = sample_indicator();
    change(indicator.as_object_mut().unwrap());
    validate_indicator(&indicator)
}

fn err_text(change: impl FnOnce(&mut Object)) -> String {
    match checked(change) {
        Err(e) => e.to_string(),
        Ok(()) => panic!("expected a validation error"),
    }
}

#[test]
fn valid_sample_indicator_passes() {
    assert_eq!(checked(|_| {}), Ok(()));
}

#[test]
fn spec_version_is_required() {
    assert_eq!(
        checked(|o| {
            o.remove("spec_version");
        }),
        Err(IndicatorError::SpecVersion {
            found: "nothing".to_owned()
        })
    );
    assert!(err_text(|o| {
        o.insert("spec_version".into(), json!("2.0"));
    })
    .contains("spec_version must be \"2.1\", found \"2.0\""));
}

#[test]
fn pattern_and_pattern_type_are_required_strings() {
    assert_eq!(
        checked(|o| {
            o.remove("pattern");
        }),
        Err(IndicatorError::Missing { field: "pattern" })
    );
    assert_eq!(
        checked(|o| {
            o.insert("pattern".into(), Value::Null);
        }),
        Err(IndicatorError::Missing { field: "pattern" })
    );
    assert!(matches!(
        checked(|o| {
            o.insert("pattern".into(), json!(["[a:b = 'c']"]));
        }),
        Err(IndicatorError::NotAString {
            field: "pattern",
            ..
        })
    ));
    assert_eq!(
        checked(|o| {
            o.remove("pattern_type");
        }),
        Err(IndicatorError::Missing {
            field: "pattern_type"
        })
    );
    assert!(matches!(
        checked(|o| {
            o.insert("pattern_type".into(), json!(7));
        }),
        Err(IndicatorError::NotAString {
            field: "pattern_type",
            ..
        })
    ));
}

#[test]
fn stix_patterns_get_a_sanity_check() {
    let with_pattern = |pattern: &str, pattern_type: &str| {
        checked(|o| {
            o.insert("pattern".into(), json!(pattern));
            o.insert("pattern_type".into(), json!(pattern_type));
        })
    };
    for good in [
        "[domain-name:value = 'evil.example']",
        "([ipv4-addr:value = '1.2.3.4'] OR [ipv4-addr:value = '5.6.7.8']) WITHIN 300 SECONDS",
        "[file:hashes.'SHA-256' = 'abc' AND (file:name = 'a]b' OR file:size > 3)]",
        "[file:extensions.'windows-pebinary-ext'.sections[*].entropy > 7.0] REPEATS 5 TIMES",
        r"[file:name = 'it\'s [tricky]']",
        "[x:y = t'2024-01-01T00:00:00Z'] START t'2024-01-01T00:00:00Z' STOP t'2024-02-01T00:00:00Z'",
    ] {
        assert_eq!(with_pattern(good, "stix"), Ok(()), "{good}");
    }
    for (bad, reason) in [
        ("not a pattern", "must start with '[' or '('"),
        (
            "[domain-name:value = 'x'",
            "unbalanced brackets or parentheses",
        ),
        ("[a:b = 'x']]", "unbalanced brackets or parentheses"),
        ("([a:b = 'x']", "unbalanced brackets or parentheses"),
        ("[a:b = 'x)]", "unterminated quoted literal"),
        ("[ ]", "empty [] comparison"),
        ("()", "no [...] comparison"),
    ] {
        assert_eq!(
            with_pattern(bad, "stix"),
            Err(IndicatorError::StixPattern {
                pattern: bad.to_owned(),
                reason
            }),
            "{bad}"
        );
    }
    // Other pattern languages are not checked (Threat Bus does not check them either).
    assert_eq!(with_pattern("rule x { condition: true }", "yara"), Ok(()));
    assert_eq!(with_pattern("title: x", "sigma"), Ok(()));
}

#[test]
fn id_must_be_indicator_uuid() {
    let with_id = |id: Value| {
        checked(|o| {
            o.insert("id".into(), id);
        })
    };
    assert!(matches!(
        with_id(json!("identity--f1252f7b-d79f-5fa0-a0a8-f257c6d774c0")),
        Err(IndicatorError::Id(IdError::WrongType { .. }))
    ));
    for bad in [
        "indicator--3ae0b0a2-7289-5fda-8a85-02d057ba096", // short
        "indicator--3ae0b0a2-7289-5fda-7a85-02d057ba0968", // variant bits (NCS)
        "indicator--3ae0b0a27289-5fda-8a85-02d057ba09680", // hyphen misplaced
        "indicator--3ae0b0a2-7289-5fda-8a85-02d057ba096g", // not hex
        "indicator-3ae0b0a2-7289-5fda-8a85-02d057ba0968",
    ] {
        assert!(
            matches!(with_id(json!(bad)), Err(IndicatorError::Id(_))),
            "{bad}"
        );
    }
    assert_eq!(
        with_id(Value::Null),
        Err(IndicatorError::Id(IdError::Missing))
    );
    assert_eq!(
        with_id(json!(3)),
        Err(IndicatorError::Id(IdError::NotAString))
    );
    assert_eq!(
        with_id(json!("indicator--3AE0B0A2-7289-5FDA-8A85-02D057BA0968")),
        Ok(())
    );
}

#[test]
fn created_by_ref_must_be_an_identity() {
    assert!(matches!(
        checked(|o| {
            o.insert(
                "created_by_ref".into(),
                json!("organization--f1252f7b-d79f-5fa0-a0a8-f257c6d774c0"),
            );
        }),
        Err(IndicatorError::CreatedByRef(IdError::WrongType { .. }))
    ));
    assert!(matches!(
        checked(|o| {
            o.insert("created_by_ref".into(), json!("identity--nope"));
        }),
        Err(IndicatorError::CreatedByRef(IdError::Malformed { .. }))
    ));
    assert_eq!(
        checked(|o| {
            o.remove("created_by_ref");
        }),
        Ok(())
    );
    assert_eq!(
        checked(|o| {
            o.insert("created_by_ref".into(), Value::Null);
        }),
        Ok(())
    );
}

#[test]
fn marking_refs_must_be_marking_definitions() {
    assert!(matches!(
        checked(|o| {
            o.insert(
                "object_marking_refs".into(),
                json!(["identity--f1252f7b-d79f-5fa0-a0a8-f257c6d774c0"]),
            );
        }),
        Err(IndicatorError::MarkingRef(IdError::WrongType { .. }))
    ));
    assert!(matches!(
        checked(|o| {
            o.insert("object_marking_refs".into(), json!("marking-definition--x"));
        }),
        Err(IndicatorError::MarkingRef(_))
    ));
}

#[test]
fn valid_until_must_be_after_valid_from() {
    let with_validity = |from: &str, until: &str| {
        checked(|o| {
            o.insert("valid_from".into(), json!(from));
            o.insert("valid_until".into(), json!(until));
        })
    };
    assert_eq!(
        with_validity("2024-03-01T10:00:00Z", "2024-03-01T10:00:00.000Z"),
        Err(IndicatorError::ValidUntilNotAfterValidFrom {
            valid_from: "2024-03-01T10:00:00Z".to_owned(),
            valid_until: "2024-03-01T10:00:00Z".to_owned(),
        })
    );
    assert!(with_validity("2024-03-01T10:00:00Z", "2024-03-01T09:00:00Z").is_err());
    // Compared as instants, not as text.
    assert_eq!(
        with_validity("2024-03-01T12:00:00+02:00", "2024-03-01T10:00:00.001Z"),
        Ok(())
    );
    assert!(matches!(
        with_validity("yesterday", "2024-03-01T10:00:00Z"),
        Err(IndicatorError::Timestamp {
            field: "valid_from",
            ..
        })
    ));
}

#[test]
fn timestamps_must_parse_and_modified_is_required() {
    assert_eq!(
        checked(|o| {
            o.remove("modified");
        }),
        Err(IndicatorError::Missing { field: "modified" })
    );
    assert!(matches!(
        checked(|o| {
            o.insert("created".into(), json!(1_709_287_215));
        }),
        Err(IndicatorError::Timestamp {
            field: "created",
            ..
        })
    ));
    assert_eq!(
        checked(|o| {
            o.remove("valid_from");
            o.remove("valid_until");
        }),
        Ok(())
    );
}

#[test]
fn custom_property_names_must_start_lowercase() {
    assert_eq!(
        checked(|o| {
            o.insert("X_FOO".into(), json!(1));
        }),
        Err(IndicatorError::PropertyName {
            name: "X_FOO".to_owned()
        })
    );
    for bad in ["_private", "9lives", "Éclair"] {
        assert!(matches!(
            checked(|o| {
                o.insert(bad.into(), json!(1));
            }),
            Err(IndicatorError::PropertyName { .. })
        ));
    }
    for good in ["x_opencti_score", "xCamelCase", "x-hyphen-name"] {
        assert_eq!(
            checked(|o| {
                o.insert(good.into(), json!(1));
            }),
            Ok(())
        );
    }
}

#[test]
fn type_must_be_indicator() {
    assert!(matches!(
        checked(|o| {
            o.insert("type".into(), json!("malware"));
        }),
        Err(IndicatorError::WrongType { .. })
    ));
    assert_eq!(
        validate_indicator(&json!([])),
        Err(IndicatorError::NotAnObject)
    );
}

#[test]
fn invalid_indicators_in_events_are_dead_lettered_with_the_field() {
    let mut indicator = sample_indicator();
    indicator.as_object_mut().unwrap().remove("spec_version");
    let envelope = json!({"data": indicator, "origin": {}});
    for kind in ["update", "delete", "merge"] {
        match event(kind, &envelope) {
            StreamAction::Invalid { reason } => {
                assert!(reason.starts_with("indicator--3ae0b0a2"), "{reason}");
                assert!(reason.contains("spec_version"), "{reason}");
            }
            other => panic!("{kind}: {other:?}"),
        }
    }
    // A create that is filtered out is skipped before validation: no dead letter.
    let mut off = indicator.clone();
    set_detection(&mut off, false);
    assert!(matches!(
        event("create", &json!({"data": off})),
        StreamAction::Skip { .. }
    ));
}

// ---------------------------------------------------------------------------------------
// echo keys and bus messages

/// The exact indicator from threatbus/README.md §5.
const README_INDICATOR: &str = r#"{"type": "indicator", "spec_version": "2.1", "id": "indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461", "created": "2024-01-02T03:04:05.000Z", "modified": "2024-01-02T03:04:05.000Z", "name": "bad domain evil.example", "pattern": "[domain-name:value = 'evil.example']", "pattern_type": "stix", "valid_from": "2024-01-02T03:04:05Z", "x_opencti_detection": true, "x_threatbus_update": "EDIT"}"#;

fn readme_indicator() -> Value {
    serde_json::from_str(README_INDICATOR).unwrap()
}

#[test]
fn readme_indicator_is_valid() {
    assert_eq!(validate_indicator(&readme_indicator()), Ok(()));
}

#[test]
fn echo_key_survives_threatbus_reserialisation() {
    let sent = readme_indicator();
    let key = indicator_echo_key(&sent).unwrap();
    assert_eq!(key.id, "indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461");
    assert_eq!(key.update, Operation::Edit);

    // As Threat Bus sends it back: reordered, zeros trimmed, pattern_version added.
    let echoed = json!({
        "type": "indicator", "spec_version": "2.1",
        "id": "indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461",
        "created": "2024-01-02T03:04:05Z", "modified": "2024-01-02T03:04:05Z",
        "name": "bad domain evil.example", "pattern": "[domain-name:value = 'evil.example']",
        "pattern_type": "stix", "pattern_version": "2.1", "valid_from": "2024-01-02T03:04:05Z",
        "x_opencti_detection": true, "x_threatbus_update": "EDIT"
    });
    assert_eq!(indicator_echo_key(&echoed), Some(key.clone()));

    let modified = |m: &str| {
        let mut v = sent.clone();
        v["modified"] = json!(m);
        indicator_echo_key(&v).unwrap().modified_ms
    };
    assert_eq!(
        modified("2024-01-02T03:04:05.1Z"),
        modified("2024-01-02T03:04:05.100Z")
    );
    assert_eq!(
        modified("2024-01-02T03:04:05.123456Z"),
        modified("2024-01-02T03:04:05.123456Z")
    );
    assert_eq!(
        modified("2024-01-02T03:04:05.123456Z"),
        modified("2024-01-02T03:04:05.123Z")
    );
    assert_ne!(
        modified("2024-01-02T03:04:05.1Z"),
        modified("2024-01-02T03:04:05.101Z")
    );

    // A different operation or version is a different key.
    let remove = with_update(sent.clone(), Some("REMOVE"));
    assert_ne!(indicator_echo_key(&remove), Some(key.clone()));
    let create = with_update(sent.clone(), None);
    assert_eq!(
        indicator_echo_key(&create).map(|k| k.update),
        Some(Operation::Create)
    );
    assert_eq!(
        indicator_echo_key(&with_update(sent.clone(), Some("DELETE"))),
        None
    );
    let mut no_modified = sent.clone();
    no_modified.as_object_mut().unwrap().remove("modified");
    assert_eq!(indicator_echo_key(&no_modified), None);
}

#[test]
fn published_objects_key_like_their_echo() {
    let update = &data_events(SAMPLE)[3];
    let objects = published(map_stream_event(&update.event, &update.data, false));
    let key = indicator_echo_key(&objects[0]).unwrap();
    assert_eq!(key.update, Operation::Edit);
    assert_eq!(
        key.modified_ms,
        Timestamp::parse("2024-03-01T10:01:02.466Z")
            .unwrap()
            .unix_millis()
    );
}

#[test]
fn bus_messages_by_suffix() {
    assert_eq!(
        classify_bus_message("indicator", README_INDICATOR),
        BusMessage::Indicator {
            echo_key: indicator_echo_key(&readme_indicator())
        }
    );
    assert_eq!(
        classify_bus_message("indicator", "garbage"),
        BusMessage::Indicator { echo_key: None }
    );
    let sighting = r#"{"type": "sighting", "spec_version": "2.1", "id": "sighting--65184b15-a91d-4ee2-b023-efd239ddb72b", "last_seen": "2024-01-02T03:05:00Z", "sighting_of_ref": "indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461"}"#;
    assert!(matches!(
        classify_bus_message("sighting", sighting),
        BusMessage::Sighting(s) if s.sighting_of_ref == "indicator--3d63fc4d-ba50-4892-be4d-f3a44fdc4461"
    ));
    assert!(matches!(
        classify_bus_message("sighting", "{}"),
        BusMessage::InvalidSighting(SightingError::WrongType { .. })
    ));
    let snapshot = r#"{"type": "snapshotrequest", "snapshot_type": 1, "snapshot_id": "6da23ea2-2ca0-43ad-bcff-5c9a4e1cddde", "snapshot": 259200}"#;
    assert_eq!(
        classify_bus_message("snapshotrequest", snapshot),
        BusMessage::SnapshotRequest
    );
    assert_eq!(
        classify_bus_message("weird", "{}"),
        BusMessage::Unknown {
            suffix: "weird".to_owned()
        }
    );
}

// ---------------------------------------------------------------------------------------
// no panics, whatever the input

fn arb_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("type".to_owned()),
        Just("id".to_owned()),
        Just("spec_version".to_owned()),
        Just("pattern".to_owned()),
        Just("pattern_type".to_owned()),
        Just("modified".to_owned()),
        Just("valid_from".to_owned()),
        Just("valid_until".to_owned()),
        Just("revoked".to_owned()),
        Just("extensions".to_owned()),
        Just(OPENCTI_EXTENSION.to_owned()),
        Just("detection".to_owned()),
        Just("x_opencti_detection".to_owned()),
        Just("x_opencti_patch".to_owned()),
        Just("x_opencti_context".to_owned()),
        Just("sources".to_owned()),
        Just("reverse_patch".to_owned()),
        Just("op".to_owned()),
        Just("path".to_owned()),
        Just("value".to_owned()),
        Just("replace".to_owned()),
        Just("previous".to_owned()),
        "[a-zA-Z_]{0,6}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(json!("indicator")),
        Just(json!("2.1")),
        Just(json!("stix")),
        Just(json!("indicator--3ae0b0a2-7289-5fda-8a85-02d057ba0968")),
        Just(json!("2024-03-01T10:00:15.712Z")),
        Just(json!("[a:b = 'c']")),
        Just(json!("add")),
        Just(json!("remove")),
        Just(json!("replace")),
        "(/[a-z0-9~-]{0,4}){0,3}".prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn event_type() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("create".to_owned()),
        Just("update".to_owned()),
        Just("delete".to_owned()),
        Just("merge".to_owned()),
        ".{0,10}",
    ]
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(kind in event_type(), data in ".{0,200}", all in any::<bool>()) {
        let _ = map_stream_event(&kind, &data, all);
        let _ = is_dependency_data(&data);
        let _ = parse_sighting(&data);
        let _ = classify_bus_message(&kind, &data);
    }

    #[test]
    fn arbitrary_indicator_shaped_json_never_panics(
        kind in event_type(),
        mut stix in arb_json(),
        context in arb_json(),
        patch in arb_json(),
        all in any::<bool>(),
    ) {
        if let Some(map) = stix.as_object_mut() {
            map.insert("type".into(), json!("indicator"));
        }
        let envelope = json!({"data": stix.clone(), "context": context});
        match map_stream_event(&kind, &envelope.to_string(), all) {
            StreamAction::Publish(objects) => {
                for object in &objects {
                    prop_assert_eq!(validate_indicator(object), Ok(()));
                }
            }
            StreamAction::NeedsFullIndicator { .. } => prop_assert_eq!(kind.as_str(), "update"),
            _ => {}
        }
        let _ = map_fetched_indicator(stix.clone(), &patch, all);
        let _ = indicator_echo_key(&stix);
        let _ = sighting_from_value(&stix);
    }

    #[test]
    fn mutated_sample_never_panics(
        kind in event_type(),
        key in "[a-z_]{1,12}",
        value in arb_json(),
        reverse in arb_json(),
    ) {
        let mut stix = sample_indicator();
        stix[key.as_str()] = value;
        let envelope = json!({"data": stix, "context": {"reverse_patch": reverse}});
        let _ = map_stream_event(&kind, &envelope.to_string(), false);
    }
}
