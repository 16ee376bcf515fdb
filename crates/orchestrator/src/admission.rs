//! Admission: whether one more environment may be created, decided as pure
//! functions over a snapshot of what is already held. No Docker, no
//! database, no clock: [`crate::service`] reads the snapshot inside one
//! serialized write transaction, asks [`admit`], and writes the answer in
//! the same transaction, so the decision is exact under concurrency.
//!
//! The rules, in the order they are applied:
//! 1. idempotency: a request id the team used before is answered with what
//!    it created (no new admission);
//! 2. replay: a clearance is good for one environment only;
//! 3. a fresh environment id;
//! 4. the team's quotas (count, CPU, memory) over every environment that
//!    holds a reservation (every live state except `failed`);
//! 5. the host's capacity: all reservations together stay within the share
//!    of the engine's memory the operator allows;
//! 6. a subnet from the installation's pool that overlaps nothing held by a
//!    record (in any state) or present on the engine.
//!
//! A resize of an environment in place ([`admit_resize`]) is judged by the
//! same quota and capacity rules, over every reservation but its own.

use crate::subnet::{self, Cidr};

/// What one environment reserves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Reservation {
    /// CPU in billionths of a core.
    pub nano_cpus: i64,
    /// Memory in bytes.
    pub memory_bytes: i64,
}

/// A team's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Environments a team may hold at once.
    pub max_environments: u32,
    /// CPU a team may reserve, in billionths of a core.
    pub max_cpu_nanos: i64,
    /// Memory a team may reserve, in bytes.
    pub max_memory_bytes: i64,
}

/// The host's memory and the share of it environments may reserve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    /// The engine's memory in bytes (0: unknown, not checked).
    pub host_memory_bytes: i64,
    /// Share of it all environments may reserve together.
    pub share: f64,
}

/// Where new subnets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPool {
    /// The installation's pool.
    pub pool: Cidr,
    /// The prefix length of one environment's subnet.
    pub prefix: u8,
}

/// What admission looks at, read in the same transaction that writes its
/// answer.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The team already used this request id (a retry).
    pub retried: bool,
    /// The clearance was already used for another environment.
    pub clearance_used: bool,
    /// A record with this environment id exists.
    pub id_taken: bool,
    /// Reservations of the team's environments that hold one.
    pub team: Vec<Reservation>,
    /// Reservations of every environment of the installation that holds one.
    pub all: Vec<Reservation>,
    /// Subnets held by records (any state) or present on the engine.
    pub taken_subnets: Vec<Cidr>,
}

/// Admission's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A retried request: answer with the environment it created.
    Retry,
    /// Admitted on this subnet.
    Admit(Cidr),
}

/// Why an environment is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The clearance was already used.
    #[error("the clearance was already used")]
    Replayed,
    /// The environment id is taken.
    #[error("environment id already exists")]
    IdTaken,
    /// A team quota would be exceeded.
    #[error("{0}")]
    Quota(QuotaExceeded),
    /// The host has no room for the reservation.
    #[error("{0}")]
    Capacity(String),
    /// No subnet of the pool is free.
    #[error("no free subnet in the environment address pool")]
    SubnetsExhausted,
}

const MIB: i64 = 1024 * 1024;

/// One of a team's quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quota {
    /// Environments held at once.
    Environments,
    /// CPU reserved.
    Cpu,
    /// Memory reserved.
    Memory,
}

impl Quota {
    /// Its stable name (`environments`, `cpu`, `memory`).
    pub fn as_str(self) -> &'static str {
        match self {
            Quota::Environments => "environments",
            Quota::Cpu => "cpu",
            Quota::Memory => "memory",
        }
    }

    /// The unit [`QuotaExceeded::amount`] gives its amounts in.
    pub fn unit(self) -> &'static str {
        match self {
            Quota::Environments => "environments",
            Quota::Cpu => "cores",
            Quota::Memory => "MiB",
        }
    }
}

/// A team quota a reservation would exceed. Amounts are in the quota's
/// base unit: environments, billionths of a core, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaExceeded {
    pub quota: Quota,
    /// The team's limit.
    pub limit: i64,
    /// What the team holds already.
    pub reserved: i64,
    /// What the refused change asked for on top of it.
    pub requested: i64,
}

impl QuotaExceeded {
    /// An amount of this quota in its [`unit`](Quota::unit), as text.
    pub fn amount(&self, raw: i64) -> String {
        match self.quota {
            Quota::Environments => raw.to_string(),
            Quota::Cpu => format!("{:.2}", raw as f64 / 1e9),
            Quota::Memory => (raw / MIB).to_string(),
        }
    }
}

