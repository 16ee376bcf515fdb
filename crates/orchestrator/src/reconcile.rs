//! Level-triggered reconcile of this installation's Docker objects against
//! the store: orphans removed, lost containers failed, drift quarantined,
//! interrupted operations finished, desired run state converged.
//!
//! An operation is interrupted when its record is transitional and nothing
//! in this process holds the environment (a crash, or a shutdown that
//! abandoned it): `creating` is rolled back (everything removed, `failed`;
//! a create is not resumed: its caller was told it failed or not at all,
//! and a retried request gets the failed record), `starting` is started,
//! `stopping` stopped with the default timeout (a restart's goes on to
//! start), `deleting` deleted (whatever of it still exists); each is
//! audited under the id its own event has, so it is logged once.
//!
//! Invariant: only objects labelled with this installation's id are ever
//! touched, so installations (and parallel test runs) can share an engine.

use std::collections::{HashMap, HashSet};

use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, ListVolumesOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder, StopContainerOptionsBuilder,
};
use vibebox_proto::audit::{Outcome, Severity};

use crate::audit::Event;
use crate::docker::{self, labels};
use crate::service::{Orchestrator, Result};
use crate::store::{EnvRecord, State, Transition};

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub orphans_removed: Vec<String>,
    pub lost: Vec<String>,
    pub quarantined: Vec<String>,
    pub rolled_back: Vec<String>,
    pub deletes_finished: Vec<String>,
    /// Starts, stops, restarts and automatic stops finished.
    pub operations_finished: Vec<String>,
    pub started: Vec<String>,
    pub stopped: Vec<String>,
}

struct Found {
    id: String,
    env: String,
    running: bool,
    restarting: bool,
    /// The environment's egress gate, not its own container (forwarders
    /// are taken out of the list before).
    helper: bool,
}

/// How the failure reason of an environment quarantined for drift begins.
const DRIFT_REASON: &str = "drift from the cleared spec: ";
/// The status of a quarantined environment once its drift event is durable.
const DRIFT_AUDITED: &str = "quarantined; the drift is recorded in the audit log";

impl Orchestrator {
    /// Whether a record was quarantined for drift and its event may not be
    /// written yet (a crash, or an audit outbox that refused it).
    pub(crate) fn drift_event_pending(rec: &EnvRecord) -> bool {
        rec.state == State::Quarantined
            && rec.failure_reason.starts_with(DRIFT_REASON)
            && rec.status_message != DRIFT_AUDITED
    }

    /// Records the drift event of a quarantine under an id made of the
    /// environment and the reason (written again after a crash, the audit
    /// service keeps it once), then marks the record so that it is not
    /// written again.
    pub(crate) async fn record_drift(&self, rec: &EnvRecord, reason: &str) -> Result<()> {
        self.audit()
            .record_once(
                crate::audit::once_id(&rec.id, &format!("reconcile.drift {reason}")),
                Event {
                    action: "reconcile.drift",
                    outcome: Outcome::Failure,
                    severity: Severity::Critical,
                    caller: None,
                    team_id: &rec.team_id,
                    environment_id: &rec.id,
                    details: vec![(
                        "drift",
                        reason
                            .strip_prefix(DRIFT_REASON)
                            .unwrap_or(reason)
                            .to_owned(),
                    )],
                },
            )
            .await?;
        self.store()
            .set_status_message(&rec.id, DRIFT_AUDITED)
            .await?;
        Ok(())
    }

    /// One reconcile pass.
    pub async fn reconcile(&self) -> Result<Report> {
        let mut report = Report::default();
        let docker = self.docker().clone();
        let label = format!("{}={}", labels::INSTALLATION, self.installation());
        let filters = HashMap::from([("label", vec![label.as_str()])]);

        // Docker objects first, records second: a record is committed before
        // any of its objects exists, so every listed object's record is seen.
        let listed = docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await?;
        // Port-forward forwarders beside an environment are not its
        // container (nor impostors): kept while it runs, removed below
        // otherwise.
        let forwarders = crate::forward::forwarders_in(&listed);
        let containers: Vec<Found> = listed
            .into_iter()
            .filter(|c| !crate::forward::is_forwarder(c))
            .filter_map(|c| {
                let env = c.labels.as_ref()?.get(labels::ENVIRONMENT)?.clone();
                let helper = c
                    .labels
                    .as_ref()?
                    .get(crate::egress::ROLE_LABEL)
                    .is_some_and(|role| role == crate::egress::GATE_ROLE);
                let state = c.state.map(|s| s.to_string()).unwrap_or_default();
                Some(Found {
                    id: c.id?,
                    env,
                    running: state == "running",
                    restarting: state == "restarting",
                    helper,
                })
            })
            .collect();
        let networks: Vec<(String, String)> = docker
            .list_networks(Some(
                ListNetworksOptionsBuilder::new().filters(&filters).build(),
            ))
            .await?
            .into_iter()
            .filter_map(|n| Some((n.name?, n.labels?.get(labels::ENVIRONMENT)?.clone())))
            .collect();
        let volumes: Vec<(String, String)> = docker
            .list_volumes(Some(
                ListVolumesOptionsBuilder::new().filters(&filters).build(),
            ))
            .await?
            .volumes
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| Some((v.name, v.labels.get(labels::ENVIRONMENT)?.clone())))
            .collect();

