//! One LUN's snapshots on this node: a directory beside the backing file
//! (`<lun file>.snapshots/`) holding one clone per snapshot (`<guid>.img`) and the catalogue
//! (`catalog.json`) that names them.
//!
//! The catalogue is the truth; it is replaced atomically (write, fsync, rename, fsync the
//! directory), and a clone is durable before the catalogue names it. A clone the catalogue
//! does not name (a crash between the two) is deleted when the store opens.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use replica::snapshot::{Listed, SnapshotName};
use replica::wire::SNAPSHOTS_PER_LUN_MAX;
use serde::{Deserialize, Serialize};

use super::reflink::{clone_file, CloneError};

const CATALOG: &str = "catalog.json";
const CATALOG_VERSION: u32 = 1;

/// Why a snapshot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: the snapshot catalogue is unreadable ({reason}); move it aside to start without the snapshots it lists")]
    Catalog { path: PathBuf, reason: String },
    #[error(transparent)]
    Clone(#[from] CloneError),
    #[error("a snapshot named {0:?} exists already")]
    NameTaken(String),
    #[error("no snapshot named {0:?}")]
    NoSuchName(String),
    #[error("no snapshot with id {0:016x}")]
    NoSuchId(u64),
    #[error(
        "this LUN holds {SNAPSHOTS_PER_LUN_MAX} snapshots, the most it may: delete some first"
    )]
    Full,
}

/// One snapshot in the catalogue.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// Id, the same on both nodes (hex in the file: JSON numbers lose u64 precision).
    #[serde(with = "hex_u64")]
    pub guid: u64,
    pub name: String,
    /// When the cut was taken (the primary's clock).
    pub created_unix_ms: u64,
    /// The cut's id: snapshots of LUNs taken at one cut share it.
    #[serde(with = "hex_u64")]
    pub group: u64,
    /// Cloned, not committed: never listed to operators nor served.
    pub pending: bool,
}

#[derive(Serialize, Deserialize)]
struct CatalogFile {
    version: u32,
    snapshots: Vec<Entry>,
}

mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        u64::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}

/// The snapshots of one LUN on this node.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    entries: Vec<Entry>,
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, what, source }
}

