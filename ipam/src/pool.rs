//! Address pools: the raw spec as the API carries it, its validation, and the parsed form.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::consumer::Consumer;
use crate::family::{to_number, Family};
use crate::selector::{LabelSelector, Operator, Requirement};

/// Virtual label that a pool's `serviceSelector` sees on every consumer, valued with the
/// consumer's namespace (Cilium LB-IPAM's spelling, so Cilium pools keep their meaning).
pub const SERVICE_NAMESPACE_LABEL: &str = "io.kubernetes.service.namespace";

/// Virtual label that a pool's `serviceSelector` sees on every consumer, valued with the
/// consumer's name (Cilium LB-IPAM's spelling).
pub const SERVICE_NAME_LABEL: &str = "io.kubernetes.service.name";

/// A pool's spec exactly as the API object carries it: strings not yet checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawPoolSpec {
    /// `spec.blocks`.
    pub blocks: Vec<RawBlock>,
    /// `spec.allowFirstLastIPs` (default true).
    pub allow_first_last_ips: Option<bool>,
    /// `spec.avoidBuggyIPs` (default false).
    pub avoid_buggy_ips: Option<bool>,
    /// `spec.serviceSelector` (absent: every consumer).
    pub service_selector: Option<RawSelector>,
    /// `spec.namespaceSelector` (absent: every namespace).
    pub namespace_selector: Option<RawSelector>,
    /// `spec.namespaces` (empty: every namespace).
    pub namespaces: Vec<String>,
    /// `spec.priority` (lower is tried first; unset is tried after every set priority,
    /// as in MetalLB).
    pub priority: Option<i32>,
    /// `spec.autoAssign` (default true).
    pub auto_assign: Option<bool>,
    /// `spec.disabled` (default false).
    pub disabled: Option<bool>,
}

/// One entry of `spec.blocks`: either `cidr`, or `start` and `stop`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawBlock {
    /// A CIDR such as `10.0.10.0/24`.
    pub cidr: Option<String>,
    /// First address of an inclusive range.
    pub start: Option<String>,
    /// Last address of an inclusive range.
    pub stop: Option<String>,
}

/// A label selector as the API carries it (operators still strings).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawSelector {
    /// `matchLabels`.
    pub match_labels: BTreeMap<String, String>,
    /// `matchExpressions`.
    pub match_expressions: Vec<RawRequirement>,
}

/// One `matchExpressions` entry as the API carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawRequirement {
    /// The label key.
    pub key: String,
    /// The operator, one of `In`, `NotIn`, `Exists`, `DoesNotExist`.
    pub operator: String,
    /// The values.
    pub values: Vec<String>,
}

/// One problem in a pool's spec, naming the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value:?} {problem}")]
pub struct SpecError {
    /// The field path, e.g. `spec.blocks[2].cidr`.
    pub field: String,
    /// The offending value as written.
    pub value: String,
    /// What is wrong with it, e.g. `is not a valid CIDR`.
    pub problem: String,
}

/// Every problem found in a pool's spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// An inclusive range of addresses of one family, as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrRange {
    /// The family.
    pub family: Family,
    /// First usable address.
    pub first: u128,
    /// Last usable address.
    pub last: u128,
}

impl AddrRange {
    /// Whether the two ranges share an address.
    #[must_use]
    pub fn overlaps(&self, other: &AddrRange) -> bool {
        self.family == other.family && self.first <= other.last && other.first <= self.last
    }

    /// Whether `value` of `family` lies in the range.
    #[must_use]
    pub fn contains(&self, family: Family, value: u128) -> bool {
        self.family == family && self.first <= value && value <= self.last
    }
}

