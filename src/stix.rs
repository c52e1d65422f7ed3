//! Pure mapping between the OpenCTI live stream, Threat Bus and STIX 2.1 (SPEC §3).
//!
//! No I/O and no clock: the stream consumer, the Threat Bus link and the drainers call
//! these functions and act on the result. STIX objects stay `serde_json::Value`s so that
//! every property OpenCTI sends reaches Threat Bus unchanged; only `x_threatbus_update` is
//! set (and, for 4.x merge events, OpenCTI's event metadata is taken out of the object).
//!
//! Wire facts this follows (see `tests/fixtures/opencti/*` for the samples):
//! - The SSE `event:` is `create`, `update`, `delete` or `merge`; the `data:` line is a JSON
//!   envelope whose `data` member is the STIX object. Everything else (`connected`,
//!   `heartbeat`, `consumer_metrics`, `sync`, …) carries no object.
//! - OpenCTI ≥ 5.3 keeps `detection` and its internal `id` in [`OPENCTI_EXTENSION`]; 4.x
//!   has top-level `x_opencti_detection` and `x_opencti_id`.
//! - 4.x `update` events carry only `id`, `x_opencti_id`, `type` and `x_opencti_patch`:
//!   the full indicator has to be read through the API ([`StreamAction::NeedsFullIndicator`],
//!   then [`map_fetched_indicator`]).
//! - OpenCTI ≥ 5 puts `patch`/`reverse_patch` (JSON Patch) in the envelope's `context` of
//!   updates and merges; a merge also lists the merged-away objects in `context.sources`
//!   (4.x: in the object's `x_opencti_context.sources`).

pub mod import;
mod json_patch;
pub mod reconcile;
pub mod sighting;
pub mod snapshot;
#[cfg(test)]
mod tests;
pub mod timestamp;

use serde_json::{Map, Value};

pub use sighting::{
    parse_sighting, sighting_from_value, sighting_times_utc, Sighting, SightingError,
    MAX_SIGHTING_COUNT,
};
pub use snapshot::{
    parse_snapshot_request, snapshot_envelope_frame, SnapshotKind, SnapshotRequest,
    SnapshotRequestError,
};
pub use timestamp::{Timestamp, TimestampError};

type Object = Map<String, Value>;

/// The STIX extension in which OpenCTI ≥ 5.3 keeps its own fields (`detection`, `id`,
/// `score`, `main_observable_type`, …).
pub const OPENCTI_EXTENSION: &str = "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba";

/// Threat Bus's custom property telling tools what to do with an indicator.
pub const X_THREATBUS_UPDATE: &str = "x_threatbus_update";

/// What a tool behind Threat Bus should do with an indicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// A new indicator: `x_threatbus_update` absent.
    Create,
    /// A changed indicator: `"EDIT"`.
    Edit,
    /// Stop matching it: `"REMOVE"`.
    Remove,
}

impl Operation {
    /// The `x_threatbus_update` value for this operation (`None`: leave the property out).
    pub fn threatbus_update(self) -> Option<&'static str> {
        match self {
            Operation::Create => None,
            Operation::Edit => Some("EDIT"),
            Operation::Remove => Some("REMOVE"),
        }
    }

    /// Reads `x_threatbus_update` back; `None` for a value Threat Bus does not define.
    pub fn from_threatbus_update(value: Option<&Value>) -> Option<Operation> {
        match value {
            None | Some(Value::Null) => Some(Operation::Create),
            Some(Value::String(s)) if s == "EDIT" => Some(Operation::Edit),
            Some(Value::String(s)) if s == "REMOVE" => Some(Operation::Remove),
            Some(_) => None,
        }
    }
}

/// What the stream consumer does with one SSE event.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamAction {
    /// Nothing to send: only the stream position advances (subject to SPEC §2.2).
    Skip { reason: SkipReason },
    /// Publish these indicators on `stix2/indicator`, in this order. Each already carries
    /// the right `x_threatbus_update` and passed [`validate_indicator`].
    Publish(Vec<Value>),
    /// A 4.x update carries only a patch. Read the indicator (as STIX 2.1) through the API
    /// by `opencti_id`, then hand it and `patch` to [`map_fetched_indicator`].
    NeedsFullIndicator {
        stix_id: String,
        opencti_id: String,
        operation: Operation,
        /// The event's `x_opencti_patch`, which tells what the indicator was before.
        patch: Value,
    },
    /// An indicator event Threat Bus would drop, or an event that cannot be read: park the
    /// raw event data as a dead letter with this reason.
    Invalid { reason: String },
}

