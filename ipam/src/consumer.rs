//! Consumers: whatever asks for a LoadBalancer address (a Service, a Gateway).

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use crate::family::Family;
use crate::selector::Labels;

/// What kind of object a consumer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConsumerKind {
    /// A `Service` of type LoadBalancer.
    Service,
    /// A Gateway API `Gateway`.
    Gateway,
}

/// Identifies a consumer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConsumerId {
    /// The kind of object.
    pub kind: ConsumerKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl fmt::Display for ConsumerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// A port a consumer listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortProtocol {
    /// The port number.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

impl fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}/{}", self.protocol, self.port)
    }
}

/// A Service's `externalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TrafficPolicy {
    /// `Cluster` (the default).
    #[default]
    Cluster,
    /// `Local`.
    Local,
}

/// A Service's `ipFamilyPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FamilyPolicy {
    /// One address, of the first listed family.
    #[default]
    SingleStack,
    /// One address of each listed family that a pool can give; at least one.
    PreferDualStack,
    /// One IPv4 and one IPv6 address, or nothing.
    RequireDualStack,
}

/// Which other namespaces a sharing consumer accepts as co-owners of its address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum CrossNamespace {
    /// Only consumers of its own namespace.
    #[default]
    Denied,
    /// Consumers of any namespace.
    Any,
    /// Consumers of these namespaces (and its own).
    Namespaces(BTreeSet<String>),
}

impl CrossNamespace {
    /// Whether a consumer in `namespace` is accepted.
    #[must_use]
    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            CrossNamespace::Denied => false,
            CrossNamespace::Any => true,
            CrossNamespace::Namespaces(list) => list.contains(namespace),
        }
    }
}

/// A sharing request: consumers with the same key may share one address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sharing {
    /// The sharing key.
    pub key: String,
    /// Opt-in to sharing with other namespaces.
    pub cross_namespace: CrossNamespace,
}

/// What a consumer explicitly asked for (annotations and `spec.loadBalancerIP`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Requests {
    /// Exact addresses, at most one per family.
    pub ips: Vec<IpAddr>,
    /// A pool by name.
    pub pool: Option<String>,
    /// Sharing with other consumers.
    pub sharing: Option<Sharing>,
}

/// Something that wants LoadBalancer addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    /// Who it is.
    pub id: ConsumerId,
    /// Its labels (matched by `spec.serviceSelector`).
    pub labels: Labels,
    /// Its namespace's labels (matched by `spec.namespaceSelector`).
    pub namespace_labels: Labels,
    /// What it asked for explicitly.
    pub requests: Requests,
    /// Its ports, which decide whether it may share an address.
    pub ports: BTreeSet<PortProtocol>,
    /// Its `externalTrafficPolicy`; sharers must agree on it.
    pub traffic_policy: TrafficPolicy,
    /// The Service's `spec.selector`, which picks its endpoints (empty: none). Two
    /// `Local` consumers share an address only if they select the same endpoints, since
    /// only nodes with a local endpoint may announce it (MetalLB's "backend key").
    pub endpoint_selector: Labels,
    /// Its `ipFamilies`, preferred first (empty: IPv4).
    pub families: Vec<Family>,
    /// Its `ipFamilyPolicy`.
    pub family_policy: FamilyPolicy,
}

/// The families a consumer wants, and whether it needs all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Wanted {
    pub families: Vec<Family>,
    pub all_required: bool,
}

