//! Image reference canonicalization (the `spec.image` a user writes, and the
//! allow/deny patterns of a policy file): never panics; the canonical form is
//! a fixed point made of its parts; every spelling of the same reference
//! (case, implied `docker.io`/`library/`, Docker Hub aliases) canonicalizes
//! the same; a pattern written as the canonical form matches it; and a
//! reference resolving to the `docker`/`dind` repositories is always caught
//! by the default deny list. Against the independent oracle
//! (`vibebox_fuzz::oracle::image`, Docker's rules written out apart): every
//! reference the policy accepts, Docker accepts too and canonicalizes the
//! same; and a deny pattern the policy holds matches whatever the oracle's
//! reading of it matches.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vibebox_fuzz::oracle;
use vibebox_policy::image::{DOCKER_HUB, ImagePattern, ImageRef, ListKind};

fuzz_target!(|data: &[u8]| {
    oracle::self_check();
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    for kind in [ListKind::Allow, ListKind::Deny] {
        if let Ok(p) = ImagePattern::new(input, kind) {
            assert_eq!(p.as_str(), input);
        }
    }
    // The input as a deny pattern, judged over the input's own wildcards
    // filled in (the concrete image an operator meant to stop).
    if let Ok(deny) = ImagePattern::new(input, ListKind::Deny) {
        let filled = input.replace(['*', '?'], "x");
        if let (Ok(image), Ok(docker)) = (
            ImageRef::parse(&filled),
            oracle::image::canonicalize(&filled),
        ) && oracle::image::Pattern::deny(input).matches(&docker)
        {
            assert!(
                deny.matches(&image),
                "{filled:?} escaped the deny pattern {input:?}"
            );
        }
    }
    let docker = oracle::image::canonicalize(input);
    let Ok(image) = ImageRef::parse(input) else {
        return;
    };
    let canonical = image.canonical();
    match &docker {
        Ok(d) => assert_eq!(
            canonical,
            d.canonical(),
            "{input:?}: policy vs Docker's rules"
        ),
        Err(e) => panic!("{input:?} accepted as {canonical}, but Docker refuses it: {e}"),
    }
    let again = ImageRef::parse(canonical).expect("canonical form parses");
    assert_eq!(again, image, "canonical form is a fixed point");

    // The parts partition the canonical string.
    assert_eq!(
        format!("{}/{}", image.registry(), image.path()),
        image.name()
    );
    let mut rebuilt = image.name().to_owned();
    if let Some(t) = image.tag() {
        rebuilt += &format!(":{t}");
    }
    if let Some(d) = image.digest() {
        rebuilt += &format!("@{d}");
    }
    assert_eq!(rebuilt, canonical);
    assert!(image.tag().is_some() || image.digest().is_some());
    assert!(image.repository() == image.path().rsplit('/').next().unwrap());

    // Other spellings of the same reference.
    let rest = &canonical[image.name().len()..];
    let mut spellings = vec![format!("{}{rest}", image.name().to_ascii_uppercase())];
    if image.registry() == DOCKER_HUB {
        spellings.push(format!("index.docker.io/{}{rest}", image.path()));
        spellings.push(format!("Registry-1.Docker.IO/{}{rest}", image.path()));
        let first = image.path().split('/').next().unwrap();
        if !first.contains(['.', ':']) && first != "localhost" {
            spellings.push(format!("{}{rest}", image.path()));
            if let Some(short) = image.path().strip_prefix("library/")
                && !short.contains('/')
            {
                spellings.push(format!("{short}{rest}"));
            }
        }
    }
    if image.tag() == Some("latest") && image.digest().is_none() {
        spellings.push(image.name().to_owned());
    }
    for s in &spellings {
        let other = ImageRef::parse(s).unwrap_or_else(|e| panic!("{s:?} ({input:?}): {e}"));
        assert_eq!(other.canonical(), canonical, "{s:?} vs {input:?}");
    }

    // Patterns.
    for kind in [ListKind::Allow, ListKind::Deny] {
        let exact = ImagePattern::new(canonical, kind).expect("canonical form is a pattern");
        assert!(
            exact.matches(&image),
            "{canonical} does not match itself ({kind:?})"
        );
    }
    let repo = ImagePattern::new(&format!("{}:*", image.repository()), ListKind::Deny)
        .expect("repository pattern");
    assert!(
        repo.matches(&image),
        "{input:?} escaped {:?}",
        repo.as_str()
    );
    if image.repository() == "docker" || image.repository() == "dind" {
        let deny = [
            ImagePattern::new("docker:*", ListKind::Deny).unwrap(),
            ImagePattern::new("dind:*", ListKind::Deny).unwrap(),
        ];
        assert!(
            deny.iter().any(|p| p.matches(&image)),
            "{input:?} escaped the deny list"
        );
    }
});
