//! `twinsan lun add|resize|remove`: edit the config file (comments and layout kept, with
//! `toml_edit`), write it atomically, and apply it through the daemon's reload; if the
//! daemon refuses, the previous file is put back, so file and daemon never disagree.

use std::path::Path;
use std::process::ExitCode;

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table};

use crate::AdminArgs;

#[derive(clap::Subcommand)]
pub enum LunCmd {
    /// Add LUN ID to TARGET, a sparse file of SIZE (e.g. 10GiB).
    Add {
        target: String,
        id: u64,
        #[arg(long)]
        size: String,
        /// The backing file (relative paths are under data_dir); default TARGET-lunID.img.
        #[arg(long)]
        path: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Grow LUN TARGET/ID to SIZE (shrinking is refused: data would be lost).
    Resize {
        /// TARGET/ID.
        lun: String,
        size: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove LUN TARGET/ID from the configuration (its backing file stays).
    Remove {
        /// TARGET/ID.
        lun: String,
        /// Remove it even if sessions use it.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Why an edit cannot be made (said with status 2, nothing written).
pub(crate) type EditError = String;

fn split_lun(s: &str) -> Result<(String, u64), EditError> {
    let (t, id) = s
        .rsplit_once('/')
        .ok_or_else(|| format!("`{s}`: expected TARGET/ID"))?;
    let id = id
        .parse()
        .map_err(|_| format!("`{s}`: the LUN id `{id}` is not a number"))?;
    Ok((t.to_string(), id))
}

/// The `[[target]]` table named `name` (case-insensitive, as iSCSI names compare).
fn target_mut<'a>(doc: &'a mut DocumentMut, name: &str) -> Result<&'a mut Table, EditError> {
    doc.get_mut("target")
        .and_then(Item::as_array_of_tables_mut)
        .and_then(|a| {
            a.iter_mut().find(|t| {
                t.get("name")
                    .and_then(Item::as_str)
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
        })
        .ok_or_else(|| format!("no [[target]] named {name} in the file"))
}

fn lun_position(t: &Table, id: u64) -> Option<usize> {
    t.get("lun")
        .and_then(Item::as_array_of_tables)?
        .iter()
        .position(|l| l.get("id").and_then(Item::as_integer) == Some(id as i64))
}

/// Applies one command to the document's text; returns the new text and the admin command
/// that applies it.
fn edit(text: &str, cmd: &LunCmd) -> Result<(String, &'static str), EditError> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e| format!("the file is not valid TOML: {e}"))?;
    let reload = match cmd {
        LunCmd::Add {
            target,
            id,
            size,
            path,
            ..
        } => {
            let t = target_mut(&mut doc, target)?;
            if lun_position(t, *id).is_some() {
                return Err(format!("{target} already has LUN {id}"));
            }
            let mut l = Table::new();
            l["id"] = toml_edit::value(*id as i64);
            // Named after the target as the file spells it (the argument may differ in case).
            let file_name = t
                .get("name")
                .and_then(Item::as_str)
                .unwrap_or(target)
                .to_string();
            let default_path = || {
                let safe: String = file_name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                format!("{safe}-lun{id}.img")
            };
            l["path"] = toml_edit::value(path.clone().unwrap_or_else(default_path));
            l["size"] = toml_edit::value(size.as_str());
            if t.get("lun").and_then(Item::as_array_of_tables).is_none() {
                t.insert("lun", Item::ArrayOfTables(ArrayOfTables::new()));
            }
            if let Some(a) = t.get_mut("lun").and_then(Item::as_array_of_tables_mut) {
                a.push(l);
            }
            "reload"
        }
        LunCmd::Resize { lun, size, .. } => {
            let (target, id) = split_lun(lun)?;
            let t = target_mut(&mut doc, &target)?;
            let p = lun_position(t, id).ok_or_else(|| format!("{target} has no LUN {id}"))?;
            if let Some(l) = t
                .get_mut("lun")
                .and_then(Item::as_array_of_tables_mut)
                .and_then(|a| a.get_mut(p))
            {
                l["size"] = toml_edit::value(size.as_str());
            }
            "reload"
        }
        LunCmd::Remove { lun, force, .. } => {
            let (target, id) = split_lun(lun)?;
            let t = target_mut(&mut doc, &target)?;
            let p = lun_position(t, id).ok_or_else(|| format!("{target} has no LUN {id}"))?;
            if let Some(a) = t.get_mut("lun").and_then(Item::as_array_of_tables_mut) {
                a.remove(p);
            }
            if *force {
                "reload-force"
            } else {
                "reload"
            }
        }
    };
    Ok((doc.to_string(), reload))
}

/// Writes `text` to `path` durably, keeping its permissions (the config holds secrets: CHAP,
/// the peer's psk).
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    engine::disk::durable::replace_file(path, text.as_bytes())
}

pub fn run(cmd: LunCmd) -> ExitCode {
    let (LunCmd::Add { admin, .. } | LunCmd::Resize { admin, .. } | LunCmd::Remove { admin, .. }) =
        &cmd;
    edit_then_reload("lun", admin, |text| edit(text, &cmd))
}

/// Edits the config file named by `admin` with `edit` (old text to new text and the admin
/// command that applies it), checks the result as the daemon would, writes it atomically
/// and applies it; if the daemon refuses, the previous file is put back.
pub(crate) fn edit_then_reload(
    what: &str,
    admin: &AdminArgs,
    edit: impl FnOnce(&str) -> Result<(String, &'static str), EditError>,
) -> ExitCode {
    let Some(path) = admin.config.clone() else {
        eprintln!("twinsan {what}: --config FILE is required (the file to edit)");
        return ExitCode::from(2);
    };
    let old = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("twinsan {what}: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let (new, reload) = match edit(&old) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("twinsan {what}: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    // The same validation the daemon runs: a bad size is said here, nothing written.
    let file = path.display().to_string();
    if let Err(e) =
        engine::config::Config::parse_str(&new, &file, Some(path.clone()), &Default::default())
    {
        eprintln!("twinsan {what}: not changed: {e}");
        return ExitCode::from(2);
    }
    let socket = match crate::admin_socket(AdminArgs {
        config: admin.config.clone(),
        socket: admin.socket.clone(),
    }) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(e) = write_atomic(&path, &new) {
        eprintln!("twinsan {what}: cannot write {}: {e}", path.display());
        return ExitCode::from(1);
    }
    let reply = engine::admin::request(&socket, reload);
    let ok = matches!(&reply, Ok(r) if r.starts_with("ok"));
    if !ok {
        if let Err(e) = write_atomic(&path, &old) {
            eprintln!(
                "twinsan {what}: the daemon did not apply the change and the previous file could not be restored ({e}): {} holds the change",
                path.display()
            );
        }
    }
    match reply {
        Ok(r) => {
            print!("{r}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => crate::unreachable_daemon(&socket, &e),
    }
}

/// Adds `[[target.lun]]` `lun` to the target named `target` in `doc`, making the target
/// (open to every initiator, as a new `[[target]]` without ACLs is) if the file has none.
pub(crate) fn add_lun_table(
    doc: &mut DocumentMut,
    target: &str,
    id: u64,
    lun: Table,
) -> Result<(), EditError> {
    if target_mut(doc, target).is_err() {
        let mut t = Table::new();
        t["name"] = toml_edit::value(target);
        if doc
            .get("target")
            .and_then(Item::as_array_of_tables)
            .is_none()
        {
            doc.insert("target", Item::ArrayOfTables(ArrayOfTables::new()));
        }
        if let Some(a) = doc.get_mut("target").and_then(Item::as_array_of_tables_mut) {
            a.push(t);
        }
    }
    let t = target_mut(doc, target)?;
    if lun_position(t, id).is_some() {
        return Err(format!("{target} already has LUN {id}"));
    }
    if t.get("lun").and_then(Item::as_array_of_tables).is_none() {
        t.insert("lun", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    if let Some(a) = t.get_mut("lun").and_then(Item::as_array_of_tables_mut) {
        a.push(lun);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# the node\n[server]\nlisten = \"127.0.0.1:3260\"\n\n[[target]]\nname = \"iqn.2026-11.io.t:a\" # kept\n\n[[target.lun]]\nid = 0\npath = \"a0.img\"\nsize = \"1GiB\"\n";

    #[test]
    fn add_resize_remove_keep_comments_and_touch_only_their_lun() {
        let add = LunCmd::Add {
            target: "iqn.2026-11.io.t:A".into(),
            id: 1,
            size: "2GiB".into(),
            path: None,
            admin: AdminArgs {
                config: None,
                socket: None,
            },
        };
        let (t, cmd) = edit(FILE, &add).expect("add");
        assert_eq!(cmd, "reload");
        assert!(t.starts_with("# the node\n") && t.contains("# kept"), "{t}");
        assert!(
            t.contains("id = 1")
                && t.contains("size = \"2GiB\"")
                && t.contains("iqn.2026-11.io.t_a-lun1.img"),
            "{t}"
        );
        assert!(edit(&t, &add).is_err(), "LUN 1 exists now");
        let resize = LunCmd::Resize {
            lun: "iqn.2026-11.io.t:a/0".into(),
            size: "3GiB".into(),
            admin: AdminArgs {
                config: None,
                socket: None,
            },
        };
        let (t, _) = edit(&t, &resize).expect("resize");
        assert!(
            t.contains("size = \"3GiB\"") && t.contains("size = \"2GiB\""),
            "{t}"
        );
        let remove = LunCmd::Remove {
            lun: "iqn.2026-11.io.t:a/1".into(),
            force: true,
            admin: AdminArgs {
                config: None,
                socket: None,
            },
        };
        let (t, cmd) = edit(&t, &remove).expect("remove");
        assert_eq!(cmd, "reload-force");
        assert!(!t.contains("id = 1") && t.contains("id = 0"), "{t}");
        let missing = LunCmd::Resize {
            lun: "iqn.2026-11.io.t:a/7".into(),
            size: "1GiB".into(),
            admin: AdminArgs {
                config: None,
                socket: None,
            },
        };
        assert!(edit(&t, &missing).unwrap_err().contains("no LUN 7"));
    }
}
