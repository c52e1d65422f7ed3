//! Gap reconciliation, the pure part: what OpenCTI's answer about an indicator the bridge
//! told Threat Bus to match means, and the `REMOVE` to send when it is gone.
//!
//! A replay (recover mode) brings back the current state of everything OpenCTI still has,
//! but nothing about what it deleted meanwhile. So every indicator still active in the
//! catalog that the replay did not refresh is looked up in OpenCTI
//! ([`crate::pipeline::reconcile`]); this module decides from the answer.

use serde_json::Value;

use super::{Operation, X_THREATBUS_UPDATE};

/// What OpenCTI says about one indicator now (the fields of the batched lookup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndicatorState {
    /// The STIX id OpenCTI knows it by. Differs from the id looked up when the indicator
    /// was merged into another (OpenCTI keeps the old id among the target's STIX ids).
    pub standard_id: String,
    pub revoked: bool,
    /// `x_opencti_detection`; `None` when OpenCTI returns null.
    pub detection: Option<bool>,
}

/// Why a catalog indicator is no longer one tools should match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gone {
    /// OpenCTI has no indicator with this id.
    Deleted,
    /// Revoked in OpenCTI.
    Revoked,
    /// Detection turned off (and `forward_all_iocs` is off).
    DetectionOff,
    /// Merged into another indicator, forwarded under its own id.
    Merged { into: String },
}

impl Gone {
    /// A short label for logs, metrics and the `reconcile` report.
    pub fn label(&self) -> &'static str {
        match self {
            Gone::Deleted => "deleted",
            Gone::Revoked => "revoked",
            Gone::DetectionOff => "detection_off",
            Gone::Merged { .. } => "merged",
        }
    }
}

/// The verdict on catalog indicator `catalog_id`, given OpenCTI's answer (`None`: not
/// found). The rule is the stream mapping's (`forwarding` in [`crate::stix`]): revoked
/// wins over `forward_all_iocs`; detection must be on unless `forward_all_iocs`.
pub fn verdict(
    catalog_id: &str,
    found: Option<&IndicatorState>,
    forward_all_iocs: bool,
) -> Option<Gone> {
    let Some(state) = found else {
        return Some(Gone::Deleted);
    };
    if state.standard_id != catalog_id {
        return Some(Gone::Merged {
            into: state.standard_id.clone(),
        });
    }
    if state.revoked {
        return Some(Gone::Revoked);
    }
    if !forward_all_iocs && state.detection != Some(true) {
        return Some(Gone::DetectionOff);
    }
    None
}

/// The `REMOVE` for an indicator last sent as `active_body` (a create or `EDIT` as
/// queued): the same object, `x_threatbus_update: "REMOVE"`. Tools match on id and
/// pattern, so the last version they were given is the one to withdraw.
pub fn removal_body(active_body: &[u8]) -> Result<Vec<u8>, String> {
    let mut value: Value = serde_json::from_slice(active_body)
        .map_err(|e| format!("the catalog body is not JSON: {e}"))?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| "the catalog body is not a JSON object".to_owned())?;
    let update = Operation::Remove.threatbus_update().unwrap_or("REMOVE");
    object.insert(X_THREATBUS_UPDATE.to_owned(), Value::from(update));
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "indicator--3f2b0c4e-1a2b-4c3d-8e9f-0a1b2c3d4e5f";

    fn state(standard_id: &str, revoked: bool, detection: Option<bool>) -> IndicatorState {
        IndicatorState {
            standard_id: standard_id.to_owned(),
            revoked,
            detection,
        }
    }

    #[test]
    fn an_indicator_opencti_still_detects_stays() {
        assert_eq!(
            verdict(ID, Some(&state(ID, false, Some(true))), false),
            None
        );
    }

    #[test]
    fn deleted_revoked_merged_and_undetected_indicators_go() {
        assert_eq!(verdict(ID, None, false), Some(Gone::Deleted));
        assert_eq!(
            verdict(ID, Some(&state(ID, true, Some(true))), true),
            Some(Gone::Revoked),
            "revoked wins over forward_all_iocs"
        );
        assert_eq!(
            verdict(ID, Some(&state(ID, false, Some(false))), false),
            Some(Gone::DetectionOff)
        );
        assert_eq!(
            verdict(ID, Some(&state(ID, false, None)), false),
            Some(Gone::DetectionOff),
            "the stream mapping forwards only detection = true"
        );
        assert_eq!(
            verdict(
                ID,
                Some(&state("indicator--other", false, Some(true))),
                false
            ),
            Some(Gone::Merged {
                into: "indicator--other".into()
            })
        );
    }

    #[test]
    fn forward_all_iocs_keeps_undetected_indicators() {
        assert_eq!(
            verdict(ID, Some(&state(ID, false, Some(false))), true),
            None
        );
    }

    #[test]
    fn the_removal_is_the_last_body_marked_remove() {
        let body = format!(
            r#"{{"type":"indicator","id":"{ID}","x_threatbus_update":"EDIT","pattern":"[x]"}}"#
        );
        let removal: Value =
            serde_json::from_slice(&removal_body(body.as_bytes()).unwrap()).unwrap();
        assert_eq!(removal["x_threatbus_update"], "REMOVE");
        assert_eq!(removal["id"], ID);
        assert_eq!(removal["pattern"], "[x]");
        assert!(removal_body(b"not json").is_err());
        assert!(removal_body(b"[1]").is_err());
    }
}
