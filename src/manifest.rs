//! The manifest-folder source: multi-document YAML (or JSON) files holding the same objects
//! a cluster would hold. Each rescan re-reads only the files that changed and reports the
//! difference as [`Event`]s, so the folder feeds the [`World`](crate::world::World) the way
//! Kubernetes watchers will.
//!
//! Nothing is lost to a bad edit: a file that is not valid YAML keeps its last good objects,
//! and an object that does not decode keeps its last good version; both are reported with
//! file, document, object, field and value until fixed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::world::{Event, Kind, Object, ObjectKey};

/// A problem with one file or object of the folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    /// The file.
    pub file: PathBuf,
    /// The document within the file (1-based), when the problem is in one document.
    pub document: Option<usize>,
    /// The object, when it could be told.
    pub object: Option<ObjectKey>,
    /// The field (a path such as `spec.ports[0].port`), when known.
    pub field: Option<String>,
    /// The field's value as written, when known.
    pub value: Option<String>,
    /// What is wrong, and what happened because of it.
    pub problem: String,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, " document {d}")?;
        }
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        f.write_str(": ")?;
        match (&self.field, &self.value) {
            (Some(field), Some(value)) => write!(f, "{field} = {value}: ")?,
            (Some(field), None) => write!(f, "{field}: ")?,
            _ => {}
        }
        f.write_str(&self.problem)
    }
}

/// Where an object came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Origin {
    /// The file.
    pub file: PathBuf,
    /// The document within it (1-based).
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file.display(), self.document)
    }
}

/// What one document decoded to.
#[derive(Debug, Clone)]
enum Decoded {
    /// A kind Portico reads.
    Object(ObjectKey, Box<Object>),
    /// A kind Portico does not read (a Deployment next to its Service): ignored.
    Ignored,
}

/// The objects of one file, and its problems.
#[derive(Debug, Clone, Default)]
struct FileEntry {
    stamp: Option<(u64, SystemTime)>,
    objects: Vec<(ObjectKey, Origin, Object)>,
    errors: Vec<SourceError>,
}

/// The manifest folder and what was read from it.
#[derive(Debug)]
pub struct ManifestFolder {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    merged: BTreeMap<ObjectKey, (Origin, Object)>,
    duplicate_errors: Vec<SourceError>,
}

impl ManifestFolder {
    /// A source reading `root` (recursively; hidden files and folders are skipped).
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ManifestFolder {
            root: root.into(),
            files: BTreeMap::new(),
            merged: BTreeMap::new(),
            duplicate_errors: Vec::new(),
        }
    }

    /// The folder.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Re-reads the files that changed (by size and modification time) and returns what
    /// changed since the last rescan, deletions first.
    ///
    /// # Errors
    /// The folder itself cannot be listed (problems of single files are
    /// [`ManifestFolder::errors`], not errors here).
    pub fn rescan(&mut self) -> std::io::Result<Vec<Event>> {
        let mut paths = Vec::new();
        list_files(&self.root, &mut paths)?;
        let present: BTreeSet<PathBuf> = paths.iter().cloned().collect();
        self.files.retain(|p, _| present.contains(p));
        for path in paths {
            let stamp = std::fs::metadata(&path)
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)));
            let entry = self.files.entry(path.clone()).or_default();
            if stamp.is_some() && entry.stamp == stamp {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    entry.errors = vec![file_error(&path, format!("cannot be read: {e}"))];
                    continue;
                }
            };
            let (objects, errors) = parse_file(&path, &text, &entry.objects);
            *entry = FileEntry {
                stamp,
                objects,
                errors,
            };
        }
        Ok(self.merge())
    }

    /// Problems of the folder as of the last rescan, in file order.
    #[must_use]
    pub fn errors(&self) -> Vec<SourceError> {
        self.files
            .values()
            .flat_map(|f| f.errors.iter().cloned())
            .chain(self.duplicate_errors.iter().cloned())
            .collect()
    }

    /// Where an object came from.
    #[must_use]
    pub fn origin(&self, key: &ObjectKey) -> Option<&Origin> {
        self.merged.get(key).map(|(o, _)| o)
    }

    fn merge(&mut self) -> Vec<Event> {
        let mut merged: BTreeMap<ObjectKey, (Origin, Object)> = BTreeMap::new();
        self.duplicate_errors.clear();
        for entry in self.files.values() {
            for (key, origin, object) in &entry.objects {
                if let Some((first, _)) = merged.get(key) {
                    self.duplicate_errors.push(SourceError {
                        file: origin.file.clone(),
                        document: Some(origin.document),
                        object: Some(key.clone()),
                        field: None,
                        value: None,
                        problem: format!("is also defined in {first}; this copy is ignored"),
                    });
                    continue;
                }
                merged.insert(key.clone(), (origin.clone(), object.clone()));
            }
        }
        let mut events: Vec<Event> = self
            .merged
            .keys()
            .filter(|k| !merged.contains_key(*k))
            .map(|k| Event::Delete(k.clone()))
            .collect();
        for (key, (_, object)) in &merged {
            if self.merged.get(key).is_none_or(|(_, old)| old != object) {
                events.push(Event::Apply(key.clone(), object.clone()));
            }
        }
        self.merged = merged;
        events
    }
}

