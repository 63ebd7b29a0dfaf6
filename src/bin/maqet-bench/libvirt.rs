//! libvirt's session daemon with an equivalent tiny domain, side by side, when
//! installed: `virsh start` and `virsh destroy` as a user runs them (whole command).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::bare::accel;
use crate::report::{Samples, Unit};
use crate::sections::Bench;
use crate::session::{Context, Res};

const DOMAIN: &str = "maqet-bench";

pub async fn libvirt(b: &mut Bench<'_>) -> Res<()> {
    if which("virsh").is_none() {
        b.report.notes.push(
            "libvirt: virsh is not installed; skipped (apt-get install libvirt-daemon libvirt-clients libvirt-daemon-driver-qemu)".into(),
        );
        return Ok(());
    }
    let dir = b.run.root().join("libvirt");
    for d in ["run", "config", "cache", "data", "home"] {
        std::fs::create_dir_all(dir.join(d)).ctx("libvirt dirs")?;
    }
    let marker = format!("{}/libvirt", b.run.marker());
    let virsh = |args: &[&str]| -> Res<(Duration, Output)> {
        let mut cmd = Command::new("virsh");
        cmd.args(["-c", "qemu:///session"])
            .args(args)
            .stdin(Stdio::null())
            // The session daemon virsh autostarts inherits these: its state stays in
            // the run's temp dir, and clean-up finds it by the marker.
            .env(crate::fixture::MARKER_VAR, &marker)
            .env("XDG_RUNTIME_DIR", dir.join("run"))
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .env("XDG_DATA_HOME", dir.join("data"))
            .env("HOME", dir.join("home"));
        let t0 = Instant::now();
        let out = cmd.output().ctx("virsh")?;
        Ok((t0.elapsed(), out))
    };
    let xml = dir.join("domain.xml");
    let domain_type = if accel() == "kvm" { "kvm" } else { "qemu" };
    std::fs::write(&xml, domain_xml(domain_type)).ctx("domain XML")?;
    let (_, out) = virsh(&["define", &xml.to_string_lossy()])?;
    if !out.status.success() {
        b.report.notes.push(format!(
            "libvirt: cannot use qemu:///session here ({}); skipped. (For root, libvirt maps qemu:///session to the privileged daemon's socket; without a running libvirtd there is nothing to compare.)",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        return Ok(());
    }
    let (mut start, mut destroy) = (Samples::default(), Samples::default());
    for i in 0..=b.opts.runs.min(5) {
        let (d, out) = virsh(&["start", DOMAIN])?;
        if !out.status.success() {
            b.report.notes.push(format!(
                "libvirt: virsh start failed ({}); skipped",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            let _ = virsh(&["undefine", DOMAIN]);
            return Ok(());
        }
        let (d2, _) = virsh(&["destroy", DOMAIN])?;
        if i > 0 {
            start.push(d);
            destroy.push(d2);
        }
    }
    let _ = virsh(&["undefine", DOMAIN]);
    let r = &mut b.report;
    r.add(
        "libvirt",
        "virsh_start",
        "libvirt: virsh -c qemu:///session start (median)",
        start.median(),
        Unit::Us,
        start.len(),
    );
    r.note_last("whole command, as a user runs it");
    r.add(
        "libvirt",
        "virsh_destroy",
        "libvirt: virsh destroy (median)",
        destroy.median(),
        Unit::Us,
        destroy.len(),
    );
    Ok(())
}

/// The tiny VM in libvirt's words: 64 MiB, one vCPU, no disk, no display, and none of
/// the devices libvirt adds by default that the tiny VM does not have.
fn domain_xml(domain_type: &str) -> String {
    let emulator =
        which("qemu-system-x86_64").unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into());
    format!(
        r#"<domain type='{domain_type}'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"#
    )
}

fn which(cmd: &str) -> Option<String> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(cmd))
        .find(|p| Path::new(p).is_file())
        .map(|p| p.to_string_lossy().into_owned())
}