/// Where a pending snapshot's image comes from ([`Store::prepare`]).
pub enum CloneFrom<'a> {
    /// Cloned from the LUN's file now.
    Live(&'a File),
    /// A clone staged before the cut and made equal to the LUN's file under the hold.
    Staged(&'a Path),
}

/// The directory of the snapshots of the LUN backed by `lun_path`: `<lun_path>.snapshots`.
pub fn snapshot_dir(lun_path: &Path) -> PathBuf {
    let mut dir = lun_path.as_os_str().to_owned();
    dir.push(".snapshots");
    PathBuf::from(dir)
}

impl Store {
    /// The store of the LUN backed by `lun_path`; its catalogue is read if it exists (the
    /// directory is made at the first snapshot). Clones no entry names are deleted.
    pub fn open(lun_path: &Path) -> Result<Store, StoreError> {
        let dir = snapshot_dir(lun_path);
        let path = dir.join(CATALOG);
        let entries = match std::fs::read(&path) {
            Ok(bytes) => {
                let c: CatalogFile =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Catalog {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if c.version != CATALOG_VERSION {
                    return Err(StoreError::Catalog {
                        path,
                        reason: format!(
                            "version {} (this twinsan reads {CATALOG_VERSION})",
                            c.version
                        ),
                    });
                }
                c.snapshots
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&path, "reading the snapshot catalogue")(e)),
        };
        Ok(Store { dir, entries })
    }

    /// Deletes `<guid>.img` files no entry names (a clone made before a crash, never
    /// recorded). Only names of that form are touched. The daemon's start only: a clone
    /// being made is not named yet either.
    pub fn remove_strays(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for f in rd.flatten() {
            let name = f.file_name();
            if name == "staging.img" {
                // A clone staged for a cut that never came (snapshot/staging.rs).
                let _ = std::fs::remove_file(f.path());
                continue;
            }
            let Some(guid) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".img"))
                .and_then(|g| (g.len() == 16).then(|| u64::from_str_radix(g, 16).ok()))
                .flatten()
            else {
                continue;
            };
            if !self.entries.iter().any(|e| e.guid == guid) {
                tracing::info!(path = %f.path().display(), "removing a snapshot clone no catalogue entry names (a cut interrupted by a crash)");
                let _ = std::fs::remove_file(f.path());
            }
        }
    }

    /// Every snapshot, pending ones included, oldest first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Committed snapshots, oldest first.
    pub fn committed(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| !e.pending)
    }

    /// The list as the pair's reconciliation reads it.
    pub fn listed(&self) -> Vec<Listed> {
        self.entries
            .iter()
            .filter_map(|e| {
                Some(Listed {
                    guid: e.guid,
                    name: SnapshotName::parse(&e.name).ok()?,
                    pending: e.pending,
                })
            })
            .collect()
    }

    /// The committed snapshot called `name`.
    pub fn by_name(&self, name: &str) -> Result<&Entry, StoreError> {
        self.committed()
            .find(|e| e.name == name)
            .ok_or_else(|| StoreError::NoSuchName(name.to_string()))
    }

    /// The clone of snapshot `guid`.
    pub fn image_path(&self, guid: u64) -> PathBuf {
        self.dir.join(format!("{guid:016x}.img"))
    }

    /// Makes pending snapshot `guid` called `name` from `from`: a clone of the LUN's file
    /// made now, or a clone staged before the cut (snapshot/staging.rs) and finished. The
    /// caller holds every write of the LUN out. Durable before it returns.
    pub fn prepare(
        &mut self,
        from: CloneFrom<'_>,
        guid: u64,
        name: &SnapshotName,
        group: u64,
        created_unix_ms: u64,
    ) -> Result<(), StoreError> {
        self.admit(guid, name)?;
        match from {
            CloneFrom::Live(live) => self.clone_live(live, guid)?,
            CloneFrom::Staged(staged) => self.name_staged(staged, guid)?,
        }
        self.record_pending(guid, name, group, created_unix_ms)
    }

    /// Clones `live` into snapshot `guid`'s image, durably.
    fn clone_live(&self, live: &File, guid: u64) -> Result<(), StoreError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(io(&self.dir, "creating the snapshot directory"))?;
        let path = self.image_path(guid);
        let dest = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io(&path, "creating the snapshot clone"))?;
        let made = clone_file(live, &dest)
            .map_err(StoreError::from)
            .and_then(|()| {
                dest.sync_all()
                    .map_err(io(&path, "syncing the snapshot clone"))
            });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(())
    }

    /// Names the staged clone `staged` (equal to the LUN's file, and durable) as snapshot
    /// `guid`'s image.
    fn name_staged(&self, staged: &Path, guid: u64) -> Result<(), StoreError> {
        let path = self.image_path(guid);
        std::fs::rename(staged, &path).map_err(io(&path, "naming the staged clone"))?;
        crate::disk::durable::sync_dir(&self.dir)
            .map_err(io(&self.dir, "syncing the snapshot directory"))?;
        Ok(())
    }

    /// Whether a new snapshot `guid` called `name` may be added; forgets a pending entry
    /// of the same id (a retried cut may reuse the id of a pending clone never dropped).
    fn admit(&mut self, guid: u64, name: &SnapshotName) -> Result<(), StoreError> {
        if self.committed().any(|e| e.name == name.as_str()) {
            return Err(StoreError::NameTaken(name.to_string()));
        }
        if self.entries.len() >= SNAPSHOTS_PER_LUN_MAX {
            return Err(StoreError::Full);
        }
        self.entries.retain(|e| !(e.pending && e.guid == guid));
        Ok(())
    }

    /// Records pending snapshot `guid` (its clone made and durable) in the catalogue.
    fn record_pending(
        &mut self,
        guid: u64,
        name: &SnapshotName,
        group: u64,
        created_unix_ms: u64,
    ) -> Result<(), StoreError> {
        self.entries.push(Entry {
            guid,
            name: name.to_string(),
            created_unix_ms,
            group,
            pending: true,
        });
        self.save()
    }

    /// Commits pending snapshot `guid`.
    pub fn commit(&mut self, guid: u64) -> Result<(), StoreError> {
        let e = self
            .entries
            .iter_mut()
            .find(|e| e.guid == guid)
            .ok_or(StoreError::NoSuchId(guid))?;
        if !e.pending {
            return Ok(());
        }
        e.pending = false;
        let r = self.save();
        if r.is_err() {
            // Not durable: keep the memory as the disk says.
            if let Some(e) = self.entries.iter_mut().find(|e| e.guid == guid) {
                e.pending = true;
            }
        }
        r
    }

    /// Removes snapshot `guid` (pending or committed) and its clone; removing one that is
    /// not here succeeds (the peer's retried abort).
    pub fn remove(&mut self, guid: u64) -> Result<(), StoreError> {
        let Some(pos) = self.entries.iter().position(|e| e.guid == guid) else {
            return Ok(());
        };
        let e = self.entries.remove(pos);
        if let Err(err) = self.save() {
            self.entries.insert(pos, e);
            return Err(err);
        }
        // The catalogue no longer names it: a failure here leaves a stray, removed at the
        // next start.
        let path = self.image_path(guid);
        if let Err(err) = std::fs::remove_file(&path) {
            if err.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %err, "could not remove a deleted snapshot's clone");
            }
        }
        Ok(())
    }

    /// Drops every pending snapshot (at start on a node that is not a secondary waiting for
    /// its primary's list, and at promotion: the old primary may never have committed them).
    pub fn drop_pending(&mut self) -> Result<(), StoreError> {
        let pending: Vec<u64> = self
            .entries
            .iter()
            .filter(|e| e.pending)
            .map(|e| e.guid)
            .collect();
        for g in pending {
            self.remove(g)?;
        }
        Ok(())
    }

    /// Replaces the content of `live` (the LUN's file, open for writing) by snapshot
    /// `guid`'s. The caller holds every write of the LUN out.
    pub fn rollback(&self, guid: u64, live: &File) -> Result<(), StoreError> {
        if !self.committed().any(|e| e.guid == guid) {
            return Err(StoreError::NoSuchId(guid));
        }
        let path = self.image_path(guid);
        let src = File::open(&path).map_err(io(&path, "opening the snapshot clone"))?;
        clone_file(&src, live)?;
        live.sync_all()
            .map_err(io(&path, "syncing the rolled-back LUN"))
    }

    fn save(&self) -> Result<(), StoreError> {
        let path = self.dir.join(CATALOG);
        let body = serde_json::to_vec_pretty(&CatalogFile {
            version: CATALOG_VERSION,
            snapshots: self.entries.clone(),
        })
        .map_err(|e| StoreError::Catalog {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::create_dir_all(&self.dir)
            .map_err(io(&self.dir, "creating the snapshot directory"))?;
        crate::disk::durable::replace_file(&path, &body)
            .map_err(io(&path, "writing the snapshot catalogue"))
    }
}