impl std::fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (limit, reserved, requested) = (
            self.amount(self.limit),
            self.amount(self.reserved),
            self.amount(self.requested),
        );
        match self.quota {
            Quota::Environments => write!(
                f,
                "team environment quota: {reserved} of {limit} environments in use"
            ),
            Quota::Cpu => write!(
                f,
                "team CPU quota: {reserved} cores reserved of {limit}, {requested} more requested"
            ),
            Quota::Memory => write!(
                f,
                "team memory quota: {reserved} MiB reserved of {limit} MiB, {requested} MiB more requested"
            ),
        }
    }
}

/// Decides whether `wanted` is admitted given `snapshot`.
pub fn admit(
    snapshot: &Snapshot,
    wanted: Reservation,
    quotas: &Quotas,
    capacity: &Capacity,
    subnets: &SubnetPool,
) -> Result<Decision, Refusal> {
    if snapshot.retried {
        return Ok(Decision::Retry);
    }
    if snapshot.clearance_used {
        return Err(Refusal::Replayed);
    }
    if snapshot.id_taken {
        return Err(Refusal::IdTaken);
    }
    check_quota(&snapshot.team, wanted, quotas)?;
    check_capacity(&snapshot.all, wanted, capacity)?;
    subnet::allocate(subnets.pool, subnets.prefix, &snapshot.taken_subnets)
        .map(Decision::Admit)
        .ok_or(Refusal::SubnetsExhausted)
}

/// The team's quotas with `wanted` added to what it holds.
pub fn check_quota(
    team: &[Reservation],
    wanted: Reservation,
    quotas: &Quotas,
) -> Result<(), Refusal> {
    if team.len() as u64 >= u64::from(quotas.max_environments) {
        return Err(Refusal::Quota(QuotaExceeded {
            quota: Quota::Environments,
            limit: i64::from(quotas.max_environments),
            reserved: i64::try_from(team.len()).unwrap_or(i64::MAX),
            requested: 1,
        }));
    }
    check_cpu_quota(team, wanted, quotas)?;
    check_memory_quota(team, wanted, quotas)
}

/// The team's CPU quota with `wanted` added to what it holds.
fn check_cpu_quota(
    team: &[Reservation],
    wanted: Reservation,
    quotas: &Quotas,
) -> Result<(), Refusal> {
    let cpu = team
        .iter()
        .fold(wanted.nano_cpus, |sum, r| sum.saturating_add(r.nano_cpus));
    if cpu > quotas.max_cpu_nanos {
        return Err(Refusal::Quota(QuotaExceeded {
            quota: Quota::Cpu,
            limit: quotas.max_cpu_nanos,
            reserved: cpu.saturating_sub(wanted.nano_cpus),
            requested: wanted.nano_cpus,
        }));
    }
    Ok(())
}

/// The team's memory quota with `wanted` added to what it holds.
fn check_memory_quota(
    team: &[Reservation],
    wanted: Reservation,
    quotas: &Quotas,
) -> Result<(), Refusal> {
    let memory = team.iter().fold(wanted.memory_bytes, |sum, r| {
        sum.saturating_add(r.memory_bytes)
    });
    if memory > quotas.max_memory_bytes {
        return Err(Refusal::Quota(QuotaExceeded {
            quota: Quota::Memory,
            limit: quotas.max_memory_bytes,
            reserved: memory.saturating_sub(wanted.memory_bytes),
            requested: wanted.memory_bytes,
        }));
    }
    Ok(())
}

/// Decides whether an environment that reserves `current` may reserve
/// `wanted` instead (a resize in place). `team` and `all` are the
/// reservations of its team and of the installation *without its own*. The
/// environment already counts against the team's number of environments;
/// a dimension that does not grow is not judged, so that an environment of
/// a team over a quota lowered since can still shrink.
pub fn admit_resize(
    team: &[Reservation],
    all: &[Reservation],
    current: Reservation,
    wanted: Reservation,
    quotas: &Quotas,
    capacity: &Capacity,
) -> Result<(), Refusal> {
    if wanted.nano_cpus > current.nano_cpus {
        check_cpu_quota(team, wanted, quotas)?;
    }
    if wanted.memory_bytes > current.memory_bytes {
        check_memory_quota(team, wanted, quotas)?;
        check_capacity(all, wanted, capacity)?;
    }
    Ok(())
}