        match self
            .store()
            .release_deleted_subnets(self.installation())
            .await
        {
            Ok(0) => {}
            Ok(released) => {
                tracing::info!(
                    released,
                    "released subnets still held by deleted environments"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the subnets of deleted environments")
            }
        }
        let records = self.store().live(self.installation()).await?;
        let by_id: HashMap<&str, &EnvRecord> = records.iter().map(|r| (r.id.as_str(), r)).collect();
        let mut busy = HashSet::new();

        for rec in &records {
            let Some(_guard) = self.try_lock_env(&rec.id) else {
                busy.insert(rec.id.clone());
                continue;
            };
            // Re-read under the lock: an operation may have just finished.
            let Ok(rec) = self.get(&rec.id).await else {
                continue;
            };
            if let Err(e) = self.reconcile_one(&rec, &containers, &mut report).await {
                tracing::warn!(environment = %rec.id, error = %e, "reconcile of environment failed");
            }
        }

        self.sweep_forwarders(&forwarders, |env| {
            busy.contains(env) || by_id.get(env).is_some_and(|r| r.state == State::Running)
        })
        .await;

        // Orphans: labelled objects without a live record.
        let holds_objects = |env: &str| {
            busy.contains(env) || by_id.get(env).is_some_and(|r| r.state != State::Deleted)
        };
        let rm = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        for c in containers.iter().filter(|c| !holds_objects(&c.env)) {
            if self.remove_logged(docker.remove_container(&c.id, Some(rm.clone())).await) {
                self.orphan(&c.env, "container", &c.id, &mut report).await?;
            }
        }
        for (name, env) in networks.iter().filter(|(_, e)| !holds_objects(e)) {
            if self.remove_logged(docker.remove_network(name).await) {
                self.orphan(env, "network", name, &mut report).await?;
            }
        }
        for (name, env) in volumes.iter().filter(|(_, e)| !holds_objects(e)) {
            let opts = RemoveVolumeOptionsBuilder::new().force(true).build();
            if self.remove_logged(docker.remove_volume(name, Some(opts)).await) {
                self.orphan(env, "volume", name, &mut report).await?;
            }
        }
        Ok(report)
    }

