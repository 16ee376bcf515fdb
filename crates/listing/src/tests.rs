//! Hand-checked tables: which environments each filter selects, where each
//! bad filter or order_by is refused, and paging through every order.

use std::collections::BTreeMap;

use prost_types::Timestamp;
use vibebox_proto::environment::{Environment, EnvironmentState};

use crate::*;

fn ts(rfc3339: &str) -> Timestamp {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap();
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

#[allow(clippy::too_many_arguments)]
fn env(
    id: &str,
    name: &str,
    owner: &str,
    team: &str,
    state: EnvironmentState,
    image: &str,
    labels: &[(&str, &str)],
    created: &str,
    updated: &str,
) -> Environment {
    Environment {
        id: id.into(),
        name: name.into(),
        owner_id: owner.into(),
        team_id: team.into(),
        state: state as i32,
        canonical_image: image.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        create_time: Some(ts(created)),
        update_time: Some(ts(updated)),
        ..Environment::default()
    }
}

/// The hand-made set every table below is checked against.
fn fixture() -> Vec<Environment> {
    use EnvironmentState::*;
    vec![
        env(
            "e1",
            "web-1",
            "alice",
            "t1",
            Running,
            "docker.io/library/python:3.12",
            &[("ci", "true"), ("tier", "front")],
            "2026-01-01T00:00:00Z",
            "2026-01-02T00:00:00.500Z",
        ),
        env(
            "e2",
            "web-2",
            "bob",
            "t1",
            Stopped,
            "ghcr.io/acme/app:1.0",
            &[("ci", "false")],
            "2026-01-01T00:00:00.001Z",
            "2026-01-03T00:00:00Z",
        ),
        env(
            "e3",
            "db",
            "alice",
            "t2",
            Running,
            "docker.io/library/postgres:16",
            &[("tier", "back"), ("example.com/owner", "x")],
            "2026-02-01T12:00:00Z",
            "2026-02-01T12:00:00Z",
        ),
        env(
            "e4",
            "web-10",
            "bob",
            "t2",
            Deleted,
            "ghcr.io/acme/app:2.0",
            &[],
            "2025-12-31T23:59:59.999Z",
            "2026-03-01T00:00:00Z",
        ),
        env(
            "e5",
            "scratch",
            "carol",
            "t1",
            Failed,
            "docker.io/library/busybox:1",
            &[("ci", "true")],
            "2026-01-15T00:00:00Z",
            "2026-01-15T00:00:00Z",
        ),
    ]
}

fn selected(filter: &str) -> Vec<String> {
    let f = Filter::parse(filter).unwrap_or_else(|e| panic!("{filter:?}: {e}"));
    fixture()
        .into_iter()
        .filter(|e| f.matches(e))
        .map(|e| e.id)
        .collect()
}

#[test]
fn filters_select_the_hand_checked_sets() {
    let table: &[(&str, &[&str])] = &[
        ("", &["e1", "e2", "e3", "e4", "e5"]),
        ("   ", &["e1", "e2", "e3", "e4", "e5"]),
        ("state = RUNNING", &["e1", "e3"]),
        ("state = ENVIRONMENT_STATE_STOPPED", &["e2"]),
        ("state = \"FAILED\"", &["e5"]),
        ("state != RUNNING", &["e2", "e4", "e5"]),
        ("state = DELETED", &["e4"]),
        ("state = STARTING", &[]),
        ("owner_id = \"alice\"", &["e1", "e3"]),
        ("owner_id = alice AND state = RUNNING", &["e1", "e3"]),
        ("owner_id = bob OR owner_id = carol", &["e2", "e4", "e5"]),
        ("name = \"web-*\"", &["e1", "e2", "e4"]),
        ("name = web-*", &["e1", "e2", "e4"]),
        ("name = web-1", &["e1"]),
        ("name = \"web-1*\"", &["e1", "e4"]),
        ("name != \"web-*\"", &["e3", "e5"]),
        ("name = \"web-\\*\"", &[]),
        ("name = 'db'", &["e3"]),
        ("name > \"scratch\"", &["e1", "e2", "e4"]),
        ("name >= scratch", &["e1", "e2", "e4", "e5"]),
        ("name < web-10", &["e1", "e3", "e5"]),
        ("name <= web-10", &["e1", "e3", "e4", "e5"]),
        ("labels.ci = \"true\"", &["e1", "e5"]),
        ("labels.ci != \"true\"", &["e2", "e3", "e4"]),
        ("labels.ci = \"*\"", &["e1", "e2", "e5"]),
        ("labels:ci", &["e1", "e2", "e5"]),
        ("-labels:ci", &["e3", "e4"]),
        ("NOT labels:ci", &["e3", "e4"]),
        ("labels.tier:*", &["e1", "e3"]),
        ("labels.tier > front", &[]),
        ("labels.tier < front", &["e3"]),
        ("labels.example.com/owner = x", &["e3"]),
        ("labels:example.com/owner", &["e3"]),
        ("labels:\"tier\"", &["e1", "e3"]),
        (
            "create_time > \"2026-01-01T00:00:00Z\"",
            &["e2", "e3", "e5"],
        ),
        (
            "create_time >= \"2026-01-01T00:00:00Z\"",
            &["e1", "e2", "e3", "e5"],
        ),
        ("create_time < 2026-01-01T00:00:00Z", &["e4"]),
        ("create_time <= 2026-01-01T00:00:00Z", &["e1", "e4"]),
        ("create_time = \"2026-01-01T00:00:00.001Z\"", &["e2"]),
        (
            "create_time != \"2026-01-01T00:00:00.001Z\"",
            &["e1", "e3", "e4", "e5"],
        ),
        // Sub-millisecond bounds compare exactly.
        (
            "create_time > \"2026-01-01T00:00:00.0005Z\"",
            &["e2", "e3", "e5"],
        ),
        ("create_time < \"2026-01-01T00:00:00.0005Z\"", &["e1", "e4"]),
        // Offsets are honoured: 01:00+01:00 is midnight UTC.
        (
            "create_time > \"2026-01-01T01:00:00+01:00\"",
            &["e2", "e3", "e5"],
        ),
        (
            "update_time >= \"2026-01-02T00:00:00.500Z\"",
            &["e1", "e2", "e3", "e4", "e5"],
        ),
        (
            "update_time > \"2026-01-02T00:00:00.500Z\"",
            &["e2", "e3", "e4", "e5"],
        ),
        (
            "update_time >= \"2026-01-02T00:00:00.501Z\"",
            &["e2", "e3", "e4", "e5"],
        ),
        ("image = \"ghcr.io/acme/*\"", &["e2", "e4"]),
        ("image = ghcr.io/acme/app:1.0", &["e2"]),
        (
            "canonical_image = \"docker.io/library/postgres:16\"",
            &["e3"],
        ),
        ("team_id = t1", &["e1", "e2", "e5"]),
        ("id = e3", &["e3"]),
        (
            "(state = RUNNING OR state = STOPPED) AND owner_id = bob",
            &["e2"],
        ),
        (
            "state = RUNNING OR (state = STOPPED AND owner_id = bob)",
            &["e1", "e2", "e3"],
        ),
        ("NOT (state = RUNNING OR state = DELETED)", &["e2", "e5"]),
        ("-(owner_id = alice)", &["e2", "e4", "e5"]),
        ("NOT(state = RUNNING)", &["e2", "e4", "e5"]),
        ("state=RUNNING AND labels.tier=\"front\"", &["e1"]),
        ("((((state = RUNNING))))", &["e1", "e3"]),
        (
            "owner_id = alice AND (labels:ci OR name = db) AND NOT state = FAILED",
            &["e1", "e3"],
        ),
        ("name = x OR name = db OR name = scratch", &["e3", "e5"]),
        (
            "\tstate = RUNNING\n AND\r\nowner_id = alice ",
            &["e1", "e3"],
        ),
        ("name = \"é\" OR name = db", &["e3"]),
    ];
    for (filter, expected) in table {
        assert_eq!(selected(filter), *expected, "filter {filter:?}");
    }
}

#[test]
fn bad_filters_say_where_and_what() {
    let deep = format!("{}name = x{}", "(".repeat(9), ")".repeat(9));
    let many = vec!["name = x"; 33].join(" AND ");
    let long = format!("name = \"{}\"", "a".repeat(1020));
    let table: &[(&str, usize, &str)] = &[
        (
            "state = RUNNING AND name = x OR owner_id = y",
            30,
            "OR after the AND at column 17: AND and OR cannot be mixed without parentheses",
        ),
        (
            "name = a OR name = b AND state = RUNNING",
            22,
            "AND after the OR at column 10",
        ),
        (
            "state = running",
            9,
            "unknown state `running`: expected one of CREATING, RUNNING",
        ),
        ("state = RUN*", 9, "unknown state `RUN*`"),
        ("state > RUNNING", 7, "`state` takes = or != only"),
        ("foo = 1", 1, "unknown field `foo`: expected id, name"),
        (
            "name",
            5,
            "expected an operator (=, !=, <, <=, >, >= or :) after `name`, found the end of the filter",
        ),
        (
            "name ~ x",
            6,
            "expected an operator (=, !=, <, <=, >, >= or :) after `name`, found `~`",
        ),
        (
            "name =",
            7,
            "expected a value (a word, or a string in double quotes), found the end of the filter",
        ),
        ("name = (x)", 8, "expected a value"),
        (
            "name = \"abc",
            8,
            "string not terminated: expected a closing \"",
        ),
        (
            "(state = RUNNING",
            17,
            "expected ')' to close the '(' at column 1, found the end of the filter",
        ),
        ("state = RUNNING)", 16, "unbalanced ')'"),
        (
            "name = \"a*b\"",
            10,
            "`*` is allowed only at the end of a value (a prefix match) (\\* is a literal *)",
        ),
        ("name = a*b", 9, "`*` is allowed only at the end"),
        (
            "name < \"web-*\"",
            6,
            "a prefix match (a value ending in *) takes = or != only",
        ),
        (
            "create_time > yesterday",
            15,
            "expected an RFC 3339 timestamp such as \"2026-01-01T00:00:00Z\" after `create_time`, found `yesterday`",
        ),
        (
            "update_time > \"2026-01-01\"",
            15,
            "expected an RFC 3339 timestamp",
        ),
        ("create_time : x", 13, "`:` (has) applies to labels only"),
        (
            "name:web",
            5,
            "`:` (has) applies to labels only (labels:KEY); compare `name` with = or !=",
        ),
        ("labels = x", 8, "`labels` takes `:`"),
        (
            "labels:Bad",
            8,
            "label key `Bad` must be 1 to 63 lower-case letters",
        ),
        ("labels:ci*", 8, "label key `ci*`"),
        ("labels.Bad = x", 8, "label key `Bad` must be"),
        ("labels. = x", 8, "label key `` must be"),
        (
            "labels.ci:true",
            10,
            "`labels.ci:` takes `*` only (labels.ci:* tests presence)",
        ),
        (
            "state = RUNNING and name = x",
            17,
            "expected AND, OR or the end of the filter, found `and` (AND and OR are upper case)",
        ),
        (
            "not name = x",
            1,
            "unknown field `not`: expected id, name, owner_id, team_id, state, image, create_time, update_time, labels.KEY or labels:KEY (AND, OR and NOT are upper case)",
        ),
        ("name == x", 6, "`==` is not an operator: use `=`"),
        (
            "name = x y = z",
            10,
            "expected AND, OR or the end of the filter, found `y`",
        ),
        ("(name = x y)", 11, "expected AND, OR or ')', found `y`"),
        (
            "- name = x",
            2,
            "expected a comparison or '(' right after '-' (no space)",
        ),
        (
            "NOT NOT name = x",
            5,
            "expected a comparison (such as state = RUNNING), NOT or '(', found `NOT`",
        ),
        ("name = x AND AND name = y", 14, "found `AND`"),
        (
            "()",
            2,
            "expected a comparison (such as state = RUNNING), NOT or '(', found `)`",
        ),
        ("NOT", 4, "found the end of the filter"),
        ("name = x AND", 13, "found the end of the filter"),
        ("name = x AND -", 15, "found the end of the filter"),
        ("= x", 1, "expected a comparison"),
        ("1name = x", 1, "expected a comparison"),
        (
            "name = \"\\n\"",
            9,
            "unknown escape `\\n`: the escapes are \\\\, \\\", \\' and \\*",
        ),
        ("name = \"é\" AND x = 1", 16, "unknown field `x`"),
        (
            "name = é",
            8,
            "expected a value (a word, or a string in double quotes), found `é`",
        ),
        (&deep, 9, "parentheses nested deeper than 8"),
        (&many, 417, "more than 32 comparisons"),
        (&long, 1025, "the filter is longer than 1024 bytes"),
    ];
    for (filter, column, message) in table {
        let e = Filter::parse(filter).expect_err(filter);
        assert_eq!(
            (e.column, e.message.contains(message)),
            (*column, true),
            "{filter:?}: {e}"
        );
        assert_eq!(e.to_string(), format!("column {}: {}", e.column, e.message));
    }
}

#[test]
fn at_most_the_limits_is_accepted() {
    let nested = format!("{}name = x{}", "(".repeat(8), ")".repeat(8));
    assert!(Filter::parse(&nested).is_ok());
    let many = vec!["name = x"; 32].join(" OR ");
    assert!(Filter::parse(&many).is_ok());
    let long = format!("name = \"{}\"", "a".repeat(1015));
    assert_eq!(long.len(), 1024);
    assert!(Filter::parse(&long).is_ok());
}

#[test]
fn required_comparisons_and_deleted() {
    let f = Filter::parse("owner_id = a AND (state = RUNNING OR name = b) AND NOT id = c").unwrap();
    let required: Vec<_> = f.required().into_iter().map(|c| c.field.clone()).collect();
    assert_eq!(required, [Field::OwnerId]);
    assert_eq!(f.comparisons().len(), 4);
    assert!(
        Filter::parse("name = x OR NOT state = DELETED")
            .unwrap()
            .names_state(EnvironmentState::Deleted)
    );
    assert!(
        !Filter::parse("state = RUNNING")
            .unwrap()
            .names_state(EnvironmentState::Deleted)
    );
}

#[test]
fn order_by_parses_and_refuses_precisely() {
    use OrderField::*;
    let keys = |text: &str| -> Vec<(OrderField, bool)> {
        OrderBy::parse(text)
            .unwrap_or_else(|e| panic!("{text:?}: {e}"))
            .keys()
            .iter()
            .map(|k| (k.field, k.descending))
            .collect()
    };
    assert_eq!(keys(""), [(CreateTime, true)]);
    assert_eq!(keys("  "), [(CreateTime, true)]);
    assert_eq!(keys("name"), [(Name, false)]);
    assert_eq!(
        keys("name desc, create_time"),
        [(Name, true), (CreateTime, false)]
    );
    assert_eq!(keys("  update_time   DESC  "), [(UpdateTime, true)]);
    assert_eq!(keys("state asc,name desc"), [(State, false), (Name, true)]);
    assert_eq!(
        keys("create_time,update_time,name,state"),
        [
            (CreateTime, false),
            (UpdateTime, false),
            (Name, false),
            (State, false)
        ]
    );

    let table: &[(&str, usize, &str)] = &[
        (
            "id",
            1,
            "unknown field `id`: order_by takes create_time, update_time, name and state",
        ),
        ("name, owner_id desc", 7, "unknown field `owner_id`"),
        ("name, name desc", 7, "`name` appears twice"),
        (
            "name descending",
            6,
            "expected `desc`, `asc` or ',' after `name`, found `descending`",
        ),
        ("name,,state", 6, "found nothing: a ',' too many?"),
        ("name,", 6, "found nothing"),
        ("name desc x", 11, "expected ',' or the end, found `x`"),
    ];
    for (text, column, message) in table {
        let e = OrderBy::parse(text).expect_err(text);
        assert_eq!(
            (e.column, e.message.contains(message)),
            (*column, true),
            "{text:?}: {e}"
        );
    }
    assert!(OrderBy::parse(&"name".repeat(65)).is_err());
}

fn ids(envs: &[Environment]) -> Vec<&str> {
    envs.iter().map(|e| e.id.as_str()).collect()
}

#[test]
fn orders_sort_as_checked_by_hand() {
    let all = fixture();
    let table: &[(&str, &[&str])] = &[
        // Default: newest first.
        ("", &["e3", "e5", "e2", "e1", "e4"]),
        ("create_time", &["e4", "e1", "e2", "e5", "e3"]),
        ("update_time", &["e1", "e2", "e5", "e3", "e4"]),
        ("update_time desc", &["e4", "e3", "e5", "e2", "e1"]),
        ("name", &["e3", "e5", "e1", "e4", "e2"]),
        ("name desc", &["e2", "e4", "e1", "e5", "e3"]),
        // RUNNING(2) < STOPPED(3) < FAILED(4) < DELETED(6); ties by id.
        ("state", &["e1", "e3", "e2", "e5", "e4"]),
        ("state desc", &["e4", "e5", "e2", "e1", "e3"]),
        ("state, name desc", &["e1", "e3", "e2", "e5", "e4"]),
        ("state desc, name desc", &["e4", "e5", "e2", "e1", "e3"]),
        ("state, create_time desc", &["e3", "e1", "e2", "e5", "e4"]),
    ];
    for (order_by, expected) in table {
        let q = Query::new("", order_by, true).unwrap();
        let page = q.page(all.clone(), 50, None);
        assert_eq!(ids(&page.environments), *expected, "order_by {order_by:?}");
        assert!(page.next_page_token.is_empty());
    }
    // Equal keys: the id decides, ascending.
    let mut same = fixture();
    for e in &mut same {
        e.create_time = Some(ts("2026-01-01T00:00:00Z"));
    }
    same.reverse();
    let page = Query::new("", "", true).unwrap().page(same, 50, None);
    assert_eq!(ids(&page.environments), ["e1", "e2", "e3", "e4", "e5"]);
}

#[test]
fn deleted_only_with_show_deleted_or_a_filter_naming_it() {
    let all = fixture();
    let listed = |filter: &str, show_deleted: bool| {
        let q = Query::new(filter, "name", show_deleted).unwrap();
        ids(&q.page(all.clone(), 50, None).environments)
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(listed("", false), ["e3", "e5", "e1", "e2"]);
    assert_eq!(listed("", true), ["e3", "e5", "e1", "e4", "e2"]);
    assert_eq!(listed("state = DELETED", false), ["e4"]);
    assert_eq!(listed("owner_id = bob", false), ["e2"]);
    assert_eq!(listed("owner_id = bob", true), ["e4", "e2"]);
    assert_eq!(listed("state != DELETED", false), ["e3", "e5", "e1", "e2"]);
    let q = Query::new("", "", false).unwrap();
    assert!(!q.includes_deleted());
    assert!(!q.bounds(None).include_deleted);
    assert!(
        Query::new("state = DELETED", "", false)
            .unwrap()
            .includes_deleted()
    );
}

/// Walks every page; the ids in order.
fn walk(q: &Query, all: &[Environment], size: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..100 {
        let cursor = q.cursor(&token).unwrap();
        let bounds = q.bounds(cursor.as_ref());
        // What a database narrowed by the bounds would return.
        let candidates = all.iter().filter(|e| within(e, &bounds)).cloned();
        let page = q.page(candidates, size, cursor.as_ref());
        assert!(page.environments.len() <= size);
        out.extend(page.environments.iter().map(|e| e.id.clone()));
        if page.next_page_token.is_empty() {
            return out;
        }
        assert_eq!(page.environments.len(), size, "only the last page is short");
        token = page.next_page_token;
    }
    panic!("paging did not end");
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

#[test]
fn paging_collects_exactly_the_sorted_set_in_every_order() {
    // A larger set: the fixture and copies with shifted times and names,
    // many sharing keys (ties decided by id).
    let mut all = Vec::new();
    for round in 0..6 {
        for mut e in fixture() {
            e.id = format!("{}-{round}", e.id);
            if round % 2 == 1 {
                e.name = format!("{}-{round}", e.name);
            }
            if let Some(t) = e.update_time.as_mut() {
                t.seconds += round / 3;
            }
            all.push(e);
        }
    }
    let filters = [
        "",
        "state = RUNNING",
        "owner_id = bob",
        "labels:ci",
        "name = \"web-*\"",
        "update_time >= \"2026-01-02T00:00:00.500Z\"",
        "create_time < \"2026-01-15T00:00:00Z\" AND NOT state = STOPPED",
        "state = DELETED OR owner_id = carol",
    ];
    let orders = [
        "",
        "create_time",
        "update_time",
        "update_time desc",
        "name",
        "name desc, update_time",
        "state, create_time desc",
    ];
    for filter in filters {
        for order_by in orders {
            for show_deleted in [false, true] {
                let q = Query::new(filter, order_by, show_deleted).unwrap();
                let mut expected: Vec<Environment> =
                    all.iter().filter(|e| q.matches(e)).cloned().collect();
                expected.sort_by(|a, b| q.order().compare(a, b));
                let expected: Vec<String> = expected.into_iter().map(|e| e.id).collect();
                for size in [1, 2, 3, 7, 50] {
                    assert_eq!(
                        walk(&q, &all, size),
                        expected,
                        "{filter:?} / {order_by:?} / {show_deleted} / {size}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_page_continues_after_its_last_item_whatever_changed() {
    let mut all = fixture();
    let q = Query::new("", "create_time", true).unwrap();
    let first = q.page(all.clone(), 2, None);
    assert_eq!(ids(&first.environments), ["e4", "e1"]);
    // Created meanwhile: one sorting before the cursor, one after.
    let mut early = all[0].clone();
    early.id = "e0".into();
    early.create_time = Some(ts("2020-01-01T00:00:00Z"));
    let mut late = all[0].clone();
    late.id = "e9".into();
    late.create_time = Some(ts("2027-01-01T00:00:00Z"));
    all.extend([early, late]);
    // And the first item of the next page deleted.
    all.retain(|e| e.id != "e2");
    let cursor = q.cursor(&first.next_page_token).unwrap();
    let next = q.page(all, 10, cursor.as_ref());
    assert_eq!(ids(&next.environments), ["e5", "e3", "e9"]);
}

#[test]
fn page_tokens_belong_to_their_query() {
    let all = fixture();
    let q = Query::new("owner_id = bob OR owner_id = alice", "name", false).unwrap();
    let first = q.page(all, 1, None);
    let token = first.next_page_token;
    assert!(!token.is_empty());
    // Opaque: no sort key or id in the clear.
    assert!(!token.contains("db") && !token.contains("e3"));
    assert!(q.cursor(&token).unwrap().is_some());
    assert!(
        Query::new("owner_id = bob OR owner_id = alice", "name", false)
            .unwrap()
            .cursor(&token)
            .is_ok()
    );
    for (filter, order_by, show_deleted) in [
        ("owner_id = bob", "name", false),
        ("owner_id = bob OR owner_id = alice", "name desc", false),
        ("owner_id = bob OR owner_id = alice", "", false),
        ("owner_id = bob OR owner_id = alice", "name", true),
    ] {
        let other = Query::new(filter, order_by, show_deleted).unwrap();
        let e = other.cursor(&token).unwrap_err();
        assert_eq!(e.field, "page_token");
        assert!(e.description.contains("another filter"), "{e}");
    }
    for bad in ["x", "!!!!", "AAAA", &"A".repeat(2000), "CgA"] {
        let e = q.cursor(bad).unwrap_err();
        assert_eq!(
            (e.field, e.description.as_str()),
            ("page_token", "not a token from a previous page"),
            "{bad:?}"
        );
    }
    assert!(q.cursor("").unwrap().is_none());
}

#[test]
fn bounds_narrow_by_what_every_match_requires() {
    let q = Query::new(
        "update_time >= \"2026-01-02T00:00:00.5009Z\" AND owner_id = bob AND state = RUNNING \
         AND create_time < \"2026-01-01T00:00:00Z\" AND (id = x OR id = y)",
        "update_time",
        true,
    )
    .unwrap();
    let b = q.bounds(None);
    let t = ms(&Some(ts("2026-01-02T00:00:00.500Z")));
    assert_eq!(
        b.update_time_ms,
        MsRange {
            min: Some(t),
            max: None
        }
    );
    assert_eq!(
        b.create_time_ms.max,
        Some(ms(&Some(ts("2026-01-01T00:00:00Z"))))
    );
    assert_eq!(b.owner_id.as_deref(), Some("bob"));
    assert_eq!(b.state, Some(EnvironmentState::Running));
    assert_eq!(b.id, None, "an OR requires neither side");
    assert!(b.include_deleted);
    // Negated comparisons narrow nothing.
    let b = Query::new("NOT update_time >= \"2026-01-01T00:00:00Z\"", "", false)
        .unwrap()
        .bounds(None);
    assert_eq!(b.update_time_ms, MsRange::default());
    // The cursor narrows by the first key, in its direction.
    let all = fixture();
    for (order_by, field_is_update, descending) in [
        ("update_time", true, false),
        ("update_time desc", true, true),
        ("create_time", false, false),
        ("", false, true),
    ] {
        let q = Query::new("", order_by, true).unwrap();
        let page = q.page(all.clone(), 2, None);
        let last = page.environments.last().unwrap().clone();
        let cursor = q.cursor(&page.next_page_token).unwrap();
        let b = q.bounds(cursor.as_ref());
        let (range, other, value) = if field_is_update {
            (b.update_time_ms, b.create_time_ms, ms(&last.update_time))
        } else {
            (b.create_time_ms, b.update_time_ms, ms(&last.create_time))
        };
        let expected = if descending {
            MsRange {
                min: None,
                max: Some(value),
            }
        } else {
            MsRange {
                min: Some(value),
                max: None,
            }
        };
        assert_eq!(
            (range, other),
            (expected, MsRange::default()),
            "{order_by:?}"
        );
    }
}

#[test]
fn page_sizes_are_bounded() {
    assert_eq!(page_size(0), Ok(DEFAULT_PAGE_SIZE));
    assert_eq!(page_size(1), Ok(1));
    assert_eq!(page_size(500), Ok(500));
    for bad in [-1, 501, i32::MAX, i32::MIN] {
        let e = page_size(bad).unwrap_err();
        assert_eq!(e.field, "page_size");
        assert_eq!(e.description, "must be between 0 and 500");
    }
    let e = Query::new("name", "", false).unwrap_err();
    assert_eq!(e.field, "filter");
    assert!(
        e.description.starts_with("column 5: expected an operator"),
        "{e}"
    );
    let e = Query::new("", "owner_id", false).unwrap_err();
    assert_eq!(e.field, "order_by");
}

/// Walks every page of a scan that examines at most `limit` candidates per
/// call, in the query's order after the cursor (as a database reading in
/// the order's first key does); the ids, and the number of pages.
fn walk_capped(q: &Query, all: &[Environment], size: usize, limit: usize) -> (Vec<String>, usize) {
    let mut out = Vec::new();
    let mut token = String::new();
    for pages in 1..10_000 {
        let cursor = q.cursor(&token).unwrap();
        let mut after: Vec<&Environment> = all
            .iter()
            .filter(|e| {
                cursor
                    .as_ref()
                    .is_none_or(|c| q.order().compare(c.last(), e).is_lt())
            })
            .collect();
        after.sort_by(|a, b| q.order().compare(a, b));
        let mut examined = 0;
        let mut matched = Vec::new();
        let mut stopped_at = None;
        for e in &after {
            examined += 1;
            if q.matches(e) {
                matched.push((*e).clone());
            }
            if matched.len() > size {
                break;
            }
            if examined == limit {
                stopped_at = Some((*e).clone());
                break;
            }
        }
        assert!(examined <= limit);
        let page = match stopped_at {
            Some(edge) if matched.len() <= size && examined < after.len() => {
                q.partial_page(matched, size, cursor.as_ref(), &edge)
            }
            _ => q.page(matched, size, cursor.as_ref()),
        };
        assert!(page.environments.len() <= size);
        out.extend(page.environments.iter().map(|e| e.id.clone()));
        if page.next_page_token.is_empty() {
            return (out, pages);
        }
        token = page.next_page_token;
    }
    panic!("paging did not end");
}

#[test]
fn short_pages_of_a_capped_scan_still_collect_exactly_the_set() {
    assert_eq!(examine_limit(1), MIN_EXAMINED);
    assert_eq!(examine_limit(100), MIN_EXAMINED);
    assert_eq!(examine_limit(500), 5000);
    // A long history: mostly deleted, a few matches far apart.
    let mut all = Vec::new();
    for i in 0..300 {
        let mut e = fixture()[i % 5].clone();
        e.id = format!("h{i:03}");
        e.state = if i % 50 == 7 {
            EnvironmentState::Running as i32
        } else {
            EnvironmentState::Deleted as i32
        };
        e.create_time = Some(Timestamp {
            seconds: 1_767_225_600 + i as i64,
            nanos: 0,
        });
        all.push(e);
    }
    for (filter, order_by, show_deleted) in [
        ("", "", false),
        ("state = RUNNING", "create_time", true),
        ("state = DELETED", "", false),
        ("name = nothing", "", true),
        ("", "update_time desc, name", true),
    ] {
        let q = Query::new(filter, order_by, show_deleted).unwrap();
        let mut expected: Vec<Environment> = all.iter().filter(|e| q.matches(e)).cloned().collect();
        expected.sort_by(|a, b| q.order().compare(a, b));
        let expected: Vec<String> = expected.into_iter().map(|e| e.id).collect();
        for (size, limit) in [(1, 1), (2, 7), (3, 40), (10, 1000)] {
            let (got, pages) = walk_capped(&q, &all, size, limit);
            assert_eq!(
                got, expected,
                "{filter:?} / {order_by:?} / {size} / {limit}"
            );
            // Every call moved on by at least `limit` candidates or a page.
            assert!(
                pages <= all.len().div_ceil(limit) + expected.len() / size + 1,
                "{filter:?} / {size} / {limit}: {pages} pages"
            );
        }
    }
    // A partial page's token goes on right after the edge, which need not
    // match the filter.
    let q = Query::new("state = RUNNING", "create_time", true).unwrap();
    let page = q.partial_page(Vec::new(), 5, None, &all[3]);
    assert!(page.environments.is_empty());
    let cursor = q.cursor(&page.next_page_token).unwrap().unwrap();
    assert_eq!(cursor.last().id, "h003");
    let rest = q.page(all.clone(), 1, Some(&cursor));
    assert_eq!(ids(&rest.environments), ["h007"]);
    // A full page keeps the token of its last item.
    let full = q.partial_page(all.clone(), 1, None, &all[299]);
    assert_eq!(ids(&full.environments), ["h007"]);
    assert_eq!(
        q.cursor(&full.next_page_token).unwrap().unwrap().last().id,
        "h007"
    );
    assert!(q.scans_in_order());
    assert!(Query::new("", "", false).unwrap().scans_in_order());
    assert!(!Query::new("", "name", false).unwrap().scans_in_order());
    assert!(
        !Query::new("", "state, create_time", false)
            .unwrap()
            .scans_in_order()
    );
}
