//! `ListEnvironments` filter, order_by and page token (`vibebox-listing`):
//! arbitrary text never panics any of the three parsers; a refusal points
//! inside the text (a character boundary, the column counted in
//! characters); an accepted filter stays within its bounds (length,
//! comparisons), its negation `NOT (...)` selects exactly the complement
//! (unless the wrapping itself crosses a bound), and the database bounds
//! derived from it never exclude an environment it matches.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost_types::Timestamp;
use vibebox_listing::{Bounds, Filter, MAX_COMPARISONS, MAX_FILTER_BYTES, MsRange, OrderBy, Query};
use vibebox_proto::environment::{Environment, EnvironmentState};

fn env(
    id: &str,
    name: &str,
    state: EnvironmentState,
    ms: i64,
    labels: &[(&str, &str)],
) -> Environment {
    let t = Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    };
    Environment {
        id: id.into(),
        name: name.into(),
        owner_id: format!("owner-{}", ms % 3),
        team_id: "team".into(),
        state: state as i32,
        canonical_image: "docker.io/library/python:3.12".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        create_time: Some(t),
        update_time: Some(Timestamp {
            seconds: t.seconds + 60,
            nanos: t.nanos,
        }),
        ..Environment::default()
    }
}

fn fixture() -> Vec<Environment> {
    use EnvironmentState::*;
    vec![
        env("a", "web-1", Running, 1_767_225_600_000, &[("ci", "true")]),
        env("b", "web-10", Stopped, 1_767_225_600_001, &[("tier", "x*")]),
        env("c", "db", Deleted, 1_767_225_599_999, &[]),
        env("d", "", Failed, 0, &[("ci", "")]),
        env("e", "é", Starting, 1_767_312_000_500, &[("a.b/c", "v")]),
    ]
}

fn ms(t: &Option<Timestamp>) -> i64 {
    let t = t.unwrap_or_default();
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

fn within(e: &Environment, b: &Bounds) -> bool {
    let inside = |r: &MsRange, v: i64| r.min.is_none_or(|m| v >= m) && r.max.is_none_or(|m| v <= m);
    inside(&b.create_time_ms, ms(&e.create_time))
        && inside(&b.update_time_ms, ms(&e.update_time))
        && b.owner_id.as_ref().is_none_or(|o| *o == e.owner_id)
        && b.id.as_ref().is_none_or(|i| *i == e.id)
        && b.state.is_none_or(|s| s as i32 == e.state)
        && (b.include_deleted || e.state != EnvironmentState::Deleted as i32)
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let envs = fixture();

    match Filter::parse(input) {
        Err(e) => {
            assert!(e.offset <= input.len(), "{input:?}: {e}");
            assert!(input.is_char_boundary(e.offset), "{input:?}: {e}");
            assert_eq!(e.column, input[..e.offset].chars().count() + 1);
            assert!(!e.message.is_empty());
        }
        Ok(filter) => {
            assert!(input.len() <= MAX_FILTER_BYTES);
            assert!(filter.comparisons().len() <= MAX_COMPARISONS);
            if !filter.is_empty() {
                match Filter::parse(&format!("NOT ({input})")) {
                    Ok(negated) => {
                        for e in &envs {
                            assert_ne!(
                                filter.matches(e),
                                negated.matches(e),
                                "{input:?} on {}",
                                e.id
                            );
                        }
                    }
                    Err(e) => assert!(
                        e.message.contains("nested deeper") || e.message.contains("longer than"),
                        "{input:?} parses but NOT ({input}) does not: {e}"
                    ),
                }
            }
            for show_deleted in [false, true] {
                let query = Query::new(input, "", show_deleted).expect("the filter parsed");
                let bounds = query.bounds(None);
                for e in &envs {
                    if query.matches(e) {
                        assert!(
                            within(e, &bounds),
                            "{input:?}: bounds {bounds:?} exclude {}",
                            e.id
                        );
                    }
                }
                let page = query.page(envs.clone(), 2, None);
                if !page.next_page_token.is_empty() {
                    let cursor = query.cursor(&page.next_page_token).expect("own token");
                    let bounds = query.bounds(cursor.as_ref());
                    let rest = query.page(envs.clone(), 10, cursor.as_ref());
                    for e in &rest.environments {
                        assert!(within(e, &bounds));
                    }
                }
            }
        }
    }

    match OrderBy::parse(input) {
        Err(e) => {
            assert!(input.is_char_boundary(e.offset), "{input:?}: {e}");
            assert_eq!(e.column, input[..e.offset].chars().count() + 1);
        }
        Ok(order) => {
            assert!(!order.keys().is_empty() && order.keys().len() <= 4);
            let query = Query::new("", input, true).expect("the order parsed");
            let page = query.page(envs.clone(), 50, None);
            for pair in page.environments.windows(2) {
                assert!(order.compare(&pair[0], &pair[1]).is_lt());
            }
        }
    }

    // As a page token: refused or read, never a panic.
    let query = Query::new("state = RUNNING", "name desc", false).expect("fixed query");
    if let Ok(Some(cursor)) = query.cursor(input) {
        let _ = query.bounds(Some(&cursor));
        let _ = query.page(envs, 3, Some(&cursor));
    }
});