/// The host's capacity with `wanted` added to every reservation.
pub fn check_capacity(
    all: &[Reservation],
    wanted: Reservation,
    capacity: &Capacity,
) -> Result<(), Refusal> {
    if capacity.host_memory_bytes <= 0 {
        return Ok(());
    }
    let reserved = all.iter().fold(wanted.memory_bytes, |sum, r| {
        sum.saturating_add(r.memory_bytes)
    });
    let cap = (capacity.host_memory_bytes as f64 * capacity.share) as i64;
    if reserved > cap {
        return Err(Refusal::Capacity(format!(
            "environments would reserve {} MiB of the {} MiB allowed on this host",
            reserved / MIB,
            cap / MIB
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: i64 = 1024 * MIB;

    fn quotas() -> Quotas {
        Quotas {
            max_environments: 3,
            max_cpu_nanos: 4_000_000_000,
            max_memory_bytes: 8 * GIB,
        }
    }

    fn capacity() -> Capacity {
        Capacity {
            host_memory_bytes: 16 * GIB,
            share: 0.5,
        }
    }

    fn pool() -> SubnetPool {
        SubnetPool {
            pool: "10.90.0.0/24".parse().unwrap(),
            prefix: 26,
        }
    }

    fn small() -> Reservation {
        Reservation {
            nano_cpus: 1_000_000_000,
            memory_bytes: GIB,
        }
    }

    fn decide(snapshot: &Snapshot, wanted: Reservation) -> Result<Decision, Refusal> {
        admit(snapshot, wanted, &quotas(), &capacity(), &pool())
    }

    #[test]
    fn a_first_environment_gets_the_first_subnet() {
        let decision = decide(&Snapshot::default(), small()).unwrap();
        assert_eq!(decision, Decision::Admit("10.90.0.0/26".parse().unwrap()));
    }

    #[test]
    fn a_retry_is_answered_before_any_limit_is_checked() {
        let snapshot = Snapshot {
            retried: true,
            clearance_used: true,
            team: vec![small(); 3],
            ..Snapshot::default()
        };
        assert_eq!(decide(&snapshot, small()), Ok(Decision::Retry));
    }

    #[test]
    fn a_used_clearance_and_a_taken_id_are_refused() {
        let replay = Snapshot {
            clearance_used: true,
            ..Snapshot::default()
        };
        assert_eq!(decide(&replay, small()), Err(Refusal::Replayed));
        let taken = Snapshot {
            id_taken: true,
            ..Snapshot::default()
        };
        assert_eq!(decide(&taken, small()), Err(Refusal::IdTaken));
    }

    #[test]
    fn the_team_count_is_a_hard_limit() {
        let snapshot = Snapshot {
            team: vec![Reservation::default(); 3],
            ..Snapshot::default()
        };
        let refusal = decide(&snapshot, Reservation::default()).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::Quota(QuotaExceeded {
                quota: Quota::Environments,
                limit: 3,
                reserved: 3,
                requested: 1,
            })
        );
        assert_eq!(
            refusal.to_string(),
            "team environment quota: 3 of 3 environments in use"
        );
        // Two held: the third fits.
        let snapshot = Snapshot {
            team: vec![Reservation::default(); 2],
            ..Snapshot::default()
        };
        assert!(decide(&snapshot, Reservation::default()).is_ok());
    }

    #[test]
    fn cpu_and_memory_quotas_count_the_new_reservation_exactly() {
        let two_cores = Reservation {
            nano_cpus: 2_000_000_000,
            memory_bytes: GIB,
        };
        // 2 + 2 = 4 cores: exactly the limit, admitted.
        let snapshot = Snapshot {
            team: vec![two_cores],
            ..Snapshot::default()
        };
        assert!(decide(&snapshot, two_cores).is_ok());
        // One nanocore more is over it.
        let over = Reservation {
            nano_cpus: 2_000_000_001,
            ..two_cores
        };
        assert!(matches!(decide(&snapshot, over), Err(Refusal::Quota(m)) if m.quota == Quota::Cpu));
        let big = Reservation {
            nano_cpus: 1,
            memory_bytes: 7 * GIB + 1,
        };
        assert!(
            matches!(decide(&snapshot, big), Err(Refusal::Quota(m)) if m.quota == Quota::Memory)
        );
    }

    #[test]
    fn reservations_cannot_overflow_past_a_limit() {
        let huge = Reservation {
            nano_cpus: i64::MAX,
            memory_bytes: i64::MAX,
        };
        let snapshot = Snapshot {
            team: vec![huge],
            ..Snapshot::default()
        };
        assert!(matches!(decide(&snapshot, huge), Err(Refusal::Quota(_))));
    }

    #[test]
    fn host_capacity_counts_every_team() {
        // 8 GiB allowed on the host (half of 16); other teams hold 7.
        let others = Snapshot {
            all: vec![Reservation {
                nano_cpus: 0,
                memory_bytes: 7 * GIB,
            }],
            ..Snapshot::default()
        };
        assert!(decide(&others, small()).is_ok());
        let two = Reservation {
            nano_cpus: 0,
            memory_bytes: 2 * GIB,
        };
        assert!(matches!(decide(&others, two), Err(Refusal::Capacity(_))));
        // Unknown host memory: not checked.
        let unknown = Capacity {
            host_memory_bytes: 0,
            share: 0.5,
        };
        assert!(admit(&others, two, &quotas(), &unknown, &pool()).is_ok());
    }

    fn cores(n: f64, gib: i64) -> Reservation {
        Reservation {
            nano_cpus: (n * 1e9) as i64,
            memory_bytes: gib * GIB,
        }
    }

    fn resize(
        team: &[Reservation],
        all: &[Reservation],
        current: Reservation,
        wanted: Reservation,
    ) -> Result<(), Refusal> {
        admit_resize(team, all, current, wanted, &quotas(), &capacity())
    }

    #[test]
    fn a_resize_counts_every_other_reservation_but_not_its_own() {
        // The team holds 3 of 3 environments and 3 of 4 cores; the one
        // resized holds 1 core of them.
        let others = [cores(1.0, 1), cores(1.0, 1)];
        // Growing to 2 cores: 1 + 1 + 2 = 4, exactly the limit (its own
        // core is not counted twice, nor is it a fourth environment).
        assert_eq!(
            resize(&others, &others, cores(1.0, 1), cores(2.0, 1)),
            Ok(())
        );
        // One nanocore more is over it.
        let over = Reservation {
            nano_cpus: 2_000_000_001,
            memory_bytes: GIB,
        };
        assert!(matches!(
            resize(&others, &others, cores(1.0, 1), over),
            Err(Refusal::Quota(m)) if m.quota == Quota::Cpu
        ));
        // Memory: 1 + 1 + 6 = 8 GiB fits, 1 + 1 + 7 does not.
        assert_eq!(resize(&others, &[], cores(1.0, 1), cores(1.0, 6)), Ok(()));
        assert!(matches!(
            resize(&others, &[], cores(1.0, 1), cores(1.0, 7)),
            Err(Refusal::Quota(m)) if m.quota == Quota::Memory
        ));
    }

    #[test]
    fn a_resize_that_grows_memory_is_judged_against_the_host() {
        // 8 GiB allowed on the host; other teams hold 6.
        let elsewhere = [cores(0.0, 6)];
        assert_eq!(
            resize(&[], &elsewhere, cores(1.0, 1), cores(1.0, 2)),
            Ok(())
        );
        assert!(matches!(
            resize(&[], &elsewhere, cores(1.0, 1), cores(1.0, 3)),
            Err(Refusal::Capacity(_))
        ));
    }

    #[test]
    fn what_does_not_grow_is_not_judged() {
        // A team already over every quota (lowered since) may still shrink
        // or keep a dimension, and grow another only within its limit.
        let over = [cores(4.0, 8), cores(4.0, 8)];
        let full_host = [cores(0.0, 100)];
        assert_eq!(
            resize(&over, &full_host, cores(2.0, 2), cores(1.0, 1)),
            Ok(())
        );
        assert_eq!(
            resize(&over, &full_host, cores(2.0, 2), cores(2.0, 2)),
            Ok(())
        );
        assert!(matches!(
            resize(&over, &full_host, cores(2.0, 2), cores(2.5, 1)),
            Err(Refusal::Quota(m)) if m.quota == Quota::Cpu
        ));
        assert!(matches!(
            resize(&over, &[], cores(2.0, 2), cores(1.0, 3)),
            Err(Refusal::Quota(m)) if m.quota == Quota::Memory
        ));
        // Overflow cannot wrap a sum below a limit.
        let huge = [Reservation {
            nano_cpus: i64::MAX,
            memory_bytes: i64::MAX,
        }];
        assert!(resize(&huge, &huge, cores(1.0, 1), cores(2.0, 2)).is_err());
    }

    #[test]
    fn subnets_skip_everything_taken_and_run_out() {
        let taken: Vec<Cidr> = ["10.90.0.0/26", "10.90.0.128/25"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let snapshot = Snapshot {
            taken_subnets: taken.clone(),
            ..Snapshot::default()
        };
        assert_eq!(
            decide(&snapshot, small()),
            Ok(Decision::Admit("10.90.0.64/26".parse().unwrap()))
        );
        // A foreign network overlapping the rest of the pool exhausts it.
        let full = Snapshot {
            taken_subnets: vec!["10.90.0.0/24".parse().unwrap()],
            ..Snapshot::default()
        };
        assert_eq!(decide(&full, small()), Err(Refusal::SubnetsExhausted));
    }
}
