//! Leader election on a `coordination.k8s.io/v1` Lease: a pure [`Elector`] that decides
//! from the Lease it read and the caller's clock, and a small driver ([`run_elector`])
//! that reads and writes the Lease through the API.
//!
//! As client-go's leader election: expiry is judged on the local clock from when the
//! record was last seen to change (no trust in other nodes' clocks); every write carries
//! the resourceVersion it read, so of two candidates racing for an expired Lease one gets
//! 409 Conflict and stays a follower; a leader that cannot renew within `renew_deadline`
//! (shorter than the Lease duration) stops leading before anyone may take over.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::Api;
use tokio::sync::watch;

/// Timing of an election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a Lease holds without renewal (`leaseDurationSeconds`).
    pub duration: Duration,
    /// A leader that has not renewed for this long stops leading (shorter than
    /// `duration`, so it stops before anyone else may take over).
    pub renew_deadline: Duration,
    /// How often candidates and the leader look at the Lease.
    pub retry: Duration,
}

impl Default for LeaseTiming {
    /// client-go's defaults: 15 s, 10 s, 2 s.
    fn default() -> Self {
        LeaseTiming {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// What to do with the Lease after reading it.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// There is none: create it, held by us.
    Create(LeaseSpec),
    /// Write it back with this spec (renewal, or takeover of an expired or released
    /// Lease), conditional on the resourceVersion read.
    Replace(LeaseSpec),
    /// Someone else holds it and it has not expired.
    Wait,
}

/// One candidate's view of the election. Pure: the caller reads the Lease, calls
/// [`Elector::observe`], performs the [`Step`], and reports the result.
#[derive(Debug, Clone)]
pub struct Elector {
    identity: String,
    timing: LeaseTiming,
    observed: Option<(LeaseSpec, Instant)>,
    renewed_at: Option<Instant>,
}

fn holder(spec: &LeaseSpec) -> Option<&str> {
    spec.holder_identity.as_deref().filter(|h| !h.is_empty())
}

impl Elector {
    /// A candidate named `identity` (unique per process, e.g. the Pod name).
    #[must_use]
    pub fn new(identity: impl Into<String>, timing: LeaseTiming) -> Self {
        Elector {
            identity: identity.into(),
            timing,
            observed: None,
            renewed_at: None,
        }
    }

    /// The candidate's identity.
    #[must_use]
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The timing.
    #[must_use]
    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.timing.duration.as_secs()).unwrap_or(i32::MAX)
    }

