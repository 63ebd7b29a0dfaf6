//! `display: spice | vnc`: a display server maqetd gives QEMU itself (on a unix socket
//! in the VM's 0700 runtime directory, `vm::display`), instead of the `-display` option
//! the key otherwise stands for. Any other value (`gtk`, `sdl`, `none`, `vnc=:1`, …)
//! stays `-display <value>`, so existing configs keep their command line.

use super::validate::Cx;
use super::yaml::Loc;

/// The display server maqet provides for `display: spice` / `display: vnc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisplayServer {
    Spice,
    Vnc,
}

impl DisplayServer {
    pub fn parse(text: &str) -> Option<DisplayServer> {
        match text {
            "spice" => Some(DisplayServer::Spice),
            "vnc" => Some(DisplayServer::Vnc),
            _ => None,
        }
    }

    /// The config value, and the protocol name QMP's `add_client` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            DisplayServer::Spice => "spice",
            DisplayServer::Vnc => "vnc",
        }
    }

    /// The QEMU option that would start a second server of the same kind.
    fn option(self) -> &'static str {
        match self {
            DisplayServer::Spice => "spice",
            DisplayServer::Vnc => "vnc",
        }
    }
}

/// `-device` drivers that give the guest a screen.
const GRAPHICS_DEVICES: &[&str] = &[
    "VGA",
    "ati-vga",
    "bochs-display",
    "cirrus-vga",
    "isa-cirrus-vga",
    "isa-vga",
    "qxl",
    "qxl-vga",
    "ramfb",
    "secondary-vga",
    "virtio-gpu",
    "virtio-gpu-device",
    "virtio-gpu-gl-pci",
    "virtio-gpu-pci",
    "virtio-vga",
    "virtio-vga-gl",
    "vmware-svga",
];

/// Whether the arguments choose the guest's graphics themselves: any `-vga` (even
/// `none`: the user decided) or a graphics `-device`.
pub(crate) fn has_graphics_device(argv: &[String]) -> bool {
    let mut prev = "";
    for word in argv {
        let option = prev.trim_start_matches('-');
        if option == "vga" {
            return true;
        }
        if option == "device" {
            let driver = word.split(',').next().unwrap_or_default();
            let driver = driver.strip_prefix("driver=").unwrap_or(driver);
            if GRAPHICS_DEVICES.contains(&driver) {
                return true;
            }
        }
        prev = word;
    }
    false
}

/// A config that asks for maqet's server and starts one of its own as well would get
/// two: refused, naming both.
pub(crate) fn check_no_second_server(
    server: DisplayServer,
    argv: &[String],
    loc: &Loc,
    cx: &mut Cx,
) {
    let own = server.option();
    if argv
        .iter()
        .any(|w| w.trim_start_matches('-') == own && w.starts_with('-'))
    {
        let message = format!(
            "`display: {}` gives the VM maqet's own {} server, and the arguments start another one with `-{own}`",
            server.as_str(),
            own.to_uppercase()
        );
        let hint = format!(
            "remove `-{own}` (maqet's server needs no port or password: `maqet view` connects to it), or set `display:` to something else"
        );
        cx.diags.error_hint(loc, message, hint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn graphics_devices_are_recognised() {
        assert!(!has_graphics_device(&words(&["-m", "64", "-nodefaults"])));
        assert!(has_graphics_device(&words(&["-vga", "none"])));
        assert!(has_graphics_device(&words(&["--vga", "qxl"])));
        assert!(has_graphics_device(&words(&["-device", "virtio-vga,id=v"])));
        assert!(has_graphics_device(&words(&["-device", "driver=qxl-vga"])));
        assert!(!has_graphics_device(&words(&["-device", "virtio-rng-pci"])));
        // A value that merely looks like a device is not one.
        assert!(!has_graphics_device(&words(&["-name", "VGA"])));
    }

    #[test]
    fn only_the_two_server_values_are_servers() {
        assert_eq!(DisplayServer::parse("spice"), Some(DisplayServer::Spice));
        assert_eq!(DisplayServer::parse("vnc"), Some(DisplayServer::Vnc));
        for other in ["gtk", "sdl", "none", "vnc=:1", "spice-app", "SPICE"] {
            assert_eq!(DisplayServer::parse(other), None, "{other}");
        }
    }
}
