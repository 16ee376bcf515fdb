//! Image reference canonicalization: never panics, the canonical form is a
//! fixed point, and a reference resolving to the `docker` repository is
//! always caught by the default deny list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vibebox_policy::image::{ImagePattern, ImageRef, ListKind};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(image) = ImageRef::parse(input) else {
        return;
    };
    let again = ImageRef::parse(image.canonical()).expect("canonical form parses");
    assert_eq!(again.canonical(), image.canonical(), "canonical form is a fixed point");
    assert!(image.canonical().starts_with(image.registry()));
    if image.repository() == "docker" || image.repository() == "dind" {
        let deny = [
            ImagePattern::new("docker:*", ListKind::Deny).unwrap(),
            ImagePattern::new("dind:*", ListKind::Deny).unwrap(),
        ];
        assert!(deny.iter().any(|p| p.matches(&image)), "{input:?} escaped the deny list");
    }
});