    fn remove_logged(&self, r: std::result::Result<(), bollard::errors::Error>) -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot remove orphan");
                false
            }
        }
    }

    async fn orphan(&self, env: &str, kind: &str, name: &str, report: &mut Report) -> Result<()> {
        tracing::warn!(environment = env, kind, name, "removed orphan");
        report.orphans_removed.push(format!("{kind}:{name}"));
        self.audit()
            .record(Event {
                action: "reconcile.orphan_removed",
                outcome: Outcome::Success,
                severity: Severity::High,
                caller: None,
                team_id: "",
                environment_id: env,
                details: vec![("kind", kind.into()), ("name", name.into())],
            })
            .await?;
        Ok(())
    }

    async fn reconcile_one(
        &self,
        rec: &EnvRecord,
        containers: &[Found],
        report: &mut Report,
    ) -> Result<()> {
        let state = rec.state;
        let store = self.store();
        match state {
            State::Creating => {
                // Interrupted create: roll back. Audit first, then commit
                // (under a fixed id: a crash before the commit repeats this
                // pass, and the log keeps the event once).
                self.remove_objects(rec).await?;
                self.audit()
                    .record_once(
                        // The id of the create's own failure event: a crash
                        // after the create recorded its failure leaves one.
                        crate::audit::once_id(&rec.id, crate::service::CREATE_FAILED),
                        Event {
                            action: "environment.create",
                            outcome: Outcome::Failure,
                            severity: Severity::Medium,
                            caller: None,
                            team_id: &rec.team_id,
                            environment_id: &rec.id,
                            details: vec![(
                                "reason",
                                "interrupted; rolled back by reconcile".into(),
                            )],
                        },
                    )
                    .await?;
                let reason = match rec.failure_reason.as_str() {
                    "" => "create was interrupted; rolled back by reconcile",
                    failed => failed,
                };
                store
                    .transition(
                        &rec.id,
                        &[State::Creating],
                        State::Failed,
                        Transition {
                            failure_reason: Some(reason),
                            status_message: Some(""),
                            release_subnet: true,
                            ..Transition::default()
                        },
                    )
                    .await?;
                report.rolled_back.push(rec.id.clone());
                return Ok(());
            }
            State::Deleting => {
                self.delete_locked(rec, None).await?;
                report.deletes_finished.push(rec.id.clone());
                return Ok(());
            }
            State::Starting | State::Stopping => {
                self.resume(rec).await?;
                report.operations_finished.push(rec.id.clone());
                return Ok(());
            }
            State::Deleted | State::Failed => return Ok(()),
            State::Running | State::Stopped | State::Quarantined => {}
        }
        // An update a crash left pending is rolled back before the drift
        // check: the container may hold limits the record never committed.
        self.roll_back_update(rec).await?;
        // A quarantine's event that a crash or a full audit outbox kept from
        // being written: first, before anything below can change the
        // record, and without holding up the rest of the pass.
        if Self::drift_event_pending(rec)
            && let Err(e) = self.record_drift(rec, &rec.failure_reason).await
        {
            tracing::warn!(environment = %rec.id, error = %e, "drift event not recorded yet");
        }

        let mine: Vec<&Found> = containers
            .iter()
            .filter(|c| c.env == rec.id && !c.helper)
            .collect();
        let expected_id = rec.container_id.clone().unwrap_or_default();
        let current = mine.iter().find(|c| c.id == expected_id);
        let impostors: Vec<&&Found> = mine.iter().filter(|c| c.id != expected_id).collect();

        let Some(current) = current else {
            // Audit first, then commit (fixed id: `failed` is final, so the
            // environment is lost once).
            self.audit()
                .record_once(
                    crate::audit::once_id(&rec.id, "reconcile.lost"),
                    Event {
                        action: "reconcile.lost",
                        outcome: Outcome::Failure,
                        severity: Severity::High,
                        caller: None,
                        team_id: &rec.team_id,
                        environment_id: &rec.id,
                        details: vec![],
                    },
                )
                .await?;
            store
                .transition(
                    &rec.id,
                    &[state],
                    State::Failed,
                    Transition {
                        failure_reason: Some("container vanished outside the platform"),
                        status_message: Some(""),
                        ..Transition::default()
                    },
                )
                .await?;
            report.lost.push(rec.id.clone());
            return Ok(());
        };

        let mut drift = Vec::new();
        let rm = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        for c in &impostors {
            drift.push(format!(
                "unexpected container {} with this environment's labels",
                c.id
            ));
            if let Err(e) = self
                .docker()
                .remove_container(&c.id, Some(rm.clone()))
                .await
            {
                tracing::warn!(error = %e, "cannot remove impostor container");
            }
        }
        if state != State::Quarantined {
            let inspected = self.docker().inspect_container(&current.id, None).await?;
            let expected = self.body_of(rec)?;
            drift.extend(docker::drift(&expected, &inspected));
        }

        let stop = StopContainerOptionsBuilder::new().t(5).build();
        if !drift.is_empty() {
            // The quarantine is a security action: committed and applied
            // before the event, never held up by the audit outbox. The
            // event has a fixed id made of the reason the record keeps, so
            // a crash before it was written is made good at the start of
            // the next pass (`drift_event_pending`), and the log holds it
            // once.
            let reason = format!("{DRIFT_REASON}{}", drift.join("; "));
            let quarantined = store
                .transition(
                    &rec.id,
                    &[state],
                    State::Quarantined,
                    Transition {
                        failure_reason: Some(&reason),
                        status_message: Some(""),
                        ..Transition::default()
                    },
                )
                .await?;
            if !quarantined {
                // A delete was accepted meanwhile: it removes the container.
                return Ok(());
            }
            if let Err(e) = self.docker().stop_container(&current.id, Some(stop)).await {
                tracing::warn!(error = %e, "cannot stop drifted container");
            }
            report.quarantined.push(rec.id.clone());
            if let Err(e) = self.record_drift(rec, &reason).await {
                tracing::warn!(environment = %rec.id, error = %e, "drift event not recorded yet");
            }
            return Ok(());
        }

        // The egress gate follows its environment: running with it
        // (recreated if it went missing), stopped without it.
        let gate = match state {
            State::Running => self.gate_up(rec).await,
            _ => self.gate_stop(rec).await,
        };
        if let Err(e) = gate {
            tracing::warn!(environment = %rec.id, error = %e, "cannot converge the egress gate");
        }

        // Converge the run state.
        match state {
            State::Running if !current.running && !current.restarting => {
                if let Err(e) = self.docker().start_container(&current.id, None).await {
                    tracing::warn!(environment = %rec.id, error = %e, "cannot start container");
                } else {
                    report.started.push(rec.id.clone());
                }
            }
            State::Stopped | State::Quarantined if current.running || current.restarting => {
                if let Err(e) = self.docker().stop_container(&current.id, Some(stop)).await {
                    tracing::warn!(environment = %rec.id, error = %e, "cannot stop container");
                } else {
                    report.stopped.push(rec.id.clone());
                }
            }
            _ => {}
        }
        Ok(())
    }
}
