//! Unit tests of `require.rs`, run once, with the library's unit tests (see `lib.rs`).

use crate::require::*;

#[test]
fn found_runs_missing_skips_or_fails() {
    assert_eq!(decide(Ok(7), true), Some(7));
    assert_eq!(decide(Ok(7), false), Some(7));
    assert_eq!(decide::<u8>(Err("no sshd".into()), false), None);
    let failed = std::panic::catch_unwind(|| decide::<u8>(Err("no sshd".into()), true));
    let msg = failed.expect_err("must fail with REQUIRE_ALL");
    let msg = msg.downcast_ref::<String>().unwrap();
    assert!(msg.starts_with("no sshd\n"), "{msg}");
    assert!(msg.contains("scripts/setup-deps"), "{msg}");
}

#[test]
fn programs_are_found_with_their_package_named_when_not() {
    assert!(program("sh", "dash").is_ok());
    let e = program("no-such-program-maqet", "some-package").unwrap_err();
    assert!(e.contains("apt-get install some-package"), "{e}");
}
