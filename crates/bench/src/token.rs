//! Token verification cost (issue 16, bounded token cost): a normal token
//! next to the worst token the platform still accepts (eight blocks, as many
//! checks as fit in 4 KiB) and next to hostile tokens it refuses (attenuation
//! blocks with facts and a self-join rule), all through `vibebox_token`'s
//! verify-then-authorize path on one thread. For reference, what the
//! smallest of those hostile blocks costs when nothing refuses it (biscuit's
//! own authorizer, a 20-fact four-way join).

use std::hint::black_box;
use std::time::{Duration, Instant};

use biscuit_auth::{AuthorizerLimits, Biscuit, BlockBuilder, UnverifiedBiscuit};
use vibebox_token::{
    AuthzRequest, Claims, KeyRing, MAX_BLOCKS, MAX_TOKEN_CHARS, Restriction, RootKey, TokenError,
    attenuate, mint,
};

use crate::report::{Figure, Unit};

/// Milliseconds per call of `f`, over at least `min_time`.
fn per_call(min_time: Duration, mut f: impl FnMut()) -> f64 {
    // Warm up.
    for _ in 0..10 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < min_time {
        for _ in 0..50 {
            f();
        }
        n += 50;
    }
    start.elapsed().as_secs_f64() * 1000.0 / n as f64
}

fn append(token: &str, code: &str) -> anyhow::Result<String> {
    let block = BlockBuilder::new().code(code)?;
    Ok(UnverifiedBiscuit::from_base64(token)?
        .append(block)?
        .to_base64()?)
}

fn hostile_block(facts: usize) -> String {
    let mut code = String::new();
    for i in 0..facts {
        code.push_str(&format!("f({i});"));
    }
    code.push_str("g($a) <- f($a), f($b), f($c), f($d), $a + $b + $c + $d == -1;");
    code
}

/// The largest, most complex token still accepted: eight blocks, each with
/// as many four-predicate, two-comparison checks as fit under the size cap.
fn worst_accepted(ring: &KeyRing, token: &str) -> anyhow::Result<String> {
    let check = "check if time($t), team($a), operation($o), environment($e), \
                 $t < 2100-01-01T00:00:00Z, $o != \"x\" or operation(\"environment.get\");";
    for per_block in (1..=8).rev() {
        let mut t = token.to_owned();
        for _ in 0..MAX_BLOCKS - 1 {
            t = append(&t, &check.repeat(per_block))?;
        }
        if t.len() <= MAX_TOKEN_CHARS && ring.verify(&t).is_ok() {
            return Ok(t);
        }
    }
    // Fall back on the platform's own attenuation.
    let mut t = token.to_owned();
    for i in 0..MAX_BLOCKS - 1 {
        t = attenuate(
            &t,
            &Restriction::default()
                .team("team-a")
                .environment(format!("env-{i}")),
        )?;
    }
    Ok(t)
}

fn verify_and_authorize(ring: &KeyRing, token: &str) -> Result<(), TokenError> {
    let verified = ring.verify(token)?;
    verified.authorize(
        &AuthzRequest::new("environment.get")
            .team("team-a")
            .environment("env-0"),
    )
}

pub(crate) async fn run(seconds: f64) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let min_time = Duration::from_secs_f64(seconds.max(0.2));
    tokio::task::spawn_blocking(move || measure(min_time)).await?
}

