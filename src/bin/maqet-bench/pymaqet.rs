//! The Python maqet 0.0.15 (the tool maqet replaces), from the venv
//! `scripts/setup-deps --bench` makes, with its state in the run's directory.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::bare::accel;
use crate::fixture::MARKER_VAR;
use crate::sections::Bench;
use crate::session::{Context, Res};
use crate::targets::PYTHON_MAQET;

pub struct PyMaqet {
    exe: PathBuf,
    dir: PathBuf,
    marker: String,
}

impl PyMaqet {
    /// The venv's `maqet`, or `None` (recorded as "peer missing") when it is not there or
    /// does not run. `MAQET_BENCH_PYTHON_MAQET` names another executable.
    pub fn find(b: &mut Bench<'_>) -> Option<PyMaqet> {
        let exe = std::env::var_os("MAQET_BENCH_PYTHON_MAQET")
            .map(PathBuf::from)
            .or_else(|| {
                let target = b.run.maqet_cli().parent()?.parent()?.to_path_buf();
                Some(target.join("bench-venv/bin/maqet"))
            })?;
        if !exe.is_file() {
            b.report.peer_missing(
                PYTHON_MAQET,
                format!(
                    "no {} (scripts/setup-deps --bench makes the venv; it needs Python ≥ 3.12)",
                    exe.display()
                ),
            );
            return None;
        }
        let dir = b.run.root().join("py");
        for d in ["config", "data", "run", "home"] {
            if let Err(e) = std::fs::create_dir_all(dir.join(d)) {
                b.report
                    .peer_missing(PYTHON_MAQET, format!("its directories: {e}"));
                return None;
            }
        }
        let py = PyMaqet {
            exe,
            dir,
            marker: format!("{}/py", b.run.marker()),
        };
        match py.cmd(&["--help"]).stdout(Stdio::null()).output() {
            Ok(o) if o.status.success() => Some(py),
            Ok(o) => {
                b.report.peer_missing(
                    PYTHON_MAQET,
                    format!(
                        "{} --help fails: {}",
                        py.exe.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                );
                None
            }
            Err(e) => {
                b.report
                    .peer_missing(PYTHON_MAQET, format!("{}: {e}", py.exe.display()));
                None
            }
        }
    }

    /// `maqet ARGS` with its directories in the run's, not the user's.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.exe);
        let (sub, rest) = args
            .split_first()
            .map_or(("--help", &[][..]), |(s, r)| (*s, r));
        cmd.arg(sub);
        if sub != "--help" {
            cmd.arg("--maqet-config-dir")
                .arg(self.dir.join("config"))
                .arg("--maqet-data-dir")
                .arg(self.dir.join("data"))
                .arg("--maqet-runtime-dir")
                .arg(self.dir.join("run"));
        }
        cmd.args(rest)
            .stdin(Stdio::null())
            .env(MARKER_VAR, &self.marker)
            .env("XDG_RUNTIME_DIR", self.dir.join("run"))
            .env("XDG_CONFIG_HOME", self.dir.join("config"))
            .env("XDG_DATA_HOME", self.dir.join("data"))
            .env("HOME", self.dir.join("home"));
        cmd
    }

    /// Runs `cmd` to its exit; the wall time. Its output goes to a file: 0.0.15's `start`
    /// fails when its stdout is /dev/null, and its runner keeps a pipe open for good.
    pub fn timed(&self, mut cmd: Command, what: &str) -> Res<std::time::Duration> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("output.log"))
            .ctx("Python maqet's log")?;
        cmd.stdout(log.try_clone().ctx("log")?).stderr(log);
        crate::cli::timed_as_is(cmd, what).map_err(|e| {
            let log = std::fs::read_to_string(self.dir.join("output.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            format!(
                "{e}{}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            )
        })
    }

    /// Defines the tiny VM (64 MiB, no defaults, no display) as `name`.
    pub fn add_tiny(&self, name: &str) -> Res<()> {
        let qemu = crate::libvirt::which("qemu-system-x86_64")
            .unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into());
        let file = self.dir.join(format!("{name}.yaml"));
        std::fs::write(
            &file,
            format!(
                "binary: {qemu}\nmemory: 64M\narguments:\n  - nodefaults: null\n  - accel: {}\n  - display: none\n",
                accel()
            ),
        )
        .ctx("Python maqet config")?;
        let out = self
            .cmd(&[
                "add",
                "--vm-config",
                &file.to_string_lossy(),
                "--name",
                name,
            ])
            .output()
            .ctx("Python maqet add")?;
        if !out.status.success() {
            return Err(format!(
                "Python maqet add: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }
}

impl Drop for PyMaqet {
    fn drop(&mut self) {
        // Its per-VM runner processes and their QEMUs carry the marker.
        crate::fixture::kill_marked(|m| m == self.marker);
    }
}
