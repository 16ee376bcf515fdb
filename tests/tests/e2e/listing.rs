//! Listing through the real gateway (issue #20): `ListEnvironments` with
//! `filter` (AIP-160 subset) and `order_by` over a hand-built set of
//! environments whose answers were worked out by hand; keyset paging that
//! collects exactly the set; precise INVALID_ARGUMENT answers naming the
//! field; and `ListTeamMembers` paged by username.

use std::collections::BTreeMap;

use tonic::Code;
use tonic_types::StatusExt;
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, Environment, EnvironmentState,
    ListEnvironmentsRequest, ListEnvironmentsResponse,
};
use vibebox_proto::identity::{ListTeamMembersRequest, TeamRole};
use vibebox_tests::{Authed, Platform, Settle, dev_image};

fn rfc3339_ms(t: &prost_types::Timestamp) -> String {
    chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32)
        .expect("timestamp in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn create(
    client: &mut EnvironmentServiceClient<Authed>,
    image: &str,
    team: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Environment {
    let env = client
        .create_settled(CreateEnvironmentRequest {
            request_id: format!("listing-{name}"),
            team_id: team.into(),
            name: name.into(),
            spec: Some(ContainerSpec {
                image: image.into(),
                cpu_limit: Some(0.25),
                memory_limit_mb: Some(128),
                ..Default::default()
            }),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        })
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e:?}"));
    assert_eq!(env.state(), EnvironmentState::Running, "{env:?}");
    env
}

