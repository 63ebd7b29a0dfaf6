//! The CLI's manners, through the real binary: a closed pipe, shell completion of VM
//! names in bash, zsh and fish, the man pages `setup --user` installs, `wait --timeout`,
//! local times for people and UTC for programs, the snapshot spinner on a terminal.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::{Bus, stderr, stdout, tiny_vm_yaml};

/// Runs maqet with a stdout whose reader is already gone: every write fails with EPIPE.
fn into_closed_pipe(bus: &Bus, args: &[&str]) -> std::process::Output {
    let (read, write) = std::io::pipe().unwrap();
    drop(read);
    bus.maqet_command(args)
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_into_a_closed_pipe_ends_quietly() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    for name in ["one", "two", "three"] {
        bus.add(&conn, "", &tiny_vm_yaml(name)).await;
    }
    // A QEMU log and some history for `logs`.
    let out = bus.maqet(&["start", "one"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bus.maqet(&["stop", "--force", "one"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for args in [
        &["ls"][..],
        &["--json", "ls"],
        &["logs", "one"],
        &["--json", "logs", "one"],
        &["audit"],
        &["status", "one"],
        &["manpage"],
        &["completions", "bash"],
    ] {
        let out = into_closed_pipe(&bus, args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "maqet {args:?}: {}",
            stderr(&out)
        );
        assert!(
            out.stderr.is_empty(),
            "maqet {args:?} said: {}",
            stderr(&out)
        );
    }
    // The way people meet it: a pipeline whose reader leaves after one line.
    let envs: Vec<(String, String)> = env_of(&bus);
    for pipeline in ["maqet ls | head -1", "maqet logs one | head -1"] {
        let out = Command::new("bash")
            .args(["-o", "pipefail", "-c", pipeline])
            .envs(envs.iter().cloned())
            .env("PATH", path_with_maqet())
            .output()
            .unwrap();
        assert!(out.status.success(), "{pipeline}: {}", stderr(&out));
        assert_eq!(stdout(&out).lines().count(), 1, "{pipeline}");
        assert!(out.stderr.is_empty(), "{pipeline}: {}", stderr(&out));
    }
}

/// The environment `maqet` gets against this bus, for a shell that runs it.
fn env_of(bus: &Bus) -> Vec<(String, String)> {
    bus.maqet_command(&[])
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_str()?.to_string(), v?.to_str()?.to_string())))
        .collect()
}

fn path_with_maqet() -> String {
    let dir = Path::new(common::maqet_bin()).parent().unwrap();
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The completions a shell offers for `line` (the word under the cursor last).
fn complete(bus: &Bus, shell: &str, line: &[&str]) -> Vec<String> {
    let script = bus.root().join(format!("completion.{shell}"));
    let out = bus.maqet(&["completions", shell]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(&script, &out.stdout).unwrap();
    let script = script.display();
    let words = line.join(" ");
    let (program, code) = match shell {
        "bash" => (
            "bash",
            format!(
                "source {script}; COMP_WORDS=({words}); COMP_CWORD={}; COMP_TYPE=9; \
                 _clap_complete_maqet maqet '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                line.len() - 1,
                line[line.len() - 1],
                line[line.len() - 2]
            ),
        ),
        // zsh's completion system needs a terminal; stand in for its two builtins the
        // script calls and print what it would offer.
        "zsh" => (
            "zsh",
            format!(
                "compdef() {{ :; }}; _describe() {{ print -l -- \"${{(@P)3}}\"; }}; \
                 source {script}; words=({words}); CURRENT={}; _clap_dynamic_completer_maqet",
                line.len()
            ),
        ),
        _ => ("fish", format!("source {script}; complete -C '{words}'")),
    };
    let mut cmd = Command::new(program);
    if shell == "fish" {
        cmd.arg("--no-config");
    } else if shell == "zsh" {
        cmd.arg("-f");
    }
    let out = cmd
        .args(["-c", &code])
        .envs(env_of(bus))
        .env("PATH", path_with_maqet())
        .output()
        .unwrap();
    assert!(out.status.success(), "{shell}: {}", stderr(&out));
    stdout(&out)
        .lines()
        // zsh and fish carry a description after ':' or a tab.
        .map(|l| l.split(['\t', ':']).next().unwrap().trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_offers_vm_names_in_bash_zsh_and_fish() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    for name in ["alpha-one", "alpha-two", "beta"] {
        bus.add(&conn, "", &tiny_vm_yaml(name)).await;
    }
    let mut shells = vec!["bash"];
    for (shell, package) in [("zsh", "zsh"), ("fish", "fish")] {
        if common::require(common::program(shell, package)).is_some() {
            shells.push(shell);
        }
    }
    for shell in shells {
        let got: BTreeSet<String> = complete(&bus, shell, &["maqet", "start", "al"])
            .into_iter()
            .collect();
        let want: BTreeSet<String> = ["alpha-one", "alpha-two"].map(String::from).into();
        assert_eq!(got, want, "{shell}");
        let got = complete(&bus, shell, &["maqet", "snapshot", "ls", "b"]);
        assert_eq!(got, ["beta"], "{shell}: nested commands too");
        let got = complete(&bus, shell, &["maqet", "sta"]);
        assert!(
            got.contains(&"start".to_string()) && got.contains(&"status".to_string()),
            "{shell}: {got:?}"
        );
    }
    // Without a reachable maqetd a Tab completes no VM, at once, and commands still.
    let engine = |words: &[&str]| {
        let out = bus
            .maqet_command(&[&["--", "maqet"][..], words].concat())
            .env("MAQET_COMPLETE", "fish")
            .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(engine(&["start", "al"]), "");
    assert!(engine(&["sta"]).contains("status"));
}

/// Every `name(1)` a page refers to.
fn references(page: &str) -> BTreeSet<String> {
    let text = page.replace("\\-", "-");
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("(1)") {
        let name: String = text[..i]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if name.starts_with("maqet") {
            out.insert(name);
        }
    }
    out
}

#[test]
fn setup_installs_completions_and_every_man_page_a_page_refers_to() {
    let bus = Bus::start_unactivated();
    let out = bus.maqet(&["setup", "--user"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let root = bus.root();
    let maqet = common::maqet_bin();
    for file in [
        "data/bash-completion/completions/maqet",
        "data/zsh/site-functions/_maqet",
        "config/fish/completions/maqet.fish",
    ] {
        let script = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        assert!(
            script.contains(maqet) && script.contains("MAQET_COMPLETE"),
            "{file}"
        );
    }
    let man1 = root.join("data/man/man1");
    let pages: BTreeSet<String> = std::fs::read_dir(&man1)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for p in [
        "maqet.1",
        "maqet-start.1",
        "maqet-snapshot.1",
        "maqet-snapshot-create.1",
    ] {
        assert!(pages.contains(p), "{p} missing: {pages:?}");
    }
    assert!(!pages.contains("maqet-help.1"));
    let mut referenced = BTreeSet::new();
    for p in &pages {
        referenced.extend(references(&std::fs::read_to_string(man1.join(p)).unwrap()));
    }
    // What `maqet manpage` prints refers to the same pages.
    referenced.extend(references(&stdout(&bus.maqet(&["manpage"]))));
    assert!(referenced.len() > 20, "{referenced:?}");
    for r in &referenced {
        assert!(
            pages.contains(&format!("{r}.1")),
            "{r}(1) is referred to but not installed"
        );
    }
    let out = bus.maqet(&["setup", "--user", "--uninstall"]);
    assert!(out.status.success());
    assert_eq!(std::fs::read_dir(&man1).unwrap().count(), 0);
    assert!(!root.join("data/bash-completion/completions/maqet").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_timeout_waits_the_whole_time() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    bus.add(&conn, "", &tiny_vm_yaml("idle")).await;
    let began = Instant::now();
    let out = bus.maqet(&["wait", "idle", "status=running", "--timeout", "2"]);
    let waited = began.elapsed();
    assert_eq!(out.status.code(), Some(9), "{}", stderr(&out));
    assert!(stderr(&out).contains("within 2 s"), "{}", stderr(&out));
    // A lower bound, not a speed: it must not give up before the time it was given.
    assert!(waited.as_secs_f64() >= 2.0, "gave up after {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_see_local_times_programs_get_utc() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    bus.add(&conn, "", &tiny_vm_yaml("clocky")).await;
    let json = bus.maqet(&["--json", "status", "clocky"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let created = v["created_at"].as_u64().unwrap_or_else(|| panic!("{v}"));
    // Five hours east of UTC, by a POSIX rule (no time zone database needed).
    let utc_plus_5 = maqet::time::format_us(created + 5 * 3_600_000_000);
    let want = format!("{} XYZ", utc_plus_5.trim_end_matches('Z').replace('T', " "));
    let human = bus
        .maqet_command(&["status", "clocky"])
        .env("TZ", "XYZ-5")
        .output()
        .unwrap();
    assert!(
        stdout(&human).contains(&want),
        "want {want} in {}",
        stdout(&human)
    );
    let logs = bus
        .maqet_command(&["logs", "clocky"])
        .env("TZ", "XYZ-5")
        .output()
        .unwrap();
    assert!(stdout(&logs).contains(" XYZ clocky"), "{}", stdout(&logs));
    let out = bus
        .maqet_command(&["--json", "logs", "clocky"])
        .env("TZ", "XYZ-5")
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains("Z\""),
        "JSON stays UTC: {}",
        stdout(&out)
    );
    assert!(!stdout(&out).contains("XYZ"), "{}", stdout(&out));
}

/// Runs maqet on a pseudo-terminal (util-linux `script`), as a person at a terminal
/// does: what it draws there (progress bars, spinners) comes back as raw output.
fn on_a_terminal(bus: &Bus, args: &[&str]) -> (std::process::ExitStatus, String) {
    let command = std::iter::once(common::maqet_bin())
        .chain(args.iter().copied())
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &command, "/dev/null"])
        .env("TERM", "xterm-256color")
        .stdin(Stdio::null());
    for (k, v) in env_of(bus) {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run script (util-linux)");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// indicatif's default spinner.
const SPINNER_FRAMES: &str = "⠁⠂⠄⡀⢀⠠⠐⠈";

/// Terminal output without its control sequences (`ESC [ … letter`).
fn strip_ansi(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A snapshot whose job reports no progress (the disks of a stopped VM) shows a
/// spinner with the elapsed time on a terminal, never a bar stuck at 0 %, and clears it
/// for the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_without_progress_spins_with_the_elapsed_time() {
    // util-linux's `script` (Debian: bsdutils, an essential package).
    let Some(_) = common::require::require(common::require::program("script", "bsdutils")) else {
        return;
    };
    let bus = Bus::start();
    let conn = bus.conn().await;
    let disk = bus.root().join("spin.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "1M"])
        .status()
        .unwrap();
    assert!(made.success());
    let yaml = format!(
        "{}storage:\n  - {{type: qcow2, file: '{}'}}\n",
        tiny_vm_yaml("spin"),
        disk.display()
    );
    bus.add(&conn, "", &yaml).await;

    let (status, screen) = on_a_terminal(&bus, &["snapshot", "create", "spin", "base"]);
    assert!(status.success(), "{screen}");
    // indicatif's default spinner frames, then the elapsed time ("0s").
    let spinner = strip_ansi(&screen).split(['\r', '\n']).any(|line| {
        let mut words = line.split_whitespace();
        let frame = words.next().unwrap_or_default();
        let elapsed = words.next().unwrap_or_default();
        frame.chars().count() == 1
            && SPINNER_FRAMES.contains(frame)
            && elapsed
                .strip_suffix('s')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    });
    assert!(
        spinner,
        "no spinner with the elapsed time on the terminal:\n{screen:?}"
    );
    assert!(
        !screen.contains('%'),
        "a progress bar was drawn: {screen:?}"
    );
    assert!(!screen.contains('█') && !screen.contains('░'), "{screen:?}");
    assert!(
        screen.contains("spin: "),
        "the outcome is printed: {screen:?}"
    );

    // --no-progress draws nothing.
    let (status, screen) = on_a_terminal(
        &bus,
        &["snapshot", "create", "spin", "quiet", "--no-progress"],
    );
    assert!(status.success(), "{screen}");
    assert!(
        !screen.chars().any(|c| SPINNER_FRAMES.contains(c)),
        "{screen:?}"
    );
}
