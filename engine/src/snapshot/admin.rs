//! The admin socket's snapshot commands (one line each; replies start with "ok" or
//! "error", as every admin reply does).

use replica::snapshot::SnapshotName;

use crate::registry::Registry;

/// Runs `snapshot <verb> <args...>` (the words after "snapshot").
pub fn execute(args: &str, reg: &Registry) -> String {
    let words: Vec<&str> = args.split_whitespace().collect();
    let r = match words.as_slice() {
        ["create", group, name] => name_of(name)
            .and_then(|n| super::find_group(reg, group).map(|g| (g, n)))
            .and_then(|(g, n)| super::create(reg, &g, &n)),
        ["list"] => {
            let all: Vec<usize> = (0..reg.luns.len())
                .filter(|&i| reg.luns.get(i).is_some_and(|l| !l.is_removed()))
                .collect();
            Ok(super::list(reg, &all))
        }
        ["list", group] => super::find_group(reg, group).map(|g| super::list(reg, &g)),
        ["delete", lun, name] => name_of(name)
            .and_then(|n| super::find_lun(reg, lun).map(|l| (l, n)))
            .and_then(|(l, n)| super::delete(reg, l, &n)),
        ["rollback", lun, name, rest @ ..] if rest.iter().all(|w| *w == "force") => {
            name_of(name)
                .and_then(|n| super::find_lun(reg, lun).map(|l| (l, n)))
                .and_then(|(l, n)| super::rollback(reg, l, &n, !rest.is_empty()))
        }
        ["apply", lun, path, rest @ ..] if rest.iter().all(|w| *w == "force") => {
            super::find_lun(reg, lun)
                .and_then(|l| {
                    super::apply(reg, l, std::path::Path::new(path), !rest.is_empty())
                        .map_err(|e| e.to_string())
                })
        }
        ["info", lun, name] => name_of(name)
            .and_then(|n| super::find_lun(reg, lun).map(|l| (l, n)))
            .and_then(|(l, n)| super::info(reg, l, &n)),
        _ => Err(format!(
            "unknown snapshot command {args:?} (create GROUP NAME, list [GROUP], delete TARGET/LUN NAME, rollback TARGET/LUN NAME [force], info TARGET/LUN NAME, apply TARGET/LUN FILE [force])"
        )),
    };
    match r {
        Ok(text) => format!("ok\n{text}"),
        Err(e) => format!("error: {e}\n"),
    }
}

fn name_of(s: &str) -> Result<SnapshotName, String> {
    SnapshotName::parse(s).map_err(|e| e.to_string())
}
