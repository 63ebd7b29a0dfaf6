//! Scale of work: 50 VMs started at once by 50 clients (one bus connection each) against
//! 50 bare QEMUs spawned at once, and each Start call against one Start alone.

use std::time::{Duration, Instant};

use maqet::client::VmProxy;

use crate::bare::{self, BareQemu};
use crate::report::{Samples, Unit};
use crate::sections::{Bench, ratio};
use crate::session::{Context, Res, Session, Watch, act_until};

const N: usize = 50;

pub async fn parallel(b: &mut Bench<'_>) -> Res<()> {
    let s = Session::new(b.run).await?;
    let mut paths = Vec::new();
    for i in 0..N {
        let vm = s.add_tiny(&format!("p{i:02}")).await?;
        paths.push(vm.inner().path().to_owned());
    }
    // One client per VM, each with its own connection to the bus.
    let mut clients: Vec<(VmProxy<'static>, Watch)> = Vec::new();
    let mut conns = Vec::new();
    for p in &paths {
        let conn = s.bus.conn().await.ctx("client connection")?;
        let vm = maqet::client::vm_proxy(&conn, p.clone().into())
            .await
            .ctx("VM proxy")?;
        let w = Watch::new(&vm).await?;
        clients.push((vm, w));
        conns.push(conn);
    }
    let mut single = Samples::default();
    for i in 0..=b.opts.runs.min(5) {
        let (vm, w) = &mut clients[0];
        let t = Instant::now();
        vm.start().await.ctx("Start")?;
        let d = t.elapsed();
        w.until("running").await?;
        act_until(w, "stopped", vm.stop(true, 0)).await?;
        if i > 0 {
            single.push(d);
        }
    }
    let (binary, args) = bare::command_line(&uuid::Uuid::new_v4().to_string(), "bare")?;
    let rounds = if b.opts.quick { 1 } else { 3 };
    let (mut maqet_all, mut bare_all, mut slowest) =
        (Samples::default(), Samples::default(), Samples::default());
    for round in 0..rounds {
        for side in [round % 2, (round + 1) % 2] {
            if side == 0 {
                bare_all.push(bare_at_once(&binary, &args, &s)?);
                continue;
            }
            let t0 = Instant::now();
            let calls = futures_util::future::join_all(clients.iter_mut().map(|(vm, w)| async {
                let t = Instant::now();
                vm.start().await.ctx("Start")?;
                let call = t.elapsed();
                w.until("running").await?;
                Ok::<_, String>(call)
            }))
            .await;
            let total = t0.elapsed();
            let calls = calls.into_iter().collect::<Res<Vec<Duration>>>()?;
            maqet_all.push(total);
            slowest.push(calls.into_iter().max().unwrap_or_default());
            let stops = futures_util::future::join_all(
                clients
                    .iter_mut()
                    .map(|(vm, w)| act_until(w, "stopped", vm.stop(true, 0))),
            )
            .await;
            stops.into_iter().collect::<Res<Vec<_>>>()?;
        }
    }
    let r = &mut b.report;
    r.add(
        "parallel",
        "single_start",
        "maqet: one Start call, alone (median)",
        single.median(),
        Unit::Us,
        single.len(),
    );
    r.add(
        "parallel",
        "par50_bare",
        "floor: 50 bare QEMUs spawned at once → all QMP ready (median)",
        bare_all.median(),
        Unit::Us,
        bare_all.len(),
    );
    r.add(
        "parallel",
        "par50_maqet",
        "maqet: 50 clients Start at once → all running (median)",
        maqet_all.median(),
        Unit::Us,
        maqet_all.len(),
    );
    r.add(
        "parallel",
        "par50_ratio",
        "maqet 50 at once / bare 50 at once",
        ratio(maqet_all.median(), bare_all.median()),
        Unit::Ratio,
        0,
    );
    r.add(
        "parallel",
        "par50_slowest",
        "maqet: slowest of the 50 Start calls (median over rounds)",
        slowest.median(),
        Unit::Us,
        slowest.len(),
    );
    drop(conns);
    Ok(())
}

/// 50 bare QEMUs spawned by 50 threads at once; the time until the last is QMP-ready.
fn bare_at_once(binary: &std::path::Path, args: &[String], s: &Session) -> Res<Duration> {
    let barrier = std::sync::Barrier::new(N + 1);
    let dir = s.bus.dir();
    let marker = s.bus.marker();
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let barrier = &barrier;
                sc.spawn(move || {
                    barrier.wait();
                    BareQemu::spawn_ready(binary, args, &dir.join(format!("p{i}.sock")), marker)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut up = Vec::new();
        for h in handles {
            up.push(
                h.join()
                    .map_err(|_| "a spawning thread panicked")?
                    .ctx("bare QEMU")?,
            );
        }
        let total = t0.elapsed();
        for (q, _) in up {
            q.quit().ctx("bare QEMU quit")?;
        }
        Ok(total)
    })
}
