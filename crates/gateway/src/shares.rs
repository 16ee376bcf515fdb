//! Fair shares of the gateway: per-user caps on open streams and on short
//! calls in flight, and a global cap on open streams, all separate from the
//! server kit's global in-flight limit (load shedding).
//!
//! A stream, once admitted, gives its global in-flight permit back (see
//! [`vibebox_server_kit::InFlightPermit`]) and counts against the stream
//! caps instead for as long as it stays open: hundreds of follow streams can
//! never take the permits that `Login` and every other short call need.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The caps (zero values are raised to one).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ShareLimits {
    /// Streams one user may hold open at once.
    pub(crate) user_streams: usize,
    /// Short (unary) calls one user may have in flight at once.
    pub(crate) user_in_flight: usize,
    /// Streams the whole gateway holds open at once.
    pub(crate) streams: usize,
}

/// What kind of call asks for a share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CallKind {
    Unary,
    Stream,
}

/// Why a share was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ShareError {
    /// The user holds as many streams as it may.
    #[error("at most {limit} concurrent streams per user")]
    UserStreams { limit: usize },
    /// The user has as many short calls in flight as it may.
    #[error("at most {limit} concurrent calls in flight per user")]
    UserInFlight { limit: usize },
    /// The gateway holds as many streams as it may (load shedding).
    #[error("the gateway holds its maximum of {limit} open streams")]
    Streams { limit: usize },
}

#[derive(Default, Clone, Copy)]
struct Counts {
    streams: usize,
    in_flight: usize,
}

/// The counters.
pub(crate) struct Shares {
    limits: ShareLimits,
    users: Mutex<HashMap<String, Counts>>,
    streams: Arc<Semaphore>,
}

impl Shares {
    pub(crate) fn new(limits: ShareLimits) -> Arc<Self> {
        let limits = ShareLimits {
            user_streams: limits.user_streams.max(1),
            user_in_flight: limits.user_in_flight.max(1),
            streams: limits.streams.clamp(1, Semaphore::MAX_PERMITS),
        };
        Arc::new(Self {
            limits,
            users: Mutex::new(HashMap::new()),
            streams: Arc::new(Semaphore::new(limits.streams)),
        })
    }

    /// Takes a share of `kind` for `user`, held until the returned guard drops.
    pub(crate) fn admit(self: &Arc<Self>, user: &str, kind: CallKind) -> Result<Share, ShareError> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let counts = users.entry(user.to_owned()).or_default();
        let global = match kind {
            CallKind::Unary => {
                if counts.in_flight >= self.limits.user_in_flight {
                    return Err(ShareError::UserInFlight {
                        limit: self.limits.user_in_flight,
                    });
                }
                counts.in_flight += 1;
                None
            }
            CallKind::Stream => {
                if counts.streams >= self.limits.user_streams {
                    return Err(ShareError::UserStreams {
                        limit: self.limits.user_streams,
                    });
                }
                let Ok(permit) = self.streams.clone().try_acquire_owned() else {
                    if counts.streams == 0 && counts.in_flight == 0 {
                        users.remove(user);
                    }
                    return Err(ShareError::Streams {
                        limit: self.limits.streams,
                    });
                };
                counts.streams += 1;
                Some(permit)
            }
        };
        Ok(Share {
            shares: self.clone(),
            user: user.to_owned(),
            kind,
            _global: global,
        })
    }

    fn give_back(&self, user: &str, kind: CallKind) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(counts) = users.get_mut(user) {
            match kind {
                CallKind::Unary => counts.in_flight = counts.in_flight.saturating_sub(1),
                CallKind::Stream => counts.streams = counts.streams.saturating_sub(1),
            }
            if counts.streams == 0 && counts.in_flight == 0 {
                users.remove(user);
            }
        }
    }

    #[cfg(test)]
    fn tracked_users(&self) -> usize {
        self.users.lock().unwrap().len()
    }
}

/// One admitted call's share; given back when dropped.
pub(crate) struct Share {
    shares: Arc<Shares>,
    user: String,
    kind: CallKind,
    _global: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("user", &self.user)
            .field("kind", &self.kind)
            .finish()
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.shares.give_back(&self.user, self.kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(user_streams: usize, user_in_flight: usize, streams: usize) -> Arc<Shares> {
        Shares::new(ShareLimits {
            user_streams,
            user_in_flight,
            streams,
        })
    }

    #[test]
    fn per_user_stream_cap_leaves_others_alone() {
        let s = shares(2, 10, 100);
        let a1 = s.admit("alice", CallKind::Stream).unwrap();
        let _a2 = s.admit("alice", CallKind::Stream).unwrap();
        assert_eq!(
            s.admit("alice", CallKind::Stream).unwrap_err(),
            ShareError::UserStreams { limit: 2 }
        );
        // Alice's short calls and Bob's streams are separate budgets.
        let _call = s.admit("alice", CallKind::Unary).unwrap();
        let _b = s.admit("bob", CallKind::Stream).unwrap();
        drop(a1);
        let _a3 = s.admit("alice", CallKind::Stream).unwrap();
    }

    #[test]
    fn per_user_in_flight_cap() {
        let s = shares(2, 3, 100);
        let held: Vec<_> = (0..3)
            .map(|_| s.admit("u", CallKind::Unary).unwrap())
            .collect();
        assert_eq!(
            s.admit("u", CallKind::Unary).unwrap_err(),
            ShareError::UserInFlight { limit: 3 }
        );
        drop(held);
        assert!(s.admit("u", CallKind::Unary).is_ok());
    }

    #[test]
    fn global_stream_cap_sheds_and_forgets_idle_users() {
        let s = shares(10, 10, 2);
        let a = s.admit("a", CallKind::Stream).unwrap();
        let _b = s.admit("b", CallKind::Stream).unwrap();
        assert_eq!(
            s.admit("c", CallKind::Stream).unwrap_err(),
            ShareError::Streams { limit: 2 }
        );
        assert_eq!(s.tracked_users(), 2, "a refused user leaves no entry");
        drop(a);
        let _c = s.admit("c", CallKind::Stream).unwrap();
        drop(_c);
        drop(_b);
        assert_eq!(s.tracked_users(), 0);
    }

    #[test]
    fn zero_knobs_still_admit_one() {
        let s = shares(0, 0, 0);
        let _one = s.admit("u", CallKind::Stream).unwrap();
        assert!(s.admit("u", CallKind::Stream).is_err());
    }
}