/// Why an event produces nothing for Threat Bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The SSE event type carries no STIX object (`heartbeat`, `connected`, …).
    NotADataEvent { event_type: String },
    /// The STIX object is not an indicator (markings, authors, relationships, …).
    NotAnIndicator { stix_type: String },
    /// `detection` is off and `forward_all_iocs` is false. For an update: it was not
    /// forwarded before the update either, so there is nothing to remove.
    DetectionOff,
    /// The indicator is revoked. For a create: tools never had it. For an update: it was
    /// already revoked (or filtered out) before, so it was removed earlier.
    Revoked,
}

#[derive(Debug, Clone, Copy)]
enum EventKind {
    Create,
    Update,
    Merge,
    Delete,
}

impl EventKind {
    fn from_sse(event_type: &str) -> Option<EventKind> {
        match event_type {
            "create" => Some(EventKind::Create),
            "update" => Some(EventKind::Update),
            "merge" => Some(EventKind::Merge),
            "delete" => Some(EventKind::Delete),
            _ => None,
        }
    }
}

/// Maps one SSE event (its `event:` type and `data:` text) to what the bridge does with it.
/// Never panics, whatever the input.
pub fn map_stream_event(event_type: &str, data: &str, forward_all_iocs: bool) -> StreamAction {
    let Some(kind) = EventKind::from_sse(event_type) else {
        return skip(SkipReason::NotADataEvent {
            event_type: event_type.to_owned(),
        });
    };
    match serde_json::from_str::<Value>(data) {
        Ok(event) => map_event(kind, event, forward_all_iocs),
        Err(e) => invalid(format!("{event_type} event: data is not valid JSON: {e}")),
    }
}

/// [`map_stream_event`] for a `data:` the caller has already parsed (the stream reader
/// parses once, to look at `origin` too).
pub fn map_stream_value(event_type: &str, event: Value, forward_all_iocs: bool) -> StreamAction {
    match EventKind::from_sse(event_type) {
        Some(kind) => map_event(kind, event, forward_all_iocs),
        None => skip(SkipReason::NotADataEvent {
            event_type: event_type.to_owned(),
        }),
    }
}

/// Completes a 4.x patch-only update once the caller has read the full indicator (STIX
/// 2.1, 4.x field layout) through the API. `patch` is the event's `x_opencti_patch`, from
/// [`StreamAction::NeedsFullIndicator`]; it tells whether the indicator was forwarded
/// before the update, so that turning detection off sends a REMOVE exactly when needed.
pub fn map_fetched_indicator(full: Value, patch: &Value, forward_all_iocs: bool) -> StreamAction {
    let Value::Object(current) = full else {
        return invalid("the indicator read through the API is not a JSON object".to_owned());
    };
    match current.get("type").and_then(Value::as_str) {
        Some("indicator") => {}
        other => {
            return invalid(format!(
                "the object read through the API is not an indicator (type {other:?})"
            ))
        }
    }
    let previous = previous_from_legacy_patch(&current, patch);
    update_action(current, previous, forward_all_iocs)
}

/// True for an event OpenCTI sent only as a dependency of the next event (its marking,
/// its author, …): `origin.referer == "dependencies"`. It carries the same SSE id as that
/// event, so the stream position must not advance on it alone (SPEC §2.2).
pub fn is_dependency_event(event: &Value) -> bool {
    event
        .get("origin")
        .and_then(|origin| origin.get("referer"))
        .and_then(Value::as_str)
        == Some("dependencies")
}

/// [`is_dependency_event`] on the raw `data:` text; `false` if it is not JSON.
pub fn is_dependency_data(data: &str) -> bool {
    serde_json::from_str::<Value>(data).is_ok_and(|event| is_dependency_event(&event))
}

/// OpenCTI's detection flag: the extension's `detection` (≥ 5.3), else 4.x's top-level
/// `x_opencti_detection`. `None` when neither is a boolean.
pub fn detection(obj: &Value) -> Option<bool> {
    obj.as_object().and_then(detection_of)
}