/// Parses the documents of one manifest text (as if read from `name`) into events that
/// create its objects, with the problems found. For tests and tools.
#[must_use]
pub fn parse_text(name: &str, text: &str) -> (Vec<Event>, Vec<SourceError>) {
    let (objects, errors) = parse_file(Path::new(name), text, &[]);
    let events = objects
        .into_iter()
        .map(|(k, _, o)| Event::Apply(k, o))
        .collect();
    (events, errors)
}

fn list_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.filter_map(Result::ok).collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for e in entries {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let path = e.path();
        let Ok(ty) = e.file_type() else { continue };
        if ty.is_dir() || (ty.is_symlink() && path.is_dir()) {
            // A subfolder that cannot be listed is skipped, not fatal.
            let _ = list_files(&path, out);
        } else if [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext))
        {
            out.push(path);
        }
    }
    Ok(())
}

fn file_error(path: &Path, problem: String) -> SourceError {
    SourceError {
        file: path.to_owned(),
        document: None,
        object: None,
        field: None,
        value: None,
        problem,
    }
}

/// Parses one file. `previous` are its objects as last read: a file that is not valid YAML
/// keeps them all, and an object that fails to decode keeps its previous version.
fn parse_file(
    path: &Path,
    text: &str,
    previous: &[(ObjectKey, Origin, Object)],
) -> (Vec<(ObjectKey, Origin, Object)>, Vec<SourceError>) {
    let docs: Vec<Value> = match serde_saphyr::from_multiple(text) {
        Ok(d) => d,
        Err(e) => {
            let kept = if previous.is_empty() {
                String::new()
            } else {
                format!(
                    "; its {} objects as last read stay in force",
                    previous.len()
                )
            };
            return (
                previous.to_vec(),
                vec![file_error(
                    path,
                    format!("is not valid YAML: {}{kept}", one_line(&e.to_string())),
                )],
            );
        }
    };
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let origin = Origin {
            file: path.to_owned(),
            document: i + 1,
        };
        match decode_document(doc) {
            Ok(Decoded::Object(key, object)) => objects.push((key, origin, *object)),
            Ok(Decoded::Ignored) => {}
            Err((key, mut err)) => {
                err.file = path.to_owned();
                err.document = Some(i + 1);
                if let Some(k) = &key {
                    if let Some((_, _, old)) = previous.iter().find(|(pk, _, _)| pk == k) {
                        err.problem
                            .push_str("; the last good version stays in force");
                        objects.push((k.clone(), origin, old.clone()));
                    } else {
                        err.problem.push_str("; the object is skipped");
                    }
                } else {
                    err.problem.push_str("; the document is skipped");
                }
                err.object = key;
                errors.push(err);
            }
        }
    }
    (objects, errors)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

type DecodeError = (Option<ObjectKey>, SourceError);

fn doc_error(
    field: Option<&str>,
    value: Option<String>,
    problem: impl Into<String>,
) -> SourceError {
    SourceError {
        file: PathBuf::new(),
        document: None,
        object: None,
        field: field.map(str::to_owned),
        value,
        problem: problem.into(),
    }
}

