//! Host storage: which locations a VM may write, and (issue: storage) disk creation.

pub mod danger;