/// OpenCTI's internal id: the extension's `id` (≥ 5.3), else 4.x's `x_opencti_id`.
pub fn opencti_id(obj: &Value) -> Option<&str> {
    obj.as_object().and_then(opencti_id_of)
}

fn map_event(kind: EventKind, event: Value, forward_all_iocs: bool) -> StreamAction {
    let Value::Object(mut envelope) = event else {
        return invalid("event data is not a JSON object".to_owned());
    };
    let stix = match envelope.remove("data") {
        Some(Value::Object(stix)) => stix,
        Some(_) => return invalid("data.data (the STIX object) is not a JSON object".to_owned()),
        None => return invalid("data.data (the STIX object) is missing".to_owned()),
    };
    match stix.get("type") {
        Some(Value::String(t)) if t == "indicator" => {}
        Some(Value::String(t)) => {
            return skip(SkipReason::NotAnIndicator {
                stix_type: t.clone(),
            })
        }
        _ => return invalid("data.data.type is missing or not a string".to_owned()),
    }
    let context = envelope.remove("context");
    match kind {
        EventKind::Create => create_action(stix, forward_all_iocs),
        // A tool may hold the indicator whatever its detection flag says now.
        EventKind::Delete => publish(vec![(stix, Operation::Remove)]),
        EventKind::Update if is_legacy_patch_only(&stix) => needs_full_indicator(&stix),
        EventKind::Update => {
            let previous = previous_from_reverse_patch(&stix, context.as_ref());
            update_action(stix, previous, forward_all_iocs)
        }
        EventKind::Merge => merge_action(stix, context, forward_all_iocs),
    }
}

fn create_action(stix: Object, forward_all_iocs: bool) -> StreamAction {
    match forwarding(&stix, forward_all_iocs) {
        Ok(()) => publish(vec![(stix, Operation::Create)]),
        Err(reason) => skip(reason),
    }
}

fn update_action(stix: Object, previous: Option<Object>, forward_all_iocs: bool) -> StreamAction {
    match update_operation(&stix, previous.as_ref(), forward_all_iocs) {
        Ok(op) => publish(vec![(stix, op)]),
        Err(reason) => skip(reason),
    }
}

/// EDIT while tools should match the indicator. Once they should not (detection off,
/// revoked), REMOVE — unless the event shows it was not forwarded before either. When the
/// previous state is unknown (no `reverse_patch`, or one that does not apply), REMOVE is
/// the safe choice: a REMOVE for an indicator a tool never had is harmless, a missing one
/// leaves a stale match.
fn update_operation(
    current: &Object,
    previous: Option<&Object>,
    forward_all_iocs: bool,
) -> Result<Operation, SkipReason> {
    match forwarding(current, forward_all_iocs) {
        Ok(()) => Ok(Operation::Edit),
        Err(reason) => match previous {
            Some(prev) if forwarding(prev, forward_all_iocs).is_err() => Err(reason),
            _ => Ok(Operation::Remove),
        },
    }
}

/// A merge keeps the target and deletes the sources without delete events. Sources are
/// sent as REMOVE *before* the target's EDIT: sources are often duplicates with the same
/// pattern, and a tool that keys on the pattern must end up holding the target's.
fn merge_action(
    mut target: Object,
    context: Option<Value>,
    forward_all_iocs: bool,
) -> StreamAction {
    // 4.x put the merge metadata into the object itself; it is not indicator data and
    // `x_opencti_context.sources` can be large, so it does not go to Threat Bus.
    let legacy_context = target.remove("x_opencti_context");
    target.remove("x_opencti_patch");
    let sources_value = context
        .as_ref()
        .and_then(|c| c.get("sources"))
        .or_else(|| legacy_context.as_ref().and_then(|c| c.get("sources")));
    let mut objects = match merge_sources(sources_value) {
        Ok(sources) => sources,
        Err(reason) => return invalid(reason),
    };
    let previous = previous_from_reverse_patch(&target, context.as_ref());
    match update_operation(&target, previous.as_ref(), forward_all_iocs) {
        Ok(op) => objects.push((target, op)),
        Err(reason) if objects.is_empty() => return skip(reason),
        Err(_) => {}
    }
    publish(objects)
}

