//! Spec problems that name the object, the field and the value, and the checks shared by
//! the BGP resources.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as KubeLabelSelector;
use portico_ipam::LabelSelector;

/// One problem of a spec: `spec.peerASN: 0 is not a valid AS number`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field path, e.g. `spec.communities[1]`.
    pub field: String,
    /// The offending value as written (strings quoted, numbers bare).
    pub value: String,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} {}", self.field, self.value, self.problem)
    }
}

/// Every problem of one object's spec; the object is not used until they are fixed.
///
/// Displays as `BGPPeer tor-a: spec.peerASN: 0 is not a valid AS number; spec.holdTime: 2
/// must be 0 or at least 3`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidObject {
    /// The object's kind, e.g. `BGPPeer`.
    pub kind: &'static str,
    /// The object's name.
    pub name: String,
    /// Every problem, in field order.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for InvalidObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: ", self.kind, self.name)?;
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects [`FieldError`]s while a spec is checked.
#[derive(Debug, Default)]
pub(crate) struct Problems(pub(crate) Vec<FieldError>);

impl Problems {
    /// Records that `field` holds `value` (already formatted), which `problem`.
    pub(crate) fn push(
        &mut self,
        field: impl Into<String>,
        value: impl fmt::Display,
        problem: impl Into<String>,
    ) {
        self.0.push(FieldError {
            field: field.into(),
            value: value.to_string(),
            problem: problem.into(),
        });
    }

    /// `Ok(value)` when nothing was recorded.
    pub(crate) fn finish<T>(
        self,
        kind: &'static str,
        name: &str,
        value: T,
    ) -> Result<T, InvalidObject> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(InvalidObject {
                kind,
                name: name.to_owned(),
                errors: self.0,
            })
        }
    }
}

/// A string value as it appears in messages: quoted, with escapes.
pub(crate) fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// Checks that `asn` can be configured as a real AS number.
pub(crate) fn check_asn(problems: &mut Problems, field: &str, asn: u32) {
    match asn {
        0 => problems.push(field, asn, "is not a valid AS number"),
        23456 => problems.push(
            field,
            asn,
            "is AS_TRANS (RFC 6793), a placeholder that cannot be configured",
        ),
        65535 | u32::MAX => problems.push(field, asn, "is a reserved AS number (RFC 7300)"),
        _ => {}
    }
}

/// Converts a Kubernetes label selector into the plain form; absent means "everything".
/// The checks are `portico_ipam::parse_selector`'s, so every object validates selectors
/// alike.
pub(crate) fn label_selector(
    problems: &mut Problems,
    path: &str,
    selector: Option<&KubeLabelSelector>,
) -> LabelSelector {
    let raw = selector.map(crate::raw_selector);
    let mut errors = Vec::new();
    let parsed = portico_ipam::parse_selector(path, raw.as_ref(), &mut errors);
    for e in errors {
        let value = if e.value == "[]" {
            e.value
        } else {
            quoted(&e.value)
        };
        problems.push(e.field, value, e.problem);
    }
    parsed
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    #[test]
    fn absent_selector_selects_everything() {
        let mut p = Problems::default();
        assert_eq!(
            label_selector(&mut p, "spec.nodeSelector", None),
            LabelSelector::everything()
        );
        assert!(p.0.is_empty());
    }

    #[test]
    fn selector_with_unknown_operator_names_the_expression() {
        let mut p = Problems::default();
        let s = KubeLabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "rack".into(),
                operator: "Near".into(),
                values: None,
            }]),
        };
        label_selector(&mut p, "spec.nodeSelector", Some(&s));
        assert_eq!(
            p.0[0].to_string(),
            r#"spec.nodeSelector.matchExpressions[0].operator: "Near" is not one of In, NotIn, Exists, DoesNotExist"#
        );
    }

    #[test]
    fn in_without_values_and_exists_with_values_are_rejected() {
        let mut p = Problems::default();
        let req = |op: &str, values: Option<Vec<String>>| LabelSelectorRequirement {
            key: "k".into(),
            operator: op.into(),
            values,
        };
        let s = KubeLabelSelector {
            match_labels: None,
            match_expressions: Some(vec![req("In", None), req("Exists", Some(vec!["x".into()]))]),
        };
        label_selector(&mut p, "s", Some(&s));
        assert_eq!(p.0.len(), 2);
        assert_eq!(p.0[0].problem, "must not be empty for operator In");
        assert_eq!(p.0[1].problem, "must be empty for operator Exists");
    }

    #[test]
    fn reserved_and_placeholder_as_numbers_are_rejected() {
        for asn in [0, 23456, 65535, u32::MAX] {
            let mut p = Problems::default();
            check_asn(&mut p, "spec.myASN", asn);
            assert_eq!(p.0.len(), 1, "{asn}");
        }
        let mut p = Problems::default();
        for asn in [1, 64512, 65534, 65536, 4_200_000_001] {
            check_asn(&mut p, "spec.myASN", asn);
        }
        assert!(p.0.is_empty());
    }

    #[test]
    fn invalid_object_names_kind_name_and_every_problem() {
        let mut p = Problems::default();
        p.push("spec.peerASN", 0, "is not a valid AS number");
        p.push("spec.holdTime", 2, "must be 0 or at least 3");
        let err = p.finish("BGPPeer", "tor-a", ()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "BGPPeer tor-a: spec.peerASN: 0 is not a valid AS number; spec.holdTime: 2 must be 0 or at least 3"
        );
    }
}
