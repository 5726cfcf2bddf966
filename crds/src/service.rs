//! LoadBalancer Services as allocator consumers: which Services Portico serves, what they
//! ask for, and the `status.loadBalancer.ingress` that reports their addresses.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LoadBalancerIngress, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use portico_ipam::{
    parse_requests, Allocation, Consumer, ConsumerKind, Family, FamilyPolicy, Labels, Notice,
    Protocol, TrafficPolicy, Unsatisfied,
};

use crate::validation::{FieldError, InvalidObject};

/// The `spec.loadBalancerClass` Portico serves.
pub const LOAD_BALANCER_CLASS: &str = "portico.io/lb";

/// Which Services are Portico's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassPolicy {
    /// Also serve LoadBalancer Services without a `loadBalancerClass` (Portico is the
    /// cluster's default implementation).
    pub default_class: bool,
}

impl ClassPolicy {
    /// Whether a Service of `type` with `class` is Portico's to serve.
    pub fn serves(&self, service_type: Option<&str>, class: Option<&str>) -> bool {
        service_type == Some("LoadBalancer")
            && match class {
                Some(c) => c == LOAD_BALANCER_CLASS,
                None => self.default_class,
            }
    }
}

fn field(field: String, value: impl std::fmt::Debug, problem: &str) -> FieldError {
    FieldError {
        field,
        value: format!("{value:?}"),
        problem: problem.to_owned(),
    }
}