/// The merged-away indicators, each to be removed regardless of its detection flag (a
/// tool may hold it). Sources of another type are ignored.
fn merge_sources(sources: Option<&Value>) -> Result<Vec<(Object, Operation)>, String> {
    let Some(sources) = sources.filter(|s| !s.is_null()) else {
        return Ok(Vec::new());
    };
    let list = sources
        .as_array()
        .ok_or_else(|| "merge event: context.sources is not a list".to_owned())?;
    let mut out = Vec::new();
    for (index, source) in list.iter().enumerate() {
        let obj = source
            .as_object()
            .ok_or_else(|| format!("merge event: context.sources[{index}] is not an object"))?;
        if obj.get("type").and_then(Value::as_str) == Some("indicator") {
            out.push((obj.clone(), Operation::Remove));
        }
    }
    Ok(out)
}

fn needs_full_indicator(stix: &Object) -> StreamAction {
    let stix_id = match check_stix_id(stix.get("id"), Some("indicator")) {
        Ok(id) => id.to_owned(),
        Err(e) => return invalid(format!("4.x update: id: {e}")),
    };
    let Some(opencti_id) = opencti_id_of(stix) else {
        return invalid(format!(
            "{stix_id}: 4.x update without x_opencti_id: the indicator cannot be read through the API"
        ));
    };
    StreamAction::NeedsFullIndicator {
        stix_id,
        opencti_id: opencti_id.to_owned(),
        operation: Operation::Edit,
        patch: stix.get("x_opencti_patch").cloned().unwrap_or(Value::Null),
    }
}

/// A 4.x update: only the patch, no pattern (a 4.x merge carries the patch *and* the full
/// object, so the pattern tells them apart).
fn is_legacy_patch_only(stix: &Object) -> bool {
    stix.contains_key("x_opencti_patch") && !stix.contains_key("pattern")
}

