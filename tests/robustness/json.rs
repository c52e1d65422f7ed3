//! Generators of JSON input: valid-looking objects with mutations, the strings the mappers
//! care about (timestamps, STIX ids, patterns) in and out of range, awkward numbers and
//! unicode, deep nesting, and damage to the serialized text.

use proptest::prelude::*;
use serde_json::{json, Map, Number, Value};

/// Strings with a meaning somewhere in the mappers, valid and almost valid.
pub fn interesting_string() -> BoxedStrategy<String> {
    prop_oneof![
        3 => timestamp_text(),
        3 => stix_id_text(),
        2 => pattern_text(),
        2 => prop::sample::select(vec![
            "", " ", "\t", "EDIT", "REMOVE", "edit", "indicator", "sighting", "identity",
            "snapshotrequest", "2.1", "2.0", "stix", "sigma", "dependencies", "null", "true",
            "0", "-1", "1e400", "\u{0}", "\u{feff}", "\u{202e}", "\u{10ffff}", "🦀", "日本語",
        ])
        .prop_map(str::to_owned),
        2 => "\\PC{0,16}",
        1 => "[\\x00-\\x7f]{0,16}",
        // Long, but bounded so a case stays cheap.
        1 => (0usize..4096, any::<char>()).prop_map(|(n, c)| c.to_string().repeat(n)),
    ]
    .boxed()
}

/// `YYYY-MM-DDTHH:MM:SS[.f](Z|±hh:mm)` with every field a little past its range, the
/// extreme years, up to 10 fractional digits, and wrong separators now and then.
pub fn timestamp_text() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just(0u32), Just(9999), 0u32..=9999],
        0u32..=13,
        0u32..=32,
        0u32..=24,
        0u32..=60,
        0u32..=60,
        prop::option::of("[0-9]{0,10}"),
        prop_oneof![
            Just("Z".to_owned()),
            Just("z".to_owned()),
            Just(String::new()),
            (prop::sample::select(vec!['+', '-']), 0u32..=24, 0u32..=60)
                .prop_map(|(sign, h, m)| format!("{sign}{h:02}:{m:02}")),
        ],
        prop::sample::select(vec!["T", "t", " ", ""]),
    )
        .prop_map(|(y, mo, d, h, mi, s, frac, offset, sep)| {
            let frac = frac.map(|f| format!(".{f}")).unwrap_or_default();
            format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{frac}{offset}")
        })
}

/// `<type>--<uuid>`, with wrong types, a wrong variant digit, wrong lengths or separators.
pub fn stix_id_text() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            prop::sample::select(vec![
                "indicator", "sighting", "identity", "marking-definition", "ipv4-addr",
                "Indicator", "ab", "",
            ])
            .prop_map(str::to_owned),
            "[a-z0-9-]{0,8}",
        ],
        prop::sample::select(vec!["--", "-", "---", ""]),
        prop_oneof![
            4 => ("[0-9a-f]{8}", "[0-9a-f]{4}", "[0-9a-f]{4}", "[0-9a-fA-FxX]", "[0-9a-f]{3}", "[0-9a-f]{12}")
                .prop_map(|(a, b, c, v, d, e)| format!("{a}-{b}-{c}-{v}{d}-{e}")),
            1 => "[0-9a-f-]{0,40}",
        ],
    )
        .prop_map(|(t, sep, uuid)| format!("{t}{sep}{uuid}"))
}

/// STIX patterning: a valid one, or brackets, quotes and escapes in any order.
pub fn pattern_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("[ipv4-addr:value = '198.51.100.7']".to_owned()),
        Just("[file:hashes.'SHA-256' = 'ab\\'c'] AND ([url:value = 'x'])".to_owned()),
        "[\\[\\]() '\\\\a-z:=.0-9-]{0,32}",
    ]
}

/// Numbers at the edges: beyond `u32`, `u64::MAX`, negative, fractions, huge floats.
pub fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(vec![
            json!(0),
            json!(1),
            json!(2),
            json!(100),
            json!(101),
            json!(-1),
            json!(999_999_999u64),
            json!(1_000_000_000u64),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(-0.0),
            json!(0.5),
            json!(1e308),
            json!(-1e308),
            json!(5e-324),
        ]),
    ]
}

/// Any JSON value, a few levels deep.
pub fn value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        interesting_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((interesting_key(), inner), 0..4)
                .prop_map(|entries| Value::Object(entries.into_iter().collect::<Map<_, _>>())),
        ]
    })
    .boxed()
}

fn interesting_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(INDICATOR_KEYS.to_vec()).prop_map(str::to_owned),
        "[a-zA-Z_]{0,8}",
    ]
}

/// `inner` wrapped in `depth` arrays or objects (alternating by `objects`). serde_json
/// refuses text nested over 128 levels, so depths around that limit matter.
pub fn nest(inner: Value, depth: usize, objects: bool) -> Value {
    (0..depth).fold(inner, |v, _| {
        if objects {
            json!({ "a": v })
        } else {
            json!([v])
        }
    })
}

/// A value for one field: any value, or one built to be almost right for some field.
pub fn field_value() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => value(),
        3 => interesting_string().prop_map(Value::String),
        2 => number(),
        1 => (interesting_string(), 0usize..140, any::<bool>()).prop_map(|(s, d, o)| nest(Value::String(s), d, o)),
    ]
    .boxed()
}

/// One change to an object: a key removed, set (maybe to a wrong type), or nested.
#[derive(Debug, Clone)]
pub enum Mutation {
    Remove(String),
    Set(String, Value),
}