/// A validated pool: plain data the allocator works from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// The pool's name (cluster-scoped, so unique).
    pub name: String,
    /// Creation time in seconds since the Unix epoch; with the name, it decides which of
    /// two overlapping pools wins (the older one).
    pub created_at: i64,
    /// Usable ranges, sorted, with network and broadcast addresses already removed when
    /// `allowFirstLastIPs` is false.
    pub ranges: Vec<AddrRange>,
    /// Skip every IPv4 address ending in `.0` or `.255`.
    pub avoid_buggy_ips: bool,
    /// Which consumers may use the pool (by their labels).
    pub service_selector: LabelSelector,
    /// Which namespaces may use the pool (by the namespace's labels).
    pub namespace_selector: LabelSelector,
    /// Namespaces that may use the pool; empty means all.
    pub namespaces: BTreeSet<String>,
    /// Lower is tried first; `None` (unset) comes after every set priority, as in
    /// MetalLB; ties go by name.
    pub priority: Option<i32>,
    /// Whether consumers that ask for no pool and no address get addresses from it.
    pub auto_assign: bool,
    /// No new allocations; existing ones stay.
    pub disabled: bool,
}

impl Pool {
    /// Validates `spec` into a pool.
    ///
    /// # Errors
    /// Every problem found, each naming the field and the value.
    pub fn parse(name: &str, created_at: i64, spec: &RawPoolSpec) -> Result<Pool, SpecErrors> {
        let mut errors = Vec::new();
        let allow_first_last = spec.allow_first_last_ips.unwrap_or(true);
        let mut ranges: Vec<(usize, AddrRange)> = Vec::new();
        if spec.blocks.is_empty() {
            errors.push(SpecError {
                field: "spec.blocks".into(),
                value: "[]".into(),
                problem: "must list at least one block".into(),
            });
        }
        for (i, block) in spec.blocks.iter().enumerate() {
            if let Some(range) = parse_block(i, block, allow_first_last, &mut errors) {
                if let Some((j, _)) = ranges.iter().find(|(_, r)| r.overlaps(&range)) {
                    errors.push(SpecError {
                        field: format!("spec.blocks[{i}]"),
                        value: block_text(block),
                        problem: format!("overlaps spec.blocks[{j}]"),
                    });
                } else {
                    ranges.push((i, range));
                }
            }
        }
        let service_selector = parse_selector(
            "spec.serviceSelector",
            spec.service_selector.as_ref(),
            &mut errors,
        );
        let namespace_selector = parse_selector(
            "spec.namespaceSelector",
            spec.namespace_selector.as_ref(),
            &mut errors,
        );
        for (i, ns) in spec.namespaces.iter().enumerate() {
            if ns.is_empty() {
                errors.push(SpecError {
                    field: format!("spec.namespaces[{i}]"),
                    value: ns.clone(),
                    problem: "is not a namespace name".into(),
                });
            }
        }
        if !errors.is_empty() {
            return Err(SpecErrors(errors));
        }
        let mut ranges: Vec<AddrRange> = ranges.into_iter().map(|(_, r)| r).collect();
        ranges.sort();
        Ok(Pool {
            name: name.to_owned(),
            created_at,
            ranges,
            avoid_buggy_ips: spec.avoid_buggy_ips.unwrap_or(false),
            service_selector,
            namespace_selector,
            namespaces: spec.namespaces.iter().cloned().collect(),
            priority: spec.priority,
            auto_assign: spec.auto_assign.unwrap_or(true),
            disabled: spec.disabled.unwrap_or(false),
        })
    }

    /// A ready pool over `blocks` (CIDRs or `a-b` ranges) with default settings: the
    /// builder the tests and benchmarks start from.
    ///
    /// # Errors
    /// As [`Pool::parse`].
    pub fn from_blocks(name: &str, blocks: &[&str]) -> Result<Pool, SpecErrors> {
        let spec = RawPoolSpec {
            blocks: blocks
                .iter()
                .map(|b| match b.split_once('-') {
                    Some((start, stop)) => RawBlock {
                        start: Some(start.trim().to_owned()),
                        stop: Some(stop.trim().to_owned()),
                        cidr: None,
                    },
                    None => RawBlock {
                        cidr: Some((*b).to_owned()),
                        ..RawBlock::default()
                    },
                })
                .collect(),
            ..RawPoolSpec::default()
        };
        Pool::parse(name, 0, &spec)
    }

    /// Sets the creation time.
    #[must_use]
    pub fn created(mut self, at: i64) -> Self {
        self.created_at = at;
        self
    }