fn measure(min_time: Duration) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let root = RootKey::generate(1);
    let mut ring = KeyRing::new();
    ring.insert(1, &root.public_key_bytes())?;
    let normal = mint(
        &root,
        &Claims::new(
            "user-1",
            "token-1",
            chrono::Utc::now() + chrono::Duration::hours(12),
        ),
    )?;
    let attenuated = attenuate(&normal, &Restriction::default().team("team-a"))?;
    let worst = worst_accepted(&ring, &normal)?;
    let hostile_small = append(&normal, &hostile_block(60))?;
    let hostile_large = append(&normal, &hostile_block(300))?;
    anyhow::ensure!(verify_and_authorize(&ring, &normal).is_ok(), "normal token");
    let worst_verified = ring.verify(&worst)?;
    for (name, t) in [("small", &hostile_small), ("large", &hostile_large)] {
        anyhow::ensure!(
            matches!(ring.verify(t), Err(TokenError::Refused(_))),
            "the {name} hostile token must be refused"
        );
    }

    let normal_ms = per_call(min_time, || {
        let _ = black_box(verify_and_authorize(&ring, black_box(&normal)));
    });
    let attenuated_ms = per_call(min_time, || {
        let _ = black_box(verify_and_authorize(&ring, black_box(&attenuated)));
    });
    let worst_ms = per_call(min_time, || {
        let _ = black_box(verify_and_authorize(&ring, black_box(&worst)));
    });
    let hostile_small_ms = per_call(min_time, || {
        let _ = black_box(ring.verify(black_box(&hostile_small)));
    });
    let hostile_large_ms = per_call(min_time, || {
        let _ = black_box(ring.verify(black_box(&hostile_large)));
    });

    // What the guard prevents: a small hostile block evaluated by biscuit
    // itself (20 facts: 160,000 combinations in one iteration).
    let reference = append(&normal, &hostile_block(20))?;
    let biscuit = Biscuit::from_base64(&reference, root_public(&root)?)?;
    let started = Instant::now();
    let mut authorizer = biscuit_auth::AuthorizerBuilder::new()
        .set_limits(AuthorizerLimits {
            max_time: Duration::from_secs(1),
            ..AuthorizerLimits::default()
        })
        .time()
        .policy("allow if true")?
        .build(&biscuit)?;
    let _ = authorizer.authorize();
    let unguarded_ms = started.elapsed().as_secs_f64() * 1000.0;

    let figures = vec![
        Figure::new(
            "token.verify_normal",
            "verify + authorize a session token (authority block only)",
            normal_ms,
            Unit::Millis,
        ),
        Figure::new(
            "token.verify_attenuated",
            "verify + authorize a token with one attenuation block",
            attenuated_ms,
            Unit::Millis,
        )
        .baseline("session token", normal_ms),
        Figure::new(
            "token.verify_worst_accepted",
            format!(
                "verify + authorize the worst accepted token ({} blocks, {} chars)",
                worst_verified.attenuation_blocks() + 1,
                worst.len()
            ),
            worst_ms,
            Unit::Millis,
        )
        .baseline("session token", normal_ms)
        .ratio_at_most(50.0)
        .note("bounded by the shape rules: 8 blocks, checks only, 4 KiB"),
        Figure::new(
            "token.refuse_hostile_join",
            "refuse a token whose appended block self-joins 60 facts",
            hostile_small_ms,
            Unit::Millis,
        )
        .baseline("session token", normal_ms)
        .ratio_at_most(5.0)
        .note("refused on shape before any signature or datalog work"),
        Figure::new(
            "token.refuse_hostile_oversized",
            "refuse a token whose appended block self-joins 300 facts",
            hostile_large_ms,
            Unit::Millis,
        )
        .baseline("session token", normal_ms)
        .ratio_at_most(5.0)
        .note("refused on size"),
        Figure::new(
            "token.unguarded_join_reference",
            "for reference: biscuit evaluating a 20-fact four-way join unguarded",
            unguarded_ms,
            Unit::Millis,
        )
        .baseline("session token", normal_ms)
        .note("what one hostile call cost before the shape rules (grows as facts^4)"),
    ];
    let details = serde_json::json!({
        "normal_chars": normal.len(),
        "worst_chars": worst.len(),
        "worst_blocks": worst_verified.attenuation_blocks() + 1,
        "hostile_small_chars": hostile_small.len(),
        "hostile_large_chars": hostile_large.len(),
    });
    Ok((figures, details))
}

fn root_public(root: &RootKey) -> anyhow::Result<biscuit_auth::PublicKey> {
    Ok(biscuit_auth::PublicKey::from_bytes(
        &root.public_key_bytes(),
        biscuit_auth::Algorithm::Ed25519,
    )?)
}