/// The object before the update, by applying the event's `context.reverse_patch`.
fn previous_from_reverse_patch(current: &Object, context: Option<&Value>) -> Option<Object> {
    let reverse = context?.get("reverse_patch")?;
    let mut previous = Value::Object(current.clone());
    json_patch::apply(&mut previous, reverse)?;
    match previous {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// The object before a 4.x update: 4.x patches look like
/// `{"replace": {"x_opencti_detection": {"current": true, "previous": false}}, "add": …}`.
/// Fields not replaced kept their value. `None` (unknown) if the patch has another shape,
/// or if a previous detection/revoked value is not a plain boolean.
fn previous_from_legacy_patch(current: &Object, patch: &Value) -> Option<Object> {
    let patch = patch.as_object()?;
    let mut previous = current.clone();
    let Some(replace) = patch.get("replace") else {
        return Some(previous);
    };
    for (field, change) in replace.as_object()? {
        let before = change.get("previous")?;
        let flag = field == "x_opencti_detection" || field == "revoked";
        if flag && !(before.is_boolean() || before.is_null()) {
            return None;
        }
        previous.insert(field.clone(), before.clone());
    }
    Some(previous)
}

/// Whether tools should match this indicator: not revoked, and detected (or
/// `forward_all_iocs`). Revoked wins over `forward_all_iocs`: revoked means "wrong".
fn forwarding(obj: &Object, forward_all_iocs: bool) -> Result<(), SkipReason> {
    if obj.get("revoked").and_then(Value::as_bool) == Some(true) {
        return Err(SkipReason::Revoked);
    }
    if !forward_all_iocs && detection_of(obj) != Some(true) {
        return Err(SkipReason::DetectionOff);
    }
    Ok(())
}

fn detection_of(obj: &Object) -> Option<bool> {
    opencti_extension(obj)
        .and_then(|ext| ext.get("detection"))
        .and_then(Value::as_bool)
        .or_else(|| obj.get("x_opencti_detection").and_then(Value::as_bool))
}

fn opencti_id_of(obj: &Object) -> Option<&str> {
    opencti_extension(obj)
        .and_then(|ext| ext.get("id"))
        .and_then(Value::as_str)
        .or_else(|| obj.get("x_opencti_id").and_then(Value::as_str))
}

fn opencti_extension(obj: &Object) -> Option<&Value> {
    obj.get("extensions")?.get(OPENCTI_EXTENSION)
}

/// Sets `x_threatbus_update` for each object, validates it, and publishes all of them, or
/// nothing: an event is dead-lettered whole, so that a requeue replays it whole.
fn publish(objects: Vec<(Object, Operation)>) -> StreamAction {
    let mut out = Vec::with_capacity(objects.len());
    for (obj, op) in objects {
        match prepare(obj, op) {
            Ok(value) => out.push(value),
            Err(reason) => return StreamAction::Invalid { reason },
        }
    }
    StreamAction::Publish(out)
}

fn prepare(mut obj: Object, op: Operation) -> Result<Value, String> {
    match op.threatbus_update() {
        Some(update) => obj.insert(X_THREATBUS_UPDATE.to_owned(), Value::from(update)),
        None => obj.remove(X_THREATBUS_UPDATE),
    };
    let value = Value::Object(obj);
    match validate_indicator(&value) {
        Ok(()) => Ok(value),
        Err(e) => {
            let id = value
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or("indicator");
            Err(format!("{id}: {e}"))
        }
    }
}

fn skip(reason: SkipReason) -> StreamAction {
    StreamAction::Skip { reason }
}

fn invalid(reason: String) -> StreamAction {
    StreamAction::Invalid { reason }
}

// ---------------------------------------------------------------------------------------
// STIX 2.1 checks

/// Why Threat Bus would drop an indicator (or why the bridge could not track it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndicatorError {
    /// The indicator is not a JSON object.
    #[error("not a JSON object")]
    NotAnObject,
    /// `type` is not `"indicator"`.
    #[error("type must be \"indicator\", found {found}")]
    WrongType { found: String },
    /// A top-level property name does not start with a lowercase ASCII letter.
    #[error(
        "property name {name:?} must start with a lowercase letter (Threat Bus drops the message)"
    )]
    PropertyName { name: String },
    /// `spec_version` is missing or not `"2.1"`: Threat Bus would parse it as STIX 2.0.
    #[error("spec_version must be \"2.1\", found {found} (Threat Bus drops anything else)")]
    SpecVersion { found: String },
    /// `id` is missing or not `indicator--<uuid>`.
    #[error("id: {0}")]
    Id(IdError),
    /// A required property is missing (or null).
    #[error("{field} is missing")]
    Missing { field: &'static str },
    /// A property that must be a non-empty string is not one.
    #[error("{field} must be a non-empty string, found {found}")]
    NotAString { field: &'static str, found: String },
    /// A `stix` pattern fails the light syntax check.
    #[error("pattern {pattern:?} is not a STIX pattern: {reason}")]
    StixPattern {
        pattern: String,
        reason: &'static str,
    },
    /// `created_by_ref` is not an `identity--<uuid>`.
    #[error("created_by_ref: {0}")]
    CreatedByRef(IdError),
    /// `object_marking_refs` is not a list of `marking-definition--<uuid>`.
    #[error("object_marking_refs: {0}")]
    MarkingRef(IdError),
    /// A timestamp property is not RFC 3339.
    #[error("{field} {value}: {error}")]
    Timestamp {
        field: &'static str,
        value: String,
        error: TimestampError,
    },
    /// `valid_until` is not strictly after `valid_from`.
    #[error("valid_until {valid_until} must be after valid_from {valid_from}")]
    ValidUntilNotAfterValidFrom {
        valid_from: String,
        valid_until: String,
    },
}

/// Why a STIX identifier is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The property is absent or null.
    #[error("missing")]
    Missing,
    /// The property is not a string.
    #[error("not a string")]
    NotAString,
    /// The value is not `<type>--<RFC 4122 UUID>`.
    #[error("{id:?} is not <type>--<uuid>: {reason}")]
    Malformed { id: String, reason: &'static str },
    /// The identifier is of another object type than required.
    #[error("{id:?} must be a {expected}-- identifier")]
    WrongType { id: String, expected: String },
}

/// The checks Threat Bus (the Python `stix2` library, with `allow_custom=True`) applies
/// to an indicator, so that what it would drop silently is dead-lettered with a reason
/// instead. Also requires `modified`: without it Threat Bus stamps the current time and
/// the echo of the indicator could never be recognised ([`indicator_echo_key`]).
pub fn validate_indicator(indicator: &Value) -> Result<(), IndicatorError> {
    let obj = indicator.as_object().ok_or(IndicatorError::NotAnObject)?;
    match obj.get("type") {
        Some(Value::String(t)) if t == "indicator" => {}
        other => {
            return Err(IndicatorError::WrongType {
                found: describe(other),
            })
        }
    }
    check_property_names(obj)?;
    match obj.get("spec_version") {
        Some(Value::String(v)) if v == "2.1" => {}
        other => {
            return Err(IndicatorError::SpecVersion {
                found: describe(other),
            })
        }
    }
    check_stix_id(obj.get("id"), Some("indicator")).map_err(IndicatorError::Id)?;
    if let Some(author) = get_present(obj, "created_by_ref") {
        check_stix_id(Some(author), Some("identity")).map_err(IndicatorError::CreatedByRef)?;
    }
    check_marking_refs(obj)?;
    check_pattern(obj)?;
    check_timestamps(obj)
}

/// `stix2` requires custom property names to start with a letter a–z (`PREFIX_21_REGEX`);
/// one bad name drops the whole message. Only top-level names are checked, like `stix2`.
fn check_property_names(obj: &Object) -> Result<(), IndicatorError> {
    match obj
        .keys()
        .find(|name| !name.starts_with(|c: char| c.is_ascii_lowercase()))
    {
        Some(name) => Err(IndicatorError::PropertyName { name: name.clone() }),
        None => Ok(()),
    }
}

fn check_marking_refs(obj: &Object) -> Result<(), IndicatorError> {
    let Some(refs) = get_present(obj, "object_marking_refs") else {
        return Ok(());
    };
    let Some(list) = refs.as_array() else {
        return Err(IndicatorError::MarkingRef(IdError::Malformed {
            id: refs.to_string(),
            reason: "not a list",
        }));
    };
    for reference in list {
        check_stix_id(Some(reference), Some("marking-definition"))
            .map_err(IndicatorError::MarkingRef)?;
    }
    Ok(())
}

fn check_pattern(obj: &Object) -> Result<(), IndicatorError> {
    let pattern = required_string(obj, "pattern")?;
    let pattern_type = required_string(obj, "pattern_type")?;
    if pattern_type == "stix" {
        check_stix_pattern(pattern).map_err(|reason| IndicatorError::StixPattern {
            pattern: pattern.to_owned(),
            reason,
        })?;
    }
    Ok(())
}

fn required_string<'o>(obj: &'o Object, field: &'static str) -> Result<&'o str, IndicatorError> {
    match get_present(obj, field) {
        None => Err(IndicatorError::Missing { field }),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
        Some(other) => Err(IndicatorError::NotAString {
            field,
            found: other.to_string(),
        }),
    }
}

/// A light sanity check of STIX patterning: starts with `[` or `(`, brackets and
/// parentheses balance outside quoted literals, and there is at least one non-empty
/// `[...]` comparison. The full grammar (what `stix2`'s pattern validator checks) is out
/// of scope; a pattern that passes here and is still dropped by Threat Bus is never
/// echoed, so with `confirm_delivery: echo` it ends as a dead letter after `max_attempts`.
fn check_stix_pattern(pattern: &str) -> Result<(), &'static str> {
    let pattern = pattern.trim();
    if !pattern.starts_with(['[', '(']) {
        return Err("must start with '[' or '('");
    }
    let mut open: Vec<char> = Vec::new();
    let mut in_literal = false;
    let mut escaped = false;
    let mut comparison_has_content = false;
    let mut comparisons = 0usize;
    for c in pattern.chars() {
        if in_literal {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '\'' => in_literal = false,
                _ => {}
            }
            continue;
        }
        let in_comparison = open.contains(&'[');
        match c {
            '\'' => {
                in_literal = true;
                comparison_has_content |= in_comparison;
            }
            '[' | '(' => {
                if c == '[' && !in_comparison {
                    comparison_has_content = false;
                }
                open.push(c);
            }
            ']' | ')' => {
                let expected = if c == ']' { '[' } else { '(' };
                if open.pop() != Some(expected) {
                    return Err("unbalanced brackets or parentheses");
                }
                if c == ']' && !open.contains(&'[') {
                    if !comparison_has_content {
                        return Err("empty [] comparison");
                    }
                    comparisons += 1;
                }
            }
            _ if !c.is_whitespace() => comparison_has_content |= in_comparison,
            _ => {}
        }
    }
    if in_literal {
        return Err("unterminated quoted literal");
    }
    if !open.is_empty() {
        return Err("unbalanced brackets or parentheses");
    }
    if comparisons == 0 {
        return Err("no [...] comparison");
    }
    Ok(())
}