impl Consumer {
    /// A single-stack IPv4 consumer of `kind` with no labels, ports or requests: the
    /// builder that tests and examples start from.
    #[must_use]
    pub fn new(kind: ConsumerKind, namespace: &str, name: &str) -> Self {
        Consumer {
            id: ConsumerId {
                kind,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
            labels: Labels::new(),
            namespace_labels: Labels::new(),
            requests: Requests::default(),
            ports: BTreeSet::new(),
            traffic_policy: TrafficPolicy::Cluster,
            endpoint_selector: Labels::new(),
            families: vec![Family::V4],
            family_policy: FamilyPolicy::SingleStack,
        }
    }

    /// A Service, as [`Consumer::new`].
    #[must_use]
    pub fn service(namespace: &str, name: &str) -> Self {
        Self::new(ConsumerKind::Service, namespace, name)
    }

    /// Adds a label.
    #[must_use]
    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Adds a label of its namespace.
    #[must_use]
    pub fn with_namespace_label(mut self, key: &str, value: &str) -> Self {
        self.namespace_labels
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// Adds a port.
    #[must_use]
    pub fn with_port(mut self, port: u16, protocol: Protocol) -> Self {
        self.ports.insert(PortProtocol { port, protocol });
        self
    }

    /// Asks for exact addresses.
    #[must_use]
    pub fn requesting(mut self, ips: &[IpAddr]) -> Self {
        self.requests.ips = ips.to_vec();
        self
    }

    /// Asks for a pool by name.
    #[must_use]
    pub fn in_pool(mut self, pool: &str) -> Self {
        self.requests.pool = Some(pool.to_owned());
        self
    }

    /// Asks to share an address with consumers of the same key (same namespace only).
    #[must_use]
    pub fn sharing(mut self, key: &str) -> Self {
        self.requests.sharing = Some(Sharing {
            key: key.to_owned(),
            cross_namespace: CrossNamespace::Denied,
        });
        self
    }

    /// Asks to share with consumers of the same key, accepting the given namespaces.
    #[must_use]
    pub fn sharing_across(mut self, key: &str, cross_namespace: CrossNamespace) -> Self {
        self.requests.sharing = Some(Sharing {
            key: key.to_owned(),
            cross_namespace,
        });
        self
    }

    /// Sets `externalTrafficPolicy`.
    #[must_use]
    pub fn with_traffic_policy(mut self, policy: TrafficPolicy) -> Self {
        self.traffic_policy = policy;
        self
    }

    /// Adds a `spec.selector` entry (which endpoints the Service has).
    #[must_use]
    pub fn selecting_endpoints(mut self, key: &str, value: &str) -> Self {
        self.endpoint_selector
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sets `ipFamilies` and `ipFamilyPolicy`.
    #[must_use]
    pub fn with_families(mut self, families: &[Family], policy: FamilyPolicy) -> Self {
        self.families = families.to_vec();
        self.family_policy = policy;
        self
    }

    /// Applies parsed requests (see [`crate::parse_requests`]).
    #[must_use]
    pub fn with_requests(mut self, requests: Requests) -> Self {
        self.requests = requests;
        self
    }

    pub(crate) fn wanted(&self) -> Wanted {
        if !self.requests.ips.is_empty() {
            let mut families: Vec<Family> =
                self.requests.ips.iter().map(|ip| Family::of(*ip)).collect();
            families.dedup();
            return Wanted {
                families,
                all_required: true,
            };
        }
        let mut listed: Vec<Family> = Vec::with_capacity(2);
        for f in &self.families {
            if !listed.contains(f) {
                listed.push(*f);
            }
        }
        match self.family_policy {
            FamilyPolicy::SingleStack => Wanted {
                families: vec![listed.first().copied().unwrap_or(Family::V4)],
                all_required: true,
            },
            FamilyPolicy::PreferDualStack => Wanted {
                families: if listed.is_empty() {
                    Family::ALL.to_vec()
                } else {
                    listed
                },
                all_required: false,
            },
            FamilyPolicy::RequireDualStack => {
                for f in Family::ALL {
                    if !listed.contains(&f) {
                        listed.push(f);
                    }
                }
                Wanted {
                    families: listed,
                    all_required: true,
                }
            }
        }
    }

    pub(crate) fn requested_ip(&self, family: Family) -> Option<IpAddr> {
        self.requests
            .ips
            .iter()
            .copied()
            .find(|ip| Family::of(*ip) == family)
    }
}
