//! Documentation in the introspection XML as D-Spy, D-Feet and `gdbus-codegen` read it:
//! `org.gtk.GDBus.DocString` (the whole text) and `org.gtk.GDBus.DocString.Short` (its
//! first sentence) annotations on interfaces, methods, properties and signals.
//!
//! zbus writes a member's Rust doc comment as an XML comment before the member; that
//! text is the one source, turned into annotations here. zbus does not document the
//! interface itself, so interface texts are in [`INTERFACE_DOCS`].

use std::fmt::Write;

pub const DOC: &str = "org.gtk.GDBus.DocString";
pub const DOC_SHORT: &str = "org.gtk.GDBus.DocString.Short";

/// What each interface maqet serves is for.
const INTERFACE_DOCS: &[(&str, &str)] = &[
    (
        "org.maqet.Maqet1.Manager",
        "maqet's VM manager: defines, finds and removes VMs; one object, /org/maqet/Maqet1. Every VM is an object below /org/maqet/Maqet1/vm/, named by its UUID; its Name property says which VM it is.",
    ),
    (
        "org.maqet.Maqet1.Images",
        "maqet's image store: imports disk images and ISOs (as jobs), lists them, removes those no VM uses. VM disks name a stored image with `from:`.",
    ),
    (
        "org.maqet.Maqet1.VM",
        "One VM: its name, status and config, and its lifecycle (Start, Stop, Restart, Pause, Resume). The object path is the VM's UUID and stays when the VM is renamed; the Name property is the name.",
    ),
    (
        "org.maqet.Maqet1.QMP",
        "The VM's QEMU monitor: QMP commands through maqetd (which owns the monitor), screendumps and QEMU's events.",
    ),
    (
        "org.maqet.Maqet1.Snapshots",
        "The VM's snapshots: list them, and create, load or delete one as a job (org.maqet.Maqet1.Job).",
    ),
    (
        "org.maqet.Maqet1.Storage",
        "The VM's disks as maqet sees them: what they are and where their images live.",
    ),
    (
        "org.maqet.Maqet1.Guest",
        "The QEMU guest agent inside the VM: whether it answers, what the guest says about itself, and commands and file transfers through it.",
    ),
    (
        "org.maqet.Maqet1.Job",
        "A long operation (a snapshot, an image import): its progress and end. The object stays a while after the job finished.",
    ),
    (
        "org.gnome.Shell.SearchProvider2",
        "GNOME Shell's overview search: finds VMs by name and starts the one chosen.",
    ),
    (
        "org.kde.krunner1",
        "KRunner (Plasma's search): finds VMs by name, with Start and Stop actions.",
    ),
];

/// The XML with every doc comment zbus wrote turned into annotations of the element
/// after it, and interfaces documented from [`INTERFACE_DOCS`].
pub fn annotate(xml: &str) -> String {
    let mut out = String::with_capacity(xml.len() * 2);
    let mut lines = xml.lines().peekable();
    let mut pending: Option<String> = None;
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed == "<!--" {
            let mut text = Vec::new();
            for l in lines.by_ref() {
                if l.trim() == "-->" {
                    break;
                }
                text.push(l.trim());
            }
            pending = Some(paragraphs(&text));
            continue;
        }
        let indent = &line[..line.len() - trimmed.len()];
        let doc = pending.take().or_else(|| {
            let name = attribute(trimmed.strip_prefix("<interface ")?, "name")?;
            INTERFACE_DOCS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, d)| d.to_string())
        });
        let Some(doc) = doc else {
            let _ = writeln!(out, "{line}");
            continue;
        };
        let inner = format!("{indent}  ");
        let annotations = format!(
            "{inner}<annotation name=\"{DOC}\" value=\"{}\"/>\n{inner}<annotation name=\"{DOC_SHORT}\" value=\"{}\"/>\n",
            escape(&doc),
            escape(&short(&doc))
        );
        match trimmed.strip_suffix("/>") {
            // `<property …/>`: opened up to hold its annotations.
            Some(open) => {
                let tag = open.split_whitespace().next().unwrap_or("<property");
                let _ = write!(
                    out,
                    "{indent}{}>\n{annotations}{indent}</{}>\n",
                    open.trim_end(),
                    &tag[1..]
                );
            }
            None => {
                let _ = write!(out, "{line}\n{annotations}");
            }
        }
    }
    out
}

/// Lines of a comment as text: wrapped lines joined, paragraphs kept apart.
fn paragraphs(lines: &[&str]) -> String {
    lines
        .split(|l| l.is_empty())
        .filter(|p| !p.is_empty())
        .map(|p| p.join(" "))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The first sentence (up to the first ". " or the end of the first paragraph).
fn short(doc: &str) -> String {
    let first = doc.split("\n\n").next().unwrap_or_default();
    match first.find(". ") {
        Some(at) => first[..=at].to_string(),
        None => first.to_string(),
    }
}

fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

/// An attribute value: markup escaped, line breaks kept (`&#10;`).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\n' => out.push_str("&#10;"),
            c => out.push(c),
        }
    }
    out
}

/// The access (`read`, `readwrite`, `write`) of the property `name` declared in one
/// interface's XML, if it declares it.
pub fn property_access<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let tag = format!("<property name=\"{name}\" ");
    let start = xml.find(&tag)?;
    let end = start + xml[start..].find('>')?;
    attribute(&xml[start..end], "access")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_become_annotations_of_the_next_element() {
        let xml = "<node>\n  <interface name=\"org.maqet.Maqet1.Job\">\n    <!--\n     Cancels the job. Fails when\n     it already ended.\n\n     Second <para> & \"quotes\".\n     -->\n    <method name=\"Cancel\">\n    </method>\n    <!--\n     0..1.\n     -->\n    <property name=\"Progress\" type=\"d\" access=\"read\"/>\n    <method name=\"Bare\">\n    </method>\n  </interface>\n</node>\n";
        let out = annotate(xml);
        let doc = roxmltree::Document::parse(&out).unwrap();
        let ann = |element: &str, name: &str, which: &str| {
            doc.descendants()
                .find(|n| n.has_tag_name(element) && n.attribute("name") == Some(name))
                .and_then(|n| {
                    n.children().find(|c| {
                        c.has_tag_name("annotation") && c.attribute("name") == Some(which)
                    })
                })
                .and_then(|a| a.attribute("value").map(str::to_string))
        };
        assert_eq!(
            ann("method", "Cancel", DOC).as_deref(),
            Some("Cancels the job. Fails when it already ended.\n\nSecond <para> & \"quotes\".")
        );
        assert_eq!(
            ann("method", "Cancel", DOC_SHORT).as_deref(),
            Some("Cancels the job.")
        );
        assert_eq!(ann("property", "Progress", DOC).as_deref(), Some("0..1."));
        assert_eq!(ann("method", "Bare", DOC), None);
        let iface = ann("interface", "org.maqet.Maqet1.Job", DOC_SHORT).unwrap();
        assert!(iface.starts_with("A long operation"), "{iface}");
        assert!(!out.contains("<!--"));
    }

    #[test]
    fn a_property_access_is_read_from_the_xml() {
        let xml = "<property name=\"Name\" type=\"s\" access=\"read\"/>\n<property name=\"NameX\" type=\"s\" access=\"readwrite\"/>";
        assert_eq!(property_access(xml, "Name"), Some("read"));
        assert_eq!(property_access(xml, "NameX"), Some("readwrite"));
        assert_eq!(property_access(xml, "Nam"), None);
    }
}
