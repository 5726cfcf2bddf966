//! Appliers: each makes one part of the node match the [`NodePlan`](crate::plan::NodePlan),
//! changing only what differs from what it applied last. They are independent: one that
//! fails reports the failure (and is retried on the next pass) without stopping the others.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use portico_announcer::driver::{PeerConfig, Speaker};
use portico_announcer::netlink::AddressHolder;
use portico_announcer::{Command, RouteAttrs};
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

/// Keeps the BGP speaker's peers and each peer's routes equal to the plan.
pub struct SpeakerApplier {
    speaker: Speaker,
    applied: BTreeMap<IpAddr, (String, BTreeMap<IpNet, RouteAttrs>)>,
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

    /// Adds, restarts (changed settings) and removes peers, then sends each peer only the
    /// routes that changed. Peers whose settings did not change keep their sessions.
    pub async fn apply(&mut self, peers: &BTreeMap<IpAddr, PeerPlan>) {
        let mut errors = Vec::new();
        let fingerprint = |c: &PeerConfig| format!("{c:?}");
        let stale: Vec<IpAddr> = self
            .applied
            .iter()
            .filter(|(a, (fp, _))| peers.get(a).is_none_or(|p| fingerprint(&p.config) != *fp))
            .map(|(a, _)| *a)
            .collect();
        for addr in stale {
            if let Err(e) = self.speaker.remove_peer(addr).await {
                tracing::debug!(peer = %addr, "remove: {e}");
            }
            self.applied.remove(&addr);
        }
        for (addr, plan) in peers {
            if !self.applied.contains_key(addr) {
                match self.speaker.add_peer(plan.config.clone()) {
                    Ok(()) => {
                        tracing::info!(peer = %addr, name = %plan.name, "BGP peer added");
                        self.applied
                            .insert(*addr, (fingerprint(&plan.config), BTreeMap::new()));
                    }
                    Err(e) => {
                        errors.push(format!("BGPPeer {} ({addr}): {e}", plan.name));
                        continue;
                    }
                }
            }
            let Some((_, sent)) = self.applied.get_mut(addr) else {
                continue;
            };
            let withdrawn: Vec<IpNet> = sent
                .keys()
                .filter(|p| !plan.routes.contains_key(*p))
                .copied()
                .collect();
            // Announcements grouped by attributes, in prefix order (deterministic UPDATEs).
            let mut groups: Vec<(RouteAttrs, Vec<IpNet>)> = Vec::new();
            for (prefix, attrs) in &plan.routes {
                if sent.get(prefix) == Some(attrs) {
                    continue;
                }
                match groups.iter_mut().find(|(a, _)| a == attrs) {
                    Some((_, v)) => v.push(*prefix),
                    None => groups.push((attrs.clone(), vec![*prefix])),
                }
            }
            let send = |cmd| self.speaker.command(*addr, cmd);
            let mut result = Ok(());
            if !withdrawn.is_empty() {
                result = send(Command::Withdraw {
                    prefixes: withdrawn,
                });
            }
            for (attrs, prefixes) in groups {
                if result.is_ok() {
                    result = send(Command::Announce { prefixes, attrs });
                }
            }
            match result {
                Ok(()) => sent.clone_from(&plan.routes),
                Err(e) => errors.push(format!("BGPPeer {} ({addr}): {e}", plan.name)),
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
