//! The tiny boot-sector guest of `tests/fixtures/guest.S`: it announces itself with an
//! RTC change, then powers off on its own or when the ACPI power button is pressed.

use std::path::{Path, PathBuf};

/// `tests/fixtures/guest.S`, assembled.
const CODE: [u8; 48] = [
    0x31, 0xc0, 0x8e, 0xd8, 0xb0, 0x00, 0xe6, 0x70, 0xb0, 0x00, 0xe6, 0x71, 0xa0, 0xf0, 0x7d, 0x84,
    0xc0, 0x75, 0x12, 0xba, 0x02, 0x06, 0xb8, 0x00, 0x01, 0xef, 0xfb, 0xf4, 0xba, 0x00, 0x06, 0xed,
    0xa9, 0x00, 0x01, 0x74, 0xf6, 0xba, 0x04, 0x06, 0xb8, 0x00, 0x20, 0xef, 0xfa, 0xf4, 0xeb, 0xfd,
];

#[derive(Clone, Copy)]
pub enum Behaviour {
    /// Waits for the ACPI power button, then powers off.
    AcpiAware,
    /// Powers off as soon as it runs.
    PowerOffAtOnce,
}

/// Writes the guest's disk image into `dir` and returns its path.
pub fn write_image(dir: &Path, behaviour: Behaviour) -> PathBuf {
    let mut img = vec![0u8; 512];
    img[..CODE.len()].copy_from_slice(&CODE);
    img[0x1f0] = matches!(behaviour, Behaviour::PowerOffAtOnce) as u8;
    img[510] = 0x55;
    img[511] = 0xaa;
    let name = match behaviour {
        Behaviour::AcpiAware => "acpi-guest.img",
        Behaviour::PowerOffAtOnce => "poweroff-guest.img",
    };
    let path = dir.join(name);
    std::fs::write(&path, img).unwrap();
    path
}

/// A VM config booting the guest (i440fx: where the guest expects its ACPI registers).
pub fn vm_yaml(name: &str, image: &Path) -> String {
    format!(
        "name: {name}\nbinary: qemu-system-x86_64\ndisplay: none\nmemory: 64\narguments:\n  - nodefaults\n  - machine: pc\n  - accel: {}\n  - drive: {{file: {}, format: raw, if: ide}}\n",
        super::accel(),
        image.display()
    )
}