fn quoted(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// The kind of a document from its `apiVersion` and `kind`: `Ok(None)` for kinds Portico
/// does not read.
fn kind_of(api_version: &str, kind: &str) -> Result<Option<Kind>, String> {
    let expected = match kind {
        "AddressPool" => Some((Kind::AddressPool, "portico.io/v1alpha1")),
        "BGPPeer" => Some((Kind::BgpPeer, "portico.io/v1alpha1")),
        "BGPAdvertisement" => Some((Kind::BgpAdvertisement, "portico.io/v1alpha1")),
        "Service" => Some((Kind::Service, "v1")),
        "EndpointSlice" => Some((Kind::EndpointSlice, "discovery.k8s.io/v1")),
        "Secret" => Some((Kind::Secret, "v1")),
        "Node" => Some((Kind::Node, "v1")),
        "Namespace" => Some((Kind::Namespace, "v1")),
        _ => None,
    };
    match expected {
        Some((k, v)) if v == api_version => Ok(Some(k)),
        Some((_, v)) => Err(format!("is not served; {kind} is {v}")),
        // A portico.io kind Portico does not know is surely a typo; anything else is
        // somebody else's object.
        None if api_version.starts_with("portico.io/") => Err(format!(
            "kind {kind:?} is not a Portico kind (AddressPool, BGPPeer, BGPAdvertisement)"
        )),
        None => Ok(None),
    }
}

#[allow(
    clippy::result_large_err,
    reason = "a bad document is rare and its error is built once"
)]
fn decode_document(mut doc: Value) -> Result<Decoded, DecodeError> {
    let Some(map) = doc.as_object_mut() else {
        return Err((
            None,
            doc_error(
                None,
                None,
                "is not a mapping (an object needs apiVersion, kind and metadata)",
            ),
        ));
    };
    #[allow(
        clippy::result_large_err,
        reason = "a bad document is rare and its error is built once"
    )]
    let str_field =
        |map: &serde_json::Map<String, Value>, f: &str| -> Result<String, DecodeError> {
            match map.get(f) {
                Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(v) => Err((
                    None,
                    doc_error(Some(f), Some(quoted(v)), "must be a non-empty string"),
                )),
                None => Err((None, doc_error(Some(f), None, "is missing"))),
            }
        };
    let api_version = str_field(map, "apiVersion")?;
    let kind_name = str_field(map, "kind")?;
    let kind = match kind_of(&api_version, &kind_name) {
        Ok(Some(k)) => k,
        Ok(None) => return Ok(Decoded::Ignored),
        Err(problem) => {
            return Err((
                None,
                doc_error(
                    Some("apiVersion"),
                    Some(format!("{api_version:?}")),
                    problem,
                ),
            ))
        }
    };
    let meta = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    let Some(meta) = meta.as_object_mut() else {
        return Err((
            None,
            doc_error(Some("metadata"), Some(quoted(meta)), "must be a mapping"),
        ));
    };
    let name = match meta.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(v) => {
            return Err((
                None,
                doc_error(
                    Some("metadata.name"),
                    Some(quoted(v)),
                    "must be a non-empty string",
                ),
            ))
        }
        None => return Err((None, doc_error(Some("metadata.name"), None, "is missing"))),
    };
    let namespace = if kind.namespaced() {
        match meta.get("namespace") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            None => {
                meta.insert("namespace".into(), Value::String("default".into()));
                "default".to_owned()
            }
            Some(v) => {
                return Err((
                    None,
                    doc_error(
                        Some("metadata.namespace"),
                        Some(quoted(v)),
                        "must be a non-empty string",
                    ),
                ))
            }
        }
    } else {
        String::new()
    };
    let key = ObjectKey {
        kind,
        namespace,
        name,
    };
    let object = match kind {
        Kind::AddressPool => typed(&doc).map(Object::AddressPool),
        Kind::BgpPeer => typed(&doc).map(Object::BgpPeer),
        Kind::BgpAdvertisement => typed(&doc).map(Object::BgpAdvertisement),
        Kind::Service => typed(&doc).map(Object::Service),
        Kind::EndpointSlice => typed(&doc).map(Object::EndpointSlice),
        Kind::Secret => typed(&doc).map(Object::Secret),
        Kind::Node => typed(&doc).map(Object::Node),
        Kind::Namespace => typed(&doc).map(Object::Namespace),
    };
    match object {
        Ok(o) => Ok(Decoded::Object(key, Box::new(o))),
        Err(e) => Err((Some(key), e)),
    }
}