/// `ListEnvironments`; the gateway's per-user rate limit (this test lists
/// more than its burst) is waited out.
async fn list(
    client: &mut EnvironmentServiceClient<Authed>,
    request: ListEnvironmentsRequest,
) -> Result<ListEnvironmentsResponse, tonic::Status> {
    loop {
        match client.list_environments(request.clone()).await {
            Err(s) if s.code() == Code::ResourceExhausted && s.message().contains("rate limit") => {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            answer => return answer.map(|r| r.into_inner()),
        }
    }
}

/// The one BadRequest field violation of an INVALID_ARGUMENT answer.
fn violation(status: &tonic::Status) -> (String, String) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let violations = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest in {status:?}"))
        .field_violations;
    assert_eq!(violations.len(), 1, "{violations:?}");
    (
        violations[0].field.clone(),
        violations[0].description.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_orders_and_pages_through_the_gateway() {
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let team = p.team(&admin, "listing").await;
    let other_team = p.team(&admin, "listing-other").await;
    let (alice_id, alice) = p.member(&admin, "alice", &team, TeamRole::Developer).await;
    let (bob_id, bob) = p.member(&admin, "bob", &team, TeamRole::Developer).await;
    p.identity(&admin)
        .add_team_member(vibebox_proto::identity::AddTeamMemberRequest {
            team_id: other_team.clone(),
            user_id: bob_id.clone(),
            role: TeamRole::Developer as i32,
        })
        .await
        .unwrap();
    let mut as_alice = p.environments(&alice);
    let mut as_bob = p.environments(&bob);

    // Created in this order (distinct creation times): two of alice's, three
    // of bob's in the team, one of bob's in the other team.
    let a1 = create(
        &mut as_alice,
        &image,
        &team,
        "web-1",
        &[("ci", "true"), ("tier", "front")],
    )
    .await;
    let a2 = create(&mut as_alice, &image, &team, "web-2", &[("ci", "false")]).await;
    let b1 = create(&mut as_bob, &image, &team, "web-10", &[("tier", "back")]).await;
    let b2 = create(&mut as_bob, &image, &team, "db", &[]).await;
    let b3 = create(&mut as_bob, &image, &team, "scratch", &[("ci", "true")]).await;
    let o1 = create(&mut as_bob, &image, &other_team, "web-other", &[]).await;
    assert_eq!(a1.labels.get("tier").map(String::as_str), Some("front"));
    // a2 and b2 stopped, b3 deleted.
    for (owner, id) in [(&mut as_alice, &a2.id), (&mut as_bob, &b2.id)] {
        let stopped = owner.stop_settled(id, Some(1)).await.unwrap();
        assert_eq!(stopped.state(), EnvironmentState::Stopped, "{stopped:?}");
    }
    let deleted = as_bob.delete_settled(&b3.id).await.unwrap();
    assert_eq!(deleted.state(), EnvironmentState::Deleted);

    let name_of: BTreeMap<String, &str> = [
        (&a1, "a1"),
        (&a2, "a2"),
        (&b1, "b1"),
        (&b2, "b2"),
        (&b3, "b3"),
        (&o1, "o1"),
    ]
    .into_iter()
    .map(|(e, n)| (e.id.clone(), n))
    .collect();
    let names = |envs: &[Environment]| -> Vec<&str> {
        envs.iter()
            .map(|e| {
                *name_of
                    .get(&e.id)
                    .unwrap_or_else(|| panic!("unknown {}", e.id))
            })
            .collect()
    };
    let a2_created = rfc3339_ms(a2.create_time.as_ref().unwrap());

    // Filters, checked by hand; listed by name so the expected order is
    // plain: db (b2), scratch (b3), web-1 (a1), web-10 (b1), web-2 (a2).
    let table: Vec<(String, bool, &[&str])> = vec![
        (String::new(), false, &["b2", "a1", "b1", "a2"]),
        (String::new(), true, &["b2", "b3", "a1", "b1", "a2"]),
        ("state = RUNNING".into(), false, &["a1", "b1"]),
        (
            "state = ENVIRONMENT_STATE_STOPPED".into(),
            false,
            &["b2", "a2"],
        ),
        ("state != RUNNING".into(), false, &["b2", "a2"]),
        ("state != RUNNING".into(), true, &["b2", "b3", "a2"]),
        // Naming DELETED includes deleted environments without show_deleted.
        ("state = DELETED".into(), false, &["b3"]),
        (format!("owner_id = \"{alice_id}\""), false, &["a1", "a2"]),
        (
            format!("owner_id = {bob_id} AND state = RUNNING"),
            false,
            &["b1"],
        ),
        ("name = \"web-*\"".into(), false, &["a1", "b1", "a2"]),
        ("name = \"web-1*\"".into(), false, &["a1", "b1"]),
        ("name != \"web-*\"".into(), false, &["b2"]),
        ("name = db OR name = scratch".into(), false, &["b2"]),
        ("name = db OR name = scratch".into(), true, &["b2", "b3"]),
        ("name > web-1".into(), false, &["b1", "a2"]),
        ("labels.ci = \"true\"".into(), false, &["a1"]),
        ("labels.ci = \"true\"".into(), true, &["b3", "a1"]),
        ("labels:ci".into(), false, &["a1", "a2"]),
        ("-labels:ci".into(), false, &["b2", "b1"]),
        ("labels.tier = back".into(), false, &["b1"]),
        ("labels.tier:*".into(), false, &["a1", "b1"]),
        (
            "NOT labels:tier AND state = STOPPED".into(),
            false,
            &["b2", "a2"],
        ),
        (
            format!("(owner_id = {alice_id} OR labels.tier = back) AND state = RUNNING"),
            false,
            &["a1", "b1"],
        ),
        (
            format!("create_time > \"{a2_created}\""),
            false,
            &["b2", "b1"],
        ),
        (
            format!("create_time <= \"{a2_created}\""),
            false,
            &["a1", "a2"],
        ),
        (format!("create_time = \"{a2_created}\""), false, &["a2"]),
        (
            format!("image = \"{}\"", a1.canonical_image),
            false,
            &["b2", "a1", "b1", "a2"],
        ),
        (format!("id = {}", b1.id), false, &["b1"]),
        (format!("team_id = {other_team}"), false, &[]),
        ("name = nothing-like-this".into(), false, &[]),
    ];
    for (filter, show_deleted, expected) in &table {
        let listed = list(
            &mut as_alice,
            ListEnvironmentsRequest {
                team_id: team.clone(),
                filter: filter.clone(),
                order_by: "name".into(),
                show_deleted: *show_deleted,
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{filter:?}: {e:?}"));
        assert_eq!(
            names(&listed.environments),
            *expected,
            "filter {filter:?}, show_deleted {show_deleted}"
        );
        assert!(listed.next_page_token.is_empty());
    }

    // Without a team: every team of the caller (bob's two, not alice's one).
    for (who, expected) in [
        (&mut as_bob, &["a1", "b1", "a2", "o1"][..]),
        (&mut as_alice, &["a1", "b1", "a2"][..]),
    ] {
        let listed = list(
            who,
            ListEnvironmentsRequest {
                filter: "name = \"web-*\"".into(),
                order_by: "name".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(names(&listed.environments), expected);
    }

    // Orders, checked by hand (RUNNING = 2 sorts before STOPPED = 3).
    for (order_by, expected) in [
        ("", &["b2", "b1", "a2", "a1"]),
        ("create_time desc", &["b2", "b1", "a2", "a1"]),
        ("create_time", &["a1", "a2", "b1", "b2"]),
        ("name desc", &["a2", "b1", "a1", "b2"]),
        ("state, name", &["a1", "b1", "b2", "a2"]),
        ("state desc, create_time desc", &["b2", "a2", "b1", "a1"]),
    ] {
        let listed = list(
            &mut as_alice,
            ListEnvironmentsRequest {
                team_id: team.clone(),
                order_by: order_by.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(
            names(&listed.environments),
            expected,
            "order_by {order_by:?}"
        );
    }
    // By update time: the stops and the deletion changed a2, b2 and b3
    // after every create.
    let listed = list(
        &mut as_alice,
        ListEnvironmentsRequest {
            team_id: team.clone(),
            order_by: "update_time desc".into(),
            show_deleted: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let updated: Vec<_> = listed
        .environments
        .iter()
        .map(|e| {
            let t = e.update_time.unwrap();
            (t.seconds, t.nanos)
        })
        .collect();
    assert!(updated.windows(2).all(|w| w[0] >= w[1]), "{updated:?}");
    let mut last_three = names(&listed.environments)[..3].to_vec();
    last_three.sort();
    assert_eq!(last_three, ["a2", "b2", "b3"]);

    // Replaying the changes since a moment (as WatchEnvironments does):
    // `update_time >= T` with millisecond precision is exact at T.
    let b2_now = list(
        &mut as_alice,
        ListEnvironmentsRequest {
            team_id: team.clone(),
            filter: format!("id = {}", b2.id),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .environments
    .remove(0);
    let since = rfc3339_ms(b2_now.update_time.as_ref().unwrap());
    let replay = |op: &str| ListEnvironmentsRequest {
        team_id: team.clone(),
        filter: format!("update_time {op} \"{since}\""),
        order_by: "update_time".into(),
        show_deleted: true,
        ..Default::default()
    };
    let from = list(&mut as_alice, replay(">=")).await.unwrap();
    let after = list(&mut as_alice, replay(">")).await.unwrap();
    let from = names(&from.environments);
    let after = names(&after.environments);
    assert!(
        from.contains(&"b2") && !after.contains(&"b2"),
        "{from:?} / {after:?}"
    );
    assert_eq!(from.len(), after.len() + 1);
    assert!(
        from.contains(&"b3"),
        "the deletion came after the stop: {from:?}"
    );

    // Paging through a filter, 2 at a time: exactly the set, newest first.
    let paged = |page_token: String| ListEnvironmentsRequest {
        team_id: team.clone(),
        filter: format!("name = \"web-*\" OR owner_id = {bob_id}"),
        show_deleted: true,
        page_size: 2,
        page_token,
        ..Default::default()
    };
    let mut collected = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    let mut first_token = String::new();
    loop {
        let page = list(&mut as_alice, paged(token.clone())).await.unwrap();
        sizes.push(page.environments.len());
        collected.extend(names(&page.environments));
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(sizes.len() < 10, "paging does not end");
        if first_token.is_empty() {
            first_token = page.next_page_token.clone();
        }
        token = page.next_page_token;
    }
    assert_eq!(collected, ["b3", "b2", "b1", "a2", "a1"]);
    assert_eq!(sizes, [2, 2, 1]);

    // The token is refused with another filter, order or show_deleted.
    for changed in [
        ListEnvironmentsRequest {
            filter: "state = RUNNING".into(),
            ..paged(first_token.clone())
        },
        ListEnvironmentsRequest {
            order_by: "name".into(),
            ..paged(first_token.clone())
        },
        ListEnvironmentsRequest {
            show_deleted: false,
            ..paged(first_token.clone())
        },
    ] {
        let err = list(&mut as_alice, changed).await.unwrap_err();
        let (field, description) = violation(&err);
        assert_eq!(field, "page_token");
        assert!(description.contains("another filter"), "{description}");
    }
    let err = list(&mut as_alice, paged("bm90LWEtdG9rZW4".into()))
        .await
        .unwrap_err();
    assert_eq!(violation(&err).0, "page_token");

    // Bad filters and orders: INVALID_ARGUMENT naming the field, the column
    // and what was expected.
    for (filter, order_by, page_size, field, description) in [
        (
            "state = RUNNING AND",
            "",
            0,
            "filter",
            "column 20: expected a comparison (such as state = RUNNING), NOT or '(', found the end of the filter",
        ),
        (
            "state = running",
            "",
            0,
            "filter",
            "column 9: unknown state `running`",
        ),
        (
            "state = RUNNING AND name = x OR name = y",
            "",
            0,
            "filter",
            "column 30: OR after the AND at column 17",
        ),
        (
            "owner = x",
            "",
            0,
            "filter",
            "column 1: unknown field `owner`",
        ),
        (
            "",
            "owner_id",
            0,
            "order_by",
            "column 1: unknown field `owner_id`",
        ),
        (
            "",
            "name sideways",
            0,
            "order_by",
            "column 6: expected `desc`",
        ),
        ("", "", 501, "page_size", "must be between 0 and 500"),
    ] {
        let err = list(
            &mut as_alice,
            ListEnvironmentsRequest {
                team_id: team.clone(),
                filter: filter.into(),
                order_by: order_by.into(),
                page_size,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        let (got_field, got_description) = violation(&err);
        assert_eq!(got_field, field, "{filter:?} {order_by:?}");
        assert!(
            got_description.starts_with(description),
            "{filter:?} {order_by:?}: {got_description}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_members_are_paged_through_the_gateway() {
    let p = Platform::start();
    let admin = p.admin_token();
    let team = p.team(&admin, "members").await;
    let other = p.team(&admin, "members-other").await;
    // With the admin who created the team: five members.
    let mut expected = vec!["admin".to_owned()];
    for name in ["walt", "ines", "omar", "bea"] {
        p.member(&admin, name, &team, TeamRole::Viewer).await;
        expected.push(name.into());
    }
    let mut identity = p.identity(&admin);
    let everyone = identity
        .list_team_members(ListTeamMembersRequest {
            team_id: team.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut usernames: Vec<String> = everyone
        .memberships
        .iter()
        .map(|m| m.username.clone())
        .collect();
    // The bootstrap admin's username is whatever `vibebox up` chose.
    expected[0] = usernames
        .iter()
        .find(|u| !["walt", "ines", "omar", "bea"].contains(&u.as_str()))
        .expect("the team's creator is a member")
        .clone();
    expected.sort();
    assert_eq!(usernames.len(), 5);
    usernames.sort();
    assert_eq!(usernames, expected);

    let mut got = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    let mut first_token = String::new();
    loop {
        let page = identity
            .list_team_members(ListTeamMembersRequest {
                team_id: team.clone(),
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        sizes.push(page.memberships.len());
        got.extend(page.memberships.into_iter().map(|m| m.username));
        if page.next_page_token.is_empty() {
            break;
        }
        if first_token.is_empty() {
            first_token = page.next_page_token.clone();
        }
        token = page.next_page_token;
    }
    assert_eq!(got, expected, "ordered by username");
    assert_eq!(sizes, [2, 2, 1]);

    for (team_id, page_size, page_token, field) in [
        (team.clone(), 501, String::new(), "page_size"),
        (team.clone(), -1, String::new(), "page_size"),
        (other.clone(), 2, first_token.clone(), "page_token"),
        (team.clone(), 2, "not-a-token".to_owned(), "page_token"),
    ] {
        let err = identity
            .list_team_members(ListTeamMembersRequest {
                team_id,
                page_size,
                page_token,
            })
            .await
            .unwrap_err();
        assert_eq!(violation(&err).0, field);
    }
}