    /// Sets the priority.
    #[must_use]
    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = Some(priority);
        self
    }

    /// The key pools are tried in: set priorities (lowest first), then unset ones, each
    /// group by name.
    #[must_use]
    pub fn order_key(&self) -> (bool, i32, &str) {
        (
            self.priority.is_none(),
            self.priority.unwrap_or(0),
            &self.name,
        )
    }

    /// Sets the service selector.
    #[must_use]
    pub fn selecting(mut self, selector: LabelSelector) -> Self {
        self.service_selector = selector;
        self
    }

    /// Sets the namespace selector.
    #[must_use]
    pub fn selecting_namespaces(mut self, selector: LabelSelector) -> Self {
        self.namespace_selector = selector;
        self
    }

    /// Restricts the pool to these namespaces.
    #[must_use]
    pub fn only_in(mut self, namespaces: &[&str]) -> Self {
        self.namespaces = namespaces.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    /// Sets `autoAssign`.
    #[must_use]
    pub fn auto_assign(mut self, on: bool) -> Self {
        self.auto_assign = on;
        self
    }

    /// Sets `disabled`.
    #[must_use]
    pub fn disabled(mut self, on: bool) -> Self {
        self.disabled = on;
        self
    }

    /// Sets `avoidBuggyIPs`.
    #[must_use]
    pub fn avoiding_buggy_ips(mut self, on: bool) -> Self {
        self.avoid_buggy_ips = on;
        self
    }

    /// Whether the pool has addresses of `family`.
    #[must_use]
    pub fn has_family(&self, family: Family) -> bool {
        self.ranges.iter().any(|r| r.family == family)
    }

    /// Whether the pool's rules skip this address although it lies in a range.
    #[must_use]
    pub fn excludes(&self, family: Family, value: u128) -> bool {
        self.avoid_buggy_ips && family == Family::V4 && is_buggy(value)
    }

    /// Whether `ip` is one of the pool's usable addresses.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (family, value) = to_number(ip);
        self.ranges.iter().any(|r| r.contains(family, value)) && !self.excludes(family, value)
    }

    /// How many usable addresses of `family` the pool has (saturating at `u128::MAX`).
    #[must_use]
    pub fn total(&self, family: Family) -> u128 {
        self.ranges
            .iter()
            .filter(|r| r.family == family)
            .map(|r| {
                let size = (r.last - r.first).saturating_add(1);
                if self.excludes_any(family) {
                    size - buggy_between(r.first, r.last)
                } else {
                    size
                }
            })
            .fold(0u128, u128::saturating_add)
    }

    fn excludes_any(&self, family: Family) -> bool {
        self.avoid_buggy_ips && family == Family::V4
    }

    /// Whether `consumer` may use the pool: its namespace is listed (or none is), its
    /// namespace's labels match `namespaceSelector`, and its labels match
    /// `serviceSelector`. As in Cilium, the service selector also sees two virtual labels,
    /// [`SERVICE_NAMESPACE_LABEL`] and [`SERVICE_NAME_LABEL`], whose values are the
    /// consumer's namespace and name; labels of those keys on the consumer itself are
    /// ignored, so a Service cannot claim another namespace's pool by labelling itself.
    #[must_use]
    pub fn admits(&self, consumer: &Consumer) -> bool {
        let id = &consumer.id;
        (self.namespaces.is_empty() || self.namespaces.contains(&id.namespace))
            && self.namespace_selector.matches(&consumer.namespace_labels)
            && self.service_selector.matches_lookup(|key| match key {
                SERVICE_NAMESPACE_LABEL => Some(id.namespace.as_str()),
                SERVICE_NAME_LABEL => Some(id.name.as_str()),
                _ => consumer.labels.get(key).map(String::as_str),
            })
    }
}

/// An IPv4 address ending in `.0` or `.255`, which some old clients mishandle.
pub(crate) fn is_buggy(value: u128) -> bool {
    let last = value & 0xff;
    last == 0 || last == 0xff
}