/// Decodes a document into its type, naming the field and value that do not fit.
#[allow(
    clippy::result_large_err,
    reason = "a bad document is rare and its error is built once"
)]
fn typed<T: DeserializeOwned>(doc: &Value) -> Result<T, SourceError> {
    serde_path_to_error::deserialize::<_, T>(doc).map_err(|e| {
        let path = e.path().clone();
        let mut value = Some(doc);
        for seg in path.iter() {
            value = value.and_then(|v| match seg {
                serde_path_to_error::Segment::Seq { index } => v.get(*index),
                serde_path_to_error::Segment::Map { key } => v.get(key.as_str()),
                _ => None,
            });
        }
        let field = path.to_string();
        let field = (field != ".").then_some(field);
        doc_error(
            field.as_deref(),
            value.map(quoted),
            one_line(&e.into_inner().to_string()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<(ObjectKey, Origin, Object)>, Vec<SourceError>) {
        parse_file(Path::new("m.yaml"), text, &[])
    }

    #[test]
    fn a_multi_document_file_yields_each_object_with_its_namespace_defaulted() {
        let (objects, errors) = parse(
            "apiVersion: portico.io/v1alpha1\nkind: AddressPool\nmetadata: {name: p}\nspec:\n  blocks: [{cidr: 192.0.2.0/24}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: LoadBalancer\n  ports: [{port: 80}]\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let keys: Vec<String> = objects.iter().map(|(k, _, _)| k.to_string()).collect();
        assert_eq!(keys, ["AddressPool p", "Service default/web"]);
        assert_eq!(objects[1].1.document, 2);
    }

    #[test]
    fn a_bad_field_is_named_with_its_value_and_the_object_is_skipped() {
        let (objects, errors) = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports: [{port: eighty}]\n",
        );
        assert!(objects.is_empty());
        assert_eq!(errors.len(), 1);
        let text = errors[0].to_string();
        assert!(
            text.starts_with(
                "m.yaml document 1 (Service shop/web): spec.ports[0].port = \"eighty\": "
            ),
            "{text}"
        );
        assert!(text.ends_with("the object is skipped"), "{text}");
    }

    #[test]
    fn a_broken_edit_keeps_the_last_good_version_of_the_object() {
        let good =
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";
        let (previous, _) = parse(good);
        let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: 5}\n";
        let (objects, errors) = parse_file(Path::new("m.yaml"), bad, &previous);
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].2, previous[0].2);
        assert!(errors[0].to_string().contains("last good version"));
    }

    #[test]
    fn invalid_yaml_keeps_every_object_of_the_file() {
        let good = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n";
        let (previous, _) = parse(good);
        let (objects, errors) = parse_file(Path::new("m.yaml"), "kind: [unclosed\n", &previous);
        assert_eq!(objects.len(), 1);
        assert!(
            errors[0].to_string().contains("is not valid YAML"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn a_wrong_api_version_and_an_unknown_portico_kind_are_errors() {
        let (_, errors) = parse(
            "apiVersion: portico.io/v1\nkind: AddressPool\nmetadata: {name: p}\n---\napiVersion: portico.io/v1alpha1\nkind: AdressPool\nmetadata: {name: p}\n",
        );
        assert_eq!(errors.len(), 2);
        assert!(errors[0]
            .to_string()
            .contains("apiVersion = \"portico.io/v1\""));
        assert!(errors[1]
            .to_string()
            .contains("\"AdressPool\" is not a Portico kind"));
    }

    #[test]
    fn rescans_report_only_changes_and_deletions() {
        let dir = tempfile::tempdir().unwrap();
        let svc = |port: u16| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{ports: [{{port: {port}}}]}}\n")
        };
        std::fs::write(dir.path().join("a.yaml"), svc(80)).unwrap();
        let mut folder = ManifestFolder::new(dir.path());
        assert_eq!(folder.rescan().unwrap().len(), 1);
        assert!(folder.rescan().unwrap().is_empty());
        // A copy in a second file is reported, and the first stays in force.
        std::fs::write(dir.path().join("b.yaml"), svc(81)).unwrap();
        assert!(folder.rescan().unwrap().is_empty());
        assert!(folder.errors()[0]
            .to_string()
            .contains("is also defined in"));
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let events = folder.rescan().unwrap();
        assert!(matches!(&events[..], [Event::Apply(..)]), "{events:?}");
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        assert!(matches!(&folder.rescan().unwrap()[..], [Event::Delete(_)]));
    }
}
