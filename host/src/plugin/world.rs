//! Which plugin kind and WIT version a component implements, read from its export names
//! (`ferrotune:plugin/format@0.1.0` → a formatter built against 0.1.0), before anything runs.

use std::fmt;

use wasmtime::component::Component;
use wasmtime::Engine;

/// The WIT package every ferrotune plugin exports from.
pub const PACKAGE: &str = "ferrotune:plugin";

/// Released versions this host loads, oldest first; the last is the current `wit/`.
pub const SUPPORTED_VERSIONS: [Version; 1] = [Version::new(0, 1, 0)];

/// A plugin kind: one WIT world each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Formatter,
    Sync,
    Storage,
    Publish,
}

impl Kind {
    /// The interface each world exports.
    const EXPORTS: [(&'static str, Kind); 4] = [
        ("format", Kind::Formatter),
        ("sync-policy", Kind::Sync),
        ("storage-backend", Kind::Storage),
        ("publish-steps", Kind::Publish),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Formatter => "formatter",
            Kind::Sync => "sync",
            Kind::Storage => "storage",
            Kind::Publish => "publish",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    pub const fn new(major: u64, minor: u64, patch: u64) -> Self {
        Version {
            major,
            minor,
            patch,
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let core = text.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        let v = Version::new(parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// What a component is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub kind: Kind,
    pub version: Version,
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} world of {PACKAGE}@{}", self.kind, self.version)
    }
}

/// Reads the kind and version from the component's exports and checks this host loads it.
/// `plugin` names the plugin in errors.
pub fn detect(engine: &Engine, component: &Component, plugin: &str) -> anyhow::Result<World> {
    let ty = component.component_type();
    let names: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    let world =
        from_export_names(&names).ok_or_else(|| {
            anyhow::anyhow!(
            "plugin {plugin} is not a ferrotune plugin: it exports none of {PACKAGE}'s interfaces \
             (it exports: {}); build it with ferrotune-plugin-sdk",
            if names.is_empty() { "nothing".to_string() } else { names.join(", ") }
        )
        })?;
    check_supported(world, plugin)?;
    Ok(world)
}

/// The first export of the form `ferrotune:plugin/<interface>@<version>` naming a known world.
pub fn from_export_names(names: &[&str]) -> Option<World> {
    names.iter().find_map(|name| {
        let rest = name.strip_prefix(PACKAGE)?.strip_prefix('/')?;
        let (interface, version) = rest.split_once('@')?;
        let kind = Kind::EXPORTS.iter().find(|(i, _)| *i == interface)?.1;
        Some(World {
            kind,
            version: Version::parse(version)?,
        })
    })
}

/// Older released versions load; a newer or unreleased version is refused naming both.
pub fn check_supported(world: World, plugin: &str) -> anyhow::Result<()> {
    if SUPPORTED_VERSIONS.contains(&world.version) {
        return Ok(());
    }
    let newest = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1];
    let known: Vec<String> = SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect();
    if world.version > newest {
        anyhow::bail!(
            "plugin {plugin} was built against {PACKAGE}@{}, newer than this ferrotune supports \
             ({PACKAGE}@{newest}); upgrade ferrotune, or rebuild the plugin with \
             ferrotune-plugin-sdk {newest}",
            world.version
        );
    }
    anyhow::bail!(
        "plugin {plugin} was built against {PACKAGE}@{}, which was never released; this \
         ferrotune loads {}; rebuild the plugin with ferrotune-plugin-sdk {newest}",
        world.version,
        known.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kind_and_version_from_export_names() {
        let names = ["wasi:cli/run@0.2.0", "ferrotune:plugin/format@0.1.0"];
        assert_eq!(
            from_export_names(&names),
            Some(World {
                kind: Kind::Formatter,
                version: Version::new(0, 1, 0)
            })
        );
        let sync = from_export_names(&["ferrotune:plugin/sync-policy@0.3.1-rc1"]).unwrap();
        assert_eq!(
            (sync.kind, sync.version),
            (Kind::Sync, Version::new(0, 3, 1))
        );
        assert_eq!(from_export_names(&["ferrotune:plugin/format"]), None);
        assert_eq!(from_export_names(&["other:plugin/format@0.1.0"]), None);
    }

    #[test]
    fn newer_versions_are_refused_naming_both() {
        let newer = World {
            kind: Kind::Formatter,
            version: Version::new(0, 2, 0),
        };
        let err = check_supported(newer, "mine.wasm").unwrap_err().to_string();
        assert!(err.contains("mine.wasm"), "{err}");
        assert!(err.contains("ferrotune:plugin@0.2.0"), "{err}");
        assert!(err.contains("ferrotune:plugin@0.1.0"), "{err}");
        let current = World {
            kind: Kind::Formatter,
            version: Version::new(0, 1, 0),
        };
        check_supported(current, "ok").unwrap();
    }
}
