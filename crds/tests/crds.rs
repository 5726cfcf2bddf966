//! The checked-in CRD YAML matches the Rust types, and API objects convert to the
//! allocator's plain data with errors that name the field.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, Time,
};
use k8s_openapi::jiff::Timestamp;
use portico_crds::{crd_files, invalid_status, status_of, AddressPool, AddressPoolSpec, Block};
use portico_ipam::{Allocator, Consumer, Family};

fn cidr(c: &str) -> Block {
    Block {
        cidr: Some(c.into()),
        ..Block::default()
    }
}

fn spec(blocks: Vec<Block>) -> AddressPoolSpec {
    AddressPoolSpec {
        blocks,
        allow_first_last_ips: true,
        avoid_buggy_ips: false,
        service_selector: None,
        namespace_selector: None,
        namespaces: vec![],
        priority: 0,
        auto_assign: true,
        disabled: false,
    }
}

fn now() -> Time {
    Time(Timestamp::from_second(1_700_000_000).unwrap())
}

#[test]
fn checked_in_crd_yaml_is_up_to_date() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    for (name, generated) in crd_files().unwrap() {
        let path = dir.join(name);
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "{} is stale; regenerate it with `cargo run -- crds --out-dir deploy/crds`",
            path.display()
        );
    }
}

#[test]
fn crd_is_cluster_scoped_with_short_name_and_printer_columns() {
    let (_, yaml) = &crd_files().unwrap()[0];
    assert!(yaml.contains("scope: Cluster"));
    assert!(yaml.contains("- lbpool"));
    assert!(yaml.contains("group: portico.io"));
    assert!(yaml.contains("name: v1alpha1"));
    for column in ["Total", "Used", "Available", "Ready", "Age"] {
        assert!(yaml.contains(&format!("name: {column}\n")), "{column}");
    }
}

#[test]
fn spec_defaults_apply_when_fields_are_absent() {
    let pool: AddressPoolSpec =
        serde_json::from_str(r#"{"blocks":[{"cidr":"10.0.0.0/24"}]}"#).unwrap();
    assert!(pool.allow_first_last_ips && pool.auto_assign);
    assert!(!pool.avoid_buggy_ips && !pool.disabled);
}

#[test]
fn invalid_cidr_in_the_api_object_names_the_field_and_value() {
    let pool = AddressPool::new(
        "p",
        spec(vec![
            cidr("10.0.0.0/24"),
            cidr("10.0.1.0/24"),
            cidr("10.0.0.300/24"),
        ]),
    );
    let errors = pool.to_pool().unwrap_err();
    assert_eq!(
        errors.to_string(),
        r#"spec.blocks[2].cidr: "10.0.0.300/24" is not a valid CIDR"#
    );
    let status = invalid_status(&errors, None, &now());
    let ready = &status.conditions[0];
    assert_eq!(
        (ready.type_.as_str(), ready.status.as_str()),
        ("Ready", "False")
    );
    assert_eq!(ready.reason, "InvalidSpec");
    assert!(ready.message.contains("10.0.0.300/24"));
}

#[test]
fn kubernetes_label_selectors_are_converted_and_checked() {
    let mut s = spec(vec![cidr("10.0.0.0/24")]);
    s.service_selector = Some(LabelSelector {
        match_labels: Some([("tier".to_owned(), "web".to_owned())].into()),
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "env".into(),
            operator: "NotIn".into(),
            values: Some(vec!["dev".into()]),
        }]),
    });
    let pool = AddressPool::new("p", s.clone()).to_pool().unwrap();
    let mut a = Allocator::new();
    a.apply_pool(pool);
    assert!(a.allocate(&Consumer::service("d", "x")).is_err());
    assert!(a
        .allocate(&Consumer::service("d", "y").with_label("tier", "web"))
        .is_ok());

    s.service_selector = Some(LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "env".into(),
            operator: "Matches".into(),
            values: None,
        }]),
    });
    let err = AddressPool::new("p", s).to_pool().unwrap_err().to_string();
    assert!(
        err.starts_with("spec.serviceSelector.matchExpressions[0].operator"),
        "{err}"
    );
}

#[test]
fn status_reports_per_family_counts_as_strings_and_ready() {
    let mut s = spec(vec![cidr("10.0.0.0/30"), cidr("fd00::/64")]);
    s.priority = 1;
    let pool = AddressPool::new("p", s).to_pool().unwrap();
    let mut a = Allocator::new();
    a.apply_pool(pool.clone());
    a.allocate(&Consumer::service("d", "x")).unwrap();
    let status = status_of(
        &a.pool_status("p").unwrap(),
        pool.has_family(Family::V4),
        pool.has_family(Family::V6),
        None,
        &now(),
    );
    let v4 = status.ipv4.as_ref().unwrap();
    assert_eq!(
        (v4.total.as_str(), v4.used.as_str(), v4.available.as_str()),
        ("4", "1", "3")
    );
    let v6 = status.ipv6.as_ref().unwrap();
    assert_eq!(v6.total, "18446744073709551616");
    assert_eq!(status.total, "18446744073709551620");
    assert_eq!(status.used, "1");
    assert_eq!(status.conditions[0].type_, "Ready");
    assert_eq!(status.conditions[0].status, "True");
}

#[test]
fn conflicting_pool_status_names_the_older_pool() {
    let mut a = Allocator::new();
    a.apply_pool(
        portico_ipam::Pool::from_blocks("old", &["10.0.0.0/24"])
            .unwrap()
            .created(1),
    );
    a.apply_pool(
        portico_ipam::Pool::from_blocks("new", &["10.0.0.0/25"])
            .unwrap()
            .created(2),
    );
    let status = status_of(&a.pool_status("new").unwrap(), true, false, None, &now());
    assert_eq!(status.conditions[0].status, "False");
    assert_eq!(status.conditions[0].reason, "Conflict");
    assert!(status.conditions[1].message.contains("old"));
    assert_eq!(status.available, "0");
}

#[test]
fn unchanged_conditions_keep_their_transition_time() {
    let a_status = |t: &Time| {
        let mut a = Allocator::new();
        a.apply_pool(portico_ipam::Pool::from_blocks("p", &["10.0.0.0/24"]).unwrap());
        status_of(&a.pool_status("p").unwrap(), true, false, None, t)
    };
    let earlier = a_status(&Time(Timestamp::from_second(1).unwrap()));
    let mut a = Allocator::new();
    a.apply_pool(portico_ipam::Pool::from_blocks("p", &["10.0.0.0/24"]).unwrap());
    let later = status_of(
        &a.pool_status("p").unwrap(),
        true,
        false,
        Some(&earlier),
        &now(),
    );
    assert_eq!(
        later.conditions[0].last_transition_time,
        earlier.conditions[0].last_transition_time
    );
}