    fn ours(&self, wall: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration_secs()),
            acquire_time: Some(MicroTime(wall)),
            renew_time: Some(MicroTime(wall)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Decides what to do with `current` (the Lease's spec as read; `None`: no Lease) at
    /// `now` (monotonic, for expiry) and `wall` (written into the Lease).
    pub fn observe(&mut self, current: Option<&LeaseSpec>, now: Instant, wall: Timestamp) -> Step {
        let Some(spec) = current else {
            self.observed = None;
            return Step::Create(self.ours(wall, 0));
        };
        if self.observed.as_ref().is_none_or(|(s, _)| s != spec) {
            self.observed = Some((spec.clone(), now));
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        match holder(spec) {
            Some(h) if h == self.identity => Step::Replace(LeaseSpec {
                renew_time: Some(MicroTime(wall)),
                lease_duration_seconds: Some(self.duration_secs()),
                ..spec.clone()
            }),
            None => Step::Replace(self.ours(wall, transitions + 1)),
            Some(_) => {
                // Someone else holds it: whatever we thought, we do not lead.
                self.renewed_at = None;
                let held_for = spec
                    .lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .map_or(self.timing.duration, Duration::from_secs);
                let seen_at = self.observed.as_ref().map_or(now, |(_, at)| *at);
                if now.saturating_duration_since(seen_at) >= held_for {
                    Step::Replace(self.ours(wall, transitions + 1))
                } else {
                    Step::Wait
                }
            }
        }
    }

    /// Our write of `written` at `now` went through: we hold the Lease.
    pub fn written(&mut self, written: &LeaseSpec, now: Instant) {
        self.observed = Some((written.clone(), now));
        self.renewed_at = Some(now);
    }

    /// Whether we lead at `now`: we wrote the Lease less than `renew_deadline` ago.
    #[must_use]
    pub fn is_leader(&self, now: Instant) -> bool {
        self.renewed_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.timing.renew_deadline)
    }

    /// Stops leading (shutdown, or a write that found someone else's Lease).
    pub fn step_down(&mut self) {
        self.renewed_at = None;
    }

    /// The spec that hands `current` over (holder cleared, duration 1 s) if we hold it.
    #[must_use]
    pub fn release(&self, current: &LeaseSpec) -> Option<LeaseSpec> {
        (holder(current) == Some(self.identity.as_str())).then(|| LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            ..current.clone()
        })
    }
}

/// Where the Lease is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseName {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Field manager of Lease writes.
pub const LEASE_FIELD_MANAGER: &str = "portico-leader-election";

fn params() -> PostParams {
    PostParams {
        dry_run: false,
        field_manager: Some(LEASE_FIELD_MANAGER.to_owned()),
    }
}

/// One read-decide-write round. Returns whether we lead afterwards.
///
/// # Errors
/// Reading the Lease failed (a refused write is not an error: we just do not lead).
pub async fn round(
    api: &Api<Lease>,
    name: &str,
    elector: &mut Elector,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(name).await?;
    let now = tokio::time::Instant::now().into_std();
    let step = elector.observe(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        now,
        Timestamp::now(),
    );
    let result = match &step {
        Step::Wait => return Ok(elector.is_leader(now)),
        Step::Create(spec) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec.clone()),
            };
            api.create(&params(), &lease).await.map(|_| spec)
        }
        Step::Replace(spec) => {
            let mut lease = current.unwrap_or_default();
            lease.spec = Some(spec.clone());
            api.replace(name, &params(), &lease).await.map(|_| spec)
        }
    };
    match result {
        Ok(spec) => {
            let was = elector.is_leader(now);
            elector.written(spec, now);
            if !was {
                tracing::info!(identity = elector.identity(), lease = name, "became leader");
            }
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::debug!(
                identity = elector.identity(),
                "lease taken by another candidate"
            );
            elector.step_down();
        }
        Err(e) => {
            tracing::warn!(identity = elector.identity(), "writing the lease: {e}");
        }
    }
    Ok(elector.is_leader(tokio::time::Instant::now().into_std()))
}

/// Runs the election until `stop` turns true, publishing whether we lead on `leading`;
/// then hands the Lease over if we hold it.
pub async fn run_elector(
    api: Api<Lease>,
    name: String,
    mut elector: Elector,
    leading: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let retry = elector.timing().retry;
    loop {
        let lead = match round(&api, &name, &mut elector).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(identity = elector.identity(), "reading the lease: {e}");
                elector.is_leader(tokio::time::Instant::now().into_std())
            }
        };
        leading.send_if_modified(|l| std::mem::replace(l, lead) != lead);
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            _ = stop.changed() => break,
        }
    }
    leading.send_replace(false);
    if let Ok(Some(mut lease)) = api.get_opt(&name).await {
        if let Some(spec) = lease.spec.as_ref().and_then(|s| elector.release(s)) {
            lease.spec = Some(spec);
            match api.replace(&name, &params(), &lease).await {
                Ok(_) => tracing::info!(identity = elector.identity(), "lease released"),
                Err(e) => tracing::warn!("releasing the lease: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            lease_transitions: Some(2),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_leader_that_finds_another_holder_stops_leading_at_once() {
        let t0 = Instant::now();
        let wall = Timestamp::UNIX_EPOCH;
        let mut e = Elector::new("a", LeaseTiming::default());
        let Step::Replace(mine) = e.observe(Some(&spec("a")), t0, wall) else {
            panic!("renewal expected");
        };
        e.written(&mine, t0);
        assert!(e.is_leader(t0));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(e.observe(Some(&spec("b")), later, wall), Step::Wait);
        assert!(!e.is_leader(later));
    }

    #[test]
    fn a_released_lease_is_taken_at_once_with_one_more_transition() {
        let mut e = Elector::new("a", LeaseTiming::default());
        let released = LeaseSpec {
            holder_identity: None,
            ..spec("b")
        };
        match e.observe(Some(&released), Instant::now(), Timestamp::UNIX_EPOCH) {
            Step::Replace(s) => {
                assert_eq!(s.holder_identity.as_deref(), Some("a"));
                assert_eq!(s.lease_transitions, Some(3));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_the_holder_releases() {
        let e = Elector::new("a", LeaseTiming::default());
        assert!(e.release(&spec("b")).is_none());
        let r = e.release(&spec("a")).unwrap();
        assert_eq!(r.holder_identity, None);
        assert_eq!(r.lease_duration_seconds, Some(1));
    }
}
