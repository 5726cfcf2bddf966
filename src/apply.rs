//! Appliers: each makes one part of the node match the [`NodePlan`](crate::plan::NodePlan),
//! changing only what differs from what it applied last. They are independent: one that
//! fails reports the failure (and is retried on the next pass) without stopping the others.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use portico_announcer::driver::{PeerConfig, Speaker};
use portico_announcer::netlink::AddressHolder;
use portico_announcer::RouteAttrs;
use portico_xdp::{Balancer, NodeConfig, ServiceKey, ServiceSpec};
use serde::Serialize;

use crate::plan::PeerPlan;

/// How one applier is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplierHealth {
    /// The applier.
    pub name: &'static str,
    /// The last pass applied everything.
    pub ok: bool,
    /// What failed in the last failing pass.
    pub last_error: Option<String>,
    /// Failed passes so far.
    pub failures: u64,
}

impl ApplierHealth {
    fn new(name: &'static str) -> Self {
        ApplierHealth {
            name,
            ok: true,
            ..ApplierHealth::default()
        }
    }

    /// Records a pass's errors (none: success).
    pub fn record(&mut self, errors: Vec<String>) {
        if errors.is_empty() {
            self.ok = true;
        } else {
            self.ok = false;
            self.failures += 1;
            self.last_error = Some(errors.join("; "));
        }
    }
}

/// Keeps the BGP speaker's peers and each peer's routes equal to the plan, through the
/// speaker's desired-state API: peers whose settings did not change keep their sessions, and
/// each session sends only the routes that changed.
pub struct SpeakerApplier {
    speaker: Speaker,
    applied: BTreeMap<IpAddr, (PeerConfig, BTreeMap<IpNet, RouteAttrs>)>,
    /// How it is doing.
    pub health: ApplierHealth,
}

impl SpeakerApplier {
    /// Wraps a running speaker.
    #[must_use]
    pub fn new(speaker: Speaker) -> Self {
        SpeakerApplier {
            speaker,
            applied: BTreeMap::new(),
            health: ApplierHealth::new("bgp"),
        }
    }

    /// The speaker (for status).
    #[must_use]
    pub fn speaker(&self) -> &Speaker {
        &self.speaker
    }

    /// Takes the speaker back (for shutdown).
    #[must_use]
    pub fn into_speaker(self) -> Speaker {
        self.speaker
    }

    /// Sets the peers (added, restarted when their settings changed, removed), then each
    /// peer's complete route table where it changed.
    pub async fn apply(&mut self, peers: &BTreeMap<IpAddr, PeerPlan>) {
        let mut errors = Vec::new();
        let configs_changed = self.applied.len() != peers.len()
            || peers
                .iter()
                .any(|(a, p)| self.applied.get(a).is_none_or(|(c, _)| *c != p.config));
        if configs_changed {
            let configs = peers.values().map(|p| p.config.clone()).collect();
            match self.speaker.set_peers(configs).await {
                Ok(changed) => {
                    if !changed.is_empty() {
                        tracing::info!(
                            added = ?changed.added,
                            removed = ?changed.removed,
                            restarted = ?changed.restarted,
                            "BGP peers changed"
                        );
                    }
                }
                Err(e) => errors.push(format!("BGP peers: {e}")),
            }
            self.applied.retain(|a, _| peers.contains_key(a));
        }
        for (addr, plan) in peers {
            let same_config = self
                .applied
                .get(addr)
                .is_some_and(|(c, _)| *c == plan.config);
            let same_routes = self
                .applied
                .get(addr)
                .is_some_and(|(_, r)| *r == plan.routes);
            if same_config && same_routes {
                continue;
            }
            match self.speaker.set_peer_routes(*addr, plan.routes.clone()) {
                Ok(()) => {
                    self.applied
                        .insert(*addr, (plan.config.clone(), plan.routes.clone()));
                }
                Err(e) => {
                    self.applied.remove(addr);
                    errors.push(format!("BGPPeer {} ({addr}): {e}", plan.name));
                }
            }
        }
        self.health.record(errors);
    }
}

/// Keeps the balancer's services equal to the plan.
pub struct BalancerApplier {
    balancer: Box<dyn Balancer + Send>,
    node: NodeConfig,
    configured: bool,
    applied: BTreeMap<ServiceKey, ServiceSpec>,
    /// Per-service errors of the last pass.
    pub service_errors: BTreeMap<ServiceKey, String>,
    /// How it is doing.
    pub health: ApplierHealth,
}

