//! VMs outlive maqetd: killed, the service is re-activated by the next call and takes
//! its VMs back; a VM that died meanwhile is reported honestly.

mod common;

use common::{Bus, StatusWatch, tiny_vm_yaml};
use futures_util::StreamExt;

fn kill(pid: u32) {
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Waits until `pid` is gone (its pidfd becomes readable), with a bound.
async fn gone(pid: u32) {
    use rustix::process::{Pid, PidfdFlags, pidfd_open};
    let Ok(fd) = pidfd_open(Pid::from_raw(pid as i32).unwrap(), PidfdFlags::NONBLOCK) else {
        return;
    };
    let afd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .unwrap();
    tokio::time::timeout(common::TIMEOUT, afd.readable())
        .await
        .expect("process did not exit")
        .unwrap()
        .retain_ready();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_survive_a_killed_maqetd_and_are_readopted() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let a = bus.add(&conn, "", &tiny_vm_yaml("alpha")).await;
    let b = bus.add(&conn, "", &tiny_vm_yaml("beta")).await;
    a.start().await.unwrap();
    b.start().await.unwrap();
    let (pa, pb) = (a.pid().await.unwrap(), b.pid().await.unwrap());

    let daemons = bus.marked_processes("maqetd");
    assert_eq!(daemons.len(), 1);
    let manager = bus.manager(&conn).await;
    let mut owner_changes = zbus::fdo::DBusProxy::new(&conn)
        .await
        .unwrap()
        .receive_name_owner_changed_with_args(&[(0, "org.maqet.Maqet1")])
        .await
        .unwrap();
    kill(daemons[0]);
    gone(daemons[0]).await;
    // The bus saw the name go: the service is really down now.
    tokio::time::timeout(common::TIMEOUT, owner_changes.next())
        .await
        .unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pa}")).exists());
    assert!(std::path::Path::new(&format!("/proc/{pb}")).exists());
    // While maqetd is down, beta's QEMU dies.
    kill(pb);
    gone(pb).await;

    // The next call activates a new maqetd, which re-adopts alpha and buries beta.
    let list = manager.list_vms().await.unwrap();
    let status = |n: &str| list.iter().find(|v| v.1 == n).unwrap().3.clone();
    assert_eq!(status("alpha"), "running");
    assert_eq!(status("beta"), "crashed");
    assert_ne!(bus.marked_processes("maqetd"), daemons);
    assert_eq!(a.pid().await.unwrap(), pa, "same QEMU, not a new one");
    let reason = b.status_reason().await.unwrap();
    assert!(reason.contains("while maqetd was not running"), "{reason}");
    assert_eq!(b.pid().await.unwrap(), 0);

    // The re-adopted VM is fully managed: QMP works and stop works.
    let mut watch = StatusWatch::new(&a).await;
    a.pause().await.unwrap();
    watch.until("paused").await;
    a.resume().await.unwrap();
    a.stop(true, 0).await.unwrap();
    watch.until("stopped").await;
    gone(pa).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_manager_lists_and_announces_vms() {
    let bus = Bus::start();
    let conn = bus.conn().await;
    let om = zbus::fdo::ObjectManagerProxy::builder(&conn)
        .destination("org.maqet.Maqet1")
        .path("/org/maqet/Maqet1")
        .build()
        .await
        .unwrap();
    assert!(om.get_managed_objects().await.unwrap().is_empty());
    let mut added = om.receive_interfaces_added().await.unwrap();
    let mut removed = om.receive_interfaces_removed().await.unwrap();
    let vm = bus.add(&conn, "", &tiny_vm_yaml("om")).await;
    let sig = tokio::time::timeout(common::TIMEOUT, added.next())
        .await
        .unwrap()
        .unwrap();
    let args = sig.args().unwrap();
    assert_eq!(args.object_path().as_str(), vm.inner().path().as_str());
    let props = &args.interfaces_and_properties()["org.maqet.Maqet1.VM"];
    assert_eq!(
        String::try_from(props["Name"].try_clone().unwrap()).unwrap(),
        "om"
    );
    let objects = om.get_managed_objects().await.unwrap();
    let vm_props = &objects[vm.inner().path()]["org.maqet.Maqet1.VM"];
    assert_eq!(
        String::try_from(vm_props["Status"].try_clone().unwrap()).unwrap(),
        "created"
    );
    bus.manager(&conn)
        .await
        .remove_vm("om", false, false)
        .await
        .unwrap();
    let sig = tokio::time::timeout(common::TIMEOUT, removed.next())
        .await
        .unwrap()
        .unwrap();
    let args = sig.args().unwrap();
    assert!(
        args.interfaces()
            .iter()
            .any(|i| i.as_str() == "org.maqet.Maqet1.VM")
    );
    assert!(om.get_managed_objects().await.unwrap().is_empty());
}
