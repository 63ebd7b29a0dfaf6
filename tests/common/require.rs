//! The one rule for tests that need something this machine may lack (root, a second
//! user, polkitd, sshd, qemu-img…): without `MAQET_TEST_REQUIRE_ALL` such a test says
//! why and skips; with `MAQET_TEST_REQUIRE_ALL=1` (CI sets it) it fails, so no test
//! passes in CI by not running. Shared with the unit tests in `src/` (see `lib.rs`), so
//! this file uses only `std` and crates the library itself depends on.

/// The variable that turns a skip into a failure.
pub const REQUIRE_ALL: &str = "MAQET_TEST_REQUIRE_ALL";

/// `Ok(v)`: the test runs with `v`. `Err(why)`: `why` says what is missing and how to
/// install it; the test is skipped (`None`, after saying so on stderr), or, with
/// `MAQET_TEST_REQUIRE_ALL` set to anything but empty or `0`, fails right here.
///
/// `let Some(user) = require(test_user()) else { return };`
#[track_caller]
pub fn require<T>(found: Result<T, String>) -> Option<T> {
    decide(found, require_all())
}

#[track_caller]
pub(crate) fn decide<T>(found: Result<T, String>, require_all: bool) -> Option<T> {
    match found {
        Ok(v) => Some(v),
        Err(why) if require_all => panic!(
            "{why}\n{REQUIRE_ALL} is set, so a test that cannot run fails instead of \
             skipping; scripts/setup-deps (as root, with {REQUIRE_ALL}=1) installs what \
             the tests need"
        ),
        Err(why) => {
            eprintln!("SKIPPED ({REQUIRE_ALL}=1 would make this a failure): {why}");
            None
        }
    }
}

/// Whether a missing prerequisite fails the test.
pub fn require_all() -> bool {
    std::env::var(REQUIRE_ALL).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `Ok(())` when the test runs as root, else why not.
pub fn root(for_what: &str) -> Result<(), String> {
    if rustix::process::geteuid().is_root() {
        Ok(())
    } else {
        Err(format!("{for_what} needs root; run the tests as root"))
    }
}

/// The path of an installed program, else why not and which Debian package has it.
pub fn program(name: &str, package: &str) -> Result<std::path::PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/lib/polkit-1"].map(Into::into))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            format!(
                "{name} is not installed (Debian: apt-get install {package}, or scripts/setup-deps)"
            )
        })
}

/// [`program`] for each `(name, package)`: `Ok` when all are installed, else why the first
/// missing one is not.
pub fn programs(wanted: &[(&str, &str)]) -> Result<(), String> {
    wanted
        .iter()
        .try_for_each(|(name, package)| program(name, package).map(drop))
}

fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