/// `created`/`modified`/`valid_from`/`valid_until` must be RFC 3339 when present;
/// `modified` must be present (see [`validate_indicator`]); `valid_until > valid_from`.
fn check_timestamps(obj: &Object) -> Result<(), IndicatorError> {
    timestamp(obj, "created")?;
    if timestamp(obj, "modified")?.is_none() {
        return Err(IndicatorError::Missing { field: "modified" });
    }
    let valid_from = timestamp(obj, "valid_from")?;
    let valid_until = timestamp(obj, "valid_until")?;
    if let (Some(from), Some(until)) = (valid_from, valid_until) {
        if until <= from {
            return Err(IndicatorError::ValidUntilNotAfterValidFrom {
                valid_from: from.to_string(),
                valid_until: until.to_string(),
            });
        }
    }
    Ok(())
}

fn timestamp(obj: &Object, field: &'static str) -> Result<Option<Timestamp>, IndicatorError> {
    let Some(value) = get_present(obj, field) else {
        return Ok(None);
    };
    let parsed = match value.as_str() {
        Some(text) => Timestamp::parse(text),
        None => Err(TimestampError::Syntax("not a string")),
    };
    parsed.map(Some).map_err(|error| IndicatorError::Timestamp {
        field,
        value: value.to_string(),
        error,
    })
}