/// How many values in `first..=last` end in `.0` or `.255`.
fn buggy_between(first: u128, last: u128) -> u128 {
    // Values <= n whose low byte is r: n >= r ? (n - r) / 256 + 1 : 0.
    let up_to = |n: u128, r: u128| if n >= r { (n - r) / 256 + 1 } else { 0 };
    let count = |n: u128| up_to(n, 0) + up_to(n, 255);
    count(last) - if first == 0 { 0 } else { count(first - 1) }
}

fn block_text(block: &RawBlock) -> String {
    match (&block.cidr, &block.start, &block.stop) {
        (Some(c), _, _) => c.clone(),
        (None, s, e) => format!(
            "{}-{}",
            s.as_deref().unwrap_or_default(),
            e.as_deref().unwrap_or_default()
        ),
    }
}

fn parse_block(
    i: usize,
    block: &RawBlock,
    allow_first_last: bool,
    errors: &mut Vec<SpecError>,
) -> Option<AddrRange> {
    let field = |name: &str| format!("spec.blocks[{i}].{name}");
    match (&block.cidr, &block.start, &block.stop) {
        (Some(cidr), None, None) => {
            let net: IpNet = match cidr.trim().parse() {
                Ok(net) => net,
                Err(_) => {
                    errors.push(SpecError {
                        field: field("cidr"),
                        value: cidr.clone(),
                        problem: "is not a valid CIDR".into(),
                    });
                    return None;
                }
            };
            if net.trunc() != net {
                errors.push(SpecError {
                    field: field("cidr"),
                    value: cidr.clone(),
                    problem: format!("has host bits set (did you mean \"{}\"?)", net.trunc()),
                });
                return None;
            }
            let (family, first) = to_number(net.network());
            let (_, last) = to_number(net.broadcast());
            let exempt = net.prefix_len() + 1 >= net.max_prefix_len();
            if allow_first_last || exempt {
                Some(AddrRange {
                    family,
                    first,
                    last,
                })
            } else {
                Some(AddrRange {
                    family,
                    first: first + 1,
                    last: last - 1,
                })
            }
        }
        (None, Some(start), Some(stop)) => {
            let parse = |name: &str, text: &String, errors: &mut Vec<SpecError>| {
                text.trim().parse::<IpAddr>().map_err(|_| {
                    errors.push(SpecError {
                        field: field(name),
                        value: text.clone(),
                        problem: "is not a valid IP address".into(),
                    });
                })
            };
            let (first, last) = (parse("start", start, errors), parse("stop", stop, errors));
            let (Ok(first), Ok(last)) = (first, last) else {
                return None;
            };
            let ((family, first_n), (last_family, last_n)) = (to_number(first), to_number(last));
            if family != last_family {
                errors.push(SpecError {
                    field: field("stop"),
                    value: stop.clone(),
                    problem: format!("is not of the same family as start {start:?}"),
                });
                return None;
            }
            if first_n > last_n {
                errors.push(SpecError {
                    field: field("stop"),
                    value: stop.clone(),
                    problem: format!("comes before start {start:?}"),
                });
                return None;
            }
            Some(AddrRange {
                family,
                first: first_n,
                last: last_n,
            })
        }
        _ => {
            errors.push(SpecError {
                field: format!("spec.blocks[{i}]"),
                value: block_text(block),
                problem: "must set either cidr, or both start and stop".into(),
            });
            None
        }
    }
}