impl BalancerApplier {
    /// Wraps a balancer that gets `node` before its first service.
    #[must_use]
    pub fn new(balancer: Box<dyn Balancer + Send>, node: NodeConfig) -> Self {
        BalancerApplier {
            balancer,
            node,
            configured: false,
            applied: BTreeMap::new(),
            service_errors: BTreeMap::new(),
            health: ApplierHealth::new("xdp"),
        }
    }

    /// Wraps a balancer that adopted a running datapath holding `services`: they count as
    /// applied, so unchanged ones are not rewritten and ones no longer planned are removed.
    #[must_use]
    pub fn adopting(
        balancer: Box<dyn Balancer + Send>,
        node: NodeConfig,
        services: BTreeMap<ServiceKey, ServiceSpec>,
    ) -> Self {
        BalancerApplier {
            applied: services,
            ..BalancerApplier::new(balancer, node)
        }
    }

    /// The balancer (for counters).
    #[must_use]
    pub fn balancer(&self) -> &(dyn Balancer + Send) {
        &*self.balancer
    }

    /// Services as applied.
    #[must_use]
    pub fn applied(&self) -> &BTreeMap<ServiceKey, ServiceSpec> {
        &self.applied
    }

    /// Removes gone services, then creates or replaces changed ones. A service the balancer
    /// refuses is reported and the others still go in.
    pub fn apply(&mut self, services: &BTreeMap<ServiceKey, ServiceSpec>) {
        let mut errors = Vec::new();
        if !self.configured {
            match self.balancer.configure_node(&self.node) {
                Ok(()) => self.configured = true,
                Err(e) => {
                    self.health.record(vec![e.to_string()]);
                    return;
                }
            }
        }
        self.service_errors.clear();
        let gone: Vec<ServiceKey> = self
            .applied
            .keys()
            .filter(|k| !services.contains_key(*k))
            .copied()
            .collect();
        for key in gone {
            match self.balancer.remove_service(&key) {
                Ok(_) => {
                    self.applied.remove(&key);
                }
                Err(e) => {
                    errors.push(e.to_string());
                    self.service_errors.insert(key, e.to_string());
                }
            }
        }
        for (key, spec) in services {
            if self.applied.get(key) == Some(spec) {
                continue;
            }
            match self.balancer.upsert_service(spec) {
                Ok(()) => {
                    self.applied.insert(*key, spec.clone());
                }
                Err(e) => {
                    errors.push(e.to_string());
                    self.service_errors.insert(*key, e.to_string());
                }
            }
        }
        self.health.record(errors);
        self.maintain();
    }

    /// The datapath's upkeep ([`Balancer::maintain`]): a failure is logged, not counted
    /// against the applier's health (the upkeep only makes the datapath faster).
    pub fn maintain(&mut self) {
        if !self.configured {
            return;
        }
        if let Err(e) = self.balancer.maintain() {
            tracing::warn!("datapath upkeep: {e}");
        }
    }

    /// Removes every service (for `--shutdown withdraw`).
    pub fn clear(&mut self) {
        self.apply(&BTreeMap::new());
    }
}

/// Keeps the addresses held on the local link equal to the plan.
pub struct HolderApplier {
    holder: AddressHolder,
    applied: Option<BTreeSet<IpAddr>>,
    /// How it is doing.
    pub health: ApplierHealth,
}

impl HolderApplier {
    /// Wraps an address holder.
    #[must_use]
    pub fn new(holder: AddressHolder) -> Self {
        HolderApplier {
            holder,
            applied: None,
            health: ApplierHealth::new("addresses"),
        }
    }

    /// Adds and removes addresses on the link; nothing when the set did not change.
    pub async fn apply(&mut self, held: &BTreeSet<IpAddr>) {
        if self.applied.as_ref() == Some(held) {
            return;
        }
        match self.holder.sync(held).await {
            Ok(_) => {
                self.applied = Some(held.clone());
                self.health.record(Vec::new());
            }
            Err(e) => {
                self.applied = None;
                self.health
                    .record(vec![format!("link {}: {e}", self.holder.name())]);
            }
        }
    }

    /// Deletes the link and its addresses (for `--shutdown withdraw`).
    ///
    /// # Errors
    /// The netlink request fails.
    pub async fn remove(self) -> Result<(), portico_announcer::Error> {
        self.holder.delete().await
    }
}