/// A property that is present and not null: `stix2` drops null (and `[]`) properties
/// before checking, so a null optional property is as good as an absent one.
pub(crate) fn get_present<'o>(obj: &'o Object, key: &str) -> Option<&'o Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// Checks `<type>--<uuid>` as `stix2` does: a STIX type name, then an RFC 4122 UUID
/// (the variant bits are checked; the version is not, OpenCTI uses v4 and v5). With
/// `expected`, the type must be that one.
pub(crate) fn check_stix_id<'v>(
    value: Option<&'v Value>,
    expected: Option<&str>,
) -> Result<&'v str, IdError> {
    let value = value.filter(|v| !v.is_null()).ok_or(IdError::Missing)?;
    let id = value.as_str().ok_or(IdError::NotAString)?;
    let malformed = |reason| IdError::Malformed {
        id: id.to_owned(),
        reason,
    };
    let (object_type, uuid) = id.split_once("--").ok_or_else(|| malformed("no '--'"))?;
    if let Some(expected) = expected.filter(|e| *e != object_type) {
        return Err(IdError::WrongType {
            id: id.to_owned(),
            expected: expected.to_owned(),
        });
    }
    if !is_stix_type_name(object_type) {
        return Err(malformed("the type is not a STIX type name"));
    }
    if !is_rfc4122_uuid(uuid) {
        return Err(malformed("not an RFC 4122 UUID"));
    }
    Ok(id)
}

