//! The actions calls are checked against (`data/polkit-1/actions/org.maqet.policy`
//! declares the same ids).

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Reading state: list, find, properties, wait.
    Observe,
    /// Defining VMs: add, remove, apply.
    Manage,
    /// Start, stop, restart, reset, pause, resume.
    Lifecycle,
    /// Keys, text, screendump.
    Console,
    QmpExecute,
    QmpPrivileged,
    QmpDangerous,
    QmpMemoryDump,
    SnapshotCreate,
    SnapshotLoad,
    SnapshotDelete,
    /// Running commands in the guest through its agent (`Guest.Exec`).
    GuestExec,
    /// Reading and writing guest files through its agent.
    GuestFiles,
    /// Importing and removing images in the image store.
    Images,
}

impl Action {
    pub const ALL: [Action; 14] = [
        Action::Observe,
        Action::Manage,
        Action::Lifecycle,
        Action::Console,
        Action::QmpExecute,
        Action::QmpPrivileged,
        Action::QmpDangerous,
        Action::QmpMemoryDump,
        Action::SnapshotCreate,
        Action::SnapshotLoad,
        Action::SnapshotDelete,
        Action::GuestExec,
        Action::GuestFiles,
        Action::Images,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Action::Observe => "org.maqet.vm.observe",
            Action::Manage => "org.maqet.vm.manage",
            Action::Lifecycle => "org.maqet.vm.lifecycle",
            Action::Console => "org.maqet.vm.console",
            Action::QmpExecute => "org.maqet.qmp.execute",
            Action::QmpPrivileged => "org.maqet.qmp.privileged",
            Action::QmpDangerous => "org.maqet.qmp.dangerous",
            Action::QmpMemoryDump => "org.maqet.qmp.memory-dump",
            Action::SnapshotCreate => "org.maqet.snapshot.create",
            Action::SnapshotLoad => "org.maqet.snapshot.load",
            Action::SnapshotDelete => "org.maqet.snapshot.delete",
            Action::GuestExec => "org.maqet.guest.exec",
            Action::GuestFiles => "org.maqet.guest.files",
            Action::Images => "org.maqet.image.manage",
        }
    }

    pub fn from_id(id: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.id() == id)
    }

    /// Calls under this action change something and are always audited.
    pub fn is_mutating(self) -> bool {
        self != Action::Observe
    }
}