/// Checks a label selector written at `path` (absent: everything) and returns it, adding a
/// [`SpecError`] for every bad key, operator or value list. The one selector validation of
/// every Portico object (pools here; peers and advertisements through `portico-crds`).
pub fn parse_selector(
    path: &str,
    raw: Option<&RawSelector>,
    errors: &mut Vec<SpecError>,
) -> LabelSelector {
    let Some(raw) = raw else {
        return LabelSelector::everything();
    };
    let mut selector = LabelSelector {
        match_labels: raw.match_labels.clone(),
        match_expressions: Vec::new(),
    };
    for key in raw.match_labels.keys().filter(|k| k.is_empty()) {
        errors.push(SpecError {
            field: format!("{path}.matchLabels"),
            value: key.clone(),
            problem: "is not a valid label key".into(),
        });
    }
    for (i, req) in raw.match_expressions.iter().enumerate() {
        let field = |name: &str| format!("{path}.matchExpressions[{i}].{name}");
        if req.key.is_empty() {
            errors.push(SpecError {
                field: field("key"),
                value: req.key.clone(),
                problem: "is not a valid label key".into(),
            });
        }
        let Ok(operator) = req.operator.parse::<Operator>() else {
            errors.push(SpecError {
                field: field("operator"),
                value: req.operator.clone(),
                problem: "is not one of In, NotIn, Exists, DoesNotExist".into(),
            });
            continue;
        };
        let needs_values = matches!(operator, Operator::In | Operator::NotIn);
        if needs_values && req.values.is_empty() {
            errors.push(SpecError {
                field: field("values"),
                value: "[]".into(),
                problem: format!("must not be empty for operator {operator}"),
            });
        } else if !needs_values && !req.values.is_empty() {
            errors.push(SpecError {
                field: field("values"),
                value: req.values.join(","),
                problem: format!("must be empty for operator {operator}"),
            });
        }
        selector.match_expressions.push(Requirement {
            key: req.key.clone(),
            operator,
            values: req.values.iter().cloned().collect(),
        });
    }
    selector
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr_spec(cidrs: &[&str]) -> RawPoolSpec {
        RawPoolSpec {
            blocks: cidrs
                .iter()
                .map(|c| RawBlock {
                    cidr: Some((*c).to_owned()),
                    ..RawBlock::default()
                })
                .collect(),
            ..RawPoolSpec::default()
        }
    }

    fn message(spec: &RawPoolSpec) -> String {
        Pool::parse("p", 0, spec).unwrap_err().to_string()
    }

    #[test]
    fn invalid_cidr_names_the_field_and_value() {
        let spec = cidr_spec(&["10.0.0.0/24", "10.0.1.0/24", "10.0.0.300/24"]);
        assert_eq!(
            message(&spec),
            r#"spec.blocks[2].cidr: "10.0.0.300/24" is not a valid CIDR"#
        );
    }

    #[test]
    fn cidr_with_host_bits_is_rejected_with_a_suggestion() {
        assert!(message(&cidr_spec(&["10.0.0.5/24"])).contains("did you mean \"10.0.0.0/24\""));
    }

    #[test]
    fn range_with_start_after_stop_is_rejected() {
        let spec = RawPoolSpec {
            blocks: vec![RawBlock {
                start: Some("10.0.0.9".into()),
                stop: Some("10.0.0.1".into()),
                cidr: None,
            }],
            ..RawPoolSpec::default()
        };
        assert_eq!(
            message(&spec),
            r#"spec.blocks[0].stop: "10.0.0.1" comes before start "10.0.0.9""#
        );
    }

    #[test]
    fn range_mixing_families_is_rejected() {
        let spec = RawPoolSpec {
            blocks: vec![RawBlock {
                start: Some("10.0.0.1".into()),
                stop: Some("fd00::1".into()),
                cidr: None,
            }],
            ..RawPoolSpec::default()
        };
        assert!(message(&spec).contains("is not of the same family"));
    }

    #[test]
    fn block_with_both_cidr_and_range_is_rejected() {
        let spec = RawPoolSpec {
            blocks: vec![RawBlock {
                cidr: Some("10.0.0.0/24".into()),
                start: Some("10.0.0.1".into()),
                stop: None,
            }],
            ..RawPoolSpec::default()
        };
        assert!(message(&spec).starts_with("spec.blocks[0]: "));
    }

    #[test]
    fn pool_without_blocks_is_rejected() {
        assert!(message(&RawPoolSpec::default()).contains("at least one block"));
    }

    #[test]
    fn overlapping_blocks_in_one_pool_are_rejected() {
        let spec = cidr_spec(&["10.0.0.0/24", "10.0.0.128/25"]);
        assert_eq!(
            message(&spec),
            r#"spec.blocks[1]: "10.0.0.128/25" overlaps spec.blocks[0]"#
        );
    }

    #[test]
    fn bad_selector_operator_names_the_field() {
        let spec = RawPoolSpec {
            service_selector: Some(RawSelector {
                match_expressions: vec![RawRequirement {
                    key: "tier".into(),
                    operator: "Equals".into(),
                    values: vec!["web".into()],
                }],
                ..RawSelector::default()
            }),
            ..cidr_spec(&["10.0.0.0/24"])
        };
        assert_eq!(
            message(&spec),
            r#"spec.serviceSelector.matchExpressions[0].operator: "Equals" is not one of In, NotIn, Exists, DoesNotExist"#
        );
    }

    #[test]
    fn in_selector_without_values_is_rejected() {
        let spec = RawPoolSpec {
            namespace_selector: Some(RawSelector {
                match_expressions: vec![RawRequirement {
                    key: "team".into(),
                    operator: "In".into(),
                    values: vec![],
                }],
                ..RawSelector::default()
            }),
            ..cidr_spec(&["10.0.0.0/24"])
        };
        assert!(message(&spec).starts_with("spec.namespaceSelector.matchExpressions[0].values"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let spec = cidr_spec(&["nonsense", "10.0.0.0/33"]);
        assert_eq!(Pool::parse("p", 0, &spec).unwrap_err().0.len(), 2);
    }

    #[test]
    fn first_and_last_ips_are_skipped_when_not_allowed() {
        let spec = RawPoolSpec {
            allow_first_last_ips: Some(false),
            ..cidr_spec(&["10.0.0.0/24", "10.0.1.0/31", "10.0.2.7/32", "fd00::/127"])
        };
        let pool = Pool::parse("p", 0, &spec).unwrap();
        assert!(!pool.contains("10.0.0.0".parse().unwrap()));
        assert!(pool.contains("10.0.0.1".parse().unwrap()));
        assert!(!pool.contains("10.0.0.255".parse().unwrap()));
        assert!(pool.contains("10.0.1.0".parse().unwrap()));
        assert!(pool.contains("10.0.1.1".parse().unwrap()));
        assert!(pool.contains("10.0.2.7".parse().unwrap()));
        assert!(pool.contains("fd00::".parse().unwrap()));
        assert_eq!(pool.total(Family::V4), 254 + 2 + 1);
        assert_eq!(pool.total(Family::V6), 2);
    }

    #[test]
    fn first_and_last_ips_are_usable_by_default() {
        let pool = Pool::from_blocks("p", &["10.0.0.0/24"]).unwrap();
        assert!(pool.contains("10.0.0.0".parse().unwrap()));
        assert_eq!(pool.total(Family::V4), 256);
    }

    #[test]
    fn avoid_buggy_ips_skips_dot_zero_and_dot_255_everywhere() {
        let pool = Pool::from_blocks("p", &["10.0.0.250-10.0.2.5"])
            .unwrap()
            .avoiding_buggy_ips(true);
        assert!(!pool.contains("10.0.0.255".parse().unwrap()));
        assert!(!pool.contains("10.0.1.0".parse().unwrap()));
        assert!(!pool.contains("10.0.2.0".parse().unwrap()));
        assert!(!pool.contains("10.0.1.255".parse().unwrap()));
        assert!(pool.contains("10.0.1.1".parse().unwrap()));
        // 6 + 256 + 6 addresses, minus .255, .0, .255, .0
        assert_eq!(pool.total(Family::V4), 6 + 256 + 6 - 4);
    }

    #[test]
    fn ipv6_totals_saturate_instead_of_overflowing() {
        let pool = Pool::from_blocks("p", &["::/0"]).unwrap();
        assert_eq!(pool.total(Family::V6), u128::MAX);
        let pool = Pool::from_blocks("p", &["fd00::/64"]).unwrap();
        assert_eq!(pool.total(Family::V6), 1u128 << 64);
    }

    #[test]
    fn defaults_follow_the_issue() {
        let pool = Pool::from_blocks("p", &["10.0.0.0/24", "fd00::/120"]).unwrap();
        assert!(pool.auto_assign && !pool.disabled && !pool.avoid_buggy_ips);
        assert_eq!(pool.priority, None);
        assert!(pool.has_family(Family::V4) && pool.has_family(Family::V6));
    }
}