/// STIX 2.1 type names: 3–250 characters of `a-z`, `0-9` and `-`, starting with a letter.
fn is_stix_type_name(name: &str) -> bool {
    (3..=250).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The hyphenated 8-4-4-4-12 form with the RFC 4122 variant (`8`, `9`, `a` or `b` first
/// in the fourth group), which Python's `uuid.UUID(...).variant` check requires.
fn is_rfc4122_uuid(text: &str) -> bool {
    let bytes = text.as_bytes();
    let shape_ok = bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    shape_ok && matches!(bytes[19], b'8' | b'9' | b'a' | b'b' | b'A' | b'B')
}

fn describe(value: Option<&Value>) -> String {
    value.map_or_else(|| "nothing".to_owned(), Value::to_string)
}

// ---------------------------------------------------------------------------------------
// Threat Bus → bridge

/// Identifies one indicator the bridge published, so that its echo on the bridge's own
/// subscription (SPEC §2.6) can be matched although Threat Bus re-serialises it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EchoKey {
    /// The STIX id, as sent.
    pub id: String,
    /// `modified` in milliseconds since the epoch. A number, not the text, because Threat
    /// Bus rewrites fractions (`.000Z` → `Z`, `.1Z` → `.100Z`). Milliseconds, because
    /// OpenCTI writes milliseconds and `stix2` declares `modified` with millisecond
    /// precision: a stack that truncates sub-millisecond digits still matches.
    pub modified_ms: i64,
    /// Create / EDIT / REMOVE: the same version may be sent as EDIT and later REMOVE.
    pub update: Operation,
}

/// The echo key of an indicator (as published, or as echoed by Threat Bus). `None` if
/// the object is not an indicator or lacks a string `id`, a parseable `modified`, or has
/// an `x_threatbus_update` Threat Bus does not define.
pub fn indicator_echo_key(obj: &Value) -> Option<EchoKey> {
    let obj = obj.as_object()?;
    if obj.get("type")?.as_str()? != "indicator" {
        return None;
    }
    let modified = Timestamp::parse(obj.get("modified")?.as_str()?).ok()?;
    Some(EchoKey {
        id: obj.get("id")?.as_str()?.to_owned(),
        modified_ms: modified.unix_millis(),
        update: Operation::from_threatbus_update(obj.get(X_THREATBUS_UPDATE))?,
    })
}

/// [`indicator_echo_key`] of a JSON text, read without building a [`Value`]: the intake
/// asks this of every echo and the drainer of every indicator it sends, and a full parse
/// of a ~1 KiB indicator was a good part of the bridge's CPU per indicator. Agrees with
/// `indicator_echo_key(&serde_json::from_str(json)?)` on every JSON object whose keys are
/// not repeated (where serde_json's `Value` keeps the last, this gives `None`); fields it
/// skips may nest deeper than the 128 levels `Value` reads, or hold numbers beyond `f64`.
pub fn indicator_echo_key_of_json(json: &str) -> Option<EchoKey> {
    use std::borrow::Cow;
    /// The fields the key is made of; every other one is skipped unread.
    #[derive(serde::Deserialize)]
    struct Fields<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<Cow<'a, str>>,
        #[serde(borrow)]
        id: Option<Cow<'a, str>>,
        #[serde(borrow)]
        modified: Option<Cow<'a, str>>,
        #[serde(rename = "x_threatbus_update")]
        update: Option<Value>,
    }
    // A derived struct also reads a JSON array, field by field; the key is an object's.
    if !json.trim_start().starts_with('{') {
        return None;
    }
    let fields: Fields = serde_json::from_str(json).ok()?;
    if fields.kind? != "indicator" {
        return None;
    }
    let modified = Timestamp::parse(&fields.modified?).ok()?;
    Some(EchoKey {
        id: fields.id?.into_owned(),
        modified_ms: modified.unix_millis(),
        update: Operation::from_threatbus_update(fields.update.as_ref())?,
    })
}

/// One message from the bridge's Threat Bus subscription, by topic suffix (the frame's
/// topic minus the p2p topic).
#[derive(Debug, Clone, PartialEq)]
pub enum BusMessage {
    /// `indicator`: normally the echo of one the bridge published (`echo_key` is `None`
    /// when it cannot be keyed). Indicators are never written back to OpenCTI.
    Indicator { echo_key: Option<EchoKey> },
    /// `sighting`, valid: to be written to OpenCTI.
    Sighting(Sighting),
    /// `sighting`, unusable: dead-letter the payload with this error.
    InvalidSighting(SightingError),
    /// `snapshotrequest`: answered from the indicator catalog ([`snapshot`]).
    SnapshotRequest,
    /// Any other suffix.
    Unknown { suffix: String },
}

/// Classifies one message from the subscription; `json` is the text after the first space.
pub fn classify_bus_message(topic_suffix: &str, json: &str) -> BusMessage {
    match topic_suffix {
        "indicator" => BusMessage::Indicator {
            echo_key: indicator_echo_key_of_json(json),
        },
        "sighting" => match parse_sighting(json) {
            Ok(sighting) => BusMessage::Sighting(sighting),
            Err(error) => BusMessage::InvalidSighting(error),
        },
        "snapshotrequest" => BusMessage::SnapshotRequest,
        other => BusMessage::Unknown {
            suffix: other.to_owned(),
        },
    }
}
