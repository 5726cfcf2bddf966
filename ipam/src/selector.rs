//! Kubernetes label selectors as plain data: `matchLabels` plus `matchExpressions`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// Labels of an object or of its namespace.
pub type Labels = BTreeMap<String, String>;

/// A label selector. The empty selector matches everything, as in Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    /// Every one of these labels must be present with exactly this value.
    pub match_labels: BTreeMap<String, String>,
    /// Every one of these requirements must hold.
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// How the label is compared.
    pub operator: Operator,
    /// The values for `In` and `NotIn`; empty for `Exists` and `DoesNotExist`.
    pub values: BTreeSet<String>,
}

/// A `matchExpressions` operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    /// The label is present and its value is one of `values`.
    In,
    /// The label is absent, or its value is none of `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl LabelSelector {
    /// The selector that matches every object.
    #[must_use]
    pub fn everything() -> Self {
        Self::default()
    }

    /// Adds a `matchLabels` entry.
    #[must_use]
    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.match_labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Adds a `matchExpressions` entry.
    #[must_use]
    pub fn with_expression(mut self, key: &str, operator: Operator, values: &[&str]) -> Self {
        self.match_expressions.push(Requirement {
            key: key.to_owned(),
            operator,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        });
        self
    }

    /// Whether an object with `labels` is selected.
    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        self.matches_lookup(|key| labels.get(key).map(String::as_str))
    }

    /// Whether an object whose label values `lookup` answers is selected: for label sets
    /// that are not stored as a map, such as a Service's labels plus the virtual labels
    /// naming its namespace and name.
    #[must_use]
    pub fn matches_lookup<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| lookup(key) == Some(value.as_str()))
            && self
                .match_expressions
                .iter()
                .all(|r| r.matches_value(lookup(&r.key)))
    }
}

impl Requirement {
    /// Whether `labels` satisfy this requirement.
    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        self.matches_value(labels.get(&self.key).map(String::as_str))
    }

    /// Whether a label of value `value` (`None`: absent) satisfies this requirement.
    #[must_use]
    pub fn matches_value(&self, value: Option<&str>) -> bool {
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl FromStr for Operator {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "In" => Ok(Operator::In),
            "NotIn" => Ok(Operator::NotIn),
            "Exists" => Ok(Operator::Exists),
            "DoesNotExist" => Ok(Operator::DoesNotExist),
            _ => Err(()),
        }
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(LabelSelector::everything().matches(&labels(&[])));
        assert!(LabelSelector::everything().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_need_every_pair() {
        let s = LabelSelector::everything()
            .with_label("tier", "web")
            .with_label("env", "prod");
        assert!(s.matches(&labels(&[("tier", "web"), ("env", "prod"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("tier", "web")])));
        assert!(!s.matches(&labels(&[("tier", "web"), ("env", "dev")])));
    }

    #[test]
    fn in_needs_the_label_with_a_listed_value() {
        let s = LabelSelector::everything().with_expression("env", Operator::In, &["a", "b"]);
        assert!(s.matches(&labels(&[("env", "b")])));
        assert!(!s.matches(&labels(&[("env", "c")])));
        assert!(!s.matches(&labels(&[])));
    }

    #[test]
    fn not_in_matches_absent_labels_and_other_values() {
        let s = LabelSelector::everything().with_expression("env", Operator::NotIn, &["prod"]);
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn exists_and_does_not_exist_look_only_at_the_key() {
        let exists = LabelSelector::everything().with_expression("gpu", Operator::Exists, &[]);
        let absent =
            LabelSelector::everything().with_expression("gpu", Operator::DoesNotExist, &[]);
        let with = labels(&[("gpu", "")]);
        assert!(exists.matches(&with) && !absent.matches(&with));
        assert!(!exists.matches(&labels(&[])) && absent.matches(&labels(&[])));
    }

    #[test]
    fn operators_parse_only_their_kubernetes_spelling() {
        assert_eq!("NotIn".parse(), Ok(Operator::NotIn));
        assert_eq!("notin".parse::<Operator>(), Err(()));
    }
}