/// Up to `max` mutations, on `keys` mostly (the fields the mappers read) or any key.
pub fn mutations(keys: &'static [&'static str], max: usize) -> BoxedStrategy<Vec<Mutation>> {
    let key = prop_oneof![
        4 => prop::sample::select(keys.to_vec()).prop_map(str::to_owned),
        1 => interesting_key(),
    ];
    let mutation = prop_oneof![
        1 => key.clone().prop_map(Mutation::Remove),
        3 => (key, field_value()).prop_map(|(k, v)| Mutation::Set(k, v)),
    ];
    prop::collection::vec(mutation, 0..=max).boxed()
}

/// Applies `mutations` to `target` if it is an object (a `/`-separated key reaches into a
/// nested object, e.g. the OpenCTI extension).
pub fn apply(target: &mut Value, mutations: &[Mutation]) {
    for mutation in mutations {
        let (path, set) = match mutation {
            Mutation::Remove(k) => (k, None),
            Mutation::Set(k, v) => (k, Some(v)),
        };
        let (parents, last) = path.rsplit_once('/').unwrap_or(("", path));
        let parent = if parents.is_empty() {
            String::new()
        } else {
            format!("/{parents}")
        };
        let Some(node) = target.pointer_mut(&parent) else {
            continue;
        };
        if let Value::Object(map) = node {
            match set {
                Some(v) => map.insert(last.to_owned(), v.clone()),
                None => map.remove(last),
            };
        }
    }
}

/// Damage to serialized JSON: cut short, a character spliced in, an impossible number, or
/// the whole wrapped past serde_json's nesting limit. Always valid UTF-8 (the `&str` APIs).
#[derive(Debug, Clone)]
pub enum TextDamage {
    None,
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, char),
    HugeNumber(prop::sample::Index),
    Nest(usize),
}

pub fn text_damage() -> impl Strategy<Value = TextDamage> {
    prop_oneof![
        6 => Just(TextDamage::None),
        1 => any::<prop::sample::Index>().prop_map(TextDamage::Truncate),
        1 => (any::<prop::sample::Index>(), any::<char>()).prop_map(|(i, c)| TextDamage::Insert(i, c)),
        1 => any::<prop::sample::Index>().prop_map(TextDamage::HugeNumber),
        1 => (120usize..140).prop_map(TextDamage::Nest),
    ]
}

pub fn damage(text: String, damage: &TextDamage) -> String {
    let boundary = |index: &prop::sample::Index| {
        let mut at = index.index(text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        at
    };
    match damage {
        TextDamage::None => text,
        TextDamage::Truncate(i) => text[..boundary(i)].to_owned(),
        TextDamage::Insert(i, c) => {
            let at = boundary(i);
            format!("{}{c}{}", &text[..at], &text[at..])
        }
        TextDamage::HugeNumber(i) => {
            let at = boundary(i);
            format!("{}1e999999999999{}", &text[..at], &text[at..])
        }
        TextDamage::Nest(depth) => format!("{}{text}{}", "[".repeat(*depth), "]".repeat(*depth)),
    }
}

/// The fields the indicator mappers, validators and the import read.
pub const INDICATOR_KEYS: &[&str] = &[
    "type",
    "spec_version",
    "id",
    "created",
    "modified",
    "pattern",
    "pattern_type",
    "pattern_version",
    "valid_from",
    "valid_until",
    "name",
    "description",
    "labels",
    "confidence",
    "revoked",
    "created_by_ref",
    "object_marking_refs",
    "x_opencti_detection",
    "x_opencti_id",
    "x_opencti_patch",
    "x_opencti_context",
    "x_threatbus_update",
    "extensions",
    EXTENSION_DETECTION,
    EXTENSION_ID,
];

const EXTENSION_DETECTION: &str =
    "extensions/extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba/detection";
const EXTENSION_ID: &str =
    "extensions/extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba/id";

/// An indicator every check accepts, in OpenCTI 6.x's shape (extension) and 4.x's.
pub fn valid_indicator() -> Value {
    json!({
        "type": "indicator",
        "spec_version": "2.1",
        "id": "indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f",
        "created": "2024-03-01T10:00:00.000Z",
        "modified": "2024-03-02T10:00:00.123Z",
        "name": "198.51.100.7",
        "description": "C2",
        "pattern": "[ipv4-addr:value = '198.51.100.7']",
        "pattern_type": "stix",
        "pattern_version": "2.1",
        "valid_from": "2024-03-01T10:00:00.000Z",
        "valid_until": "2025-03-01T10:00:00.000Z",
        "labels": ["c2"],
        "confidence": 80,
        "revoked": false,
        "created_by_ref": "identity--d2916708-57b9-5636-8689-62f049e9f727",
        "object_marking_refs": ["marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9"],
        "x_opencti_detection": true,
        "x_opencti_id": "6f9c0b3e-3f0f-4e55-9b38-8f3c2a0d9f11",
        "extensions": {
            "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba": {
                "id": "6f9c0b3e-3f0f-4e55-9b38-8f3c2a0d9f11",
                "detection": true
            }
        }
    })
}

/// A sighting every check accepts.
pub fn valid_sighting() -> Value {
    json!({
        "type": "sighting",
        "spec_version": "2.1",
        "id": "sighting--5a1b4e9c-2f1d-4c3e-8b7a-0d9e8f7a6b5c",
        "created": "2024-03-01T10:00:00Z",
        "modified": "2024-03-01T10:00:00Z",
        "sighting_of_ref": "indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f",
        "first_seen": "2024-03-01T10:00:00.5+02:00",
        "last_seen": "2024-03-01T09:00:00Z",
        "count": 3,
        "x_threatbus_source": "VAST"
    })
}

pub const SIGHTING_KEYS: &[&str] = &[
    "type",
    "spec_version",
    "id",
    "sighting_of_ref",
    "first_seen",
    "last_seen",
    "count",
    "x_threatbus_source",
];