/// The allocator's view of `svc`: `Ok(None)` when the Service is not Portico's (not a
/// LoadBalancer, or another class), an error naming every bad field otherwise.
///
/// `namespace_labels` are the labels of the Service's namespace (for pools'
/// `namespaceSelector`).
///
/// # Errors
/// The Service has no namespace or name, a port out of range, an unknown protocol, traffic
/// policy, IP family or family policy, or bad address requests (annotations or
/// `spec.loadBalancerIP`).
pub fn service_consumer(
    svc: &Service,
    namespace_labels: &Labels,
    policy: ClassPolicy,
) -> Result<Option<Consumer>, InvalidObject> {
    let Some(spec) = &svc.spec else {
        return Ok(None);
    };
    if !policy.serves(spec.type_.as_deref(), spec.load_balancer_class.as_deref()) {
        return Ok(None);
    }
    let name = svc.metadata.name.clone().unwrap_or_default();
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let mut errors = Vec::new();
    if name.is_empty() {
        errors.push(field("metadata.name".into(), "", "must be set"));
    }
    if namespace.is_empty() {
        errors.push(field("metadata.namespace".into(), "", "must be set"));
    }
    let mut consumer = Consumer::new(ConsumerKind::Service, &namespace, &name);
    consumer.labels = svc.metadata.labels.clone().unwrap_or_default();
    consumer.namespace_labels = namespace_labels.clone();
    consumer.endpoint_selector = spec.selector.clone().unwrap_or_default();

    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = match u16::try_from(p.port) {
            Ok(port) if port != 0 => port,
            _ => {
                errors.push(field(
                    format!("spec.ports[{i}].port"),
                    p.port,
                    "is not a port (1-65535)",
                ));
                continue;
            }
        };
        let protocol = match p.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            Some(other) => {
                errors.push(field(
                    format!("spec.ports[{i}].protocol"),
                    other,
                    "is not TCP, UDP or SCTP",
                ));
                continue;
            }
        };
        consumer = consumer.with_port(port, protocol);
    }

    consumer.traffic_policy = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            errors.push(field(
                "spec.externalTrafficPolicy".into(),
                other,
                "is not Cluster or Local",
            ));
            TrafficPolicy::Cluster
        }
    };

    let mut families = Vec::new();
    for (i, f) in spec.ip_families.iter().flatten().enumerate() {
        match f.as_str() {
            "IPv4" => families.push(Family::V4),
            "IPv6" => families.push(Family::V6),
            other => errors.push(field(
                format!("spec.ipFamilies[{i}]"),
                other,
                "is not IPv4 or IPv6",
            )),
        }
    }
    if families.is_empty() {
        // The API server always fills ipFamilies; a bare object means IPv4 single-stack.
        families.push(Family::V4);
    }
    let family_policy = match spec.ip_family_policy.as_deref() {
        None | Some("SingleStack") => FamilyPolicy::SingleStack,
        Some("PreferDualStack") => FamilyPolicy::PreferDualStack,
        Some("RequireDualStack") => FamilyPolicy::RequireDualStack,
        Some(other) => {
            errors.push(field(
                "spec.ipFamilyPolicy".into(),
                other,
                "is not SingleStack, PreferDualStack or RequireDualStack",
            ));
            FamilyPolicy::SingleStack
        }
    };
    consumer = consumer.with_families(&families, family_policy);

    let annotations: BTreeMap<String, String> =
        svc.metadata.annotations.clone().unwrap_or_default();
    match parse_requests(&annotations, spec.load_balancer_ip.as_deref()) {
        Ok(requests) => consumer = consumer.with_requests(requests),
        Err(problems) => {
            for p in problems {
                errors.push(FieldError {
                    field: "metadata.annotations".into(),
                    value: String::new(),
                    problem: p.to_string(),
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(Some(consumer))
    } else {
        Err(InvalidObject {
            kind: "Service",
            name: format!("{namespace}/{name}"),
            errors,
        })
    }
}

/// `status.loadBalancer.ingress` for an allocation: one entry per address, IPv4 first,
/// `ipMode: VIP` (traffic to the address is delivered to the node as addressed).
pub fn ingress(allocation: &Allocation) -> Vec<LoadBalancerIngress> {
    allocation
        .ips()
        .into_iter()
        .map(|ip| LoadBalancerIngress {
            ip: Some(ip.to_string()),
            ip_mode: Some("VIP".into()),
            ..LoadBalancerIngress::default()
        })
        .collect()
}

/// The condition type saying whether a Service has its addresses.
pub const ALLOCATED_CONDITION: &str = "portico.io/IPAMRequestSatisfied";

/// The condition type of each kind of [`Notice`].
fn notice_condition_type(notice: &Notice) -> &'static str {
    match notice {
        Notice::GracePeriod { .. } => "portico.io/AddressInGracePeriod",
        Notice::RequestPending { .. } => "portico.io/RequestPending",
        Notice::NotShared { .. } => "portico.io/NotShared",
    }
}

/// The `status.conditions` Portico owns on a Service, from what the allocator answered
/// (`allocated`) and its [`Notice`]s: [`ALLOCATED_CONDITION`] (`True`, or `False` with the
/// [`Unsatisfied`] reason), then one `True` condition per kind of notice, messages of one
/// kind joined. Transition times of conditions whose status did not change are kept from
/// `previous`; conditions of other owners are not included.
#[must_use]
pub fn service_conditions(
    allocated: Result<&Allocation, &Unsatisfied>,
    notices: &[Notice],
    previous: &[Condition],
    now: &Time,
) -> Vec<Condition> {
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let last_transition_time = previous
            .iter()
            .find(|c| c.type_ == type_ && (c.status == "True") == ok)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.to_owned(),
            status: if ok { "True" } else { "False" }.to_owned(),
            reason: reason.to_owned(),
            message,
            last_transition_time,
            observed_generation: None,
        }
    };
    let mut out = vec![match allocated {
        Ok(a) => condition(
            ALLOCATED_CONDITION,
            true,
            "Allocated",
            a.ips()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        Err(why) => condition(ALLOCATED_CONDITION, false, why.reason(), why.to_string()),
    }];
    for notice in notices {
        let type_ = notice_condition_type(notice);
        match out.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                c.message.push_str("; ");
                c.message.push_str(&notice.to_string());
            }
            None => out.push(condition(type_, true, notice.reason(), notice.to_string())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{ServicePort, ServiceSpec},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };
    use portico_ipam::PortProtocol;

    use super::*;

    fn svc(class: Option<&str>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("dns".into()),
                namespace: Some("infra".into()),
                labels: Some([("app".to_owned(), "dns".to_owned())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                load_balancer_class: class.map(Into::into),
                ports: Some(vec![
                    ServicePort {
                        port: 53,
                        protocol: Some("UDP".into()),
                        ..ServicePort::default()
                    },
                    ServicePort {
                        port: 53,
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    },
                ]),
                ip_families: Some(vec!["IPv4".into(), "IPv6".into()]),
                ip_family_policy: Some("RequireDualStack".into()),
                external_traffic_policy: Some("Local".into()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    #[test]
    fn a_portico_class_service_becomes_a_consumer_with_its_ports_families_and_policy() {
        let c = service_consumer(
            &svc(Some(LOAD_BALANCER_CLASS)),
            &Labels::new(),
            ClassPolicy::default(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.id.to_string(), "Service infra/dns");
        assert_eq!(c.labels.get("app").map(String::as_str), Some("dns"));
        assert!(c.ports.contains(&PortProtocol {
            port: 53,
            protocol: Protocol::Udp
        }));
        assert!(c.ports.contains(&PortProtocol {
            port: 53,
            protocol: Protocol::Tcp
        }));
        assert_eq!(c.traffic_policy, TrafficPolicy::Local);
        assert_eq!(c.families, vec![Family::V4, Family::V6]);
        assert_eq!(c.family_policy, FamilyPolicy::RequireDualStack);
    }

    #[test]
    fn services_of_another_class_or_type_are_not_portico_s() {
        assert!(service_consumer(
            &svc(Some("metallb.io/metallb")),
            &Labels::new(),
            ClassPolicy::default()
        )
        .unwrap()
        .is_none());
        let mut cluster_ip = svc(Some(LOAD_BALANCER_CLASS));
        cluster_ip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert!(
            service_consumer(&cluster_ip, &Labels::new(), ClassPolicy::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn classless_services_are_served_only_as_the_default_class() {
        assert!(
            service_consumer(&svc(None), &Labels::new(), ClassPolicy::default())
                .unwrap()
                .is_none()
        );
        let policy = ClassPolicy {
            default_class: true,
        };
        assert!(service_consumer(&svc(None), &Labels::new(), policy)
            .unwrap()
            .is_some());
    }

    #[test]
    fn bad_fields_are_all_reported_with_their_paths_and_values() {
        let mut s = svc(Some(LOAD_BALANCER_CLASS));
        let spec = s.spec.as_mut().unwrap();
        spec.ports.as_mut().unwrap()[1].port = 70000;
        spec.ports.as_mut().unwrap()[0].protocol = Some("QUIC".into());
        spec.ip_family_policy = Some("Sometimes".into());
        s.metadata.annotations =
            Some([("portico.io/ips".to_owned(), "10.0.0.300".to_owned())].into());
        let err = service_consumer(&s, &Labels::new(), ClassPolicy::default())
            .unwrap_err()
            .to_string();
        for needle in [
            "Service infra/dns",
            "spec.ports[1].port: 70000",
            "spec.ports[0].protocol: \"QUIC\"",
            "spec.ipFamilyPolicy: \"Sometimes\"",
            "10.0.0.300",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
    }

    #[test]
    fn requested_addresses_come_from_annotations_and_load_balancer_ip() {
        let mut s = svc(Some(LOAD_BALANCER_CLASS));
        s.metadata.annotations = Some(
            [(
                "metallb.io/loadBalancerIPs".to_owned(),
                "203.0.113.7".to_owned(),
            )]
            .into(),
        );
        let c = service_consumer(&s, &Labels::new(), ClassPolicy::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            c.requests.ips,
            vec!["203.0.113.7".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[test]
    fn ingress_lists_ipv4_then_ipv6_as_vip_mode() {
        let a = Allocation {
            v4: Some("203.0.113.7".parse().unwrap()),
            v6: Some("2001:db8::7".parse().unwrap()),
        };
        let ing = ingress(&a);
        assert_eq!(
            ing.iter()
                .map(|i| i.ip.clone().unwrap())
                .collect::<Vec<_>>(),
            vec!["203.0.113.7", "2001:db8::7"]
        );
        assert!(ing.iter().all(|i| i.ip_mode.as_deref() == Some("VIP")));
    }
}
