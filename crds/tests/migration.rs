//! Objects copied from MetalLB or Cilium setups, converted as the controller converts
//! them, allocate as they did there (docs/migration.md).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use portico_crds::{
    service_conditions, service_consumer, AddressPool, AddressPoolSpec, Block, ClassPolicy,
    ALLOCATED_CONDITION,
};
use portico_ipam::{Allocator, Consumer, Labels};

fn pool_spec(cidr: &str) -> AddressPoolSpec {
    AddressPoolSpec {
        blocks: vec![Block {
            cidr: Some(cidr.into()),
            ..Block::default()
        }],
        allow_first_last_ips: true,
        avoid_buggy_ips: false,
        service_selector: None,
        namespace_selector: None,
        namespaces: vec![],
        priority: None,
        auto_assign: true,
        disabled: false,
    }
}

fn service(namespace: &str, name: &str, annotations: &[(&str, &str)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(vec![ServicePort {
                port: 443,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn consumer(svc: &Service) -> Consumer {
    service_consumer(
        svc,
        &Labels::new(),
        ClassPolicy {
            default_class: true,
        },
    )
    .unwrap()
    .unwrap()
}

fn now() -> Time {
    Time(Timestamp::from_second(1_700_000_000).unwrap())
}

// A CiliumLoadBalancerIPPool that dedicates addresses to one tenant selects it through
// the virtual label io.kubernetes.service.namespace.
#[test]
fn cilium_pool_selecting_a_namespace_by_virtual_label_serves_that_tenant() {
    let mut spec = pool_spec("10.0.0.0/24");
    spec.service_selector = Some(LabelSelector {
        match_labels: Some(BTreeMap::from([(
            "io.kubernetes.service.namespace".to_owned(),
            "tenant-a".to_owned(),
        )])),
        match_expressions: None,
    });
    let mut a = Allocator::new();
    a.apply_pool(AddressPool::new("tenant-a", spec).to_pool().unwrap(), 0);
    assert!(a
        .allocate(&consumer(&service("tenant-a", "web", &[])))
        .is_ok());
    let mut impostor = service("tenant-b", "web", &[]);
    impostor.metadata.labels = Some(BTreeMap::from([(
        "io.kubernetes.service.namespace".to_owned(),
        "tenant-a".to_owned(),
    )]));
    assert!(a.allocate(&consumer(&impostor)).is_err());
}

// MetalLB's allow-shared-ip between Local Services with different selectors: refused,
// and the Service's conditions say why.
#[test]
fn local_services_with_different_selectors_get_separate_addresses_and_a_condition() {
    let local = |name: &str, app: &str, port: i32| {
        let mut s = service("web", name, &[("metallb.io/allow-shared-ip", "edge")]);
        let spec = s.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Local".into());
        spec.selector = Some(BTreeMap::from([("app".to_owned(), app.to_owned())]));
        spec.ports.as_mut().unwrap()[0].port = port;
        consumer(&s)
    };
    let mut a = Allocator::new();
    a.apply_pool(
        AddressPool::new("p", pool_spec("10.0.0.0/24"))
            .to_pool()
            .unwrap(),
        0,
    );
    let first = local("front", "front", 80);
    let second = local("api", "api", 443);
    let x = a.allocate(&first).unwrap();
    let y = a.allocate(&second).unwrap();
    assert_ne!(x, y);
    let conditions = service_conditions(Ok(&y), &a.notices(&second.id), &[], &now());
    assert_eq!(conditions[0].type_, ALLOCATED_CONDITION);
    assert_eq!(conditions[0].status, "True");
    let not_shared = conditions
        .iter()
        .find(|c| c.type_ == "portico.io/NotShared")
        .unwrap();
    assert!(
        not_shared.message.contains("select"),
        "{}",
        not_shared.message
    );
    // Same selector: shared.
    assert_eq!(a.allocate(&local("front-tls", "front", 443)).unwrap(), x);
}

// Cilium's sharing-cross-namespace opt-in: without it, separate addresses, and a
// condition naming the other namespace and the annotation to add.
#[test]
fn cilium_sharing_key_in_two_namespaces_without_opt_in_is_explained_on_the_service() {
    let mut a = Allocator::new();
    a.apply_pool(
        AddressPool::new("p", pool_spec("10.0.0.0/24"))
            .to_pool()
            .unwrap(),
        0,
    );
    let key = [("lbipam.cilium.io/sharing-key", "shared")];
    let x = consumer(&service("team-a", "x", &key));
    let mut y_svc = service("team-b", "y", &key);
    y_svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 80;
    let y = consumer(&y_svc);
    a.allocate(&x).unwrap();
    let got = a.allocate(&y).unwrap();
    let conditions = service_conditions(Ok(&got), &a.notices(&y.id), &[], &now());
    let message = &conditions[1].message;
    assert!(message.contains("team-a"), "{message}");
    assert!(
        message.contains("portico.io/sharing-cross-namespace"),
        "{message}"
    );
    // Both opt in with Cilium's annotation: shared.
    let opt_in = |ns: &str, other: &str, port: i32| {
        let mut s = service(
            ns,
            if ns == "team-a" { "x" } else { "y" },
            &[
                ("lbipam.cilium.io/sharing-key", "shared"),
                ("lbipam.cilium.io/sharing-cross-namespace", other),
            ],
        );
        s.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = port;
        consumer(&s)
    };
    let shared = a.allocate(&opt_in("team-a", "team-b", 443)).unwrap();
    a.release(&y.id);
    assert_eq!(a.allocate(&opt_in("team-b", "team-a", 80)).unwrap(), shared);
}

#[test]
fn unsatisfied_services_get_a_false_allocated_condition_with_the_reason() {
    let mut a = Allocator::new();
    let x = consumer(&service("d", "x", &[]));
    let err = a.allocate(&x).unwrap_err();
    let earlier = Time(Timestamp::from_second(1).unwrap());
    let previous = service_conditions(Err(&err), &[], &[], &earlier);
    let conditions = service_conditions(Err(&err), &[], &previous, &now());
    assert_eq!(conditions.len(), 1);
    assert_eq!(conditions[0].status, "False");
    assert_eq!(conditions[0].reason, "NoMatchingPool");
    assert_eq!(conditions[0].last_transition_time, earlier);
}
