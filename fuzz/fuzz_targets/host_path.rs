//! Host path normalization: never panics, the result is absolute, has no
//! `.`/`..`/empty components, and normalizing is idempotent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vibebox_policy::path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = normalize(input) else {
        return;
    };
    assert!(p.starts_with('/'));
    assert!(p == "/" || !p.ends_with('/'));
    assert!(!p[1..].split('/').any(|c| c == "." || c == ".." || (c.is_empty() && p != "/")));
    assert_eq!(normalize(&p).as_deref(), Ok(p.as_str()), "idempotent");
});
